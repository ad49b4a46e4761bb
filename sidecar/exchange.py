# -*- test-case-name: tests.test_exchange -*-
"""
One request/response pair in flight, and the immutable record it leaves behind.

An L{Exchange} sits between a front door (anything with the L{Door} methods: the fast
L{sidecar.downstream.DownstreamProtocol} or the twisted.web adapter in
L{sidecar.resource}) and an upstream connection from the L{sidecar.upstream.UpstreamPool}.
It owns the timing, the byte counts, the response flags and the backpressure between the
two sides, and hands exactly one L{Record} to the recorder when it ends, however it ends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional, Protocol

import attrs
from twisted.logger import Logger

from sidecar.headers import RequestHead, ResponseHead

if TYPE_CHECKING:  # pragma: no cover
    from twisted.internet.interfaces import IReactorTime
    from twisted.python.failure import Failure

    from sidecar.stats import Recorder
    from sidecar.upstream import UpstreamConnection, UpstreamPool

log = Logger()

#: Methods that may be sent again on a fresh connection when a pooled one turns out to
#: have been closed by the service (RFC 9110 9.2.2), provided the request has no body.
IDEMPOTENT = frozenset([b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"])

#: Request body bytes kept while the upstream connection is not there yet; past this the
#: client is paused.
PENDING_LIMIT = 64 * 1024

# Response flags, as Envoy names them.
UPSTREAM_CONNECT_FAILURE = "UF"
UPSTREAM_CONNECTION_TERMINATION = "UC"
UPSTREAM_REQUEST_TIMEOUT = "UT"
UPSTREAM_PROTOCOL_ERROR = "UPE"
DOWNSTREAM_CONNECTION_TERMINATION = "DC"
DOWNSTREAM_PROTOCOL_ERROR = "DPE"
UNAUTHORIZED = "RBAC"
UPSTREAM_OVERFLOW = "UO"
STREAM_IDLE_TIMEOUT = "SI"

#: Which ends of a tunnel have sent their FIN (L{Exchange.tunnelEnds}).
_CLIENT_FIN = 1
_SERVICE_FIN = 2


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


class Door(Protocol):
    """
    What an L{Exchange} needs of the front door it came through.
    """

    clientAddress: str
    peerPrincipal: str
    mutualTLS: bool

    def writeInterim(self, data: bytes) -> None:
        """Send an interim response (C{100 Continue}) to the client."""

    def flush(self) -> None:
        """The upstream's read is over: send anything held back."""

    def startResponse(self, exchange: Exchange, status: int, reason: bytes, head: ResponseHead) -> None:
        """Send the response head to the client."""

    def writeBody(self, data: bytes) -> None:
        """Send response body bytes to the client."""

    def finishResponse(self, exchange: Exchange) -> None:
        """The response is complete."""

    def abortResponse(self, exchange: Exchange) -> None:
        """The response cannot be completed: close the client's connection."""

    def localReply(self, exchange: Exchange, status: int, body: bytes) -> None:
        """Send a response made by the proxy itself."""

    def startTunnel(self, exchange: Exchange, conn: UpstreamConnection) -> None:
        """Splice the client and C{conn} after a 101."""

    def finishTunnel(self, exchange: Exchange) -> None:
        """The service sent its FIN on the tunnel: send a FIN to the client once its
        bytes are written (a half-close), and keep reading from it."""

    def closeTunnel(self, exchange: Exchange) -> None:
        """The tunnel is over: close the client's connection once its bytes are
        written."""

    def pauseReading(self) -> None:
        """Stop reading from the client until L{resumeReading}."""

    def resumeReading(self) -> None:
        """Read from the client again."""


