# -*- test-case-name: tests.test_tcp -*-
"""
Where the client meant to go: the original destination of a connection that an
iptables C{REDIRECT} sent to the proxy (C{SO_ORIGINAL_DST}, IPv4 and IPv6), and, for
C{--upstream original}, one upstream pool per destination port.

C{REDIRECT} rewrites the destination to the proxy's port; the kernel's connection
tracking keeps the address the client dialled, and C{getsockopt(SOL_IP,
SO_ORIGINAL_DST)} (C{SOL_IPV6, IP6T_SO_ORIGINAL_DST} for IPv6) returns it as a
C{sockaddr_in} / C{sockaddr_in6}.  A connection that was not redirected has no such
entry (C{ENOENT}), or, with connection tracking loaded, an entry equal to the
socket's own local address.
"""

from __future__ import annotations

import socket
import struct
from typing import Any, Dict, Optional, Tuple

import attrs

#: C{linux/netfilter_ipv4.h}: C{SO_ORIGINAL_DST}, on C{SOL_IP}.
SO_ORIGINAL_DST = 80
#: C{linux/netfilter_ipv6/ip6_tables.h}: C{IP6T_SO_ORIGINAL_DST}, on C{SOL_IPV6}.
IP6T_SO_ORIGINAL_DST = 80
SOL_IP = getattr(socket, "SOL_IP", 0)
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)

_SOCKADDR_IN = 16
_SOCKADDR_IN6 = 28


def parseSockaddr(raw: bytes) -> Optional[Tuple[str, int]]:
    """
    C{(host, port)} of a C{sockaddr_in} or C{sockaddr_in6} as the kernel returns it
    (the family in host byte order, the port and address in network order), or
    C{None} for anything else.
    """
    if len(raw) < 2:
        return None
    family = struct.unpack("=H", raw[:2])[0]
    if family == socket.AF_INET and len(raw) >= 8:
        port = struct.unpack("!H", raw[2:4])[0]
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6 and len(raw) >= 24:
        port = struct.unpack("!H", raw[2:4])[0]
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    return None


def originalDestination(sock: Any) -> Optional[Tuple[str, int]]:
    """
    The address a redirected connection was dialled to, or C{None} when the socket
    has none (not redirected, no connection tracking, not a TCP/IP socket).
    """
    family = getattr(sock, "family", None)
    attempts = []
    if family == socket.AF_INET6:
        attempts.append((SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6))
    attempts.append((SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN))
    for level, option, size in attempts:
        try:
            raw = sock.getsockopt(level, option, size)
        except (OSError, AttributeError, TypeError):
            continue
        found = parseSockaddr(raw)
        if found is not None:
            return found
    return None


def _unmapped(host: str) -> str:
    return host[7:] if host.startswith("::ffff:") and "." in host else host


@attrs.frozen
class Destination:
    """
    The destination a client dialled.

    @ivar host: the address.
    @ivar port: the port: the original one after a C{REDIRECT}, else the listener's.
    @ivar redirected: whether an iptables C{REDIRECT} (an original destination other
        than the listener's own address) brought the connection here.
    """

    host: str
    port: int
    redirected: bool


def _socketOf(transport: Any) -> Any:
    """
    The socket under C{transport}, looking through protocol wrappers (TLS).
    """
    for _ in range(4):
        if transport is None:
            return None
        getHandle = getattr(transport, "getHandle", None)
        if getHandle is not None:
            try:
                handle = getHandle()
            except Exception:
                handle = None
            if hasattr(handle, "getsockopt"):
                return handle
        transport = getattr(transport, "transport", None)
    return None


def dialled(transport: Any) -> Destination:
    """
    Where the client of C{transport} meant to go: the original destination after a
    C{REDIRECT}, else the listener's own address.
    """
    local = transport.getHost()
    host, port = _unmapped(getattr(local, "host", "")), getattr(local, "port", 0)
    sock = _socketOf(transport)
    original = originalDestination(sock) if sock is not None else None
    if original is None:
        return Destination(host, port, False)
    originalHost = _unmapped(original[0])
    redirected = (originalHost, original[1]) != (host, port)
    return Destination(originalHost, original[1], redirected)


