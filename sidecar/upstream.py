# -*- test-case-name: tests.test_upstream -*-
"""
The HTTP/1.1 upstream: L{UpstreamConnection} implements the engine's upstream stream
(L{sidecar.exchange.UpstreamStream}) over one persistent connection, framing requests
with L{sidecar.http1} and parsing responses with llhttp (C{httptools});
L{UpstreamPool} implements the engine's pool: it hands connections to exchanges, takes
them back when a response ends cleanly, and closes them when idle too long.
"""

from __future__ import annotations

import re
import socket
from collections import deque
from typing import TYPE_CHECKING, Any, Deque, Dict, List, Optional, Sequence

import httptools
from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer

from sidecar import http1
from sidecar.config import UpstreamConfig
from sidecar.exchange import RESPONDING
from sidecar.headers import responseHead
from sidecar.tcp import SPLICE_MIN, KernelPath, PipeStock, kernelSpliceable
from sidecar.transport import halfClose, prepare

if TYPE_CHECKING:  # pragma: no cover
    from twisted.internet.interfaces import IReactorTCP, IReactorTime

    from sidecar.exchange import Exchange


#: Where a connection stands in the pool.
CONNECTING, ACTIVE, IDLE, CLOSED = "connecting", "active", "idle", "closed"


#: Minor versions of HTTP/1 later than 1, as the byte after "HTTP/1.".
_LATER_MINOR = frozenset(b"23456789")
#: What RFC 9112 4 does not allow in a reason phrase (HTAB, SP, VCHAR, obs-text).
_BAD_REASON = re.compile(b"[\\x00-\\x08\\x0a-\\x1f\\x7f]")

_STOP_HEAD = "head"
_STOP_EXTRA = "extra"
_STOP_ERROR = "error"


def _unregisterProducer(transport: Any) -> None:
    if transport is not None and getattr(transport, "producer", None) is not None:
        transport.unregisterProducer()


class _HeadDone(Exception):
    """
    Raised from the parser's callback to stop after the head of a response that has no
    body whatever its headers say (the answer to a HEAD).
    """


