# -*- test-case-name: tests.test_behaviour -*-
"""
The fast front door: one L{DownstreamProtocol} per client connection, parsing HTTP/1.1
with llhttp (C{httptools}) and handing each request to an L{Exchange}.

Keep-alive and pipelining are supported: requests are parsed as they come, queued, and
answered strictly in order, one exchange at a time.  Every byte stream to and from the
service is tied to the client's transport with producers, so memory stays bounded.
"""

from __future__ import annotations

from typing import Any, List, Optional

import httptools
from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer

from sidecar import http1
from sidecar.exchange import SENDING, Engine, Exchange
from sidecar.listen import SERVERS, FastServer
from sidecar.record import DOWNSTREAM_PROTOCOL_ERROR, UNAUTHORIZED
from sidecar.tcp import SPLICE_MIN, KernelPath, kernelSpliceable
from sidecar.transport import BUFFER_SIZE, halfClose, prepare
from sidecar.headers import Headers, RequestHead, ResponseHead, bodyForbidden, requestHead

#: Why reading from the client is paused (a bit each; reading resumes when none is left).
_UPSTREAM_FULL = 1  # the upstream's send buffer is full (request body backpressure)
_EXCHANGE = 2  # the exchange is holding body bytes until its upstream is connected
_QUEUE = 4  # pipelined requests are waiting their turn
_ERROR = 8  # a malformed request: nothing more is read
_UPGRADE = 16  # an upgrade request waits for the service's answer

#: How many pipelined requests may wait before the client is paused.
MAX_QUEUED = 16

#: How many headers a request may have (Envoy's default).
MAX_HEADERS = 100

#: Protocol names llhttp accepts in a request line besides C{HTTP/} (and reports as
#: HTTP versions): refused with 505.
_OTHER_PROTOCOLS = (b"RTSP/", b"ICE/")

#: llhttp's own complaints that deserve another status than 400.
_PARSER_STATUS = {
    "Invalid `Transfer-Encoding` header value": 501,
    "Request has invalid `Transfer-Encoding`": 501,
    "Invalid HTTP version": 505,
}


class _Queue(list):  # of Exchange
    """
    The pipelined requests waiting their turn on one connection: at most
    L{MAX_QUEUED}, and usually none, so a list (56 bytes empty) rather than a
    C{deque} (760 bytes empty, an eighth of an idle connection's memory).
    """

    __slots__ = ()

    def popleft(self) -> Exchange:
        """
        The oldest waiting request, removed.
        """
        return self.pop(0)


class _Refusal(Exception):
    """
    A request that must be refused before it becomes an exchange.
    """

    def __init__(self, status: int, message: str) -> None:
        Exception.__init__(self, message)
        self.status = status
        self.message = message


#: Raised from L{DownstreamProtocol.on_headers_complete} to stop llhttp at the end of a
#: head whose Content-Length body follows in the same read: the door passes the body
#: on as a view of the read instead of the copy llhttp's body callback would make.
_BODY_FOLLOWS = _Refusal(0, "the body follows in this read")


