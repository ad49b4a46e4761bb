# -*- test-case-name: tests.test_h2 -*-
"""
The HTTP/2 upstream: L{H2UpstreamStream} implements the engine's upstream stream
(L{sidecar.exchange.UpstreamStream}) as one HTTP/2 stream (on the codec
L{sidecar.h2wire.newConnection} picks: libnghttp2, or h2), and L{H2UpstreamPool} the
engine's pool: streams multiplexed over few connections to the service, each carrying
at most the service's C{SETTINGS_MAX_CONCURRENT_STREAMS} (and the proxy's own cap).

Flow control is tied end to end as in L{sidecar.h2door}: response DATA is
acknowledged only once the client's side has taken it without pausing the stream, and
request bytes beyond the service's window wait on their stream while the client's
stream (or connection) is paused.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Deque, Dict, List, Optional, Sequence

from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated, DataReceived, RemoteSettingsChanged, ResponseReceived, StreamEnded, StreamReset,
    TrailersReceived, WindowUpdated,
)
from h2.exceptions import ProtocolError
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from sidecar import nghttp2 as ng
from sidecar.config import H2Config, UpstreamConfig
from sidecar.h2wire import newConnection, requestHeaders, responseFromHeaders, startConnection
from sidecar.headers import Headers, responseHead
from sidecar.record import UPSTREAM_CONNECTION_TERMINATION, UPSTREAM_REMOTE_RESET
from sidecar.transport import prepare

if TYPE_CHECKING:  # pragma: no cover
    from twisted.internet.interfaces import IReactorTCP, IReactorTime

    from sidecar.exchange import Exchange


class StreamReset_(Exception):
    """
    The service reset the stream (RST_STREAM), or did not process it (GOAWAY).
    """


def clientConfiguration() -> H2Configuration:
    """
    h2's configuration towards the service, trimmed: the service's heads are
    validated, the proxy's own are not.
    """
    return H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False,
                           normalize_outbound_headers=False, validate_inbound_headers=True,
                           normalize_inbound_headers=False)


@implementer(IPushProducer)
class H2UpstreamStream:
    """
    One request/response stream to the service over an L{H2UpstreamConnection}; the
    producer of its response (a slow client pauses it: its DATA is then not
    acknowledged and the service's window closes).
    """

    __slots__ = ("conn", "id", "exchange", "reused", "pending", "ending", "source", "paused", "unacked",
                 "responseStarted", "trailers", "closed", "ended", "tail")

    def __init__(self, conn: H2UpstreamConnection, exchange: Exchange) -> None:
        self.conn = conn
        self.id = 0
        self.exchange: Optional[Exchange] = exchange
        self.reused = False
        #: Request bytes beyond the service's window.
        self.pending: List[bytes] = []
        #: The end of the request waits behind C{pending}.
        self.ending = False
        #: The client, paused while C{pending} holds bytes.
        self.source: Any = None
        self.paused = False
        self.unacked = 0
        self.responseStarted = False
        self.trailers: Optional[Headers] = None
        self.closed = False
        self.ended = False
        #: The last body bytes, held until the connection flushes so that the end of
        #: the request can ride on their DATA frame.
        self.tail = b""

    # -- UpstreamStream --------------------------------------------------------------

    def sendRequest(self, exchange: Exchange, reused: bool, body: Sequence[bytes], end: bool) -> None:
        conn = self.conn
        h2 = conn.h2
        self.exchange = exchange
        self.reused = reused
        sid = self.id = h2.get_next_available_stream_id()
        conn.streams[sid] = self
        headers = requestHeaders(exchange.method, exchange.target, exchange.req, b"http", exchange.grpc is not None,
                                 getattr(h2, "neverIndexed", None))
        data = [b for b in body if b]
        h2.send_headers(sid, headers, end_stream=end and not data and not exchange.requestTrailers)
        for chunk in data:
            self.sendBody(chunk)
        if end and (data or exchange.requestTrailers):
            self.sendEnd()
        elif end:
            self.ended = True
        conn.touched()

    def sendBody(self, data: bytes) -> None:
        if self.closed or not data:
            return
        if type(data) is not bytes:
            data = bytes(data)  # a view of an HTTP/1.1 door's read: the codecs take bytes
        if self.pending:
            # Behind bytes the window holds back: in order, the held tail first.
            if self.tail:
                self.pending.append(self.tail)
                self.tail = b""
                self.conn.tails.pop(self.id, None)
            self.pending.append(data)
            return
        tail = self.tail
        self.tail = data
        if tail:
            self.sendNow(tail)
        else:
            self.conn.tails[self.id] = self
            self.conn.touched()

    def sendNow(self, data: bytes) -> None:
        """
        Send request bytes within the service's windows; hold the rest and pause the
        client.
        """
        if self.closed:
            return
        conn = self.conn
        if self.pending:
            self.pending.append(data)
            return
        h2 = conn.h2
        size = len(data)
        window = 0 if conn.writePaused else h2.local_flow_control_window(self.id)
        frame = h2.max_outbound_frame_size
        if size <= window and size <= frame:
            h2.send_data(self.id, data)
        else:
            offset = 0
            while offset < size and window > 0:
                n = min(window, frame, size - offset)
                h2.send_data(self.id, data[offset:offset + n])
                offset += n
                window -= n
            if offset < size:
                self.pending.append(data[offset:] if offset else data)
                conn.blocked[self.id] = self
                if self.source is not None:
                    self.source.pauseProducing()
        conn.touched()

    def sendEnd(self) -> None:
        if self.closed or self.ended:
            return
        tail = self.tail
        if tail:
            self.tail = b""
            self.conn.tails.pop(self.id, None)
            exchange = self.exchange
            h2 = self.conn.h2
            if (not self.pending and not (exchange is not None and exchange.requestTrailers)
                    and not self.conn.writePaused and len(tail) <= h2.max_outbound_frame_size
                    and len(tail) <= h2.local_flow_control_window(self.id)):
                # The last DATA frame ends the request.
                h2.send_data(self.id, tail, end_stream=True)
                self.ended = True
                self._releaseSource()
                self.conn.touched()
                return
            self.sendNow(tail)
        if self.pending:
            self.ending = True
            return
        self.ended = True
        exchange = self.exchange
        trailers = exchange.requestTrailers if exchange is not None else None
        h2 = self.conn.h2
        try:
            if trailers:
                h2.send_headers(self.id, trailers, end_stream=True)
            else:
                h2.end_stream(self.id)
        except ProtocolError:
            pass
        self._releaseSource()
        self.conn.touched()

    def streamFrom(self, producer: Any) -> None:
        if self.source is None:
            self.source = producer
            if self.pending:
                producer.pauseProducing()

    def closeWrite(self) -> None:
        """
        Not used: no HTTP/2 stream is upgraded.
        """

    def abandon(self) -> None:
        """
        Reset the stream (CANCEL): the exchange no longer wants it.
        """
        self.exchange = None
        if self.closed:
            return
        self.closed = True
        self.tail = b""
        self.conn.tails.pop(self.id, None)
        try:
            self.conn.h2.reset_stream(self.id, ErrorCodes.CANCEL)
        except ProtocolError:
            pass
        self._releaseSource()
        self.conn.streamClosed(self)
        self.conn.touched()

    # -- the producer of the response ------------------------------------------------

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.unacked:
            unacked, self.unacked = self.unacked, 0
            if not self.closed:
                self.conn.h2.acknowledge_received_data(unacked, self.id)
                self.conn.touched()

    def stopProducing(self) -> None:
        self.abandon()

    # -- internals -------------------------------------------------------------------

    def _releaseSource(self) -> None:
        source, self.source = self.source, None
        if source is not None:
            source.resumeProducing()

    def drain(self) -> None:
        """
        The service's window opened: send what waits, then the end.
        """
        if self.closed:
            return
        h2 = self.conn.h2
        frame = h2.max_outbound_frame_size
        pending = self.pending
        while pending and not self.conn.writePaused:
            window = h2.local_flow_control_window(self.id)
            if window <= 0:
                break
            data = pending[0]
            n = min(window, frame, len(data))
            if n == len(data):
                pending.pop(0)
                h2.send_data(self.id, data)
            else:
                h2.send_data(self.id, data[:n])
                pending[0] = data[n:]
        if pending:
            return
        self.conn.blocked.pop(self.id, None)
        if self.ending:
            self.ending = False
            self.sendEnd()
        elif self.source is not None:
            self.source.resumeProducing()


@implementer(IPushProducer)
class H2UpstreamConnection(Protocol):
    """
    One HTTP/2 connection to the service, carrying many streams.
    """

    def __init__(self, pool: H2UpstreamPool) -> None:
        self.pool = pool
        self.h2 = newConnection(pool.h2config, True, clientConfiguration)
        self.streams: Dict[int, H2UpstreamStream] = {}
        self.blocked: Dict[int, H2UpstreamStream] = {}
        #: Streams holding their last body bytes until the next flush.
        self.tails: Dict[int, H2UpstreamStream] = {}
        self.ready = False
        self.goneAway = False
        self.writePaused = False
        self.idleSince = 0.0
        self._flushCall: Any = None
        self._inRead = False
        self._write: Any = None

    def capacity(self) -> int:
        """
        How many more streams this connection may open now.
        """
        if not self.ready or self.goneAway:
            return 0
        limit = min(self.h2.remote_settings.max_concurrent_streams, self.pool.h2config.maxConcurrentStreams)
        return limit - len(self.streams)

    def open(self, exchange: Exchange, reused: bool) -> None:
        """
        Give C{exchange} a new stream on this connection.
        """
        # The stream joins C{streams} when it sends its head (L{H2UpstreamStream.sendRequest}).
        exchange.upstreamConnected(H2UpstreamStream(self, exchange), reused)

    # -- transport -------------------------------------------------------------------

    def connectionMade(self) -> None:
        self._write, _ = prepare(self.transport)
        config = self.pool.h2config
        startConnection(self.h2, config, client=True)
        self.transport.registerProducer(self, True)
        self.ready = True
        self.flush()
        self.pool.connected(self)

    def dataReceived(self, data: bytes) -> None:
        self._inRead = True
        touched: Dict[int, Exchange] = {}
        #: Response bytes taken by each stream in this read, acknowledged once at its end.
        acks: Dict[int, int] = {}
        try:
            try:
                events = self.h2.receive_data(data)
            except ProtocolError as e:
                self.flush()
                self._failAll(Failure(ConnectionLost(f"HTTP/2 protocol error from the service: {e}")), protocol=True)
                self.transport.loseConnection()
                return
            kinds = _KINDS
            for event in events:
                cls = kinds.get(event.__class__)
                stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
                if cls is DataReceived:
                    size = event.flow_controlled_length
                    exchange = stream.exchange if stream is not None else None
                    if exchange is None:
                        if size:
                            self.h2.acknowledge_received_data(size, event.stream_id)
                        continue
                    exchange.responseBody(event.data)
                    touched[id(exchange)] = exchange
                    if stream.paused:  # type: ignore[union-attr]
                        stream.unacked += size  # type: ignore[union-attr]
                    elif size and not stream.closed:  # type: ignore[union-attr]
                        acks[event.stream_id] = acks.get(event.stream_id, 0) + size
                elif cls is ResponseReceived:
                    if stream is None or stream.exchange is None:
                        continue
                    exchange = stream.exchange
                    status, regular = responseFromHeaders(event.headers)
                    stream.responseStarted = True
                    touched[id(exchange)] = exchange
                    exchange.responseHead(status, b"", responseHead(regular, exchange.engine.serverHeader))
                elif cls is TrailersReceived:
                    if stream is not None:
                        stream.trailers = list(event.headers)
                elif cls is StreamEnded:
                    if stream is None:
                        continue
                    exchange, stream.exchange = stream.exchange, None
                    if exchange is None:
                        continue
                    touched[id(exchange)] = exchange
                    stream.responseStarted = True
                    # Released when the request has ended too; else reset (CANCEL).
                    exchange.responseComplete(stream.ended, stream.trailers)
                elif cls is StreamReset:
                    if stream is None:
                        continue
                    self._reset(stream, event.error_code)
                elif cls is WindowUpdated:
                    if event.stream_id:
                        if stream is not None and stream.pending:
                            stream.drain()
                    else:
                        self._drainAll()
                elif cls is RemoteSettingsChanged:
                    self._drainAll()
                    self.pool.capacityChanged()
                elif cls is ConnectionTerminated:
                    self._goneAway(event.last_stream_id, event.error_code)
            for sid, size in acks.items():
                stream = self.streams.get(sid)
                if stream is None or stream.closed:
                    # Over since: only the connection's window matters now.
                    self.h2.acknowledge_received_data(size, sid)
                elif stream.paused:
                    stream.unacked += size
                else:
                    self.h2.acknowledge_received_data(size, sid)
        finally:
            self._inRead = False
        self.flush()
        for exchange in touched.values():
            exchange.upstreamReadDone()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.ready = False
        call, self._flushCall = self._flushCall, None
        if call is not None and call.active():
            call.cancel()
        self._failAll(reason)
        self.pool.lost(self)

    # -- IPushProducer (for our transport) -------------------------------------------

    def pauseProducing(self) -> None:
        self.writePaused = True

    def resumeProducing(self) -> None:
        self.writePaused = False
        self._drainAll()
        self.flush()

    def stopProducing(self) -> None:
        self.writePaused = False

    # -- internals -------------------------------------------------------------------

    def touched(self) -> None:
        if not self._inRead and self._flushCall is None and self.transport is not None:
            self._flushCall = self.pool.clock.callLater(0, self.flush)

    def flush(self) -> None:
        call, self._flushCall = self._flushCall, None
        if call is not None and call.active():
            call.cancel()
        tails = self.tails
        if tails:
            self.tails = {}
            for stream in tails.values():
                tail, stream.tail = stream.tail, b""
                if tail:
                    stream.sendNow(tail)
        data = self.h2.data_to_send()
        if data and self.transport is not None:
            self._write(data)

    def _drainAll(self) -> None:
        for stream in list(self.blocked.values()):
            stream.drain()

    def _reset(self, stream: H2UpstreamStream, code: int) -> None:
        stream.closed = True
        self.streamClosed(stream)
        exchange, stream.exchange = stream.exchange, None
        stream._releaseSource()
        if exchange is None:
            return
        refused = code == ErrorCodes.REFUSED_STREAM
        exchange.upstreamLost(Failure(StreamReset_(f"the service reset the stream ({ErrorCodes(code).name if code in ErrorCodes._value2member_map_ else code})")),
                              refused, stream.responseStarted and not refused, UPSTREAM_REMOTE_RESET)

    def _goneAway(self, lastStreamId: int, code: int) -> None:
        """
        The service's GOAWAY: streams after C{lastStreamId} were not processed (they may
        be retried elsewhere); the others finish, then the connection closes.
        """
        self.goneAway = True
        self.pool.goneAway(self)
        for sid, stream in list(self.streams.items()):
            if sid > lastStreamId:
                stream.closed = True
                self.streamClosed(stream)
                exchange, stream.exchange = stream.exchange, None
                if exchange is not None:
                    exchange.upstreamLost(Failure(StreamReset_("the service went away (GOAWAY) before the stream")),
                                          True, False, UPSTREAM_REMOTE_RESET)
        if not self.streams and self.transport is not None:
            self.transport.loseConnection()

    def _failAll(self, reason: Failure, protocol: bool = False) -> None:
        streams, self.streams = self.streams, {}
        self.blocked = {}
        self.tails = {}
        for stream in streams.values():
            stream.closed = True
            stream._releaseSource()
            exchange, stream.exchange = stream.exchange, None
            if exchange is not None:
                if protocol:
                    exchange.upstreamProtocolError(reason.getErrorMessage())
                else:
                    exchange.upstreamLost(reason, stream.reused, stream.responseStarted,
                                          UPSTREAM_CONNECTION_TERMINATION)

    def streamClosed(self, stream: H2UpstreamStream) -> None:
        """
        C{stream} is over: free its slot.
        """
        if self.streams.pop(stream.id, None) is not None:
            self.blocked.pop(stream.id, None)
            if not self.streams:
                self.idleSince = self.pool.clock.seconds()
                if self.goneAway and self.transport is not None:
                    self.transport.loseConnection()
            self.pool.capacityChanged()


#: Each codec's event classes, as h2's (the nghttp2 codec's are leaner namesakes).
_KINDS: Dict[type, type] = {cls: cls for cls in (
    DataReceived, ResponseReceived, TrailersReceived, StreamEnded, StreamReset, WindowUpdated,
    RemoteSettingsChanged, ConnectionTerminated)}
_KINDS.update({
    ng.DataReceived: DataReceived, ng.ResponseReceived: ResponseReceived, ng.TrailersReceived: TrailersReceived,
    ng.StreamEnded: StreamEnded, ng.StreamReset: StreamReset, ng.WindowUpdated: WindowUpdated,
    ng.RemoteSettingsChanged: RemoteSettingsChanged, ng.ConnectionTerminated: ConnectionTerminated,
})


class _ConnectAttempt(ClientFactory):
    protocol = H2UpstreamConnection
    noisy = False

    def __init__(self, pool: H2UpstreamPool) -> None:
        self.pool = pool

    def buildProtocol(self, addr: Any) -> H2UpstreamConnection:
        conn = H2UpstreamConnection(self.pool)
        conn.factory = self  # type: ignore[attr-defined]
        return conn

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.pool.connectFailed(reason)


class H2UpstreamPool:
    """
    HTTP/2 connections to the service, streams multiplexed over them.

    A new connection is made only when every open one carries as many streams as it
    may; at most C{config.maxConnections} are open or opening, and past that
    exchanges wait (at most C{config.maxPending}), then get 503 with flag C{UO}.

    @ivar address: C{host:port} of the service.
    """

    def __init__(self, reactor: IReactorTCP, clock: IReactorTime, config: UpstreamConfig,
                 h2config: H2Config = H2Config()) -> None:
        self.reactor = reactor
        self.clock = clock
        self.config = config
        self.h2config = h2config
        self.address = config.address
        self.conns: List[H2UpstreamConnection] = []
        self.connecting = 0
        self.connects = 0
        self.connectFailures = 0
        self.overflows = 0
        self.pending: Deque[Exchange] = deque()
        self._serving = False

    @property
    def active(self) -> int:
        """
        Connections carrying a stream.
        """
        return sum(1 for c in self.conns if c.streams)

    @property
    def idle(self) -> List[H2UpstreamConnection]:
        """
        Connections carrying no stream.
        """
        return [c for c in self.conns if not c.streams]

    def acquire(self, exchange: Exchange, fresh: bool = False) -> None:
        """
        Give C{exchange} a stream on a connection with room, or wait for one.
        """
        for conn in self.conns:
            if conn.capacity() > 0:
                conn.open(exchange, bool(conn.streams) or conn.idleSince > 0)
                return
        if len(self.pending) >= self.config.maxPending and (self.connecting or self.conns):
            self.overflows += 1
            exchange.overflow()
            return
        self.pending.append(exchange)
        if not self.connecting and len(self.conns) < self.config.maxConnections:
            self._connect()

    def _connect(self) -> None:
        self.connecting += 1
        self.reactor.connectTCP(self.config.host, self.config.port, _ConnectAttempt(self),
                                timeout=self.config.connectTimeout)

    def cancel(self, exchange: Exchange) -> None:
        """
        C{exchange} no longer wants a stream.
        """
        try:
            self.pending.remove(exchange)
        except ValueError:
            pass

    def release(self, stream: Any) -> None:
        """
        C{stream}'s response is complete and its request too: it is over.
        """
        stream.exchange = None
        stream.closed = True
        stream.conn.streamClosed(stream)

    def connected(self, conn: H2UpstreamConnection) -> None:
        self.connecting -= 1
        self.connects += 1
        self.conns.append(conn)
        self.capacityChanged()

    def connectFailed(self, reason: Failure) -> None:
        """
        A connect failed: the exchanges waiting fail with it, unless a connection
        remains that will take them.
        """
        self.connecting -= 1
        self.connectFailures += 1
        if self.conns:
            return
        pending, self.pending = self.pending, deque()
        for exchange in pending:
            if not exchange.finished:
                exchange.upstreamConnectFailed(reason)

    def capacityChanged(self) -> None:
        """
        A stream ended or the service's settings changed: serve the waiting.
        """
        if self._serving:
            return
        self._serving = True
        try:
            pending = self.pending
            while pending:
                conn = next((c for c in self.conns if c.capacity() > 0), None)
                if conn is None:
                    if not self.connecting and len(self.conns) < self.config.maxConnections:
                        self._connect()
                    break
                exchange = pending.popleft()
                if not exchange.finished:
                    conn.open(exchange, False)
        finally:
            self._serving = False

    def goneAway(self, conn: H2UpstreamConnection) -> None:
        """
        C{conn} takes no more streams.
        """
        if conn in self.conns:
            self.conns.remove(conn)
        self.capacityChanged()

    def lost(self, conn: H2UpstreamConnection) -> None:
        if conn in self.conns:
            self.conns.remove(conn)
        self.capacityChanged()

    def sweep(self) -> None:
        """
        Close the connections idle longer than the idle timeout.
        """
        deadline = self.clock.seconds() - self.config.idleTimeout
        for conn in list(self.conns):
            if not conn.streams and conn.idleSince and conn.idleSince < deadline:
                self.conns.remove(conn)
                conn.transport.loseConnection()

    def closeAll(self) -> None:
        """
        Close every idle connection (at shutdown).
        """
        for conn in list(self.conns):
            if not conn.streams:
                self.conns.remove(conn)
                conn.transport.loseConnection()
