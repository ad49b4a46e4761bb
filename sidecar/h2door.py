# -*- test-case-name: tests.test_h2 -*-
"""
The HTTP/2 front door: one L{H2ServerProtocol} per client connection holding an
HTTP/2 connection (server side: libnghttp2's through L{sidecar.nghttp2}, or h2's
C{H2Connection}, as L{sidecar.h2wire.newConnection} picks), and one L{H2StreamDoor} per stream, the engine's
L{sidecar.exchange.Door} for the L{Exchange} of that stream.

Bytes are written once per read: the events of one read from the client, or one read
of an upstream (L{H2StreamDoor.flush}), leave in one C{write}; anything else (a timer)
is flushed on the reactor's next turn.

Flow control is tied end to end.  Request DATA is acknowledged (a WINDOW_UPDATE) only
once the upstream has taken it without pausing the stream; response bytes go out only
within the client's window, and what does not fit is held on its stream while that
stream's upstream is paused.  A slow reader stalls its own stream; the connection's
window is large enough for every stream's, so the others keep flowing; a stream that
makes no progress for C{streamIdleTimeout} is reset (flag C{SI}).

The limits against HTTP/2's known attacks are in L{sidecar.config.H2Config}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated, DataReceived, RemoteSettingsChanged, RequestReceived, StreamEnded, StreamReset,
    TrailersReceived, WindowUpdated,
)
from h2.exceptions import ProtocolError
from hyperframe.frame import GoAwayFrame
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sidecar import nghttp2 as ng
from sidecar.config import H2Config
from sidecar.h2wire import (
    GrpcCounts, grpcLocalReply, newConnection, requestFromHeaders, responseHeaders, startConnection,
)
from sidecar.headers import Header, Headers, ResponseHead
from sidecar.http1 import reason as _reason
from sidecar.record import (
    DOWNSTREAM_PROTOCOL_ERROR, DOWNSTREAM_REMOTE_RESET, STREAM_IDLE_TIMEOUT, UNAUTHORIZED,
)
from sidecar.transport import prepare

if TYPE_CHECKING:  # pragma: no cover
    from sidecar.exchange import Engine, Exchange

log = Logger()

#: The client connection preface (RFC 9113 3.4).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

#: Why a stream's request DATA is not acknowledged (a bit each).
_UPSTREAM_FULL = 1  # the upstream's transport or window is full
_EXCHANGE = 2  # the exchange holds the body until its upstream is there


def serverConfiguration() -> H2Configuration:
    """
    h2's configuration for the door, trimmed: inbound heads validated (the client is
    not trusted), outbound ones not (the proxy builds them from validated parts).
    """
    return H2Configuration(client_side=False, header_encoding=None, validate_outbound_headers=False,
                           normalize_outbound_headers=False, validate_inbound_headers=True,
                           normalize_inbound_headers=False)


@implementer(IPushProducer)
class H2StreamDoor:
    """
    One client stream: the engine's L{Door} for its exchange, and the producer of its
    request body (the upstream's transport pauses it: its DATA is then not
    acknowledged).
    """

    __slots__ = ("conn", "id", "exchange", "clientAddress", "peerPrincipal", "mutualTLS", "head", "tail",
                 "pending", "pendingBytes", "ending", "pauses", "unacked", "blockedSince",
                 "producer", "responded", "dataSent", "remoteEnded", "closed")

    #: Calls that came in to this workload (HTTP/2 is not on the outbound listener yet).
    direction = "inbound"

    def __init__(self, conn: H2ServerProtocol, streamId: int) -> None:
        self.conn = conn
        self.id = streamId
        self.exchange: Optional[Exchange] = None
        self.clientAddress = conn.clientAddress
        self.peerPrincipal = conn.peerPrincipal
        self.mutualTLS = conn.mutualTLS
        #: The response head, held until the first body bytes or the end.
        self.head: Optional[List[Header]] = None
        #: The last body bytes, held until the upstream's read is over (L{flush}) so
        #: that the end of the stream can ride on their DATA frame.
        self.tail = b""
        #: Response bytes beyond the client's window.
        self.pending: List[bytes] = []
        self.pendingBytes = 0
        #: The end of the response waits behind C{pending}: C{True}, or the trailers.
        self.ending: Any = None
        self.pauses = 0
        self.unacked = 0
        self.blockedSince: Optional[float] = None
        #: The upstream stream, paused while C{pending} holds bytes.
        self.producer: Any = None
        self.responded = False
        self.dataSent = False
        self.remoteEnded = False
        self.closed = False

    # -- Door ------------------------------------------------------------------------

    def sendContinue(self) -> None:
        """
        HTTP/2 clients are not sent C{100 Continue} (the engine asks only HTTP/1.1).
        """

    def flush(self) -> None:
        if self.head is not None:
            self._sendHead()
        tail = self.tail
        if tail:
            self.tail = b""
            self.conn.sendData(self, tail)
        self.conn.flush()

    def startResponse(self, exchange: Exchange, status: int, reason: bytes, head: ResponseHead) -> None:
        if status == 101:
            # No HTTP/2 request asks to upgrade (h2 refuses Connection and Upgrade).
            self.abortResponse(exchange)
            return
        self.responded = True
        self.head = responseHeaders(status, head, status >= 200 and status != 204)
        self.producer = exchange.stream
        self.conn.touched()

    def writeBody(self, data: bytes) -> None:
        if not data or self.closed:
            return
        if self.head is not None:
            self._sendHead()
        self.dataSent = True
        tail = self.tail
        if tail:
            if len(tail) + len(data) <= _COALESCE:
                # Two small upstream frames (nginx sends 8 KiB ones) make one DATA frame.
                self.tail = tail + data
                return
            self.conn.sendData(self, tail)
        self.tail = data

    def finishResponse(self, exchange: Exchange) -> None:
        if self.closed:
            return
        # The upstream stream is done with us (a pooled HTTP/1.1 connection may already
        # serve another exchange): never resume it from here.
        self.producer = None
        trailers = exchange.trailers
        head = self.head
        if head is not None:
            self.head = None
            if trailers is None:
                # No body, no trailers (a gRPC trailers-only answer, a 204): one HEADERS.
                self._sendHeaders(head, True)
                self._ended()
                return
            self._sendHeaders(head, False)
        tail = self.tail
        if tail:
            self.tail = b""
            if trailers is None and not self.pending:
                # The last DATA frame ends the stream (when the window takes it all).
                if self.conn.sendData(self, tail, True):
                    self._ended()
                    return
                self.ending = True
                return
            self.conn.sendData(self, tail)
        if self.pending:
            self.ending = trailers if trailers is not None else True
            return
        self._end(trailers)

    def abortResponse(self, exchange: Exchange) -> None:
        self.reset(ErrorCodes.INTERNAL_ERROR)

    def localReply(self, exchange: Exchange, status: int, body: bytes, headers: Sequence[Header] = ()) -> None:
        if self.closed:
            return
        server = exchange.engine.serverHeader
        self.responded = True
        if exchange.grpc is not None:
            self._sendHeaders(grpcLocalReply(status, body, server)[1], True)
            self._ended()
            return
        contentType = b"text/plain"
        out = [(b":status", b"%d" % status), (b"server", server)]
        for name, value in headers:
            name = name.lower()
            if name == b"content-type":
                contentType = value
            elif name not in _LOCAL_FRAMING:
                out.append((name, value))
        out.append((b"content-type", contentType))
        out.append((b"content-length", b"%d" % len(body)))
        withBody = bool(body) and exchange.method != b"HEAD"
        self._sendHeaders(out, not withBody)
        if withBody:
            if self.conn.sendData(self, body, True):
                self._ended()
            else:
                self.ending = True
        else:
            self._ended()

    def startTunnel(self, exchange: Exchange, stream: Any) -> None:
        self.abortResponse(exchange)

    def pauseReading(self) -> None:
        self.pauses |= _EXCHANGE

    def resumeReading(self) -> None:
        self._resume(_EXCHANGE)

    # -- IPushProducer (for the upstream's transport) --------------------------------

    def pauseProducing(self) -> None:
        self.pauses |= _UPSTREAM_FULL

    def resumeProducing(self) -> None:
        self._resume(_UPSTREAM_FULL)

    def stopProducing(self) -> None:
        self._resume(_UPSTREAM_FULL)

    # -- internals -------------------------------------------------------------------

    def _resume(self, why: int) -> None:
        if self.pauses & why:
            self.pauses &= ~why
            if not self.pauses and self.unacked:
                unacked, self.unacked = self.unacked, 0
                self.conn.acknowledge(self.id, unacked)

    def _sendHead(self) -> None:
        head, self.head = self.head, None
        self._sendHeaders(head, False)  # type: ignore[arg-type]

    def _sendHeaders(self, headers: List[Header], end: bool) -> None:
        try:
            self.conn.h2.send_headers(self.id, headers, end_stream=end)
        except ProtocolError:
            # The stream is gone (the client reset it as we answered).
            self.closed = True
        self.conn.touched()

    def _end(self, trailers: Optional[Headers]) -> None:
        h2 = self.conn.h2
        try:
            if trailers:
                h2.send_headers(self.id, [(n.lower(), v) for n, v in trailers], end_stream=True)
            else:
                h2.end_stream(self.id)
        except ProtocolError:
            pass
        self._ended()
        self.conn.touched()

    def _ended(self) -> None:
        """
        The response is complete: forget the stream (telling a client still sending that
        its body is not wanted).
        """
        exchange = self.exchange
        if exchange is not None and not exchange.requestDone and not self.remoteEnded:
            try:
                self.conn.h2.reset_stream(self.id, ErrorCodes.NO_ERROR)
            except ProtocolError:
                pass
        self.closed = True
        self.producer = None
        self.conn.streamClosed(self)

    def reset(self, code: int) -> None:
        """
        Reset the stream (the response cannot be completed).
        """
        if self.closed:
            return
        try:
            self.conn.h2.reset_stream(self.id, code)
        except ProtocolError:
            pass
        self.closed = True
        self.producer = None
        self.pending = []
        self.tail = b""
        self.conn.streamClosed(self)
        self.conn.touched()


#: Body pieces are joined while they fit one DATA frame of the usual 16 KiB (nginx
#: sends 8 KiB frames); larger ones go as they are.
_COALESCE = 16384

_LOCAL_FRAMING = frozenset([b"content-length", b"transfer-encoding", b"connection", b"server", b"keep-alive",
                            b"upgrade", b"proxy-connection"])


@implementer(IPushProducer)
class H2ServerProtocol(Protocol):
    """
    One HTTP/2 client connection (after the preface detection or ALPN).

    It is registered in the engine's doors (idle close, drain) and is the producer of
    its transport: when the client reads slowly, response DATA waits on its streams.

    @ivar clientAddress: C{ip:port} of the client.
    @ivar peerPrincipal: the client's SPIFFE id under mutual TLS, else empty.
    @ivar mutualTLS: whether the connection is mutual TLS.
    """

    peerPrincipal = ""
    mutualTLS = False
    proto = b"http"
    denial: Optional[bytes] = None
    #: HTTP/2 was chosen by ALPN (the proxy chose it, not the service): requests other
    #: than gRPC go to the service as an HTTP/1.1 client's would.
    alpn = False
    activity = 0
    sweptActivity = -1
    idleSince: Optional[float] = None
    inHead = False
    headSince: Optional[float] = None

    def __init__(self, engine: Engine, config: H2Config = H2Config(), extra: Headers = (),  # type: ignore[assignment]
                 pool: Any = None) -> None:
        self.engine = engine
        self.config = config
        #: The pool every request of this connection uses (a port declared HTTP/2),
        #: else the engine's choice.
        self.pool = pool
        self.extra = list(extra)
        self.clientAddress = "-"
        self.clientIP = "-"
        self.streams: Dict[int, H2StreamDoor] = {}
        self.h2 = newConnection(config, False, serverConfiguration)
        self._inRead = False
        self._flushCall: Any = None
        self._writePaused = False
        self._queuedWhilePaused = 0
        self._goingAway = False
        self._lastStream = 0
        self._closing = False
        self._streamsTotal = 0
        self._prematureResets = 0
        self._idleTimer: Any = None
        self._blocked: Dict[int, H2StreamDoor] = {}
        self._write: Any = None

    # -- connection ------------------------------------------------------------------

    def connectionMade(self) -> None:
        engine = self.engine
        engine.doors.add(self)
        peer = self.transport.getPeer()
        host = getattr(peer, "host", None)
        if host is not None:
            self.clientIP = host
            self.clientAddress = f"[{host}]:{peer.port}" if ":" in host else f"{host}:{peer.port}"
        self._write, _ = prepare(self.transport)
        recorder = engine.recorder
        recorder.downstreamConnectionsActive += 1
        recorder.downstreamConnectionsTotal += 1
        config = self.config
        startConnection(self.h2, config, client=False)
        self.transport.registerProducer(self, True)
        self.identify()
        self.flush()

    def identify(self) -> None:
        """
        Learn who the client is (the mutual-TLS subclass sets L{peerPrincipal},
        L{mutualTLS}, L{proto}, L{extra} and L{denial}).
        """

    def dataReceived(self, data: bytes) -> None:
        self.activity += 1
        if self._closing:
            return
        self._inRead = True
        try:
            try:
                events = self.h2.receive_data(data)
            except ProtocolError as e:
                self._protocolError(str(e) or e.__class__.__name__)
                return
            handlers = _HANDLERS
            for event in events:
                handler = handlers.get(event.__class__)
                if handler is not None:
                    handler(self, event)
        finally:
            self._inRead = False
        if self.engine.draining and not self._goingAway:
            self.goAway()
        self.flush()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._closing = True
        self.engine.doors.discard(self)
        self.engine.recorder.downstreamConnectionsActive -= 1
        for call in (self._flushCall, self._idleTimer):
            if call is not None and call.active():
                call.cancel()
        self._flushCall = self._idleTimer = None
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.closed = True
            exchange = stream.exchange
            stream.exchange = None
            if exchange is not None and not exchange.finished:
                exchange.downstreamLost()

    # -- events ----------------------------------------------------------------------

    def _requestReceived(self, event: RequestReceived) -> None:
        streamId = event.stream_id
        self._lastStream = max(self._lastStream, streamId)
        stream = H2StreamDoor(self, streamId)
        if self._goingAway:
            # After our GOAWAY: not processed, the client may retry elsewhere.
            self.h2.reset_stream(streamId, ErrorCodes.REFUSED_STREAM)
            return
        self.streams[streamId] = stream
        self._streamsTotal += 1
        ended = event.stream_ended is not None
        method, path, req, grpc = requestFromHeaders(event.headers, self.clientIP, self.proto, self.extra, ended)
        exchange = self.engine.exchange(stream, method or b"-", path or b"-", "2", req)
        stream.exchange = exchange
        if grpc:
            exchange.grpc = GrpcCounts()
        if self.pool is not None:
            exchange.pool = self.pool
        elif self.alpn and not grpc:
            engine = self.engine
            exchange.pool = engine.poolByVersion.get("1.1", engine.pool)
        if ended:
            # No body: the request is complete before it goes up (its HEADERS end the
            # stream there too, with no empty DATA frame after them).
            stream.remoteEnded = True
            exchange.requestComplete()
        if req.error is not None:
            exchange.reject(400, DOWNSTREAM_PROTOCOL_ERROR,
                            f"{_reason(400).decode()}: {req.error}\n".encode("utf-8", "replace"))
        elif self.denial is not None:
            exchange.reject(403, UNAUTHORIZED, self.denial)
        else:
            exchange.begin()

    def _dataReceived(self, event: DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        size = event.flow_controlled_length
        exchange = stream.exchange if stream is not None else None
        if exchange is None or exchange.finished:
            # Nobody will read it: give the window back at once.
            if size:
                self.h2.acknowledge_received_data(size, event.stream_id)
            return
        exchange.requestBody(event.data)
        if stream.pauses:  # type: ignore[union-attr]
            stream.unacked += size  # type: ignore[union-attr]
        elif size:
            self.h2.acknowledge_received_data(size, event.stream_id)

    def _trailersReceived(self, event: TrailersReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None and stream.exchange is not None:
            stream.exchange.requestTrailers = list(event.headers)

    def _streamEnded(self, event: StreamEnded) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.remoteEnded:
            return
        stream.remoteEnded = True
        exchange = stream.exchange
        if exchange is not None and not exchange.finished:
            exchange.requestComplete()

    def _streamReset(self, event: StreamReset) -> None:
        stream = self.streams.pop(event.stream_id, None)
        self._blocked.pop(event.stream_id, None)
        if stream is None:
            return
        stream.closed = True
        exchange, stream.exchange = stream.exchange, None
        if exchange is not None and not exchange.finished:
            # Reset before its response was complete: a premature reset (rapid reset).
            self._prematureResets += 1
            exchange.downstreamLost(DOWNSTREAM_REMOTE_RESET)
            limit = self.config.prematureResets
            if self._prematureResets >= limit and self._prematureResets * 2 >= self._streamsTotal:
                log.warn("HTTP/2 client {client} reset {resets} of its {streams} streams before their "
                         "responses: closing the connection (rapid reset)", client=self.clientAddress,
                         resets=self._prematureResets, streams=self._streamsTotal)
                self._refuseConnection(ErrorCodes.ENHANCE_YOUR_CALM)

    def _windowUpdated(self, event: Any) -> None:
        if event.stream_id:
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream.pending:
                self._drain(stream)
        else:
            self._drainAll()

    def _connectionTerminated(self, event: ConnectionTerminated) -> None:
        # The client's GOAWAY: it opens no more streams; those in flight finish.
        self._goingAway = True
        if event.error_code:
            self._close(abort=False)
        elif not self.streams:
            self._close(abort=False)

    # -- writing ---------------------------------------------------------------------

    def touched(self) -> None:
        """
        Frames were queued outside of a read of ours: flush on the reactor's next turn
        (an upstream read calls L{flush} sooner).
        """
        if not self._inRead and self._flushCall is None and not self._closing:
            self._flushCall = self.engine.clock.callLater(0, self.flush)

    def flush(self) -> None:
        """
        Write what h2 has queued, in one write.
        """
        call, self._flushCall = self._flushCall, None
        if call is not None and call.active():
            call.cancel()
        data = self.h2.data_to_send()
        if not data or self.transport is None:
            return
        if self._writePaused:
            # The client does not read: only control frames and heads are written now.
            self._queuedWhilePaused += len(data)
            if self._queuedWhilePaused > self.config.maxQueuedControlBytes:
                log.warn("HTTP/2 client {client} does not read its control frames (PING or SETTINGS "
                         "flood?): connection aborted", client=self.clientAddress)
                self._closing = True
                self.transport.abortConnection()
                return
        self._write(data)

    def sendData(self, stream: H2StreamDoor, data: bytes, end: bool = False) -> bool:
        """
        Send response bytes within the client's windows; hold the rest on the stream
        and pause its upstream.

        @param end: end the stream with the last frame, if all of C{data} fits now.
        @return: whether all of C{data} was sent (and the stream ended, with C{end}).
        """
        if stream.pending:
            stream.pending.append(data)
            stream.pendingBytes += len(data)
            return False
        h2 = self.h2
        sid = stream.id
        size = len(data)
        window = 0 if self._writePaused else h2.local_flow_control_window(sid)
        frame = h2.max_outbound_frame_size
        if size <= window and size <= frame:
            h2.send_data(sid, data, end_stream=end)
            self.touched()
            return True
        offset = 0
        view = memoryview(data)
        while offset < size and window > 0:
            n = min(window, frame, size - offset)
            h2.send_data(sid, view[offset:offset + n].tobytes())
            offset += n
            window -= n
        self.touched()
        if offset < size:
            rest = data[offset:] if offset else data
            stream.pending.append(rest)
            stream.pendingBytes += len(rest)
            self._blockedStream(stream)
            return False
        if end:
            h2.end_stream(sid)
        return True

    def _blockedStream(self, stream: H2StreamDoor) -> None:
        producer = stream.producer
        if producer is not None:
            producer.pauseProducing()
        if stream.blockedSince is None:
            stream.blockedSince = self.engine.clock.seconds()
        self._blocked[stream.id] = stream
        timeout = self.config.streamIdleTimeout
        if timeout is not None and self._idleTimer is None:
            self._idleTimer = self.engine.clock.callLater(timeout, self._checkStalled)

    def _drain(self, stream: H2StreamDoor) -> None:
        """
        The client's window opened: send what the stream holds, then its end, then let
        its upstream go on.
        """
        if stream.closed:
            return
        h2 = self.h2
        sid = stream.id
        frame = h2.max_outbound_frame_size
        pending = stream.pending
        progressed = False
        while pending and not self._writePaused:
            window = h2.local_flow_control_window(sid)
            if window <= 0:
                break
            data = pending[0]
            n = min(window, frame, len(data))
            if n == len(data):
                pending.pop(0)
                h2.send_data(sid, data)
            else:
                h2.send_data(sid, data[:n])
                pending[0] = data[n:]
            stream.pendingBytes -= n
            progressed = True
        if progressed:
            self.touched()
            stream.blockedSince = self.engine.clock.seconds()
        if pending:
            return
        stream.blockedSince = None
        self._blocked.pop(sid, None)
        if stream.ending is not None:
            ending, stream.ending = stream.ending, None
            stream._end(None if ending is True else ending)
            return
        producer = stream.producer
        if producer is not None:
            producer.resumeProducing()

    def _drainAll(self) -> None:
        for stream in list(self._blocked.values()):
            self._drain(stream)

    def _checkStalled(self) -> None:
        """
        Reset the streams that made no progress for the stream idle timeout.
        """
        self._idleTimer = None
        timeout = self.config.streamIdleTimeout
        if timeout is None:
            return
        now = self.engine.clock.seconds()
        for stream in list(self._blocked.values()):
            since = stream.blockedSince
            if since is not None and now - since >= timeout:
                self._blocked.pop(stream.id, None)
                exchange = stream.exchange
                log.warn("HTTP/2 stream {stream} of {client} made no progress for {seconds} s "
                         "(zero window): reset", stream=stream.id, client=self.clientAddress, seconds=timeout)
                stream.reset(ErrorCodes.CANCEL)
                if exchange is not None and not exchange.finished:
                    exchange.downstreamLost(STREAM_IDLE_TIMEOUT)
        if self._blocked:
            oldest = min(s.blockedSince or now for s in self._blocked.values())
            self._idleTimer = self.engine.clock.callLater(max(oldest + timeout - now, 0.01), self._checkStalled)
        self.flush()

    def acknowledge(self, streamId: int, size: int) -> None:
        """
        The upstream took C{size} bytes of the stream's request body: open its window.
        """
        if not self._closing:
            self.h2.acknowledge_received_data(size, streamId)
            self.touched()

    def streamClosed(self, stream: H2StreamDoor) -> None:
        """
        The stream's response is complete (or it was reset): forget it, and let its
        exchange go (the two refer to each other; without this every stream would
        wait for the cyclic garbage collector).
        """
        stream.exchange = None
        self.streams.pop(stream.id, None)
        self._blocked.pop(stream.id, None)
        if self._goingAway and not self.streams:
            self.flush()
            self._close(abort=False)

    # -- IPushProducer (for our transport) -------------------------------------------

    def pauseProducing(self) -> None:
        self._writePaused = True

    def resumeProducing(self) -> None:
        self._writePaused = False
        self._queuedWhilePaused = 0
        self._drainAll()
        self.flush()

    def stopProducing(self) -> None:
        self._writePaused = False

    # -- the doors registry, drain ---------------------------------------------------

    def busy(self) -> bool:
        """
        Whether a stream is open.
        """
        return bool(self.streams)

    def answering(self) -> bool:
        return bool(self.streams)

    def headTimedOut(self) -> None:
        """
        Not used: h2 reads a head whole (its CONTINUATION frames are bounded).
        """

    def closeIdle(self) -> None:
        """
        Idle too long: GOAWAY and close.
        """
        self.goAway()
        self.flush()
        self._close(abort=False)

    def loseConnection(self) -> None:
        """
        Close gracefully (drain): GOAWAY now, close once the streams in flight end.
        """
        self.goAway()
        self.flush()
        if not self.streams:
            self._close(abort=False)

    def goAway(self) -> None:
        """
        Tell the client (GOAWAY, no error) that streams after the last one it opened
        will not be processed; those in flight finish.
        """
        if self._goingAway or self._closing or self.transport is None:
            return
        self._goingAway = True
        self.flush()
        frame = GoAwayFrame(0)
        frame.last_stream_id = self._lastStream
        frame.error_code = 0
        self._write(frame.serialize())

    # -- endings ---------------------------------------------------------------------

    def _protocolError(self, detail: str) -> None:
        """
        The client broke the protocol (h2 has queued a GOAWAY naming the error): send
        it and close.
        """
        log.warn("HTTP/2 client {client} broke the protocol: {detail}", client=self.clientAddress,
                 detail=detail)
        self._refuseConnection(None)

    def _refuseConnection(self, code: Optional[int]) -> None:
        if code is not None:
            try:
                self.h2.close_connection(code, last_stream_id=self._lastStream)
            except ProtocolError:
                pass
        data = self.h2.data_to_send()
        if data and self.transport is not None:
            self._write(data)
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.closed = True
            exchange, stream.exchange = stream.exchange, None
            if exchange is not None and not exchange.finished:
                exchange.downstreamLost(DOWNSTREAM_PROTOCOL_ERROR)
        self._close(abort=False)

    def _close(self, abort: bool) -> None:
        if self._closing or self.transport is None:
            return
        self._closing = True
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()


_HANDLERS = {
    RequestReceived: H2ServerProtocol._requestReceived,
    DataReceived: H2ServerProtocol._dataReceived,
    TrailersReceived: H2ServerProtocol._trailersReceived,
    StreamEnded: H2ServerProtocol._streamEnded,
    StreamReset: H2ServerProtocol._streamReset,
    WindowUpdated: H2ServerProtocol._windowUpdated,
    RemoteSettingsChanged: lambda self, event: self._drainAll(),
    ConnectionTerminated: H2ServerProtocol._connectionTerminated,
    # The same events from the nghttp2 codec.
    ng.RequestReceived: H2ServerProtocol._requestReceived,
    ng.DataReceived: H2ServerProtocol._dataReceived,
    ng.TrailersReceived: H2ServerProtocol._trailersReceived,
    ng.StreamEnded: H2ServerProtocol._streamEnded,
    ng.StreamReset: H2ServerProtocol._streamReset,
    ng.WindowUpdated: H2ServerProtocol._windowUpdated,
    ng.RemoteSettingsChanged: lambda self, event: self._drainAll(),
    ng.ConnectionTerminated: H2ServerProtocol._connectionTerminated,
}


class H2ServerFactory(Factory):
    """
    Builds an L{H2ServerProtocol} per client connection (h2c with prior knowledge).
    """

    noisy = False

    def __init__(self, engine: Engine, config: H2Config = H2Config(), pool: Any = None) -> None:
        self.engine = engine
        self.config = config
        self.pool = pool

    def buildProtocol(self, addr: Any) -> H2ServerProtocol:
        proto = H2ServerProtocol(self.engine, self.config, pool=self.pool)
        proto.factory = self
        return proto