@attrs.define(slots=True, eq=False)
class Engine:
    """
    What every exchange of one sidecar shares: the pool, the recorder, the clock and the
    settings.  Built once by L{sidecar.service}.
    """

    clock: IReactorTime
    pool: UpstreamPool
    recorder: Recorder
    serverHeader: bytes = b"amazing-proxy"
    responseTimeout: Optional[float] = 60.0
    #: Envoy's C{stream_idle_timeout}: an exchange with no byte either way for this long
    #: ends (flag C{SI}); C{None}: never.  Checked by L{sweepStreams}.
    streamIdleTimeout: Optional[float] = 300.0
    #: The largest response head, and the most headers in it (Envoy's 80 KiB and 100).
    maxResponseHeaderBytes: int = 80 * 1024
    maxResponseHeaders: int = 100
    #: Draining: every response says C{Connection: close} so clients move away.
    draining: bool = False
    #: The fast door's open client connections (for timeouts and drain).
    doors: set = attrs.field(factory=set)
    #: The exchanges that have begun and not ended, of every door (for
    #: L{sweepStreams}).
    streams: set = attrs.field(factory=set)

    def exchange(self, door: Door, method: bytes, target: bytes, version: str, req: RequestHead) -> Exchange:
        """
        Start timing a new exchange for a request whose head has just arrived.
        """
        self.recorder.requestsActive += 1
        return Exchange(self, door, method, target, version, req, self.clock.seconds())

    def sweepStreams(self, now: float) -> None:
        """
        End the exchanges that have seen no byte either way for L{streamIdleTimeout}.

        Called about once a second (by the service's client sweep): each exchange
        counts its activity, and this pass notes when the count last moved, so that no
        timer is scheduled or cancelled per request.  A stall is noticed between the
        timeout and a second after it.
        """
        timeout = self.streamIdleTimeout
        if not timeout:
            return
        for exchange in list(self.streams):
            if exchange.activity != exchange.sweptActivity:
                exchange.sweptActivity = exchange.activity
                exchange.idleSince = now
            elif now - exchange.idleSince >= timeout:
                exchange.streamIdleTimedOut()