class PortEngine:
    """
    The engine as the connections to one destination port see it: its own pool,
    everything else (recorder, clock, draining, the doors' registry) the main
    engine's.
    """

    def __init__(self, main: Any, pool: Any, h2pool: Any = None, versions: Any = ()) -> None:
        """
        @param h2pool: the port's HTTP/2 pool (when the sidecar speaks HTTP/2 to
            services), or C{None}.
        @param versions: the request versions that go to C{h2pool} (the main engine's
            C{poolByVersion} keys).
        """
        self._main = main
        self.pool = pool
        self.h2pool = h2pool
        #: As L{sidecar.exchange.Engine.poolByVersion}, with this port's pools (the main
        #: engine's would send HTTP/2 to the configured port, not the one dialled).
        self.poolByVersion = {version: h2pool for version in versions} if h2pool is not None else {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._main, name)

    def exchange(self, *args: Any) -> Any:
        """
        L{sidecar.exchange.Engine.exchange}, with this engine (so with this pool).
        """
        from sidecar.exchange import Engine

        return Engine.exchange(self, *args)  # type: ignore[arg-type]


class OriginalDestinations:
    """
    C{--upstream original}: the upstream pools by the port clients dialled, built
    when a port is first seen, each forwarding to the configured host on that port.

    @ivar pools: the pools by port.
    @ivar engines: a L{PortEngine} per port.
    """

    def __init__(self, reactor: Any, upstream: Any, engine: Any, h2: Any = None) -> None:
        """
        @param h2: the HTTP/2 settings (L{sidecar.config.H2Config}) when the sidecar
            speaks HTTP/2 to services (each port then gets an HTTP/2 pool too, used for
            the request versions the main engine sends over HTTP/2), else C{None}.
        """
        self.reactor = reactor
        self.upstream = upstream
        self.engine = engine
        self.h2 = h2
        self.pools: Dict[int, Any] = {}
        #: The HTTP/2 pools by port (with C{h2}).
        self.h2pools: Dict[int, Any] = {}
        self.engines: Dict[int, PortEngine] = {}

    def engineFor(self, port: int) -> PortEngine:
        """
        The engine whose pool forwards to C{port}.
        """
        engine = self.engines.get(port)
        if engine is None:
            from sidecar.upstream import UpstreamPool

            settings = attrs.evolve(self.upstream, port=port, original=False)
            pool = UpstreamPool(self.reactor, self.reactor, settings)
            self.pools[port] = pool
            h2pool = None
            if self.h2 is not None:
                from sidecar.h2upstream import H2UpstreamPool

                h2pool = self.h2pools[port] = H2UpstreamPool(self.reactor, self.reactor, settings, self.h2)
            engine = self.engines[port] = PortEngine(self.engine, pool, h2pool, tuple(self.engine.poolByVersion))
        return engine

    def totals(self, first: Any) -> PoolTotals:
        """
        The metrics' view of C{first} (the configured upstream's pool) and every
        per-port pool, summed.
        """
        return PoolTotals(lambda: [first, *self.pools.values()])

    def sweep(self) -> None:
        """
        Close idle upstream connections in every pool (for the pool timer).
        """
        for pool in [*self.pools.values(), *self.h2pools.values()]:
            pool.sweep()

    def closeAll(self) -> None:
        """
        Close every pooled connection.
        """
        for pool in [*self.pools.values(), *self.h2pools.values()]:
            pool.closeAll()


class PoolTotals:
    """
    Several upstream pools seen as one by the metrics (the C{sidecar_upstream_*}
    families): the counters and gauges summed, the idle connections and the waiting
    requests as one list each, read when asked.
    """

    def __init__(self, pools: Any) -> None:
        """
        @param pools: returns the pools, now.
        """
        self._pools = pools

    def _sum(self, name: str) -> int:
        return sum(getattr(pool, name) for pool in self._pools())

    def _join(self, name: str) -> list:
        return [item for pool in self._pools() for item in getattr(pool, name)]

    active = property(lambda self: self._sum("active"))
    connecting = property(lambda self: self._sum("connecting"))
    connects = property(lambda self: self._sum("connects"))
    connectFailures = property(lambda self: self._sum("connectFailures"))
    overflows = property(lambda self: self._sum("overflows"))
    idle = property(lambda self: self._join("idle"))
    pending = property(lambda self: self._join("pending"))
