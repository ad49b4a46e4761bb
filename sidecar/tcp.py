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

While both sides are plain TCP sockets (no TLS layer) the bytes are moved by the
kernel (L{KernelPath}): C{splice(2)} from one socket into a pipe and from the pipe
into the other socket, never copied into Python, the pipe's fill playing the part of
the write buffer for backpressure.  Whenever Twisted holds bytes or a close for the
destination (the bytes sent before the connect, a half-close) a read takes Twisted's
own path, so the order of bytes and FINs is always Twisted's.
"""

from __future__ import annotations

import os
from typing import Any, Callable, List, Optional, Tuple

from twisted.internet import main, tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IHalfCloseableDescriptor, IHalfCloseableProtocol, IHandshakeListener, ISSLTransport,
)
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sidecar.compat import writeQueueEmpty
from sidecar.logs import WarningLimit
from sidecar.record import (
    DOWNSTREAM_CONNECTION_TERMINATION, NO_ROUTE_FOUND, STREAM_IDLE_TIMEOUT, UNAUTHORIZED, UPSTREAM_CONNECT_FAILURE,
    UPSTREAM_CONNECTION_TERMINATION, TcpRecord,
)
from sidecar.transport import BUFFER_SIZE

log = Logger()

#: Envoy's response flags, as the HTTP records use them (L{sidecar.record}).
UPSTREAM_CONNECTION_FAILURE = UPSTREAM_CONNECT_FAILURE


def _close(transport: Any) -> None:
    """
    Close C{transport} once its bytes are out.  A TLS layer waits for its producer to
    be unregistered before it sends C{close_notify}, and the splice's producer (the
    other side) stays registered, so it is let go first.
    """
    transport.unregisterProducer()
    transport.loseConnection()


def _halfCloses(transport: Any) -> bool:
    """
    Whether C{transport} passes a FIN on by itself: plain TCP does; a TLS layer (which
    claims its TCP transport's interfaces) does not.
    """
    return IHalfCloseableDescriptor.providedBy(transport) and not ISSLTransport.providedBy(transport)


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
        #: The splices' failure warnings, a few per second of each kind at most.
        self.warnings = WarningLimit(reactor, log)

    def splice(self, host: str, port: int, detected: str,
               identify: Optional[Callable[[Any], Optional[Tuple[str, bool]]]] = None,
               started: Optional[float] = None, origination: Any = None,
               direction: str = "inbound") -> TcpSplice:
        """
        A splice of the next client connection to C{host:port}.

        @param identify: under mutual TLS, returns the client's C{(principal,
            allowed)} from its transport (C{None}: no certificate).
        @param started: when the connection was accepted (default: when the splice
            takes it).
        @param origination: mutual TLS to originate to the service (an
            L{sidecar.outbound.Origination}: C{wrap(factory)} and
            C{verify(transport)}), or C{None} for plain TCP.
        @param direction: C{inbound} or C{outbound}, for the record and metrics.
        """
        splice = TcpSplice(self, host, port, detected, identify, started)
        splice.direction = direction
        if origination is not None:
            splice.origination = origination
            splice.mutualTLS = True
        return splice

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
        proxy.warnings.warn("connection from {client} closed ({flag}): {detail}",
                            client=client, flag=NO_ROUTE_FOUND, detail=self.detail)
        series = proxy.recorder.tcpSeries("-", "", False)
        series.opened += 1
        proxy.recorder.downstreamConnectionsTotal += 1
        proxy.recorder.recordTcp(TcpRecord(now, 0.0, 0, 0, "", NO_ROUTE_FOUND, client,
                                           detected="nr", detail=self.detail))
        self.transport.loseConnection()


#: The pipe of one direction of a kernel splice, and the most moved per read: 1 MiB
#: (Linux's default C{/proc/sys/fs/pipe-max-size}); a pipe that cannot be made so large
#: keeps the kernel's default (64 KiB).
PIPE_BYTES = 1 << 20

#: An HTTP body framed by C{Content-Length} is moved by the kernel (a bounded
#: L{KernelPath}) only when more than this remains after the read that ended its head:
#: more than one read's worth.  Below it, a pipe costs more than the copies it saves.
SPLICE_MIN = BUFFER_SIZE

#: The most empty pipes a L{PipeStock} keeps for the next path.
PIPE_STOCK = 16

try:
    import fcntl
except ImportError:  # pragma: no cover (not POSIX: no splice either)
    fcntl = None  # type: ignore[assignment]

_SPLICE = getattr(os, "splice", None)
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
#: C{fcntl.F_SETPIPE_SZ} (Linux's number where Python's C{fcntl} does not name it).
_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def _pipe(full: bool = False) -> Tuple[int, int]:
    """
    A non-blocking pipe of L{PIPE_BYTES}, or of the kernel's default size when it
    cannot be made so large (over C{pipe-user-pages-soft}, or a smaller
    C{pipe-max-size}).

    @param full: raise L{OSError} rather than give a smaller pipe.
    """
    read, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(write, _SETPIPE_SZ, PIPE_BYTES)
    except OSError:
        if full:
            os.close(read)
            os.close(write)
            raise
    return read, write


class PipeStock:
    """
    Empty pipes kept for the next L{KernelPath} (making one, at its size, and closing
    it cost four system calls: a twentieth of what a 1 MiB body costs to move), at
    most L{PIPE_STOCK}.

    Its pipes are all of L{PIPE_BYTES}: a smaller pipe moves a body in more, smaller
    splices, which measured worse than copying through Python (8 KiB, what a user over
    C{pipe-user-pages-soft} gets) or barely better (256 KiB).  When the kernel won't
    make one that large, L{take} fails and the body takes Twisted's path.
    """

    def __init__(self) -> None:
        self.pipes: List[Tuple[int, int]] = []
        #: How many of the pipes kept no path has taken since the last L{trim}.
        self.unused = 0

    def take(self) -> Tuple[int, int]:
        """
        An empty pipe, kept or new (raises L{OSError} when out of descriptors or
        when the kernel won't make it of L{PIPE_BYTES}).
        """
        pipes = self.pipes
        if pipes:
            pipe = pipes.pop()
            if len(pipes) < self.unused:
                self.unused = len(pipes)
            return pipe
        self.unused = 0
        return _pipe(full=True)

    def trim(self) -> None:
        """
        Close the pipes that no path took since the last trim (called by the pool's
        idle sweep): a pool that no longer splices holds no pipe, and its pipes' pages
        do not count against C{pipe-user-pages-soft} for nothing.
        """
        pipes = self.pipes
        for _ in range(min(self.unused, len(pipes))):
            read, write = pipes.pop(0)
            os.close(read)
            os.close(write)
        self.unused = len(pipes)

    def give(self, pipe: Tuple[int, int]) -> None:
        """
        Keep C{pipe}, which is empty, or close it if enough are kept.
        """
        if len(self.pipes) < PIPE_STOCK:
            self.pipes.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def close(self) -> None:
        """
        Close every pipe kept.
        """
        pipes, self.pipes = self.pipes, []
        self.unused = 0
        for read, write in pipes:
            os.close(read)
            os.close(write)


def kernelSpliceable(one: Any, other: Any) -> bool:
    """
    Whether two transports are both plain TCP connections (not a TLS layer, not a test
    transport) on a system with C{os.splice}.
    """
    return _SPLICE is not None and isinstance(one, tcp.Connection) and isinstance(other, tcp.Connection)


class KernelPath:
    """
    One direction of a splice between two plain TCP transports, moved by the kernel:
    C{source} socket → pipe → C{destination} socket.

    It takes the place of C{source.doRead} and C{destination.doWrite} (instance
    attributes; the reactor calls them as before).  A read moves what the socket holds
    into the empty pipe and as much as the destination takes out of it; what it does
    not take pauses the source's reads and waits for the destination to be writable,
    so at most one pipe (L{PIPE_BYTES}) is held per direction.  A read while Twisted
    holds bytes or a close for the destination, or once it is gone, is Twisted's own
    (C{dataReceived}, C{write}), so order and half-close are Twisted's.  End of stream
    and errors are returned to the reactor as C{doRead} returns them (so a FIN is a
    half-close).  A destination that fails a splice gets the bytes through its own
    C{write}, which meets the error and closes the connection as Twisted does.

    A bounded path (C{limit}) moves one stretch of a stream, such as the rest of an
    HTTP body framed by C{Content-Length} (L{sidecar.upstream}): the kernel never
    reads past what C{limit} allows, and C{emptied} hears each time the pipe has
    been emptied into the destination, so that its owner can end the stretch once
    nothing is left to move.

    @ivar pending: bytes in the pipe, not yet taken by the destination.
    @ivar moved: bytes read by the kernel's path so far (not Twisted's).
    """

    pending = 0
    moved = 0
    _pipe: Optional[Tuple[int, int]] = None
    _paused = False
    #: A bounded path that could get no pipe: its reads are all Twisted's.
    _pipeless = False

    def __init__(self, source: tcp.Connection, destination: tcp.Connection,
                 count: Callable[[int], None], limit: Optional[Callable[[], int]] = None,
                 emptied: Optional[Callable[[], None]] = None, stock: Optional[PipeStock] = None) -> None:
        """
        @param count: called with the number of bytes of every read (the counters).
        @param limit: returns the most the kernel may read from C{source} now
            (C{None}: no limit).
        @param emptied: called each time the bytes of a read have all been taken by
            the destination.
        @param stock: where the pipe comes from and, empty, goes back to; C{None}:
            a pipe of its own.
        """
        self.source = source
        self.destination = destination
        self.count = count
        self.limit = limit
        self.emptied = emptied
        self.stock = stock
        self._sourceFd = source.socket.fileno()
        self._destinationFd = destination.socket.fileno()
        self._idle = writeQueueEmpty(destination)
        self._twistedRead = source.doRead
        self._twistedWrite = destination.doWrite
        source.doRead = self.doRead  # type: ignore[method-assign]
        destination.doWrite = self.doWrite  # type: ignore[method-assign]

    def doRead(self) -> Any:
        if self.pending:
            return None
        if not self._idle():
            return self._twistedRead()
        pipe = self._pipe
        if pipe is None:
            if self._pipeless:
                return self._twistedRead()
            try:
                pipe = self._pipe = _pipe() if self.stock is None else self.stock.take()
            except OSError:
                # Out of descriptors (or no full-size pipe for a stock's path):
                # Twisted's way for this read, and for all of a bounded stretch.
                self._pipeless = self.limit is not None
                return self._twistedRead()
        size = PIPE_BYTES
        limit = self.limit
        if limit is not None:
            size = min(size, limit())
            if size <= 0:
                # Nothing more is the kernel's to move: whatever comes is Twisted's.
                return self._twistedRead()
        try:
            n = _SPLICE(self._sourceFd, pipe[1], size, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return None
        except OSError:
            return main.CONNECTION_LOST
        if not n:
            return main.CONNECTION_DONE
        self.count(n)
        self.moved += n
        self.pending = n
        self._flush()
        return None

    def doWrite(self) -> Any:
        if self.pending:
            self._flush()
            if self.pending:
                return None
        return self._twistedWrite()

    def _flush(self) -> None:
        pending = self.pending
        read = self._pipe[0]  # type: ignore[index]
        try:
            while pending:
                pending -= _SPLICE(read, self._destinationFd, pending, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            pass
        except OSError:
            chunks = []
            while pending:
                chunk = os.read(read, pending)
                pending -= len(chunk)
                chunks.append(chunk)
            self.pending = 0
            self._resume()
            self.destination.write(b"".join(chunks))
            if self.emptied is not None:
                self.emptied()
            return
        self.pending = pending
        if pending:
            if not self._paused:
                self._paused = True
                self.source.stopReading()
            self.destination.startWriting()
        else:
            self._resume()
            if self.emptied is not None:
                self.emptied()

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            if self.source.connected and not self.source.disconnecting:
                self.source.startReading()

    def close(self) -> None:
        """
        Give both transports back their own methods and close the pipe.
        """
        for transport, name in ((self.source, "doRead"), (self.destination, "doWrite")):
            if name in vars(transport):
                delattr(transport, name)
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            if self.stock is not None and not self.pending:
                self.stock.give(pipe)
            else:
                os.close(pipe[0])
                os.close(pipe[1])
        self.pending = 0


@implementer(IHalfCloseableProtocol)
class _UpstreamSide(Protocol):
    #: The transport passes a FIN on by itself (plain TCP; TLS has no half-close).
    halfClose = True

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


@implementer(IHandshakeListener)
class _VerifiedUpstreamSide(_UpstreamSide):
    """
    The service's side of a splice over mutual TLS the sidecar originated: the splice
    hears of it once the handshake is over and the server's SPIFFE id is the one
    expected; until then nothing of the client's is sent.
    """

    halfClose = False
    _verified = False

    def connectionMade(self) -> None:
        pass

    def handshakeCompleted(self) -> None:
        splice = self.splice
        principal, problem = splice.origination.verify(self.transport)
        if problem is not None:
            self.problem = problem
            self.transport.abortConnection()
            return
        self._verified = True
        splice.verified(principal)
        splice.upstreamConnected(self)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if self._verified:
            self.splice.upstreamLost(reason)
            return
        problem = getattr(self, "problem", None)
        self.splice.upstreamConnectFailed(
            reason if problem is None else Failure(ConnectionDone(f"mutual TLS refused: {problem}")))


class _UpstreamFactory(ClientFactory):
    noisy = False

    def __init__(self, splice: TcpSplice) -> None:
        self.splice = splice

    def buildProtocol(self, addr: Any) -> _UpstreamSide:
        if self.splice.origination is not None:
            return _VerifiedUpstreamSide(self.splice)
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
    origination: Any = None
    direction = "inbound"
    peer: Any = None

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
        self.kernelPaths: Tuple[KernelPath, ...] = ()

    # -- the client's side -----------------------------------------------------------

    def connectionMade(self) -> None:
        proxy = self.proxy
        self.start = proxy.reactor.seconds() if self.started is None else self.started
        self.clientAddress = _address(self.transport.getPeer())
        self.halfClose = _halfCloses(self.transport)
        allowed = True
        if self.identify is not None:
            self.mutualTLS = True
            identity = self.identify(self.transport)
            if identity is None:
                allowed = False
            else:
                self.principal, allowed = identity
        recorder = proxy.recorder
        self.series = recorder.tcpSeries("-", self.principal, self.mutualTLS, self.direction)
        self.series.opened += 1
        # A client connection as the doors' are (Envoy's listener counts every one).
        recorder.downstreamConnectionsActive += 1
        recorder.downstreamConnectionsTotal += 1
        proxy.splices.add(self)
        if not allowed:
            self._fail(UNAUTHORIZED, "the client's identity is not allowed by --tls-allow")
            return
        self.transport.pauseProducing()
        factory: Any = _UpstreamFactory(self)
        if self.origination is not None:
            factory = self.origination.wrap(factory)
        self.connector = proxy.reactor.connectTCP(self.host, self.port, factory, timeout=proxy.connectTimeout)

    def verified(self, principal: str) -> None:
        """
        The mutual TLS the sidecar originated is up with a server whose SPIFFE id is
        C{principal}: count this connection under the destination's labels from now on
        (what was counted before moves with it).
        """
        from sidecar.peers import fromPrincipal

        self.peer = fromPrincipal(principal)
        old = self.series
        new = self.series = self.proxy.recorder.tcpSeries("-", self.principal, self.mutualTLS, self.direction,
                                                          self.peer)
        old.opened -= 1
        new.opened += 1
        old.received -= self.bytesReceived
        new.received += self.bytesReceived

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
            if upstream.halfClose:
                upstream.transport.loseWriteConnection()
            else:
                # TLS has no half-close: close once the client's bytes are out.
                _close(upstream.transport)
            self._closeIfDone()
        elif self._upstreamLost:
            # Refused (L{_fail}): our FIN went out, now the client's came.
            self.transport.loseConnection()

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
        _close(self.transport)
        upstream = self.upstream
        if upstream is not None:
            _close(upstream.transport)

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
        for transport in (client, out):
            if isinstance(transport, tcp.Connection):
                # As Envoy's tcp_proxy: no Nagle delay on a request/answer protocol.
                try:
                    transport.setTcpNoDelay(True)
                except OSError:
                    pass
                transport.bufferSize = BUFFER_SIZE
        if kernelSpliceable(client, out):
            self.kernelPaths = (KernelPath(client, out, self._countReceived),
                                KernelPath(out, client, self._countSent))
        if self._clientFin:
            if upstream.halfClose:
                out.loseWriteConnection()
            else:
                _close(out)
        else:
            client.resumeProducing()

    def _countReceived(self, n: int) -> None:
        self.bytesReceived += n
        self.series.received += n
        self.activity += 1

    def _countSent(self, n: int) -> None:
        self.bytesSent += n
        self.series.sent += n
        self.activity += 1

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
            _close(self.transport)
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
        self.proxy.warnings.warn("TCP connection from {client} closed ({flag}): {detail}",
                                 client=self.clientAddress, flag=flag, detail=detail)
        transport = self.transport
        if self.halfClose and not self._clientFin:
            # Closing a socket whose client bytes were not all read makes the kernel
            # send a reset: send a FIN instead, read (and drop) what the client still
            # sends, and close when it closes (or when the idle sweep says so).
            self._pending = []
            transport.resumeProducing()
            transport.loseWriteConnection()
        else:
            transport.loseConnection()

    def _maybeRecord(self) -> None:
        if self._recorded or not (self._clientLost and (self._upstreamLost or self.upstream is None
                                                        and self.connector is None)):
            return
        self._recorded = True
        paths, self.kernelPaths = self.kernelPaths, ()
        for path in paths:
            path.close()
        proxy = self.proxy
        proxy.splices.discard(self)
        proxy.recorder.downstreamConnectionsActive -= 1
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
            self.direction,
            self.peer,
        ))
