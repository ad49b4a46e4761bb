# -*- test-case-name: tests.test_behaviour -*-
"""
The twisted.web front door: L{SidecarProxyResource}, a L{ReverseProxyResource} that
forwards through the sidecar's upstream pool and recorder instead of the base class's
one-connection-per-request client.

Mount it in your own L{Site}, or let C{twistd sidecar --engine web} serve it.  It
behaves like the fast door; twisted.web does the client-side framing (and, before
C{render} is called, reads the whole request body into C{request.content}, a temporary
file past 100 KB, so memory stays bounded but uploads are not streamed).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, Optional

from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.web.proxy import ReverseProxyResource
from twisted.web.http import HTTPChannel
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from sidecar.exchange import DOWNSTREAM_PROTOCOL_ERROR, UNAUTHORIZED, Engine, Exchange
from sidecar.headers import Headers, RequestHead, ResponseHead, requestHead
from sidecar.upstream import halfClose

_CHUNK = 64 * 1024

_UPSTREAM_FULL = 1
_EXCHANGE = 2


@implementer(IHalfCloseableProtocol)
class _Tunnel(Protocol):
    """
    Takes over the client's transport from twisted.web after a 101.  A FIN from the
    client is passed on to the service as a FIN (a half-close), never a reset.
    """

    readDone = False

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange

    def dataReceived(self, data: bytes) -> None:
        self.exchange.tunnelToUpstream(data)

    def readConnectionLost(self) -> None:
        if not self.readDone:
            self.readDone = True
            self.exchange.tunnelClientFinished()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.exchange.tunnelClosed()


@implementer(IPushProducer)
class WebDoor:
    """
    Adapts a twisted.web L{Request} to what an L{Exchange} expects of a front door.

    It is also the producer of the request body: it pumps C{request.content} to the
    upstream as fast as the upstream's transport takes it.
    """

    peerPrincipal = ""
    mutualTLS = False

    def __init__(self, request: Request, engine: Engine) -> None:
        self.request = request
        self.engine = engine
        peer = request.getClientAddress()
        host = getattr(peer, "host", "-")
        self.clientIP = host
        self.clientAddress = f"{host}:{getattr(peer, 'port', 0)}"
        self.exchange: Optional[Exchange] = None
        self._pauses = 0
        self._bodyDone = False
        self._producer: Any = None
        self._tunnel: Optional[_Tunnel] = None
        self._finished = False
        self._upgradeHead: Any = None

    def start(self, denial: Optional[bytes] = None, proto: bytes = b"http", extra: Headers = ()) -> None:  # type: ignore[assignment]
        """
        Turn the request into an exchange and send it on its way.
        """
        request = self.request
        version = "1.0" if request.clientproto == b"HTTP/1.0" else "1.1"
        content = request.content
        content.seek(0, 2)
        length = content.tell()
        content.seek(0)
        headers: Headers = []
        hadLength = False
        for name, values in request.requestHeaders.getAllRawHeaders():
            lower = name.lower()
            if lower == b"content-length" or lower == b"transfer-encoding":
                hadLength = True
                continue
            for value in values:
                headers.append((name, value))
        if hadLength or length:
            headers.append((b"Content-Length", b"%d" % length))
        req = requestHead(request.method, request.uri, version, headers, self.clientIP, proto, extra)
        exchange = self.exchange = self.engine.exchange(self, request.method, request.uri, version, req)
        self._bodyDone = length == 0
        request.notifyFinish().addErrback(self._clientGone)
        if req.error is not None:
            exchange.reject(400, DOWNSTREAM_PROTOCOL_ERROR, f"Bad Request: {req.error}\n".encode())
            return
        if denial is not None:
            exchange.reject(403, UNAUTHORIZED, denial)
            return
        if self._bodyDone:
            exchange.requestComplete()
        exchange.begin()
        self._pump()

    def _clientGone(self, reason: Any) -> None:
        self._finished = True
        if self.exchange is not None:
            self.exchange.downstreamLost()

    # -- request body ----------------------------------------------------------------

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

    def pauseProducing(self) -> None:
        self._pauses |= _UPSTREAM_FULL

    def resumeProducing(self) -> None:
        self._pauses &= ~_UPSTREAM_FULL
        self._pump()

    def stopProducing(self) -> None:
        self._pauses &= ~_UPSTREAM_FULL

    def pauseReading(self) -> None:
        self._pauses |= _EXCHANGE

    def resumeReading(self) -> None:
        self._pauses &= ~_EXCHANGE
        self._pump()

    # -- response --------------------------------------------------------------------

    def writeInterim(self, data: bytes) -> None:
        """
        twisted.web has answered C{Expect: 100-continue} itself.
        """

    def startResponse(self, exchange: Exchange, status: int, reason: bytes, head: ResponseHead) -> None:
        request = self.request
        if self._finished:
            return
        if status == 101:
            self._upgradeHead = (reason, head)
            return
        request.setResponseCode(status, reason or None)
        out = request.responseHeaders
        out.removeHeader(b"server")
        for name, value in head.headers:
            lower = name.lower()
            if lower == b"date":
                out.removeHeader(b"date")
                break
        for name, value in head.headers:
            out.addRawHeader(name, value)
        if self.engine.draining or exchange.mustClose:
            out.setRawHeaders(b"connection", [b"close"])
        conn = exchange.conn
        if conn is not None and self._producer is None:
            self._producer = conn
            request.registerProducer(conn, True)

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

    def finishResponse(self, exchange: Exchange) -> None:
        self._unhook()
        if not self._finished:
            self._finished = True
            self.request.finish()
            if exchange.mustClose or self.engine.draining:
                self.request.channel.loseConnection()

    def abortResponse(self, exchange: Exchange) -> None:
        self._unhook()
        if not self._finished:
            self._finished = True
            self.request.transport.loseConnection()

    def localReply(self, exchange: Exchange, status: int, body: bytes) -> None:
        self._unhook()
        if self._finished:
            return
        self._finished = True
        request = self.request
        request.setResponseCode(status)
        request.setHeader(b"server", self.engine.serverHeader)
        request.setHeader(b"content-type", b"text/plain")
        request.setHeader(b"content-length", b"%d" % len(body))
        if exchange.mustClose or self.engine.draining:
            request.setHeader(b"connection", b"close")
        request.write(body)
        request.finish()

    def startTunnel(self, exchange: Exchange, conn: Any) -> None:
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
        head = [b"HTTP/1.1 101 %s\r\n" % reason]
        for name, value in response.headers + [(b"Connection", b"Upgrade"), (b"Upgrade", response.upgrade or b"")]:
            head += [name, b": ", value, b"\r\n"]
        head.append(b"\r\n")
        tunnel = self._tunnel = _Tunnel(exchange)
        channel.transport = None
        # twisted.web's channel produces for the transport and paused reading while the
        # request was served: let go of both.
        transport.unregisterProducer()
        transport.protocol = tunnel
        tunnel.makeConnection(transport)
        transport.resumeProducing()
        transport.write(b"".join(head))
        transport.registerProducer(conn, True)
        conn.transport.registerProducer(transport, True)

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

    def render(self, request: Request) -> Any:
        """
        Forward C{request} to the service; the response is written as it streams back.
        """
        WebDoor(request, self.engine).start()
        return NOT_DONE_YET


class _RefusalDoor:
    """
    The door of a request twisted.web refused before it became a L{Request}: it can
    only send the proxy's own answer and close.
    """

    peerPrincipal = ""
    mutualTLS = False

    def __init__(self, channel: HTTPChannel) -> None:
        self.channel = channel
        peer = channel.transport.getPeer()
        self.clientIP = getattr(peer, "host", "-")
        self.clientAddress = f"{self.clientIP}:{getattr(peer, 'port', 0)}"

    def localReply(self, exchange: Exchange, status: int, body: bytes) -> None:
        self.channel.transport.write(
            b"HTTP/1.1 %d %s\r\nServer: %s\r\nContent-Type: text/plain\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status, HTTPStatus(status).phrase.encode("ascii"), exchange.engine.serverHeader,
               len(body), body))

    def resumeReading(self) -> None:
        pass


class SidecarChannel(HTTPChannel):
    """
    twisted.web's channel, whose answer to a malformed request (a bare C{400 Bad
    Request}) becomes the proxy's: our C{Server} header, a body, and a record.
    """

    def _respondToBadRequestAndDisconnect(self) -> None:
        engine = self.site.engine
        door = _RefusalDoor(self)
        exchange = engine.exchange(door, b"-", b"-", "1.1", RequestHead(forwardedFor=door.clientIP))
        exchange.reject(400, DOWNSTREAM_PROTOCOL_ERROR, b"Bad Request: malformed request\n")
        self.loseConnection()


class SidecarSite(Site):
    """
    A L{Site} for the proxy: channels that answer malformed requests as the proxy, no
    request log (the sidecar's access log has the records).

    @ivar engine: the shared L{Engine}.
    """

    protocol = SidecarChannel

    def __init__(self, resource: SidecarProxyResource) -> None:
        Site.__init__(self, resource)
        self.engine = resource.engine

    def log(self, request: Request) -> None:
        pass


def proxySite(engine: Engine) -> Site:
    """
    The twisted.web front door as a factory.
    """
    site = SidecarSite(SidecarProxyResource(engine))
    site.noisy = False
    return site
