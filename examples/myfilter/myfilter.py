"""
An example sidecar filter, installed with pip and enabled by name.

Requests must carry one of the configured API keys in ``X-Api-Key`` (else 401); the key
never reaches the service, which gets ``X-Api-Client`` (the key's index) instead, and
every response says ``X-Greeting``.
"""

from __future__ import annotations

from typing import List, Optional

import attrs

from sidecar.filters import Call, Filter


@attrs.frozen
class Config:
    """
    The ``config:`` mapping of the filter in the configuration file (checked by the
    sidecar: an unknown key or a wrong type is a one-sentence error naming it).
    """

    greeting: str = "hello"
    apiKeys: List[str] = attrs.field(factory=list)


class MyFilter(Filter):
    name = "myfilter"
    Config = Config

    def __init__(self, config: Config) -> None:
        self.greeting = config.greeting.encode("ascii")
        self.keys = {key.encode("ascii"): index for index, key in enumerate(config.apiKeys)}

    @classmethod
    def fromConfig(cls, config: Config, context: object) -> "MyFilter":
        return cls(config)

    def requestHead(self, call: Call) -> None:
        key: Optional[bytes] = call.header(b"x-api-key")
        call.removeHeader(b"x-api-key")
        call.removeHeader(b"x-api-client")  # never trust a client's copy
        if self.keys and key not in self.keys:
            return call.respond(401, b"a valid X-Api-Key is needed\n", flag="UAEX")
        if key is not None:
            call.setHeader(b"x-api-client", b"%d" % self.keys[key])
        return None

    def responseHead(self, call: Call) -> None:
        call.responseHeaders.append((b"x-greeting", self.greeting))
