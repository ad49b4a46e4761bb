# -*- test-case-name: tests.test_webdoor -*-
"""
The twisted.web front door: L{SidecarProxyResource}, a L{ReverseProxyResource} that
forwards through the sidecar's engine (pooled upstream connections, timing, records)
instead of the base class's one-connection-per-request client.

Two ways to serve it:

  - L{SidecarSite} (what C{twistd sidecar --engine web} runs): its L{SidecarChannel}
    and L{StreamingRequest} hand the request to the resource as soon as the head has
    arrived and stream the body to the service with backpressure, as the fast door
    does.  The channel answers malformed, oversized and slow requests as the proxy
    (C{Server} header, body, a C{DPE} record), honours C{--max-header-bytes}, and is
    registered in C{engine.doors} so that C{--client-idle-timeout} and
    C{--request-head-timeout} apply instead of twisted.web's own 60 s.
  - Your own L{Site}, with twisted.web's own C{Request}: twisted.web reads the whole
    body first (memory up to 100 KB, then a temporary file on disk, with no limit of
    its own) and the resource forwards it once complete, with a C{Content-Length}.
    C{engine.maxRequestBytes} still refuses a larger body with 413, but only after
    twisted.web has read it; C{OPTIONS *} is answered by twisted.web itself.

Private attributes of twisted.web's L{HTTPChannel} read here (listed with the others in
L{sidecar.compat}), each for a reason given where it is read: C{_command}, C{_path}, C{_version} (the request line, known at the
end of the head, before twisted.web would give it to the request),
C{_receivedHeaderSize} and C{_receivedHeaderCount} (to answer 414/431 rather than a
bare 400), and the C{_respondToBadRequestAndDisconnect} hook.
"""

from __future__ import annotations

import re
from io import BytesIO
from typing import Any, Optional

from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.proxy import ReverseProxyResource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from sidecar import http1
from sidecar.exchange import Engine, Exchange
from sidecar.record import DOWNSTREAM_PROTOCOL_ERROR, UNAUTHORIZED
from sidecar.headers import Headers, RequestHead, ResponseHead, requestHead
from sidecar.transport import halfClose

_CHUNK = 64 * 1024

#: Why reading from the client is paused (a bit each, as in the fast door).
_UPSTREAM_FULL = 1  # the upstream's send buffer is full
_EXCHANGE = 2  # the exchange holds body bytes until its upstream is connected

#: Control characters that may not appear in a header value (RFC 9110 5.5: only HTAB,
#: SP and visible characters; twisted.web itself refuses only NUL, CR and LF).
_CTL = bytes(range(0, 9)) + bytes(range(10, 32)) + b"\x7f"

#: A protocol version as a request line ends with it (C{HTTP/2.0}, C{RTSP/1.0}).
_VERSION = re.compile(rb"^[A-Z]+/[0-9]\.[0-9]$")
#: The first byte of an obs-fold line (SP or HTAB), as an int.
_FOLD = frozenset(b" \t")

#: How many headers a request may have (Envoy's default, as the fast door).
MAX_HEADERS = 100

#: The largest Content-Length accepted (nginx's limit, a signed 64-bit size); past it,
#: 400.
MAX_CONTENT_LENGTH = 2 ** 63 - 1