@implementer(IPushProducer)
class DownstreamProtocol(Protocol):
    """
    One client connection.

    It is also a producer: registered with an upstream connection's transport while a
    request body streams, so that a slow service pauses the client.

    @ivar clientAddress: C{ip:port} of the client.
    @ivar peerPrincipal: the client's SPIFFE id under mutual TLS, else empty.
    @ivar mutualTLS: whether the connection is mutual TLS.
    """

    peerPrincipal = ""
    mutualTLS = False
    direction = "inbound"
    proto = b"http"
    #: When set, every request on this connection is answered 403 with this body (an
    #: identity the authorization policy refuses).
    denial: Optional[bytes] = None
    #: A verified mesh peer's L{sidecar.peers.PeerMemory}: each exchange gets the
    #: peer's labels from it (and the peer-metadata header it sent); C{None} on
    #: plaintext, where that header is dropped unread.
    peers: Any = None
    #: Reads so far, and what the doors registry's sweep last saw of it.
    activity = 0
    sweptActivity = -1
    idleSince: Optional[float] = None
    #: A request head has begun and not ended; since when (as the sweep saw it).
    inHead = False
    headSince: Optional[float] = None
    #: The client's FIN on a tunnel has been passed on.
    _tunnelReadDone = False
    #: While the kernel moves the rest of a request body to the service: its path.
    kernelPath: Optional[KernelPath] = None
    #: The parser is running (a close then waits for the reactor: see L{_closeAtOnce}).
    _feeding = False
    #: The client's address as the listener accepted it (L{DownstreamFactory.buildProtocol}),
    #: so that the transport need not build it again; C{None}: ask the transport.
    acceptedAddress: Any = None

    # The state of a connection that has read nothing yet, as class defaults (each set
    # on the instance when it changes): a new connection's set-up stores 4 attributes,
    # not 34.
    clientAddress = "-"
    clientIP = "-"
    _parser: Any = None
    _current: Optional[Exchange] = None
    _parsing: Optional[Exchange] = None
    _pauses = 0
    _advancing = False
    _closing = False
    _chunkedOut = False
    _head = b""
    _producer: Any = None
    _tunnel: Optional[Exchange] = None
    _early: Optional[List[bytes]] = None
    _upgrading: Optional[Exchange] = None
    _refusal: Optional[_Refusal] = None
    _url = b""
    _headBytes = 0
    _inBody = False
    _identified = False
    #: The bytes being parsed, and where in them the last request target ended;
    #: then the bytes after that target, up to 6 (to read the protocol name, which
    #: llhttp does not report), or C{None} outside a request line.
    _feed = b""
    _feedAt = 0
    _afterTarget: Optional[bytes] = None
    #: The request body's length by the proxy's own parse of C{Content-Length}
    #: (C{None}: no body, or chunked), the body bytes llhttp has passed on, and the
    #: body bytes still to come past the parser (L{_rawBody}).
    _bodyLength: Optional[int] = None
    _bodySeen = 0
    _rawLeft = 0
    #: An exchange with a Content-Length body whose head arrived in this read: it
    #: begins when the read is parsed, so that the body bytes of the same read go
    #: upstream with its head, in one send.
    _beginAfterRead: Optional[Exchange] = None
    #: No message was under way when this read came (L{dataReceived}), and the
    #: message being parsed is the first to begin in it (L{on_message_begin}):
    #: then its request line starts the read if the read starts with its method.
    _atBoundary = False
    _firstInRead = False
    #: Where, in this read, the body of the request whose head just ended begins.
    _bodyAt = 0

    def __init__(self, engine: Engine, maxHeaderBytes: int = 64 * 1024) -> None:
        self.engine = engine
        self.maxHeaderBytes = maxHeaderBytes
        self._queue: _Queue = _Queue()
        self._headers: Headers = []

    # -- connection ------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.engine.doors.add(self)
        peer = self.acceptedAddress or self.transport.getPeer()
        self.acceptedAddress = None  # (not kept for the connection's life)
        host = getattr(peer, "host", None)
        if host is not None:
            self.clientIP = host
            self.clientAddress = f"[{host}]:{peer.port}" if ":" in host else f"{host}:{peer.port}"
        self._parser = httptools.HttpRequestParser(self)
        #: The Host given to an HTTP/1.0 request without one: the service's address.
        self._defaultHost = self.engine.pool.address.encode("ascii")
        transport = self.transport
        if type(transport) is FastServer:
            self._write, self._writeSequence = transport.writers(BUFFER_SIZE)
        else:
            self._write, self._writeSequence = prepare(transport)
        recorder = self.engine.recorder
        recorder.downstreamConnectionsActive += 1
        recorder.downstreamConnectionsTotal += 1

    def dataReceived(self, data: bytes) -> None:
        self.activity += 1
        if self._tunnel is not None:
            self._tunnel.tunnelToUpstream(data)
            return
        if self._closing:
            return
        if self._rawLeft:
            data = self._rawBody(data)
            if not data:
                if self._rawLeft > SPLICE_MIN and self.kernelPath is None:
                    self._spliceRequestBody()
                return
            if self._closing:
                # (Closed at the end of that body: what follows is not read.)
                return
        if self._early is not None:
            # Bytes sent after an upgrade request, before the service said yes.
            self._early.append(data)
            self._pause(_UPGRADE)
            return
        after = self._afterTarget
        if after is not None and len(after) < 6:
            # The request line was cut after its target: its protocol starts here.
            self._afterTarget = after + data[:6 - len(after)]
        self._feed = data
        self._feedAt = 0
        self._feeding = True
        self._atBoundary = not self.inHead and self._parsing is None
        after = b""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._upgradeRequested(data[e.args[0]:])
        except httptools.HttpParserCallbackError:
            refusal, self._refusal = self._refusal, None
            if refusal is None:
                raise
            if refusal is _BODY_FOLLOWS:
                _BODY_FOLLOWS.__traceback__ = None
                self._rawLeft = self._bodyLength  # type: ignore[assignment]
                after = self._rawBody(memoryview(data)[self._bodyAt:])
            else:
                self._refuse(refusal.status, refusal.message)
        except httptools.HttpParserError as e:
            message = str(e)
            self._refuse(_PARSER_STATUS.get(message, 400), message)
        else:
            length = self._bodyLength
            if length is not None and self._parsing is not None:
                # The rest of a Content-Length body needs no parsing: the next reads
                # go to the exchange as they are (no copy by llhttp, no callback).
                self._rawLeft = length - self._bodySeen
        finally:
            self._feeding = False
        later = self._beginAfterRead
        if later is not None:
            self._beginAfterRead = None
            if self._current is later and not later.finished:
                self._begin(later)
        if after:
            # What followed that body in the read (pipelined requests), for the
            # fresh parser.
            self.dataReceived(after)
            return
        if self._rawLeft > SPLICE_MIN and self.kernelPath is None:
            self._spliceRequestBody()

    def _rawBody(self, data: bytes) -> bytes:
        """
        Bytes of a Content-Length request body past llhttp: pass them on, and complete
        the request with its last byte.  A fresh parser reads what follows (llhttp's
        own is still inside the body).

        @return: the bytes after the body (a pipelined request), or C{b""}.
        """
        left = self._rawLeft
        size = len(data)
        exchange = self._parsing
        if size < left:
            self._rawLeft = left - size
            if exchange is not None:
                exchange.requestBody(data)
            return b""
        self._rawLeft = 0
        if self.kernelPath is not None:
            self._endRequestSplice()
        if exchange is not None:
            exchange.requestBody(data if size == left else data[:left])
        self._parser = httptools.HttpRequestParser(self)
        self.on_message_complete()
        # (A copy when C{data} is a view of a read: llhttp and the target's search
        # want bytes.)
        return bytes(data[left:]) if size > left else b""

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.engine.doors.discard(self)
        self.engine.recorder.downstreamConnectionsActive -= 1
        self._closing = True
        self._endRequestSplice()
        tunnel, self._tunnel = self._tunnel, None
        if tunnel is not None:
            tunnel.tunnelClosed()
        current, self._current = self._current, None
        if current is not None and not current.finished:
            current.downstreamLost()
        queue = self._queue
        if queue:
            self._queue = _Queue()
            for exchange in queue:
                exchange.downstreamLost()
        # The parser holds this protocol's callbacks: without this, the connection's
        # objects (protocol, parser, transport, socket) outlive it as a reference cycle
        # that only the garbage collector frees (33 objects per connection, and the
        # collections they trigger cost 9% of a new connection's CPU).
        self._parser = None

    # -- parser callbacks (llhttp) ---------------------------------------------------

    def on_message_begin(self) -> None:
        self.inHead = True
        self._firstInRead = self._atBoundary
        self._atBoundary = False
        self._url = b""
        self._headers = []
        self._headBytes = 0
        self._inBody = False
        self._bodyLength = None

    def on_url(self, url: bytes) -> None:
        self._url += url
        feed = self._feed
        at = feed.find(url, self._feedAt)
        if at >= 0:
            self._feedAt = at = at + len(url)
            self._afterTarget = feed[at:at + 6]
        self._headBytes += len(url)
        if self._headBytes > self.maxHeaderBytes:
            self._refusal = _Refusal(414, "request target too long")
            raise self._refusal

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._inBody:
            return  # a trailer: dropped
        headers = self._headers
        headers.append((name, value))
        self._headBytes += len(name) + len(value) + 4
        if self._headBytes > self.maxHeaderBytes:
            self._refusal = _Refusal(431, "request header section too large")
            raise self._refusal
        if len(headers) > MAX_HEADERS:
            self._refusal = _Refusal(431, "too many request headers")
            raise self._refusal

    def on_headers_complete(self) -> None:
        self.inHead = False
        self.headSince = None
        if not self._identified:
            self._identified = True
            self.identify()
        parser = self._parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            self._refusal = _Refusal(505, f"HTTP/{version} is not supported")
            raise self._refusal
        after, self._afterTarget = self._afterTarget, None
        if after is not None and after.startswith(_OTHER_PROTOCOLS, 1):
            self._refusal = _Refusal(505, "only HTTP is supported")
            raise self._refusal
        method = parser.get_method()
        if method == b"CONNECT":
            self._refusal = _Refusal(405, "CONNECT is not supported")
            raise self._refusal
        engine = self.engine
        req = requestHead(method, self._url, version, self._headers, self.clientIP, self.proto,
                          self.extraRequestHeaders(), self._defaultHost, engine.headersWithUnderscores)
        if req.error is not None:
            self._refusal = _Refusal(req.status, req.error)
            raise self._refusal
        self._inBody = True
        exchange = engine.exchange(self, method, req.target, version, req)
        if self.peers is not None:
            exchange.peer = self.peers.learn(req.peerMetadata)
        if not parser.should_keep_alive():
            exchange.mustClose = True
        if req.chunked or req.contentLength or req.upgrade:
            self._parsing = exchange
            if req.contentLength and not req.upgrade:
                self._bodyLength = req.contentLength
                self._bodySeen = 0
        else:
            # No body: the request is whole with its head (llhttp completes it next),
            # so the upstream gets the head and the end at once, and no producer is
            # registered for a body that will not come.
            exchange.requestDone = True
        if req.upgrade:
            self._upgrading = exchange
        if self._current is None and not self._queue:
            self._current = exchange
            if self._bodyLength is not None:
                self._beginAfterRead = exchange
            else:
                self._begin(exchange)
        else:
            self._queue.append(exchange)
            if len(self._queue) >= MAX_QUEUED:
                self._pause(_QUEUE)
        if self._bodyLength is not None and self._firstInRead and self._feeding:
            feed = self._feed
            if feed.startswith(method):
                # The read starts with this request line (no message was under way,
                # none began before it in this read), and llhttp takes only CRLF line
                # ends with no CR or LF inside a line: the first blank line ends the
                # head, and its body follows.  Stop llhttp here; dataReceived passes
                # the body on as a view of the read (llhttp would copy it).
                end = feed.find(b"\r\n\r\n")
                if 0 < end < len(feed) - 4:
                    self._bodyAt = end + 4
                    self._refusal = _BODY_FOLLOWS
                    # (Without its last traceback: a raised instance adds to the one it
                    # has, which would keep every earlier request's frames alive.)
                    raise _BODY_FOLLOWS.with_traceback(None)

    def on_body(self, body: bytes) -> None:
        self._bodySeen += len(body)
        exchange = self._parsing
        if exchange is not None:
            exchange.requestBody(body)

    def on_message_complete(self) -> None:
        exchange, self._parsing = self._parsing, None
        self._inBody = False
        self._bodyLength = None
        if exchange is not None:
            exchange.requestComplete()

    # -- the rest of a request body, moved by the kernel -------------------------------

    def _spliceRequestBody(self) -> None:
        """
        More than one read of a Content-Length request body remains past llhttp
        (L{_rawBody}): let the kernel move it from the client's socket to the
        service's through a pipe (L{KernelPath}, bounded to the body's length, so a
        pipelined request after it stays in the socket for llhttp), when both are plain
        TCP, the request is going up (its head sent, the body sent as it comes) and
        nothing wants to see the bytes (no body filter, no gRPC count).  A read that
        Twisted takes meanwhile (the service's socket had bytes queued) goes through
        L{_rawBody}, which also ends the path with the body's last byte.
        """
        exchange = self._parsing
        if (not isinstance(self.transport, tcp.Connection) or exchange is None or exchange is not self._current
                or exchange.phase != SENDING or self._pauses or exchange.grpc is not None
                or exchange.call is not None and exchange.chain.requestBodies):  # type: ignore[union-attr]
            return
        stream = exchange.stream
        sink = getattr(stream, "requestSink", None)
        upstream = sink(exchange) if sink is not None else None
        if upstream is None or not kernelSpliceable(self.transport, upstream):
            return
        self.kernelPath = KernelPath(self.transport, upstream, self._splicedUp, self._requestLeft,
                                     self._requestPipeEmptied, getattr(stream.pool, "pipes", None))  # type: ignore[union-attr]

    def _requestLeft(self) -> int:
        return self._rawLeft

    def _splicedUp(self, size: int) -> None:
        """
        The kernel read C{size} bytes of the request body: count them as a read
        through L{_rawBody} is counted.
        """
        self._rawLeft -= size
        self.activity += 1
        exchange = self._parsing
        if exchange is not None:
            exchange.requestBodySpliced(size)

    def _requestPipeEmptied(self) -> None:
        """
        The service's socket took what the pipe held: after the body's last byte, the
        request is complete, and a fresh parser reads what follows (llhttp's own is
        still inside the body).
        """
        if not self._rawLeft and self.kernelPath is not None:
            self._endRequestSplice()
            self._parser = httptools.HttpRequestParser(self)
            self.on_message_complete()

    def _endRequestSplice(self) -> None:
        """
        Give both sockets back to Twisted and the pipe back to its stock.
        """
        path = self.kernelPath
        if path is not None:
            self.kernelPath = None
            path.close()

    # -- what an exchange asks of its door -------------------------------------------

    def identify(self) -> None:
        """
        Learn who the client is, once, at its first request (a TLS handshake is over by
        then).  Subclasses set L{peerPrincipal}, L{mutualTLS}, L{proto} and L{denial}.
        """

    def extraRequestHeaders(self) -> Headers:
        """
        Headers the proxy adds to every request from this connection (mutual TLS adds
        C{X-Forwarded-Client-Cert}).
        """
        return []

    def sendContinue(self) -> None:
        self._write(http1.CONTINUE)

    def startResponse(self, exchange: Exchange, status: int, reason: bytes, head: ResponseHead) -> None:
        headers = head.headers
        closing = exchange.mustClose or self._closing or self.engine.draining
        self._chunkedOut = False
        exchange.mustClose = closing
        if status == 101:
            self._head = http1.switchingProtocols(reason, headers, head.upgrade or b"")
            return
        if exchange.req.upgrade:
            # The service said no to the upgrade: bytes the client may already have
            # sent in the new protocol can't be read as HTTP.
            closing = True
        # Framing is ours, from the upstream codec's parse (never the service's header).
        length = head.contentLength
        if bodyForbidden(exchange.method, status):
            if status < 200 or status == 204:
                length = None
        else:
            if length is None:
                if exchange.version == "1.1":
                    self._chunkedOut = True
                else:
                    closing = True
            stream = exchange.stream
            if stream is not None and self._producer is None and (length is None or length > BUFFER_SIZE):
                # A body that may not fit one buffer: let a slow client pause the
                # service.  (A smaller one is at most one buffer; no need.)
                self._producer = stream
                self.transport.registerProducer(stream, True)
        exchange.mustClose = closing
        # Held until the body of the same upstream read, or the end of that read (see
        # L{flush}): one send instead of two for most responses.
        self._head = http1.responseHead(
            status, reason, headers, length, self._chunkedOut,
            b"close" if closing else b"keep-alive" if exchange.version == "1.0" else None)

    def flush(self) -> None:
        """
        Send a response head still held back (the upstream's read is over).
        """
        head = self._head
        if head:
            self._head = b""
            self._write(head)

    def writeBody(self, data: bytes) -> None:
        if not data:
            return
        head, self._head = self._head, b""
        if self._chunkedOut:
            if head:
                self._writeSequence((head,) + http1.chunk(data))
            else:
                self._writeSequence(http1.chunk(data))
        elif head:
            self._writeSequence((head, data))
        else:
            self._write(data)

    def bodySink(self, exchange: Exchange) -> Optional[tcp.Connection]:
        """
        The client's socket, when the rest of C{exchange}'s response body may be moved
        to it by the kernel (L{sidecar.upstream.UpstreamConnection._spliceBody}): a
        plain TCP connection (never a TLS layer), a body this door framed with
        C{Content-Length}, and C{exchange} the response being written.

        @return: the transport, or C{None}: the body goes through L{writeBody}.
        """
        transport = self.transport
        if (self._chunkedOut or self._closing or self._current is not exchange
                or not isinstance(transport, tcp.Connection)):
            return None
        return transport

    def finishResponse(self, exchange: Exchange) -> None:
        head, self._head = self._head, b""
        if self._chunkedOut:
            self._chunkedOut = False
            self._write(head + http1.LAST_CHUNK)
        elif head:
            self._write(head)
        self._done(exchange)

    def abortResponse(self, exchange: Exchange) -> None:
        self.flush()
        exchange.mustClose = True
        self._chunkedOut = False
        self._done(exchange)

    def localReply(self, exchange: Exchange, status: int, body: bytes, headers: Headers = ()) -> None:  # type: ignore[assignment]
        closing = exchange.mustClose or self._closing or exchange.req.upgrade or self.engine.draining
        exchange.mustClose = closing
        self._write(http1.localReply(status, self.engine.serverHeader, body, closing,
                                     exchange.version == "1.0", exchange.method != b"HEAD", headers))
        self._done(exchange)

    def startTunnel(self, exchange: Exchange, stream: Any) -> None:
        self.flush()
        # From now on a FIN from the client is a half-close to pass on, not the end of
        # the connection (L{readConnectionLost}).
        alsoProvides(self, IHalfCloseableProtocol)
        self._tunnel = exchange
        self._current = None
        self._producer = stream
        self.transport.registerProducer(stream, True)
        early, self._early = self._early or [], None
        for data in early:
            exchange.tunnelToUpstream(data)
        self._resume(_EXCHANGE | _QUEUE | _UPGRADE)

    def readConnectionLost(self) -> None:
        """
        The client sent its FIN on the tunnel (declared only once tunnelling): the
        service gets a FIN, and its bytes still reach the client.
        """
        if self._tunnelReadDone:
            return
        self._tunnelReadDone = True
        tunnel = self._tunnel
        if tunnel is None:
            self._close()
        else:
            tunnel.tunnelClientFinished()

    def writeConnectionLost(self) -> None:
        """
        Our FIN to the client is sent; reading goes on.
        """

    def finishTunnel(self, exchange: Exchange) -> None:
        if self._producer is not None:
            self._producer = None
            self.transport.unregisterProducer()
        halfClose(self.transport)

    def closeTunnel(self, exchange: Exchange) -> None:
        if self._tunnel is exchange:
            self._tunnel = None
        if self._producer is not None:
            self._producer = None
            self.transport.unregisterProducer()
        self._close()

    def pauseReading(self) -> None:
        self._pause(_EXCHANGE)

    def resumeReading(self) -> None:
        self._resume(_EXCHANGE)

    # -- IPushProducer (for the upstream's transport) --------------------------------

    def pauseProducing(self) -> None:
        self._pause(_UPSTREAM_FULL)

    def resumeProducing(self) -> None:
        self._resume(_UPSTREAM_FULL)

    def stopProducing(self) -> None:
        self._resume(_UPSTREAM_FULL)

    # -- internals -------------------------------------------------------------------

    def _pause(self, why: int) -> None:
        if not self._pauses and self.transport is not None:
            self.transport.pauseProducing()
        self._pauses |= why

    def _resume(self, why: int) -> None:
        if self._pauses & why:
            self._pauses &= ~why
            if not self._pauses and self.transport is not None and not self._closing:
                self.transport.resumeProducing()

    def _begin(self, exchange: Exchange) -> None:
        if exchange.malformed is not None:
            exchange.clientProtocolError(exchange.malformed)
        elif self.denial is not None:
            exchange.reject(403, UNAUTHORIZED, self.denial)
        else:
            exchange.begin()

    def _done(self, exchange: Exchange) -> None:
        """
        The response to C{exchange} is written: unhook it and move to the next request.
        """
        if self._producer is not None:
            self._producer = None
            self.transport.unregisterProducer()
        if self._current is exchange:
            self._current = None
        if self._rawLeft and self.kernelPath is not None and self._parsing is exchange:
            # Answered before its body was all read (the connection closes).
            self._endRequestSplice()
            exchange.mustClose = True
        if exchange.mustClose:
            self._close()
            return
        self._advance()

    def _advance(self) -> None:
        if self._advancing:
            return
        self._advancing = True
        try:
            while self._current is None and self._queue and not self._closing:
                exchange = self._queue.popleft()
                self._current = exchange
                self._begin(exchange)
            if len(self._queue) < MAX_QUEUED:
                self._resume(_QUEUE)
        finally:
            self._advancing = False
        if self._current is None and self._refusal is not None and not self._closing:
            refusal, self._refusal = self._refusal, None
            self._refuse(refusal.status, refusal.message)

    def busy(self) -> bool:
        """
        Whether a request or a tunnel is in progress on this connection.
        """
        return bool(self._current is not None or self._queue or self._tunnel is not None or self.inHead)

    def answering(self) -> bool:
        """
        Whether a request already accepted is being answered or waits its turn.
        """
        return self._current is not None or bool(self._queue)

    def closeIdle(self) -> None:
        """
        Close the connection: the client has been idle too long.
        """
        self._close()

    def headTimedOut(self) -> None:
        """
        The request head did not arrive in time (a slow or stalled client): 408, close.
        """
        self.inHead = False
        self._refuse(408, "request head not received in time")

    def _close(self) -> None:
        if not self._closing:
            self._closing = True
            transport = self.transport
            if self._feeding or not _closeAtOnce(transport):
                transport.loseConnection()

    def _upgradeRequested(self, leftover: bytes) -> None:
        """
        llhttp stopped after an upgrade request's head; C{leftover} is what followed.
        """
        exchange, self._upgrading = self._upgrading, None
        if exchange is None:
            return
        # llhttp has completed the request at its head; what follows belongs to the new
        # protocol and waits for the service's 101.
        self._early = [leftover] if leftover else []

    def _refuse(self, status: int, message: str) -> None:
        """
        Answer a request that can't be served, then close: the connection can't be
        trusted to frame another request.
        """
        self._pause(_ERROR)
        body = f"{http1.reason(status).decode('ascii')}: {message}\n".encode("utf-8", "replace")
        parsing, self._parsing = self._parsing, None
        if parsing is not None:
            # The body of a request already accepted is malformed: it is refused in its
            # turn, and never goes upstream whole.
            if parsing is self._current:
                parsing.clientProtocolError(body)
            else:
                parsing.malformed = body
            return
        if self._current is not None or self._queue:
            # Answer in order: after the requests already accepted.
            self._refusal = _Refusal(status, message)
            return
        # What was never read is recorded as "-" (llhttp's method defaults to DELETE,
        # its version to 0.0): a method was read once a target began.
        parser = self._parser
        method = parser.get_method() if self._url and parser is not None else b"-"
        version = parser.get_http_version() if parser is not None else "0.0"
        req = RequestHead(authority="", requestId="", forwardedFor=self.clientIP)
        exchange = self.engine.exchange(self, method, self._url or b"-",
                                        "" if version == "0.0" else version, req)
        exchange.mustClose = True
        self._current = exchange
        exchange.reject(status, DOWNSTREAM_PROTOCOL_ERROR, body)