@implementer(IPushProducer)
class UpstreamConnection(Protocol):
    """
    One HTTP/1.1 connection to the service, serving one exchange at a time.

    It is also the producer of the response body: the front door registers it with the
    client's transport, which pauses it when the client reads slowly.

    After a 101 it becomes one end of a tunnel and declares L{IHalfCloseableProtocol}
    (only then: before, the end of the service's stream is the end of the connection,
    as always): a FIN from the service is passed on to the client as a FIN, and the
    client's FIN reaches the service as one (L{finishTunnel}).
    """

    exchange: Optional[Exchange] = None
    #: While the kernel moves the rest of a response body to the client: its path.
    kernelPath: Optional[KernelPath] = None
    #: Over mutual TLS the sidecar originated: the server's L{sidecar.peers.PeerMemory}
    #: (its verified id, and the metadata its responses carry).
    peers: Any = None

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.state = CONNECTING
        #: Reading is paused because the client reads slower than we do.
        self.paused = False
        self.parser: Any = None
        #: The parser ended its last response by itself (not stopped, not bypassed
        #: for a raw body), so it is back at the start of a message and serves the
        #: next one as it is.
        self._parserClean = False
        self.reused = False
        self.idleSince = 0.0
        self.tunnel = False
        self.responseStarted = False
        self._headers: List = []
        self._status = 0
        self._reason = b""
        self._inBody = False
        self._eofBody = False
        self._headOnly = False
        self._abandoned = False
        self._chunked = False
        self._sourceDoor: Any = None
        self._stop: Optional[str] = None
        self._error = ""
        #: Bytes of the response head so far, and its headers (llhttp keeps a partial
        #: header in memory until it ends: the count of bytes fed bounds it).
        self._headBytes = 0
        self._maxHeadBytes = 80 * 1024
        self._maxHeaders = 100
        self._readDone = False
        #: The response's Content-Length (while its body is read), the body bytes the
        #: parser has passed on, and the body bytes still to come that bypass the
        #: parser (L{dataReceived}).
        self._length: Optional[int] = None
        self._bodySeen = 0
        self._raw = 0
        self._keepAlive = True

    # -- the exchange's side (the engine's UpstreamStream) --------------------------

    def sendRequest(self, exchange: Exchange, reused: bool, body: Sequence[bytes], end: bool) -> None:
        """
        Serve C{exchange} (a clean slate: a parser at the start of a message): send its
        head, the body bytes received so far and, when C{end}, the end of the request,
        in one write.
        """
        self.exchange = exchange
        self.reused = reused
        if self._parserClean:
            # The last response ended by the parser's own reading: the state it left
            # (head bytes, body, length, raw bytes) is already back at the start.
            self._parserClean = False
        else:
            self.parser = httptools.HttpResponseParser(self)
            # RFC 9112 2.2: a recipient MAY take a bare LF for a line end.  The head is
            # re-serialised with CRLF, so the client never sees one.
            self.parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True)
            self._headBytes = 0
            self._inBody = False
            self._eofBody = False
            self._length = None
            self._raw = 0
        self.responseStarted = False
        engine = exchange.engine
        self._maxHeadBytes = engine.maxResponseHeaderBytes
        self._maxHeaders = engine.maxResponseHeaders
        self._headOnly = exchange.method == b"HEAD"
        req = exchange.req
        chunked = self._chunked = req.chunked
        parts = [http1.requestHead(exchange.method, req.target, req.headers, req.contentLength, chunked)]
        if chunked:
            for data in body:
                parts += http1.chunk(data)
            if end:
                parts.append(http1.LAST_CHUNK)
        else:
            parts += body
        if len(parts) == 1:
            self.write(parts[0])
        else:
            self.writeSequence(parts)

    def sendBody(self, data: bytes) -> None:
        """
        Request body bytes (framed as the request is), or tunnel bytes after a 101.
        """
        if self._chunked and not self.tunnel:
            self.writeSequence(http1.chunk(data))
        else:
            self.write(data)

    def sendEnd(self) -> None:
        """
        The request body is complete: the last chunk if chunked, and stop pausing the
        client on our behalf.
        """
        if self._chunked:
            self.write(http1.LAST_CHUNK)
        self.requestSent()

    def requestSink(self, exchange: Exchange) -> Any:
        """
        Our socket, when the rest of C{exchange}'s request body may be moved to it by
        the kernel (L{sidecar.downstream.DownstreamProtocol}): a plain TCP connection
        (not mutual TLS originated), a body sent as it came (framed by
        C{Content-Length}, not chunked), C{exchange} the one served.

        @return: the transport, or C{None}.
        """
        transport = self.transport
        if self._chunked or self.tunnel or self.exchange is not exchange or not isinstance(transport, tcp.Connection):
            return None
        return transport

    def streamFrom(self, producer: Any) -> None:
        """
        Let our transport pause C{producer} (the client) while the service reads slower
        than the client sends.
        """
        if self._sourceDoor is None and self.transport is not None:
            self._sourceDoor = producer
            self.transport.registerProducer(producer, True)

    def requestSent(self) -> None:
        """
        The whole request is written: stop pausing the client on our behalf.
        """
        door = self._sourceDoor
        if door is not None:
            self._sourceDoor = None
            if self.transport is not None:
                self.transport.unregisterProducer()
            door.resumeProducing()

    def abandon(self) -> None:
        """
        Close this connection without a word: it will not be reused.
        """
        self.requestSent()
        self._endSplice()
        self._abandoned = True
        self.exchange = None
        self.pool.lost(self)
        if self.transport is not None:
            self.transport.abortConnection()

    # -- the producer of the response body ------------------------------------------

    def pauseProducing(self) -> None:
        self.paused = True
        if self.transport is not None:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        if self.transport is not None:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        # The client's connection is gone.  A tunnel's service gets a FIN, as from
        # Envoy and nginx; an HTTP response cut short can't be reused: abort.
        if self.tunnel:
            self.closeTunnel()
        else:
            self.abandon()

    # -- the transport's side --------------------------------------------------------

    def connectionMade(self) -> None:
        self.write, self.writeSequence = prepare(self.transport)
        self.pool.connected(self)

    def dataReceived(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # Nothing asked: a service talking out of turn.  Don't reuse it.
            self.abandon()
            return
        if self.tunnel:
            exchange.tunnelToClient(data)
            return
        raw = self._raw
        if raw:
            self._rawBody(exchange, data, raw)
            return
        if not self.responseStarted:
            self.responseStarted = True
            if not data.startswith(b"HTTP/1.1 ") or (len(data) > 9 and data[9] == 32):
                data = self._firstRead(data)
                if data is None:
                    return
        inHead = not self._inBody
        if inHead:
            self._headBytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            stop, self._stop = self._stop, None
            if stop == _STOP_HEAD:
                # The head of a HEAD response: complete, whatever Content-Length says.
                self._complete(self.parser.should_keep_alive())
            elif stop == _STOP_EXTRA:
                self.abandon()
            elif stop == _STOP_ERROR:
                self._protocolError(self._error)
            else:
                raise
        except httptools.HttpParserUpgrade as e:
            self._upgraded(data[e.args[0]:])
        except httptools.HttpParserError as e:
            self._protocolError(str(e))
        else:
            if inHead and not self._inBody and self._headBytes > self._maxHeadBytes:
                # A head that has not ended within the limit (one read past it at most).
                self._protocolError("response header section too large")
            length = self._length
            if length is not None and self._inBody and self.exchange is exchange:
                # The rest of a Content-Length body needs no parsing: the next reads
                # go to the client as they are (no copy by the parser, no callback).
                raw = self._raw = length - self._bodySeen
                self._keepAlive = self.parser.should_keep_alive()
                if raw > SPLICE_MIN:
                    self._spliceBody(exchange)
        exchange.upstreamReadDone()

    def _firstRead(self, data: bytes) -> Optional[bytes]:
        """
        The first read of a response whose status line is not the plain
        C{HTTP/1.1 NNN}: refuse what is not HTTP/1.x, and normalise what nginx and
        Envoy accept and llhttp does not.

        @return: the bytes to parse, or C{None} when the response was refused.
        """
        if not data.startswith(b"HTTP/1.") and len(data) >= 7:
            # llhttp takes "HTTP/2.0 200 OK" too; on an HTTP/1.1 connection it is
            # not a response.
            self._protocolError("not an HTTP/1.x status line")
            return None
        if len(data) > 8 and data[7] in _LATER_MINOR and data[8] == 32:
            # "HTTP/1.2 200 OK": RFC 9110 2.5, a later minor version of HTTP/1 is
            # read as the highest one the recipient implements (llhttp refuses it).
            # The status line is re-serialised as HTTP/1.1 anyway.
            data = b"HTTP/1.1" + data[8:]
        if len(data) > 9 and data[9] == 32:
            # "HTTP/1.1  200 OK": more than one space before the status, which nginx
            # and Envoy accept.  The status line is re-serialised, so the extra
            # spaces can go before llhttp (which refuses them) reads it.
            data = data[:9] + data[9:].lstrip(b" ")
        return data

    def _rawBody(self, exchange: Exchange, data: bytes, remaining: int) -> None:
        """
        Bytes of a Content-Length body past the parser: pass them on, and end the
        response with its last byte.  Bytes beyond it are a service talking out of
        turn: the response is complete, the connection is not reused.  (A read that
        ends exactly with the body and filled the read buffer may have left such
        bytes in the socket: they are looked for there.)
        """
        size = len(data)
        if size < remaining:
            self._raw = remaining - size
            exchange.responseBody(data)
        else:
            self._raw = 0
            self._length = None
            self._endSplice()
            exchange.responseBody(data if size == remaining else data[:remaining])
            reusable = self._keepAlive and size == remaining
            if reusable and size == getattr(self.transport, "bufferSize", 0):
                reusable = self._quiet()
            self._complete(reusable)
        exchange.upstreamReadDone()

    # -- the rest of a body, moved by the kernel ----------------------------------------

    def _spliceBody(self, exchange: Exchange) -> None:
        """
        Let the kernel move the rest of this Content-Length body (C{_raw} bytes, as the
        proxy's own parse framed it) from the service's socket to the client's, through
        a pipe (L{KernelPath}), when both are plain TCP and nothing wants to see the
        bytes: no body filter, no response held by a head filter, no gRPC count.  The
        client's door says whether its connection can take them
        (C{bodySink}: the HTTP/1.1 door on plain TCP, a body framed by
        C{Content-Length}).  Otherwise the bytes go through Python as before.
        """
        if (exchange.phase != RESPONDING or exchange.held is not None or exchange.grpc is not None
                or exchange.call is not None and exchange.chain.responseBodies):  # type: ignore[union-attr]
            return
        sink = getattr(exchange.door, "bodySink", None)
        client = sink(exchange) if sink is not None else None
        if client is None or not kernelSpliceable(self.transport, client):
            return
        self.kernelPath = KernelPath(self.transport, client, self._spliced, self._rawLeft, self._pipeEmptied,
                                     self.pool.pipes)

    def _rawLeft(self) -> int:
        return self._raw

    def _spliced(self, size: int) -> None:
        """
        The kernel read C{size} bytes of the body: count them as a read through Python
        is counted (the record's bytes, the stream's activity).
        """
        self._raw -= size
        exchange = self.exchange
        if exchange is not None:
            exchange.responseBodySpliced(size)

    def _pipeEmptied(self) -> None:
        """
        The client's socket took what the pipe held: after the body's last byte, the
        response is complete.
        """
        if not self._raw and self.kernelPath is not None:
            self._endSplice()
            self._length = None
            self._complete(self._keepAlive and self._quiet())

    def _quiet(self) -> bool:
        """
        Whether the service has sent nothing past a body that ended exactly where a
        read did (the kernel's, which never reads beyond the body, or a full one of
        Twisted's): bytes there, or its close, and the connection is not reused, as
        when such bytes come in the read that ends a body.
        """
        sock = getattr(self.transport, "socket", None)
        if sock is None:
            return True
        try:
            sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    def _endSplice(self) -> None:
        """
        Give both sockets back to Twisted and close the pipe.
        """
        path = self.kernelPath
        if path is not None:
            self.kernelPath = None
            path.close()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._endSplice()
        self.pool.lost(self)
        exchange, self.exchange = self.exchange, None
        door, self._sourceDoor = self._sourceDoor, None
        if door is not None:
            door.resumeProducing()
        if exchange is None or self._abandoned:
            return
        if self.tunnel:
            exchange.tunnelUpstreamClosed()
        elif self._eofBody and reason.check(ConnectionDone):
            # A response delimited by the end of the connection ends with a clean close
            # (a reset is a truncation, below).
            exchange.responseComplete(False)
        else:
            exchange.upstreamLost(reason, self.reused, self.responseStarted)

    # -- parser callbacks (llhttp) ---------------------------------------------------

    def on_message_begin(self) -> None:
        if self.exchange is None:
            # A second response to one request: the service is confused; stop here.
            self._stop = _STOP_EXTRA
            raise _HeadDone()
        self._headers = []
        self._reason = b""
        self._length = None
        self._bodySeen = 0

    def on_status(self, reason: bytes) -> None:
        # llhttp may hand a reason split over two reads in two calls.
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._inBody:
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if status < 100 or status > 599:
            self._fail(f"status {status} is not from 100 to 599")
        reason = self._reason
        if reason != b"OK" and _BAD_REASON.search(reason) is not None:
            # llhttp takes a NUL or another control byte in the reason phrase; RFC 9112
            # 4 allows only HTAB, SP, VCHAR and obs-text, and a client reading the
            # line up to the NUL could frame the rest differently.  Envoy answers 502.
            self._fail("control character in the reason phrase")
        headers = self._headers
        if len(headers) > self._maxHeaders:
            self._fail("too many response headers")
        if self._headBytes > self._maxHeadBytes:
            # The reads of this head (and whatever followed it in them) were larger
            # than the limit: measure the head itself.
            size = len(self._reason) + 15 + sum(len(n) + len(v) + 4 for n, v in headers)
            if size > self._maxHeadBytes:
                self._fail("response header section too large")
        self._headBytes = 0
        if status < 200 and status != 101:
            # Interim responses (100, 103) are not forwarded: the proxy answers
            # "Expect: 100-continue" itself.
            return
        if status == 101:
            self._status = status
            return
        self._inBody = True
        exchange = self.exchange
        if exchange is None:
            return
        head = responseHead(self._headers, exchange.engine.serverHeader)
        if head.error is not None:
            self._fail(head.error)
        if self.peers is not None:
            exchange.peer = self.peers.learn(head.peerMetadata)
        if not self._headOnly and status != 204 and status != 304:
            # Neither Content-Length nor chunked: the body runs to the end of the connection.
            self._eofBody = head.contentLength is None and not head.chunked
            self._length = head.contentLength
        exchange.responseHead(status, self._reason, head)
        if self._headOnly:
            self._stop = _STOP_HEAD
            raise _HeadDone()

    def on_body(self, body: bytes) -> None:
        self._bodySeen += len(body)
        exchange = self.exchange
        if exchange is not None:
            exchange.responseBody(body)

    def on_message_complete(self) -> None:
        if not self._inBody:
            return
        self._parserClean = True
        self._complete(self.parser.should_keep_alive())

    # -- the tunnel after a 101 ---------------------------------------------------------

    def readConnectionLost(self) -> None:
        """
        The service half-closed an upgraded connection (a FIN): tell the client the
        same way.
        """
        if self._readDone:
            return
        self._readDone = True
        exchange = self.exchange
        if exchange is not None and self.tunnel:
            exchange.tunnelUpstreamFinished()

    def writeConnectionLost(self) -> None:
        """
        Our FIN to the service is sent; reading goes on.
        """

    def finishTunnel(self) -> None:
        """
        The client will send nothing more: FIN to the service after the bytes already
        buffered, never a reset.
        """
        _unregisterProducer(self.transport)
        if self.transport is not None:
            halfClose(self.transport)

    def closeTunnel(self) -> None:
        """
        The tunnel is over: close gracefully (a FIN after what is buffered).
        """
        self.requestSent()
        self._abandoned = True
        self.exchange = None
        self.pool.lost(self)
        _unregisterProducer(self.transport)
        if self.transport is not None:
            self.transport.loseConnection()

    # -- internals -------------------------------------------------------------------

    def _fail(self, detail: str) -> None:
        """
        Stop llhttp from a callback: the response is malformed (502 C{UPE}).
        """
        self._stop = _STOP_ERROR
        self._error = detail
        raise _HeadDone()

    def _protocolError(self, detail: str) -> None:
        """
        The service sent something that is not a response the proxy can forward: 502
        (or a cut connection if the head was sent), and this connection is closed.
        """
        if self.exchange is not None:
            self.exchange.upstreamProtocolError(detail)
        if self.transport is not None:
            self.transport.abortConnection()

    def _complete(self, keepAlive: bool) -> None:
        self._inBody = False
        self._length = None
        exchange = self.exchange
        if exchange is not None:
            exchange.responseComplete(keepAlive)

    def _upgraded(self, leftover: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        if self._status != 101 or not exchange.req.upgrade:
            # No 101, or a 101 to a request that did not ask to switch protocols.
            exchange.upstreamProtocolError("101 Switching Protocols without an upgrade request"
                                           if self._status == 101 else "upgrade without 101")
            self.transport.abortConnection()
            return
        # Nothing more of the request goes up as HTTP: stop pausing the client for it.
        self.requestSent()
        self.tunnel = True
        alsoProvides(self, IHalfCloseableProtocol)
        exchange.responseHead(101, self._reason, responseHead(self._headers, exchange.engine.serverHeader))
        exchange.upgradeAccepted(leftover)


class _ConnectAttempt(ClientFactory):
    """
    One connect for one exchange; a success joins the pool.
    """

    protocol = UpstreamConnection
    noisy = False

    def __init__(self, pool: UpstreamPool, exchange: Exchange) -> None:
        self.pool = pool
        self.exchange: Optional[Exchange] = exchange
        self.connector: Any = None

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        conn = self.pool.connectionClass(self.pool)
        conn.factory = self  # type: ignore[attr-defined]
        return conn

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.pool.connectFailed()
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            self.pool.attempts.pop(exchange, None)
            exchange.upstreamConnectFailed(reason)


class UpstreamPool:
    """
    Persistent connections to the service, reused across requests and clients.

    Idle connections are kept in a stack (the most recently used first: its peer is the
    least likely to have timed it out).  A connection idle longer than
    C{config.idleTimeout} is closed, by L{sweep} or when it would be taken.

    @ivar address: C{host:port} of the service, for logs and records.
    @ivar active: open connections serving an exchange.
    @ivar connecting: connects under way.
    @ivar connects: successful connects so far.
    @ivar connectFailures: failed connects so far.

    At most C{config.maxConnections} connections are open or opening; past that,
    exchanges wait (at most C{config.maxPending} of them) for one to be released, and
    the next get a 503 with flag C{UO}, as with Envoy's circuit breakers.
    """

    #: The connection protocol (a subclass over mutual TLS the sidecar originates).
    connectionClass = UpstreamConnection

    def __init__(self, reactor: IReactorTCP, clock: IReactorTime, config: UpstreamConfig,
                 wrap: Any = None) -> None:
        """
        @param wrap: wraps each connect's factory (a TLS layer), or C{None}.
        """
        self.reactor = reactor
        self.clock = clock
        self.config = config
        self.wrap = wrap
        self.address = config.address
        self.idle: List[UpstreamConnection] = []
        self.active = 0
        self.connecting = 0
        self.connects = 0
        self.connectFailures = 0
        #: Exchanges waiting for a connection (at C{maxConnections}), oldest first.
        self.pending: Deque[Exchange] = deque()
        #: Requests refused with 503 because C{maxPending} were already waiting.
        self.overflows = 0
        #: The connects under way, by the exchange they are for.
        self.attempts: Dict[Exchange, _ConnectAttempt] = {}
        #: Empty pipes for the bodies its connections splice to clients.
        self.pipes = PipeStock()

    def acquire(self, exchange: Exchange, fresh: bool = False) -> None:
        """
        Give C{exchange} a connection: an idle one at once, or a new one when it
        connects (L{Exchange.upstreamConnected} or L{Exchange.upstreamConnectFailed}).

        @param fresh: don't reuse an idle connection (a retry after a stale one).
        """
        idle = self.idle
        if idle and not fresh:
            deadline = self.clock.seconds() - self.config.idleTimeout
            while idle:
                conn = idle.pop()
                if conn.idleSince >= deadline:
                    conn.state = ACTIVE
                    self.active += 1
                    exchange.upstreamConnected(conn, True)
                    return
                conn.state = CLOSED
                conn.transport.loseConnection()
        if self.active + self.connecting >= self.config.maxConnections:
            # Envoy's circuit breakers: wait for a connection, or overflow.
            if len(self.pending) >= self.config.maxPending:
                self.overflows += 1
                exchange.overflow()
                return
            self.pending.append(exchange)
            return
        self._connect(exchange)

    def _connect(self, exchange: Exchange) -> None:
        self.connecting += 1
        attempt = _ConnectAttempt(self, exchange)
        connector = self.reactor.connectTCP(
            self.config.host, self.config.port, attempt if self.wrap is None else self.wrap(attempt),
            timeout=self.config.connectTimeout
        )
        attempt.connector = connector
        self.attempts[exchange] = attempt

    def _nextWaiting(self) -> Optional[Exchange]:
        pending = self.pending
        while pending:
            exchange = pending.popleft()
            if not exchange.finished:
                return exchange
        return None

    def _capacityFreed(self) -> None:
        """
        A connection slot is free: connect for the exchanges waiting for one.
        """
        while self.pending and self.active + self.connecting < self.config.maxConnections:
            exchange = self._nextWaiting()
            if exchange is not None:
                self._connect(exchange)

    def cancel(self, exchange: Exchange) -> None:
        """
        C{exchange} no longer wants a connection (its client left): stop its wait, or
        the connect under way for it.
        """
        attempt = self.attempts.pop(exchange, None)
        if attempt is not None:
            # Twisted reports a cancelled connect at once, inside disconnect(): the
            # exchange gave up on it and must not hear of it as an upstream failure.
            attempt.exchange = None
            attempt.connector.disconnect()
            return
        try:
            self.pending.remove(exchange)
        except ValueError:
            pass

    def connected(self, conn: UpstreamConnection) -> None:
        """
        A new connection is up: give it to the exchange that asked for it.
        """
        self.connecting -= 1
        self.connects += 1
        self.active += 1
        conn.state = ACTIVE
        attempt = conn.factory  # type: ignore[attr-defined]
        exchange, attempt.exchange = attempt.exchange, None
        if exchange is not None:
            self.attempts.pop(exchange, None)
        if exchange is None or exchange.finished:
            self.release(conn)
            return
        exchange.upstreamConnected(conn, False)

    def connectFailed(self) -> None:
        """
        A connect attempt failed (or was cancelled).
        """
        self.connecting -= 1
        self.connectFailures += 1
        self._capacityFreed()

    def release(self, conn: UpstreamConnection) -> None:
        """
        An exchange is done with C{conn} and it may serve another.
        """
        conn.exchange = None
        if conn.state != ACTIVE:
            return
        if conn.paused:
            # The client's transport paused us during the response's last read; an idle
            # connection must read, or it would miss the service closing it.
            conn.resumeProducing()
        if self.pending and conn.transport is not None:
            waiting = self._nextWaiting()
            if waiting is not None:
                waiting.upstreamConnected(conn, True)
                return
        self.active -= 1
        if conn.transport is None or len(self.idle) >= self.config.idleLimit:
            conn.state = CLOSED
            conn.abandon()
            return
        conn.state = IDLE
        conn.idleSince = self.clock.seconds()
        self.idle.append(conn)

    def lost(self, conn: UpstreamConnection) -> None:
        """
        C{conn} closed: forget it, wherever it was.
        """
        if conn.state == IDLE:
            self.idle.remove(conn)
        elif conn.state == ACTIVE:
            self.active -= 1
            conn.state = CLOSED
            self._capacityFreed()
        conn.state = CLOSED

    def sweep(self) -> None:
        """
        Close the idle connections that have been idle too long, and the pipes kept
        that no body used since the last sweep.
        """
        self.pipes.trim()
        deadline = self.clock.seconds() - self.config.idleTimeout
        keep = []
        for conn in self.idle:
            if conn.idleSince >= deadline:
                keep.append(conn)
            else:
                conn.state = CLOSED
                conn.transport.loseConnection()
        self.idle[:] = keep

    def closeAll(self) -> None:
        """
        Close every idle connection (at shutdown), and the pipes kept.
        """
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.state = CLOSED
            conn.transport.loseConnection()
        self.pipes.close()