def _address(peer: Any) -> tuple:
    """
    The client's IP and its C{ip:port} for the record, IPv6 in brackets.
    """
    host = getattr(peer, "host", None)
    if host is None:
        return "-", "-"
    port = getattr(peer, "port", 0)
    return host, (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


@implementer(IHalfCloseableProtocol)
class _Tunnel(Protocol):
    """
    Takes over the client's transport from twisted.web after a 101.  A FIN from the
    client is passed on to the service as a FIN (a half-close), never a reset.
    """

    readDone = False

    def __init__(self, exchange: Exchange, channel: Optional[SidecarChannel]) -> None:
        self.exchange = exchange
        #: The L{SidecarChannel} it took over (its activity and registry), if any.
        self.channel = channel

    def dataReceived(self, data: bytes) -> None:
        channel = self.channel
        if channel is not None:
            channel.activity += 1
        self.exchange.tunnelToUpstream(data)

    def readConnectionLost(self) -> None:
        if not self.readDone:
            self.readDone = True
            self.exchange.tunnelClientFinished()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.exchange.tunnelClosed()
        channel, self.channel = self.channel, None
        if channel is not None:
            channel._gone()


@implementer(IPushProducer)
class WebDoor:
    """
    Adapts a twisted.web L{Request} to what an L{Exchange} expects of a front door.

    It is also the producer of the request body for the upstream's transport: either
    the client's transport itself (a L{StreamingRequest}: chunks are forwarded as they
    arrive, and a full upstream pauses the client), or C{request.content} read as fast
    as the upstream takes it (twisted.web's own C{Request} has read the whole body).
    """

    peerPrincipal = ""
    mutualTLS = False
    direction = "inbound"

    def __init__(self, request: Request, engine: Engine) -> None:
        self.request = request
        self.engine = engine
        self.clientIP, self.clientAddress = _address(request.getClientAddress())
        self.exchange: Optional[Exchange] = None
        self.streaming = isinstance(request, StreamingRequest) and request.streaming
        self._pauses = 0
        self._bodyDone = False
        self._producer: Any = None
        self._tunnel: Optional[_Tunnel] = None
        self._finished = False
        self._upgradeHead: Any = None

    def start(self, target: bytes, denial: Optional[bytes] = None, proto: bytes = b"http",
              extra: Headers = ()) -> None:  # type: ignore[assignment]
        """
        Turn the request into an exchange for C{target} (the request target to send
        upstream) and send it on its way.
        """
        request = self.request
        method = request.method
        version = "1.0" if request.clientproto == b"HTTP/1.0" else "1.1"
        if self.streaming:
            length = request.bodyLength
        else:
            content = request.content
            content.seek(0, 2)
            length = content.tell()
            content.seek(0)
        headers: Headers = []
        hadLength = False
        badValue = False
        for name, values in request.requestHeaders.getAllRawHeaders():
            lower = name.lower()
            if lower == b"content-length" or lower == b"transfer-encoding":
                # Given to the rules to judge (501 for a coding, 400 for both), but the
                # framing sent on is twisted.web's parse, set below.
                hadLength = True
            for value in values:
                if len(value.translate(None, _CTL)) != len(value):
                    badValue = True
                headers.append((name, value))
        engine = self.engine
        req = requestHead(method, target, version, headers, self.clientIP, proto, extra,
                          engine.pool.address.encode("ascii"), engine.headersWithUnderscores)
        req.chunked = length is None
        req.contentLength = length if length is not None and (hadLength or length) else None
        exchange = self.exchange = self.engine.exchange(self, method, request.uri, version, req)
        request.notifyFinish().addErrback(self._clientGone)
        if not self.streaming and length == 0:
            # (Streamed, even a bodiless request completes when twisted.web's channel
            # says so, right after the head: an answer before that closes the
            # connection, as the fast door's does.)
            self._bodyDone = True
            exchange.requestComplete()
        refusal = None
        if request.clientproto not in (b"HTTP/1.1", b"HTTP/1.0"):
            refusal = 505, f"{request.clientproto.decode('latin-1')} is not supported"
        elif method == b"CONNECT":
            refusal = 405, "CONNECT is not supported"
        elif badValue:
            refusal = 400, "a header value has a control character"
        elif req.error is not None:
            refusal = req.status, req.error
        if refusal is not None:
            status, message = refusal
            body = f"{http1.reason(status).decode('ascii')}: {message}\n".encode("utf-8", "replace")
            exchange.reject(status, DOWNSTREAM_PROTOCOL_ERROR, body)
            return
        if denial is not None:
            exchange.reject(403, UNAUTHORIZED, denial)
            return
        exchange.begin()
        if not self.streaming:
            self._pump()

    def _clientGone(self, reason: Any) -> None:
        self._finished = True
        if self.exchange is not None:
            self.exchange.downstreamLost()

    # -- request body ----------------------------------------------------------------

    def requestBody(self, data: bytes) -> None:
        """
        A chunk of a streamed body (from L{StreamingRequest.handleContentChunk}).
        """
        exchange = self.exchange
        if exchange is None or exchange.finished:
            return
        if self._pauses:
            # Something (twisted.web's channel, answering early) resumed the client
            # while we wait: pause it again.
            self._pauseClient()
        exchange.requestBody(data)

    def requestComplete(self) -> None:
        """
        The streamed body has all arrived.
        """
        if not self._bodyDone:
            self._bodyDone = True
            if self.exchange is not None:
                self.exchange.requestComplete()

    def _pump(self) -> None:
        exchange = self.exchange
        content = self.request.content
        while not self._pauses and not self._bodyDone and exchange is not None and not exchange.finished:
            chunk = content.read(_CHUNK)
            if not chunk:
                self._bodyDone = True
                exchange.requestComplete()
                return
            exchange.requestBody(chunk)

    def _pauseClient(self) -> None:
        channel = getattr(self.request, "channel", None)
        transport = getattr(channel, "transport", None)
        if transport is not None:
            transport.pauseProducing()

    def _pause(self, why: int) -> None:
        if self.streaming and not self._pauses:
            self._pauseClient()
        self._pauses |= why

    def _resume(self, why: int) -> None:
        if self._pauses & why:
            self._pauses &= ~why
            if self._pauses:
                return
            if self.streaming:
                channel = getattr(self.request, "channel", None)
                transport = getattr(channel, "transport", None)
                if transport is not None and not getattr(channel, "_closing", False):
                    transport.resumeProducing()
            else:
                self._pump()

    def pauseProducing(self) -> None:
        if self._tunnel is not None:
            self._tunnel.transport.pauseProducing()
            return
        self._pause(_UPSTREAM_FULL)

    def resumeProducing(self) -> None:
        if self._tunnel is not None:
            self._tunnel.transport.resumeProducing()
            return
        self._resume(_UPSTREAM_FULL)

    def stopProducing(self) -> None:
        self._resume(_UPSTREAM_FULL)

    def pauseReading(self) -> None:
        self._pause(_EXCHANGE)

    def resumeReading(self) -> None:
        self._resume(_EXCHANGE)

    # -- response --------------------------------------------------------------------

    def sendContinue(self) -> None:
        """
        C{100 Continue}: ours to send when streaming (L{SidecarChannel} leaves it to
        the exchange, so that a refusal is never preceded by it); twisted.web's own
        channel has sent it otherwise.
        """
        if self.streaming and not self._finished and self.request.bodyLength != 0:
            transport = getattr(self.request.channel, "transport", None)
            if transport is not None:
                transport.write(http1.CONTINUE)

    def startResponse(self, exchange: Exchange, status: int, reason: bytes, head: ResponseHead) -> None:
        request = self.request
        if self._finished:
            return
        if status == 101:
            self._upgradeHead = (reason, head)
            return
        request.setResponseCode(status, reason or None)
        # A response without Content-Type must reach the client without one.
        request.defaultContentType = None
        out = request.responseHeaders
        out.removeHeader(b"server")
        for name, value in head.headers:
            lower = name.lower()
            if lower == b"date":
                out.removeHeader(b"date")
                break
        for name, value in head.headers:
            out.addRawHeader(name, value)
        if head.contentLength is not None and status >= 200 and status != 204:
            # Framing from the upstream codec's parse; twisted.web chunks without it.
            out.setRawHeaders(b"content-length", [b"%d" % head.contentLength])
        if self.engine.draining or exchange.mustClose:
            out.setRawHeaders(b"connection", [b"close"])
        stream = exchange.stream
        if stream is not None and self._producer is None:
            self._producer = stream
            request.registerProducer(stream, True)

    def flush(self) -> None:
        """
        The upstream's read is over: make twisted.web send the response head if no body
        has made it do so yet.
        """
        request = self.request
        if not self._finished and self._tunnel is None and not request.startedWriting and request.code:
            if self.exchange is not None and self.exchange.headSent:
                request.write(b"")

    def writeBody(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel.transport.write(data)
        elif not self._finished and data:
            self.request.write(data)

    def _endsConnection(self, exchange: Exchange) -> None:
        """
        The client connection ends with this response: tell twisted.web's channel, so
        that it closes rather than reading on in the middle of a request body.
        """
        if exchange.mustClose or self.engine.draining:
            channel = self.request.channel
            channel.persistent = False

    def finishResponse(self, exchange: Exchange) -> None:
        self._unhook()
        if not self._finished:
            self._finished = True
            self._endsConnection(exchange)
            self.request.finish()

    def abortResponse(self, exchange: Exchange) -> None:
        self._unhook()
        if not self._finished:
            self._finished = True
            self._pauses = 0
            self.request.channel.persistent = False
            self.request.transport.loseConnection()

    def localReply(self, exchange: Exchange, status: int, body: bytes, headers: Headers = ()) -> None:  # type: ignore[assignment]
        self._unhook()
        if self._finished:
            return
        self._finished = True
        self._pauses = 0
        request = self.request
        request.setResponseCode(status)
        request.defaultContentType = None
        request.setHeader(b"server", self.engine.serverHeader)
        request.setHeader(b"content-type", b"text/plain")
        for name, value in headers:
            if name.lower() not in (b"content-length", b"transfer-encoding", b"connection", b"server"):
                request.setHeader(name, value)
        request.setHeader(b"content-length", b"%d" % len(body))
        if exchange.mustClose or self.engine.draining:
            request.setHeader(b"connection", b"close")
        self._endsConnection(exchange)
        request.write(body)
        request.finish()

    def startTunnel(self, exchange: Exchange, stream: Any) -> None:
        """
        After a 101, take the client's transport from twisted.web and splice it to the
        upstream connection.
        """
        request = self.request
        self._unhook()
        self._finished = True
        channel = request.channel
        transport = channel.transport
        channel.setTimeout(None)
        reason, response = self._upgradeHead
        ours = channel if isinstance(channel, SidecarChannel) else None
        tunnel = self._tunnel = _Tunnel(exchange, ours)
        if ours is not None:
            ours._tunnel = tunnel
        channel.transport = None
        # twisted.web's channel produces for the transport and paused reading while the
        # request was served: let go of both.
        transport.unregisterProducer()
        transport.protocol = tunnel
        tunnel.makeConnection(transport)
        transport.resumeProducing()
        transport.write(http1.switchingProtocols(reason, response.headers, response.upgrade or b""))
        transport.registerProducer(stream, True)

    def finishTunnel(self, exchange: Exchange) -> None:
        """
        The service sent its FIN: send one to the client after what is buffered.
        """
        transport = self._tunnel.transport if self._tunnel is not None else None
        if transport is not None:
            if transport.producer is not None:
                transport.unregisterProducer()
            halfClose(transport)

    def closeTunnel(self, exchange: Exchange) -> None:
        """
        The tunnel is over: close the client's connection after what is buffered.
        """
        transport = self._tunnel.transport if self._tunnel is not None else None
        if transport is not None:
            if transport.producer is not None:
                transport.unregisterProducer()
            transport.loseConnection()

    def _unhook(self) -> None:
        if self._producer is not None:
            self._producer = None
            self.request.unregisterProducer()


class SidecarProxyResource(ReverseProxyResource):
    """
    A L{ReverseProxyResource} that forwards every path below it to the service through
    the sidecar's engine: pooled upstream connections, timing, sizes, records.

    The upstream request target follows the base class's rule for C{path}: the part of
    the request's path below where the resource is mounted, appended to C{path}, with
    the query string kept.  Mounted at C{/api} with C{path} C{b""} or C{b"/"},
    C{/api/x?q=1} goes upstream as C{/x?q=1}; with C{b"/v1"}, as C{/v1/x?q=1}.  At the
    root of a site with C{path} C{b""} (the default) the target passes byte for byte,
    asterisk-form and absolute-form included.

    @ivar engine: the shared L{Engine}.
    """

    isLeaf = True

    def __init__(self, engine: Engine, path: bytes = b"") -> None:
        config = engine.pool.config
        ReverseProxyResource.__init__(self, config.host, config.port, path, reactor=engine.clock)
        self.engine = engine

    def getChild(self, path: bytes, request: Request) -> SidecarProxyResource:
        """
        Every path below is proxied by this same resource (the base class would build a
        new one per segment).
        """
        return self

    def upstreamTarget(self, request: Request) -> bytes:
        """
        The request target to send upstream for C{request} (see the class docstring).
        """
        uri = request.uri
        prepath = getattr(request, "prepath", None) or []
        if not self.path and not prepath:
            return uri
        path, sep, query = uri.partition(b"?")
        if not path.startswith(b"/"):
            return uri
        # The raw segments (still percent-encoded) below the ones twisted.web consumed
        # to reach this resource.
        rest = b"/".join(path[1:].split(b"/")[len(prepath):])
        return self.path.rstrip(b"/") + b"/" + rest + sep + query

    def render(self, request: Request) -> Any:
        """
        Forward C{request} to the service; the response is written as it streams back.
        """
        door = WebDoor(request, self.engine)
        if isinstance(request, StreamingRequest):
            request.door = door
        door.start(self.upstreamTarget(request))
        return NOT_DONE_YET


class StreamingRequest(Request):
    """
    A twisted.web L{Request} that hands a L{SidecarProxyResource} the request as soon
    as its head has arrived (L{SidecarChannel} calls L{headReceived}), then each body
    chunk as it arrives, instead of reading the whole body first.

    For any other resource, and on a channel other than L{SidecarChannel}, it is
    twisted.web's own C{Request}: the body is read whole, then the resource rendered.

    @ivar streaming: the request is being streamed to a L{SidecarProxyResource}.
    @ivar bodyLength: the body's length as twisted.web's channel framed it (C{None}:
        chunked).
    """

    streaming = False
    bodyLength: Optional[int] = 0
    door: Optional[WebDoor] = None
    content: Any = None

    def gotLength(self, length: Optional[int]) -> None:
        """
        Remember the length; where the body goes is decided in L{headReceived}.
        """
        self.bodyLength = length

    def _spool(self) -> None:
        if self.content is None:
            Request.gotLength(self, self.bodyLength)

    def headReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """
        The head has arrived: find the resource, and render it now when it is a
        L{SidecarProxyResource}.
        """
        self.method, self.uri, self.clientproto = command, path, version
        self.path = path.split(b"?", 1)[0]
        self.args = {}
        site = self.channel.site
        self.site = site
        self.prepath = []
        self.postpath = list(map(http.unquote, self.path[1:].split(b"/")))
        try:
            if self.path == b"*":
                # Asterisk-form (OPTIONS *) goes to the service, as with Envoy, when the
                # proxy is the site's root; twisted.web would answer it itself.
                resource = site.resource
            else:
                resource = site.getResourceFor(self)
        except BaseException:
            resource = None
        if not isinstance(resource, SidecarProxyResource):
            self._spool()
            return
        self.streaming = True
        self.content = BytesIO()
        try:
            self.render(resource)
        except BaseException:
            # The 500 ends the connection: the body of this request is still to come.
            self.channel.persistent = False
            self.processingFailed(Failure())

    def handleContentChunk(self, data: bytes) -> None:
        door = self.door
        if self.streaming:
            if door is not None:
                door.requestBody(data)
            return
        self._spool()
        Request.handleContentChunk(self, data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.streaming:
            door = self.door
            if door is not None:
                door.requestComplete()
            return
        self._spool()
        Request.requestReceived(self, command, path, version)


class _RefusalDoor:
    """
    The door of a request refused before it became an exchange: it can only send the
    proxy's own answer and close.
    """

    peerPrincipal = ""
    mutualTLS = False
    direction = "inbound"

    def __init__(self, channel: HTTPChannel) -> None:
        self.channel = channel
        self.clientIP, self.clientAddress = _address(channel.transport.getPeer())

    def localReply(self, exchange: Exchange, status: int, body: bytes, headers: Headers = ()) -> None:  # type: ignore[assignment]
        self.channel.transport.write(http1.localReply(status, exchange.engine.serverHeader, body, True, False))

    def resumeReading(self) -> None:
        pass


class SidecarChannel(HTTPChannel):
    """
    twisted.web's channel, answering as the proxy: malformed requests get our 400
    (C{Server} header, body, a C{DPE} record) rather than a bare one, an oversized head
    431 (414 for the request line), more than L{MAX_HEADERS} headers 431, an
    out-of-range C{Content-Length} 400.  With a L{StreamingRequest} it renders at the
    end of the head and streams the body.

    It is registered in C{engine.doors} (an L{sidecar.doors.OpenDoor}), so that the
    client idle and request-head timeouts apply to it as to the fast door.

    @ivar activity: reads so far; the sweep compares it with C{sweptActivity}.
    @ivar inHead: a request head has begun and not ended.
    """

    maxHeaders = MAX_HEADERS
    activity = 0
    sweptActivity = -1
    idleSince: Optional[float] = None
    inHead = False
    headSince: Optional[float] = None
    _closing = False
    _inRequest = False
    _tunnel: Optional[_Tunnel] = None
    _counted = False

    # -- connection ------------------------------------------------------------------

    def connectionMade(self) -> None:
        HTTPChannel.connectionMade(self)
        engine = self.site.engine
        engine.doors.add(self)
        recorder = engine.recorder
        recorder.downstreamConnectionsActive += 1
        recorder.downstreamConnectionsTotal += 1
        self._counted = True

    def _gone(self) -> None:
        """
        The client connection is closed (by twisted.web, or after a tunnel).
        """
        self._closing = True
        if self._counted:
            self._counted = False
            engine = self.site.engine
            engine.doors.discard(self)
            engine.recorder.downstreamConnectionsActive -= 1

    def connectionLost(self, reason: Any) -> None:
        self._gone()
        HTTPChannel.connectionLost(self, reason)

    def dataReceived(self, data: bytes) -> None:
        self.activity += 1
        if self._closing:
            return
        if not self._inRequest:
            self._inRequest = True
            self.inHead = True
        HTTPChannel.dataReceived(self, data)

    def loseConnection(self) -> None:
        self._closing = True
        HTTPChannel.loseConnection(self)

    # -- parsing -----------------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        if self._closing:
            return
        # twisted.web's running size of this head (private): checked here, before it
        # would answer a bare 400, so that an oversized head gets our 431.
        size = self._receivedHeaderSize
        if size + len(line) > self.totalHeadersSize:
            if size == 0:
                self._refuse(414, "request target too long")
            else:
                self._refuse(431, "request header section too large")
            return
        if size == 0 and line[:1] == b"\n":
            # Bare-LF empty lines before the request line: RFC 9112 2.2 lets a server
            # ignore empty lines there and take LF for a line end, as the fast door does.
            line = line.lstrip(b"\n")
        if size == 0 and line:
            # The request line: a well-formed version other than HTTP/1.0 and 1.1 is
            # 505, as on the fast door (twisted.web would answer 400).
            version = line.rsplit(b" ", 1)[-1]
            if _VERSION.match(version) and version not in (b"HTTP/1.0", b"HTTP/1.1"):
                self._refuse(505, f"{version.decode('ascii')} is not supported")
                return
            if b"  " in line and line[0] != 0x20 and line[-1] != 0x20:
                # RFC 9112 3: a recipient MAY parse the request line on runs of SP; the
                # fast door does, Envoy and nginx do, and the line is re-serialised
                # with single spaces (twisted.web would answer 400).
                line = b" ".join(part for part in line.split(b" ") if part)
        elif size > 0 and line and line[0] in _FOLD:
            # RFC 9112 5.2: obs-fold (a line starting with SP or HTAB) in a request is
            # refused with 400, as on the fast door (twisted.web would merge it into
            # the header before it).
            self._refuse(400, "obs-fold line in the request header section")
            return
        HTTPChannel.lineReceived(self, line)

    def lineLengthExceeded(self, line: bytes) -> None:
        """
        One line longer than the whole head may be (LineReceiver would close without a
        word).
        """
        if self._receivedHeaderSize == 0:
            self._refuse(414, "request target too long")
        else:
            self._refuse(431, "request header section too large")

    def headerReceived(self, line: bytes) -> bool:
        if self._closing:
            return False
        # twisted.web's header count for this head (private), for a 431 rather than
        # its bare 400.
        if self._receivedHeaderCount >= self.maxHeaders:
            self._refuse(431, "too many request headers")
            return False
        return HTTPChannel.headerReceived(self, line)

    def allHeadersReceived(self) -> None:
        self.inHead = False
        self.headSince = None
        if self._closing:
            return
        if self.length is not None and self.length > MAX_CONTENT_LENGTH:
            self._refuse(400, "Content-Length out of range")
            return
        request = self.requests[-1]
        if not isinstance(request, StreamingRequest):
            HTTPChannel.allHeadersReceived(self)
            return
        # What HTTPChannel.allHeadersReceived does, less 100 Continue, which is the
        # exchange's to send (never before a refusal); then the request renders now.
        request.parseCookies()
        self.persistent = self.checkPersistence(request, self._version)
        request.gotLength(self.length)
        # The request line (private attributes): twisted.web hands it to the request
        # only once the whole body has arrived.
        request.headReceived(self._command, self._path, self._version)
        if not request.streaming:
            expect = request.requestHeaders.getRawHeaders(b"expect")
            if expect and expect[0].lower() == b"100-continue" and self._version == b"HTTP/1.1":
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def allContentReceived(self) -> None:
        if self._closing:
            return
        HTTPChannel.allContentReceived(self)

    def rawDataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        HTTPChannel.rawDataReceived(self, data)

    def requestDone(self, request: Any) -> None:
        self._inRequest = False
        HTTPChannel.requestDone(self, request)

    # -- refusals --------------------------------------------------------------------

    def _respondToBadRequestAndDisconnect(self) -> None:
        """
        twisted.web's hook for every request it finds malformed (private, overridden):
        our 400 instead of its bare one.
        """
        self._refuse(400, "malformed request")

    def _refuse(self, status: int, message: str) -> None:
        """
        Answer C{status} with a record and close: the connection can't be trusted to
        frame another request.
        """
        if self._closing:
            return
        self.inHead = False
        body = f"{http1.reason(status).decode('ascii')}: {message}\n".encode("utf-8", "replace")
        request = self.requests[-1] if self.requests else None
        door = getattr(request, "door", None)
        exchange = getattr(door, "exchange", None)
        if exchange is not None and not exchange.finished:
            # The body of a request being streamed turned out malformed: it never goes
            # upstream whole.
            exchange.clientProtocolError(body)
            self.loseConnection()
            return
        if exchange is None:
            engine = self.site.engine
            refusal = _RefusalDoor(self)
            # The request line, when twisted.web has read it (private attributes).
            method = getattr(self, "_command", None) or b"-"
            target = getattr(self, "_path", None) or b"-"
            record = engine.exchange(refusal, method, target, "1.1", RequestHead(forwardedFor=refusal.clientIP))
            record.reject(status, DOWNSTREAM_PROTOCOL_ERROR, body)
        self.loseConnection()

    # -- what the doors registry asks (sidecar.doors.OpenDoor) ------------------------

    def busy(self) -> bool:
        """
        Whether a request or a tunnel is in progress on this connection.
        """
        return bool(self.requests or self.inHead or self._tunnel is not None)

    def answering(self) -> bool:
        """
        Whether a request already accepted is being answered (a head read behind it is
        not slow: its client waits for that answer).
        """
        # twisted.web makes the Request of a head as soon as its first line arrives:
        # one being read is not one being answered.
        return len(self.requests) > (1 if self.inHead else 0)

    def headTimedOut(self) -> None:
        """
        The request head did not arrive in time (a slow or stalled client): 408, close.
        """
        self._refuse(408, "request head not received in time")

    def closeIdle(self) -> None:
        """
        Close the connection: the client has been idle too long.
        """
        if not self._closing and self.transport is not None:
            self.loseConnection()


class SidecarSite(Site):
    """
    A L{Site} for the proxy: L{SidecarChannel}s and L{StreamingRequest}s, no request
    log (the sidecar's access log has the records), and no twisted.web timeout (the
    engine's sweep applies C{--client-idle-timeout} and C{--request-head-timeout}).

    @ivar engine: the shared L{Engine}.
    """

    protocol = SidecarChannel

    def __init__(self, resource: Any, engine: Optional[Engine] = None, maxHeaderBytes: int = 64 * 1024) -> None:
        Site.__init__(self, resource, requestFactory=StreamingRequest, timeout=None)
        self.engine = engine if engine is not None else resource.engine
        self.maxHeaderBytes = maxHeaderBytes
        self.noisy = False

    def buildProtocol(self, addr: Any) -> Any:
        channel = Site.buildProtocol(self, addr)
        channel.totalHeadersSize = self.maxHeaderBytes
        channel.MAX_LENGTH = self.maxHeaderBytes
        return channel

    def log(self, request: Request) -> None:
        pass


def proxySite(engine: Engine, maxHeaderBytes: int = 64 * 1024) -> Site:
    """
    The twisted.web front door as a factory.
    """
    return SidecarSite(SidecarProxyResource(engine), engine, maxHeaderBytes)