def _closeAtOnce(transport: Any) -> bool:
    """
    Close a plain TCP client connection at once, in order (FIN), when Twisted holds
    nothing to write for it; say whether it was done.

    Twisted's C{loseConnection} stops reading, waits for the socket to be writable,
    finds nothing to write and only then closes: two more C{epoll_ctl} calls and one
    more trip through the reactor per connection.  With nothing queued, that wait is
    for nothing: this closes and tells the protocol now, as Twisted's own
    C{loseConnection} does after a half-close (C{_writeDisconnected}).  A transport
    with bytes queued, a producer, TLS started on it, or any other kind of transport
    takes Twisted's way.
    """
    if type(transport) not in SERVERS or transport.TLS or transport.producer is not None:
        return False
    if (getattr(transport, "_tempDataLen", 1) or transport.dataBuffer or transport.disconnecting
            or not transport.connected):
        return False
    transport.connectionLost(_CLOSED)
    return True


#: The reason of an orderly close at once (as Twisted's reactor passes one shared
#: failure for every connection closed cleanly).
_CLOSED = Failure(ConnectionDone())


class DownstreamFactory(Factory):
    """
    Builds a L{DownstreamProtocol} per client connection.
    """

    noisy = False

    def __init__(self, engine: Engine, maxHeaderBytes: int = 64 * 1024) -> None:
        self.engine = engine
        self.maxHeaderBytes = maxHeaderBytes

    def buildProtocol(self, addr: Any) -> DownstreamProtocol:
        proto = DownstreamProtocol(self.engine, self.maxHeaderBytes)
        proto.factory = self
        proto.acceptedAddress = addr
        return proto
