# -*- test-case-name: tests.test_tap -*-
"""
Frozen value objects for the whole configuration.  No Twisted imports here: the
configuration is plain data, built by L{sidecar.tap} and read by everything else.
"""

from __future__ import annotations

from typing import Optional, Tuple

import attrs

LOG_FORMATS = ("seed", "text", "json")
ENGINES = ("fast", "web")


@attrs.frozen
class UpstreamConfig:
    """
    Where the service lives and how the pool treats its connections.

    @ivar host: the service's address, normally C{127.0.0.1}.
    @ivar port: the service's port.
    @ivar connectTimeout: seconds allowed for a TCP connect.
    @ivar responseTimeout: seconds from sending a request to the response head; C{None}
        means no limit.
    @ivar idleTimeout: seconds an idle pooled connection is kept; below the usual
        keep-alive of servers (Node 5 s, nginx 75 s) so that we close before they do.
    @ivar maxIdle: how many idle connections the pool keeps at most.
    """

    host: str = "127.0.0.1"
    port: int = 80
    connectTimeout: float = 5.0
    responseTimeout: Optional[float] = 60.0
    idleTimeout: float = 4.0
    maxIdle: int = 128

    @property
    def address(self) -> str:
        """
        C{host:port}, as the access log and metrics show it.
        """
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@attrs.frozen
class ProxyConfig:
    """
    The effective configuration of one sidecar process.

    @ivar listen: a Twisted server endpoint string for the plain listener, or C{None}.
    @ivar upstream: the upstream settings.
    @ivar serverHeader: the C{Server} header put on every response.
    @ivar accessLog: C{"-"} for stdout, a path, or C{None} for no access log.
    @ivar logFormat: one of L{LOG_FORMATS}.
    @ivar engine: C{"fast"} (the llhttp front door) or C{"web"} (twisted.web).
    @ivar admin: a Twisted server endpoint string for the admin site, or C{None}.
    @ivar maxHeaderBytes: the largest request head accepted (431 beyond).
    """

    listen: Optional[str] = "tcp:8000"
    upstream: UpstreamConfig = UpstreamConfig()
    serverHeader: str = "amazing-proxy"
    accessLog: Optional[str] = "-"
    logFormat: str = "text"
    engine: str = "fast"
    admin: Optional[str] = "tcp:15000"
    maxHeaderBytes: int = 64 * 1024
    extra: Tuple[Tuple[str, str], ...] = ()
