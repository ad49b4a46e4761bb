# -*- test-case-name: tests.test_tcp -*-
"""
Opaque TCP passthrough: what detection does not parse is spliced to the service byte
for byte, observable as one L{TcpRecord} per connection and Istio's TCP metrics.

The timeline of one connection::

  client connects ─ (detection) ─ TcpSplice.connectionMade: client reads paused,
      connect to the service (--connect-timeout)
        ├─ refused / timed out: record UF, close the client (FIN, never a reset)
        └─ connected: the buffered bytes go first, then both transports are tied
           with producers (each pauses the other's reads when its buffer is full)
  either side sends FIN ─ the other side gets FIN (half-close), the other direction
      goes on; when both have, both close
  either side resets ─ the other side is closed (FIN) and the record says UC or DC
  nothing moves for --client-idle-timeout ─ both closed, SI (one sweep a second,
      no timer per connection)

Bytes are counted into the recorder's TCP series as they flow, so that a long
connection shows progress in the metrics before it ends.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import attrs
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableDescriptor, IHalfCloseableProtocol
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()

UPSTREAM_CONNECTION_FAILURE = "UF"
UPSTREAM_CONNECTION_TERMINATION = "UC"
DOWNSTREAM_CONNECTION_TERMINATION = "DC"
NO_ROUTE_FOUND = "NR"
STREAM_IDLE_TIMEOUT = "SI"
UNAUTHORIZED = "RBAC"


@attrs.frozen
class TcpRecord:
    """
    What happened to one opaque TCP connection.  Times are seconds from the reactor's
    clock.

    @ivar startTime: when the connection was handed to the splice (epoch seconds).
    @ivar duration: from C{startTime} until both sides were closed.
    @ivar bytesReceived: bytes received from the client (sent on to the service unless
        the connection was refused).
    @ivar bytesSent: bytes sent to the client (received from the service).
    @ivar upstreamHost: C{host:port} of the service, C{""} when none was chosen.
    @ivar flags: Envoy-style flags joined with C{","} (C{UF}, C{UC}, C{DC}, C{NR},
        C{SI}, C{RBAC}), or C{"-"}.
    @ivar downstreamRemoteAddress: the client's C{host:port}.
    @ivar downstreamPeerPrincipal: the client's SPIFFE id under mutual TLS.
    @ivar mutualTLS: whether the connection came over mutual TLS.
    @ivar detected: how detection chose TCP: C{tcp} (unknown bytes), C{tls}, C{http2},
        C{timeout} (the client said nothing: a server-first protocol), C{declared},
        C{closed} (the client half-closed first), C{nr}.
    @ivar detail: why the connection ended, in words, when it was not a clean close.
    """

    startTime: float
    duration: float
    bytesReceived: int
    bytesSent: int
    upstreamHost: str
    flags: str
    downstreamRemoteAddress: str
    downstreamPeerPrincipal: str = ""
    mutualTLS: bool = False
    detected: str = ""
    detail: str = ""

    @property
    def protocol(self) -> str:
        """
        Istio's C{request_protocol}: always C{tcp}.
        """
        return "tcp"


def _address(peer: Any) -> str:
    host = getattr(peer, "host", None)
    if host is None:
        return "-"
    return f"[{host}]:{peer.port}" if ":" in host else f"{host}:{peer.port}"


class TcpProxy:
    """
    What every splice of one sidecar shares: the reactor, the recorder, the timeouts
    and the open splices (for the idle sweep).

    @ivar splices: the open splices.
    """

    def __init__(self, reactor: Any, recorder: Any, connectTimeout: float,
                 idleTimeout: Optional[float]) -> None:
        self.reactor = reactor
        self.recorder = recorder
        self.connectTimeout = connectTimeout
        self.idleTimeout = idleTimeout
        self.splices: set = set()

    def splice(self, host: str, port: int, detected: str,
               identify: Optional[Callable[[Any], Optional[Tuple[str, bool]]]] = None,
               started: Optional[float] = None) -> TcpSplice:
        """
        A splice of the next client connection to C{host:port}.

        @param identify: under mutual TLS, returns the client's C{(principal,
            allowed)} from its transport (C{None}: no certificate).
        @param started: when the connection was accepted (default: when the splice
            takes it).
        """
        return TcpSplice(self, host, port, detected, identify, started)

    def refusal(self, detail: str) -> Refusal:
        """
        A protocol that records the connection with flag C{NR} and closes it.
        """
        return Refusal(self, detail)

    def sweep(self, now: float) -> None:
        """
        Close the splices on which nothing moved for the idle timeout: one pass about
        once a second, an integer compare per splice, no timer per read.
        """
        timeout = self.idleTimeout
        if timeout is None:
            return
        for splice in list(self.splices):
            if splice.activity != splice.sweptActivity or splice.idleSince is None:
                splice.sweptActivity = splice.activity
                splice.idleSince = now
            elif now - splice.idleSince >= timeout:
                splice.idleTimedOut()


class Refusal(Protocol):
    """
    A connection that has nowhere to go (C{--upstream original} without a redirect):
    logged, recorded with C{NR}, and closed with a FIN.
    """

    def __init__(self, proxy: TcpProxy, detail: str) -> None:
        self.proxy = proxy
        self.detail = detail

    def connectionMade(self) -> None:
        proxy = self.proxy
        now = proxy.reactor.seconds()
        client = _address(self.transport.getPeer())
        log.warn("connection from {client} closed ({flag}): {detail}",
                 client=client, flag=NO_ROUTE_FOUND, detail=self.detail)
        series = proxy.recorder.tcpSeries("-", "", False)
        series.opened += 1
        proxy.recorder.recordTcp(TcpRecord(now, 0.0, 0, 0, "", NO_ROUTE_FOUND, client,
                                           detected="nr", detail=self.detail))
        self.transport.loseConnection()


@implementer(IHalfCloseableProtocol)
class _UpstreamSide(Protocol):
    """
    The service's side of a splice: every event goes to the splice.
    """

    def __init__(self, splice: TcpSplice) -> None:
        self.splice = splice

    def connectionMade(self) -> None:
        self.splice.upstreamConnected(self)

    def dataReceived(self, data: bytes) -> None:
        self.splice.fromUpstream(data)

    def readConnectionLost(self) -> None:
        self.splice.upstreamFinished()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.splice.upstreamLost(reason)


class _UpstreamFactory(ClientFactory):
    noisy = False

    def __init__(self, splice: TcpSplice) -> None:
        self.splice = splice

    def buildProtocol(self, addr: Any) -> _UpstreamSide:
        return _UpstreamSide(self.splice)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.splice.upstreamConnectFailed(reason)


@implementer(IHalfCloseableProtocol)
class TcpSplice(Protocol):
    """
    The client's side of one opaque TCP connection, spliced to a new connection to the
    service.

    @ivar bytesReceived: bytes from the client so far.
    @ivar bytesSent: bytes to the client so far.
    @ivar activity: a counter bumped by every read on either side (for the sweep).
    """

    upstream: Optional[_UpstreamSide] = None
    connector: Any = None

    def __init__(self, proxy: TcpProxy, host: str, port: int, detected: str,
                 identify: Optional[Callable[[Any], Optional[Tuple[str, bool]]]] = None,
                 started: Optional[float] = None) -> None:
        self.proxy = proxy
        self.started = started
        self.host = host
        self.port = port
        self.detected = detected
        self.identify = identify
        self.upstreamHost = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.bytesReceived = 0
        self.bytesSent = 0
        self.activity = 0
        self.sweptActivity = -1
        self.idleSince: Optional[float] = None
        self.flags: List[str] = []
        self.detail = ""
        self.principal = ""
        self.mutualTLS = False
        self._pending: List[bytes] = []
        self._clientFin = False
        self._upstreamFin = False
        self._clientLost = False
        self._upstreamLost = False
        self._recorded = False
        self.series: Any = None

    # -- the client's side -----------------------------------------------------------

    def connectionMade(self) -> None:
        proxy = self.proxy
        self.start = proxy.reactor.seconds() if self.started is None else self.started
        self.clientAddress = _address(self.transport.getPeer())
        self.halfClose = IHalfCloseableDescriptor.providedBy(self.transport)
        allowed = True
        if self.identify is not None:
            self.mutualTLS = True
            identity = self.identify(self.transport)
            if identity is None:
                allowed = False
            else:
                self.principal, allowed = identity
        self.series = proxy.recorder.tcpSeries("-", self.principal, self.mutualTLS)
        self.series.opened += 1
        proxy.splices.add(self)
        if not allowed:
            self._fail(UNAUTHORIZED, "the client's identity is not allowed by --tls-allow")
            return
        self.transport.pauseProducing()
        self.connector = proxy.reactor.connectTCP(self.host, self.port, _UpstreamFactory(self),
                                                  timeout=proxy.connectTimeout)

    def dataReceived(self, data: bytes) -> None:
        n = len(data)
        self.bytesReceived += n
        self.series.received += n
        self.activity += 1
        upstream = self.upstream
        if upstream is not None:
            upstream.transport.write(data)
        elif not self._upstreamLost:
            self._pending.append(data)

    def readConnectionLost(self) -> None:
        """
        The client sent FIN: send FIN to the service once the bytes before it are out.
        """
        self._clientFin = True
        upstream = self.upstream
        if upstream is not None:
            upstream.transport.loseWriteConnection()
            self._closeIfDone()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._clientLost = True
        if not reason.check(ConnectionDone) and not self._upstreamLost and not self._recorded:
            self._flag(DOWNSTREAM_CONNECTION_TERMINATION, f"the client's connection ended: {reason.getErrorMessage()}")
        elif self.upstream is None and not self._upstreamLost:
            self._flag(DOWNSTREAM_CONNECTION_TERMINATION, "the client left before the service answered the connect")
        connector, self.connector = self.connector, None
        if self.upstream is None and connector is not None:
            self._upstreamLost = True
            try:
                connector.stopConnecting()
            except Exception:  # twisted.internet.error.NotConnectingError: it just connected
                pass
        upstream = self.upstream
        if upstream is not None and not self._upstreamLost:
            upstream.transport.loseConnection()
        self._maybeRecord()

    def loseConnection(self) -> None:
        """
        Close both sides gracefully (drain).
        """
        self.transport.loseConnection()
        upstream = self.upstream
        if upstream is not None:
            upstream.transport.loseConnection()

    # -- the service's side ----------------------------------------------------------

    def upstreamConnected(self, upstream: _UpstreamSide) -> None:
        self.connector = None
        if self._clientLost:
            upstream.transport.loseConnection()
            return
        self.upstream = upstream
        out = upstream.transport
        pending, self._pending = self._pending, []
        if pending:
            out.write(b"".join(pending))
        client = self.transport
        client.registerProducer(out, True)
        out.registerProducer(client, True)
        if self._clientFin:
            out.loseWriteConnection()
        else:
            client.resumeProducing()

    def upstreamConnectFailed(self, reason: Failure) -> None:
        self.connector = None
        if self._clientLost:
            self._upstreamLost = True
            self._maybeRecord()
            return
        self._fail(UPSTREAM_CONNECTION_FAILURE, f"connect to {self.upstreamHost} failed: {reason.getErrorMessage()}")

    def fromUpstream(self, data: bytes) -> None:
        n = len(data)
        self.bytesSent += n
        self.series.sent += n
        self.activity += 1
        self.transport.write(data)

    def upstreamFinished(self) -> None:
        """
        The service sent FIN: send FIN to the client (or, over a transport without
        half-close such as TLS, close it once its bytes are out).
        """
        self._upstreamFin = True
        if self.halfClose:
            self.transport.loseWriteConnection()
        else:
            self.transport.loseConnection()
        self._closeIfDone()

    def upstreamLost(self, reason: Failure) -> None:
        self._upstreamLost = True
        if not reason.check(ConnectionDone) and not self._clientLost:
            self._flag(UPSTREAM_CONNECTION_TERMINATION, f"the service's connection ended: {reason.getErrorMessage()}")
        if not self._clientLost:
            self.transport.unregisterProducer()
            self.transport.loseConnection()
        self._maybeRecord()

    # -- ends --------------------------------------------------------------------------

    def idleTimedOut(self) -> None:
        """
        Nothing moved either way for the idle timeout: close both sides.
        """
        self._flag(STREAM_IDLE_TIMEOUT, f"idle for {self.proxy.idleTimeout:g} s")
        self.loseConnection()

    def _closeIfDone(self) -> None:
        if self._clientFin and self._upstreamFin:
            self.loseConnection()

    def _flag(self, flag: str, detail: str) -> None:
        if flag not in self.flags:
            self.flags.append(flag)
            if not self.detail:
                self.detail = detail

    def _fail(self, flag: str, detail: str) -> None:
        self._flag(flag, detail)
        self._upstreamLost = True
        log.warn("TCP connection from {client} closed ({flag}): {detail}",
                 client=self.clientAddress, flag=flag, detail=detail)
        self.transport.loseConnection()

    def _maybeRecord(self) -> None:
        if self._recorded or not (self._clientLost and (self._upstreamLost or self.upstream is None
                                                        and self.connector is None)):
            return
        self._recorded = True
        proxy = self.proxy
        proxy.splices.discard(self)
        proxy.recorder.recordTcp(TcpRecord(
            self.start,
            proxy.reactor.seconds() - self.start,
            self.bytesReceived,
            self.bytesSent,
            self.upstreamHost,
            ",".join(self.flags) if self.flags else "-",
            self.clientAddress,
            self.principal,
            self.mutualTLS,
            self.detected,
            self.detail,
        ))
