# -*- test-case-name: tests.test_accesslog -*-
"""
What one exchange leaves behind: the immutable L{Record} and Envoy's response flags.

The recorder, the access log, the metrics and drain import only this module, never
the engine.
"""

from __future__ import annotations

from typing import Optional

import attrs

# Response flags, as Envoy names them.
UPSTREAM_CONNECT_FAILURE = "UF"
UPSTREAM_CONNECTION_TERMINATION = "UC"
UPSTREAM_REQUEST_TIMEOUT = "UT"
UPSTREAM_PROTOCOL_ERROR = "UPE"
DOWNSTREAM_CONNECTION_TERMINATION = "DC"
DOWNSTREAM_PROTOCOL_ERROR = "DPE"
UNAUTHORIZED = "RBAC"
UPSTREAM_OVERFLOW = "UO"
#: No configured route matched the request (404).
NO_ROUTE_FOUND = "NR"
#: The route's retries were used up and the last failure went to the client.
UPSTREAM_RETRY_LIMIT_EXCEEDED = "URX"


@attrs.frozen
class Record:
    """
    What happened to one request.  Times are seconds from the reactor's clock.

    @ivar startTime: when the request head arrived (epoch seconds).
    @ivar duration: from C{startTime} to the last byte sent (or the end of the exchange).
    @ivar upstreamServiceTime: from the request being sent upstream to the response head,
        or C{None} when the upstream never answered.
    @ivar bytesReceived: request body bytes received from the client (decoded, so chunked
        bodies count their data only; for an upgraded stream, the client's bytes).
    @ivar bytesSent: response body bytes sent to the client (the same way).
    @ivar status: the status sent to the client, C{0} when none was sent.
    @ivar flags: Envoy-style response flags joined with C{","}, or C{"-"}.
    """

    startTime: float
    duration: float
    upstreamServiceTime: Optional[float]
    bytesReceived: int
    bytesSent: int
    status: int
    method: str
    path: str
    protocol: str
    authority: str
    upstreamHost: str
    flags: str
    requestId: str
    forwardedFor: str
    userAgent: str
    downstreamRemoteAddress: str
    downstreamPeerPrincipal: str = ""
    mutualTLS: bool = False