class Exchange:
    """
    One request/response pair in flight.

    The front door calls L{begin} when the exchange may use the upstream, then
    L{requestBody} and L{requestComplete} as the body arrives, and L{downstreamLost} if
    the client goes away.  The upstream connection calls L{responseHead},
    L{responseBody}, L{responseComplete}, or L{upstreamLost}.
    """

    __slots__ = (
        "engine", "door", "method", "target", "version", "req", "start", "conn",
        "connector", "pending", "pendingBytes", "requestDone", "bytesReceived",
        "bytesSent", "status", "flags", "upstreamStart", "upstreamServiceTime",
        "timeout", "finished", "retried", "headSent", "upgraded", "readingPaused",
        "mustClose", "malformed", "waiting", "activity", "sweptActivity", "idleSince",
        "tunnelEnds",
    )

    def __init__(self, engine: Engine, door: Door, method: bytes, target: bytes, version: str,
                 req: RequestHead, start: float) -> None:
        self.engine = engine
        self.door = door
        self.method = method
        self.target = target
        self.version = version
        self.req = req
        self.start = start
        self.conn: Optional[UpstreamConnection] = None
        self.connector: Any = None
        self.pending: List[bytes] = []
        self.pendingBytes = 0
        self.requestDone = False
        self.bytesReceived = 0
        self.bytesSent = 0
        self.status = 0
        self.flags: List[str] = []
        self.upstreamStart = 0.0
        self.upstreamServiceTime: Optional[float] = None
        self.timeout: Any = None
        self.finished = False
        self.retried = False
        self.headSent = False
        self.upgraded = False
        self.readingPaused = False
        #: The client connection cannot be reused after this exchange.
        self.mustClose = False
        #: The 400 body to answer with in this exchange's turn: its request turned out
        #: malformed while it waited behind another.
        self.malformed: Optional[bytes] = None
        #: Waiting in the pool for a connection (the pool is at its limit).
        self.waiting = False
        #: Events that moved bytes, and what L{Engine.sweepStreams} last saw of it.
        self.activity = 0
        self.sweptActivity = -1
        self.idleSince = 0.0
        #: Which ends of a tunnel have sent their FIN.
        self.tunnelEnds = 0

    # -- the client side -------------------------------------------------------------

    def begin(self) -> None:
        """
        The exchange may now talk to the client and the upstream: answer C{Expect:
        100-continue} and ask the pool for a connection.
        """
        if self.req.expectContinue and not self.requestDone and self.version == "1.1":
            self.door.writeInterim(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.engine.streams.add(self)
        self.engine.pool.acquire(self)

    def requestBody(self, data: bytes) -> None:
        """
        Request body bytes from the client (already de-chunked).
        """
        if self.finished:
            return
        self.activity += 1
        self.bytesReceived += len(data)
        conn = self.conn
        if self.req.chunked:
            framed = [b"%x\r\n" % len(data), data, b"\r\n"]
        else:
            framed = [data]
        if conn is not None and conn.transport is not None:
            conn.writeSequence(framed)
        else:
            self.pending.extend(framed)
            self.pendingBytes += len(data)
            if self.pendingBytes > PENDING_LIMIT and not self.readingPaused:
                self.readingPaused = True
                self.door.pauseReading()

    def requestComplete(self) -> None:
        """
        The client's request (head and body) has all arrived.
        """
        self.requestDone = True
        if self.finished:
            return
        if self.req.chunked:
            # Trailers are dropped: the last chunk and an empty trailer section.
            if self.conn is not None:
                self.conn.write(b"0\r\n\r\n")
            else:
                self.pending.append(b"0\r\n\r\n")
        if self.conn is not None and not self.upgraded:
            self.conn.requestSent()
            self._armTimeout()

    def downstreamLost(self) -> None:
        """
        The client went away before the exchange ended: cancel the upstream side.
        """
        if self.finished:
            return
        self.flags.append(DOWNSTREAM_CONNECTION_TERMINATION)
        self._dropUpstream()
        self._end()

    # -- the pool's side -------------------------------------------------------------

    def upstreamConnected(self, conn: UpstreamConnection, reused: bool) -> None:
        """
        The pool gives us C{conn}: send the head and whatever body has arrived.
        """
        self.connector = None
        if self.finished:
            self.engine.pool.release(conn)
            return
        self.conn = conn
        conn.attach(self, reused)
        self.upstreamStart = self.engine.clock.seconds()
        if self.pending:
            conn.writeSequence([self.req.head] + self.pending)
            self.pending = []
            self.pendingBytes = 0
        else:
            conn.write(self.req.head)
        if self.readingPaused:
            self.readingPaused = False
            self.door.resumeReading()
        if self.requestDone:
            conn.requestSent()
            self._armTimeout()
        else:
            conn.streamRequestFrom(self.door)

    def upstreamConnectFailed(self, reason: Failure) -> None:
        """
        No connection to the service could be made.
        """
        self.connector = None
        if self.finished:
            return
        self._warn("upstream connect to {upstream} failed for {method} {path}: {reason}",
                   reason=reason.getErrorMessage())
        self.flags.append(UPSTREAM_CONNECT_FAILURE)
        self._localReply(502, b"upstream connect error or disconnect/reset before headers. "
                              b"reset reason: connection failure")

    def setConnector(self, connector: Any) -> None:
        """
        Remember the connect attempt under way, so that a client that leaves cancels it.
        """
        self.connector = connector

    # -- the upstream connection's side ---------------------------------------------

    def responseHead(self, status: int, reason: bytes, head: ResponseHead) -> None:
        """
        The upstream's (final) response head arrived, after the forwarding rules.
        """
        self._cancelTimeout()
        self.activity += 1
        self.upstreamServiceTime = self.engine.clock.seconds() - self.upstreamStart
        self.status = status
        self.headSent = True
        if not self.requestDone:
            # The service answered before the client finished sending: the rest of the
            # body goes nowhere and the connections can't be reused.
            self.mustClose = True
        self.door.startResponse(self, status, reason, head)

    def responseBody(self, data: bytes) -> None:
        """
        Response body bytes from the upstream (de-chunked).
        """
        self.activity += 1
        self.bytesSent += len(data)
        self.door.writeBody(data)

    def responseComplete(self, reusable: bool) -> None:
        """
        The upstream's response ended; C{reusable} says whether its connection may serve
        another request.
        """
        conn, self.conn = self.conn, None
        if conn is not None:
            if reusable and self.requestDone:
                self.engine.pool.release(conn)
            else:
                conn.abandon()
        # The record first: finishing may start the next pipelined exchange at once.
        self._end()
        self.door.finishResponse(self)

    def upgradeAccepted(self, conn: UpstreamConnection, leftover: bytes) -> None:
        """
        The upstream answered 101: from now on bytes flow both ways untouched.
        """
        self.upgraded = True
        self.door.startTunnel(self, conn)
        if leftover:
            self.tunnelToClient(leftover)

    def tunnelToClient(self, data: bytes) -> None:
        """
        Bytes from the upstream on an upgraded connection.
        """
        self.activity += 1
        self.bytesSent += len(data)
        self.door.writeBody(data)

    def tunnelToUpstream(self, data: bytes) -> None:
        """
        Bytes from the client on an upgraded connection.
        """
        self.activity += 1
        self.bytesReceived += len(data)
        if self.conn is not None:
            self.conn.write(data)

    def tunnelClientFinished(self) -> None:
        """
        The client sent its FIN on an upgraded connection: the service gets a FIN too
        (never a reset), and its bytes still flow to the client.
        """
        self.activity += 1
        self.tunnelEnds |= _CLIENT_FIN
        if self.conn is not None:
            self.conn.finishTunnel()
        if self.tunnelEnds == _CLIENT_FIN | _SERVICE_FIN:
            self._closeTunnel()

    def tunnelUpstreamFinished(self) -> None:
        """
        The service sent its FIN on an upgraded connection: the client is told at once
        by a FIN, and its bytes still flow to the service.
        """
        self.activity += 1
        self.tunnelEnds |= _SERVICE_FIN
        if not self.finished:
            self.door.finishTunnel(self)
        if self.tunnelEnds == _CLIENT_FIN | _SERVICE_FIN:
            self._closeTunnel()

    def tunnelClosed(self) -> None:
        """
        The client's connection of an upgraded exchange is gone: close the service's
        gracefully (a FIN), and the exchange is over.
        """
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.closeTunnel()
        self._end()

    def tunnelUpstreamClosed(self) -> None:
        """
        The service's connection of an upgraded exchange is gone: close the client's
        once what it was sent is written, and the exchange is over.
        """
        self.conn = None
        if not self.finished:
            self._end()
            self.door.closeTunnel(self)

    def _closeTunnel(self) -> None:
        """
        Both ends have sent their FIN: close both connections.
        """
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.closeTunnel()
        if not self.finished:
            self._end()
            self.door.closeTunnel(self)

    def upstreamLost(self, reason: Failure, reused: bool, responseStarted: bool) -> None:
        """
        The upstream connection closed before the response was complete.
        """
        self._cancelTimeout()
        self.conn = None
        if self.finished:
            return
        if self.headSent:
            self._warn("upstream {upstream} closed in the middle of the response to {method} {path}")
            self.flags.append(UPSTREAM_CONNECTION_TERMINATION)
            self._end()
            self.door.abortResponse(self)
            return
        if (reused and not responseStarted and not self.retried and self.method in IDEMPOTENT
                and not self.req.chunked and not self.req.contentLength and not self.req.upgrade):
            # A pooled connection the service had closed: once more, on a new connection.
            self.retried = True
            self.engine.pool.acquire(self, fresh=True)
            return
        self._warn("upstream {upstream} closed before answering {method} {path}: {reason}",
                   reason=reason.getErrorMessage())
        self.flags.append(UPSTREAM_CONNECTION_TERMINATION)
        self._localReply(502, b"upstream connect error or disconnect/reset before headers. "
                              b"reset reason: connection termination")

    def upstreamProtocolError(self, detail: str) -> None:
        """
        The upstream sent something that is not HTTP/1.1.
        """
        self._cancelTimeout()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abandon()
        if self.finished:
            return
        self._warn("upstream {upstream} sent a malformed response to {method} {path}: {detail}",
                   detail=detail)
        self.flags.append(UPSTREAM_PROTOCOL_ERROR)
        if self.headSent:
            self._end()
            self.door.abortResponse(self)
        else:
            self._localReply(502, b"upstream sent a malformed response")

    # -- endings ---------------------------------------------------------------------

    def reject(self, status: int, flag: str, body: bytes) -> None:
        """
        Refuse the request without asking the upstream (authorization, overflow).
        """
        self.flags.append(flag)
        self.mustClose = self.mustClose or not self.requestDone
        self._localReply(status, body)

    def clientProtocolError(self, body: bytes) -> None:
        """
        The client's request body turned out malformed: drop the upstream side, answer
        400 if nothing was answered yet, and close.
        """
        self.mustClose = True
        self.requestDone = True
        if self.finished:
            return
        self._dropUpstream()
        self.flags.append(DOWNSTREAM_PROTOCOL_ERROR)
        self._localReply(400, body)

    def overflow(self) -> None:
        """
        The pool is at its connection limit and its queue is full: 503, flag C{UO}.
        """
        self._warn("upstream {upstream} overflow: {method} {path} refused, "
                   "the connection limit is reached and the queue is full")
        self.flags.append(UPSTREAM_OVERFLOW)
        self._localReply(503, b"upstream connect error or disconnect/reset before headers. "
                              b"reset reason: overflow")

    def streamIdleTimedOut(self) -> None:
        """
        No byte either way for L{Engine.streamIdleTimeout} (Envoy's stream idle
        timeout, flag C{SI}): before the response, 504 if the request had all arrived
        and 408 if not (as Envoy); after it started, the client's connection is closed so
        that a truncated body is never taken for a complete one.
        """
        if self.finished:
            return
        self._warn("stream idle timeout: no byte on {method} {path} to {upstream} for {seconds} s",
                   seconds=self.engine.streamIdleTimeout)
        self.flags.append(STREAM_IDLE_TIMEOUT)
        if self.upgraded:
            conn, self.conn = self.conn, None
            if conn is not None:
                conn.abandon()
            self._end()
            self.door.closeTunnel(self)
            return
        self._dropUpstream()
        if self.requestDone:
            self._localReply(504, b"stream timeout")
        else:
            self.mustClose = True
            self._localReply(408, b"stream timeout")

    def _timedOut(self) -> None:
        self.timeout = None
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abandon()
        if self.finished or self.headSent:
            return
        self._warn("upstream {upstream} did not answer {method} {path} within {seconds} s",
                   seconds=self.engine.responseTimeout)
        self.flags.append(UPSTREAM_REQUEST_TIMEOUT)
        self._localReply(504, b"upstream request timeout")

    def _localReply(self, status: int, body: bytes) -> None:
        if self.headSent:
            self._end()
            self.door.abortResponse(self)
            return
        self.status = status
        self.headSent = True
        self.bytesSent += 0 if self.method == b"HEAD" else len(body)
        if not self.requestDone:
            self.mustClose = True
        self._end()
        self.door.localReply(self, status, body)

    def _warn(self, format: str, **fields: Any) -> None:
        """
        Log why this exchange failed, naming the upstream, the method and the path.
        """
        log.warn(format, upstream=self.engine.pool.address, method=self.method.decode("latin-1"),
                 path=self.target.decode("latin-1"), **fields)

    def _dropUpstream(self) -> None:
        """
        Give up on the upstream side: the timer, a wait or a connect under way, the
        connection.
        """
        self._cancelTimeout()
        if self.waiting:
            self.engine.pool.cancel(self)
        if self.connector is not None:
            self.connector.disconnect()
            self.connector = None
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abandon()

    def _armTimeout(self) -> None:
        """
        The whole request is with the service: from now on it has C{responseTimeout}
        seconds to answer (as Envoy's route timeout, so a long upload is not cut short).
        """
        if self.engine.responseTimeout and self.timeout is None and not self.headSent:
            self.timeout = self.engine.clock.callLater(self.engine.responseTimeout, self._timedOut)

    def _cancelTimeout(self) -> None:
        if self.timeout is not None:
            self.timeout.cancel()
            self.timeout = None

    def _end(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.engine.recorder.requestsActive -= 1
        self.engine.streams.discard(self)
        self._cancelTimeout()
        if self.readingPaused:
            self.readingPaused = False
            self.door.resumeReading()
        engine = self.engine
        door = self.door
        target = self.target
        self.engine.recorder.record(Record(
            self.start,
            engine.clock.seconds() - self.start,
            self.upstreamServiceTime,
            self.bytesReceived,
            self.bytesSent,
            self.status,
            self.method.decode("latin-1"),
            target.decode("latin-1"),
            "HTTP/" + self.version,
            self.req.authority,
            engine.pool.address,
            ",".join(self.flags) if self.flags else "-",
            self.req.requestId,
            self.req.forwardedFor,
            self.req.userAgent,
            door.clientAddress,
            door.peerPrincipal,
            door.mutualTLS,
        ))
