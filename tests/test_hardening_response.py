# -*- test-case-name: tests.test_hardening_response -*-
"""
Regression tests for the response-side and tunnel defects of issue 8: hostile or broken
service responses, a stalled response body, and the close of an upgraded connection.

The service is a raw TCP server of the test's own that answers each request with exactly
the bytes the test gives it; the client is a raw socket.  What the client received is
compared byte for byte, and the next request on the same client connection and on the
same pooled upstream connection shows that nothing was desynchronised.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.trial import unittest
from zope.interface import implementer

from tests.support import Proxy, waitUntil
from tests.test_exchange import GET, Harness


class ScriptedService(Protocol):
    """
    One connection to the raw service: each request head (no bodies here) is answered
    with C{factory.responses[path]}, sent as is.
    """

    def connectionMade(self) -> None:
        self.buffer = b""
        self.index = len(self.factory.connections)
        self.factory.connections.append(self)
        self.lost: Optional[Any] = None

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            path = head.split(b" ", 2)[1]
            self.factory.requests.append((self.index, path))
            answer = self.factory.responses.get(path, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            if callable(answer):
                answer(self)
            else:
                self.transport.write(answer)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = reason


class ScriptedServiceFactory(Factory):
    protocol = ScriptedService

    def __init__(self, responses: Dict[bytes, Any]) -> None:
        self.responses = responses
        self.requests: List[tuple] = []
        self.connections: List[ScriptedService] = []


class RawClient(Protocol):
    """
    Sends bytes and keeps every byte it receives; C{closed} fires at the end.
    """

    def __init__(self) -> None:
        self.received = b""
        self.closed: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


class ResponseCase(unittest.TestCase):
    """
    A raw service and a proxy (fast door unless C{engine} says otherwise).
    """

    engine = "fast"

    def start(self, responses: Dict[bytes, Any], **proxyArgs: Any) -> int:
        self.service = ScriptedServiceFactory(responses)
        listening = reactor.listenTCP(0, self.service, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.addCleanup(self._dropServiceConnections)
        self.proxy = Proxy(listening.getHost().port, engine=self.engine, **proxyArgs)
        return self.proxy.start(self)

    def _dropServiceConnections(self) -> None:
        for conn in self.service.connections:
            if conn.transport.connected:
                conn.transport.abortConnection()

    @defer.inlineCallbacks
    def connect(self, port: int) -> Any:
        client = RawClient()
        connected: defer.Deferred = defer.Deferred()
        factory = ClientFactory.forProtocol(lambda: client)
        factory.clientConnectionFailed = lambda c, r: connected.errback(r)  # type: ignore[method-assign]
        connector = reactor.connectTCP("127.0.0.1", port, factory)

        def made() -> None:
            connected.callback(client)

        client.connectionMade = made  # type: ignore[method-assign]
        self.addCleanup(lambda: client.transport.connected and client.transport.abortConnection())
        self.addCleanup(connector.disconnect)
        yield connected
        return client

    @defer.inlineCallbacks
    def exchange(self, client: RawClient, request: bytes, expect: bytes, timeout: float = 5.0) -> Any:
        """
        Send C{request} and wait until the client has received C{expect} more bytes (or
        the connection closed); return what arrived.
        """
        start = len(client.received)
        client.transport.write(request)
        yield waitUntil(lambda: len(client.received) - start >= len(expect) or client.closed.called,
                        timeout=timeout)
        # Anything sent after the expected bytes would be a desync: give it a moment.
        yield deferLater(0.05)
        return client.received[start:]


def deferLater(seconds: float) -> defer.Deferred:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


OK_B = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
PROXY_OK_B = b"HTTP/1.1 200 OK\r\nServer: amazing-proxy\r\nContent-Length: 2\r\n\r\nok"


def request(path: bytes) -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: svc\r\n\r\n"


class ResponseFramingTests(ResponseCase):
    """
    Framing to the client comes from the proxy's own parse of the service's response.
    """

    @defer.inlineCallbacks
    def test_nulInReason(self):
        """
        C{HTTP/1.1 200 OK\\x00}: the web door answers 502 (no NUL, nothing of the bad
        response), closes that upstream connection, and the client's connection serves
        the next request in step.
        """
        port = self.start({b"/bad": b"HTTP/1.1 200 OK\x00\r\nContent-Length: 2\r\n\r\nok", b"/b": OK_B})
        client = yield self.connect(port)
        first = yield self.exchange(client, request(b"/bad"), b"HTTP/1.1 502 Bad Gateway\r\n")
        self.assertTrue(first.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), first)
        self.assertTrue(first.endswith(b"\r\n\r\nupstream sent a malformed response"), first)
        self.assertNotIn(b"\x00", first)
        self.assertNotIn(b"\r\n\r\nok", first)
        second = yield self.exchange(client, request(b"/b"), b"HTTP/1.1 200 OK\r\n")
        yield waitUntil(lambda: client.received.endswith(b"\r\n\r\nok"))
        self.assertTrue(second.startswith(b"HTTP/1.1 200 OK\r\n"), second)
        self.assertEqual([r.flags for r in self.proxy.records], ["UPE", "-"])
        self.assertEqual(self.service.requests, [(0, b"/bad"), (1, b"/b")])

    @defer.inlineCallbacks
    def test_laterMinorVersion(self):
        """
        C{HTTP/1.2 200 OK} goes to the client as an HTTP/1.1 200 on the web door too.
        """
        port = self.start({b"/a": b"HTTP/1.2 200 OK\r\nContent-Length: 5\r\n\r\nhello"})
        client = yield self.connect(port)
        first = yield self.exchange(client, request(b"/a"), b"HTTP/1.1 200 OK\r\n")
        yield waitUntil(lambda: client.received.endswith(b"hello"))
        self.assertTrue(client.received.startswith(b"HTTP/1.1 200 OK\r\n"), first)
        self.assertEqual([r.flags for r in self.proxy.records], ["-"])

    @defer.inlineCallbacks
    def test_connectionNominatingContentLength(self):
        """
        A service response with C{Connection: Content-Length} keeps its framing: the
        client receives C{Content-Length: 5} and exactly five body bytes, and the next
        request on the same client connection (and the same pooled upstream connection)
        gets its own response.
        """
        port = self.start({
            b"/a": b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\nhello",
            b"/b": OK_B,
        })
        client = yield self.connect(port)
        first = yield self.exchange(client, request(b"/a"),
                                    b"HTTP/1.1 200 OK\r\nServer: amazing-proxy\r\nContent-Length: 5\r\n\r\nhello")
        self.assertEqual(first, b"HTTP/1.1 200 OK\r\nServer: amazing-proxy\r\nContent-Length: 5\r\n\r\nhello")
        second = yield self.exchange(client, request(b"/b"), PROXY_OK_B)
        self.assertEqual(second, PROXY_OK_B)
        self.assertEqual(self.service.requests, [(0, b"/a"), (0, b"/b")])

    @defer.inlineCallbacks
    def test_connectionNominatingTransferEncodingAndServer(self):
        """
        C{Connection: Transfer-Encoding, Server} in a chunked response changes
        nothing: the body is re-chunked for the client, our C{Server} header stays,
        and the connection stays in step.
        """
        port = self.start({
            b"/a": (b"HTTP/1.1 200 OK\r\nConnection: Transfer-Encoding, Server\r\nServer: svc\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
            b"/b": OK_B,
        })
        client = yield self.connect(port)
        expected = (b"HTTP/1.1 200 OK\r\nServer: amazing-proxy\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\n0\r\n\r\n")
        first = yield self.exchange(client, request(b"/a"), expected)
        self.assertEqual(first, expected)
        second = yield self.exchange(client, request(b"/b"), PROXY_OK_B)
        self.assertEqual(second, PROXY_OK_B)
        self.assertEqual(self.service.requests, [(0, b"/a"), (0, b"/b")])

    @defer.inlineCallbacks
    def test_contentLengthNormalised(self):
        """
        The C{Content-Length} sent to the client is the parsed number (leading zeros
        go), so that it is the length the proxy frames by.
        """
        port = self.start({b"/a": b"HTTP/1.1 200 OK\r\nContent-Length: 005\r\n\r\nhello", b"/b": OK_B})
        client = yield self.connect(port)
        expected = b"HTTP/1.1 200 OK\r\nServer: amazing-proxy\r\nContent-Length: 5\r\n\r\nhello"
        first = yield self.exchange(client, request(b"/a"), expected)
        self.assertEqual(first, expected)
        second = yield self.exchange(client, request(b"/b"), PROXY_OK_B)
        self.assertEqual(second, PROXY_OK_B)

    @defer.inlineCallbacks
    def test_contentLengthAndChunked(self):
        """
        A response with both C{Content-Length} and C{Transfer-Encoding: chunked} is a
        502 C{UPE} (RFC 9112 6.3 allows treating it as an error; nginx and Envoy do):
        none of it reaches the client, its connection is closed, and the client's next
        request is served on a new upstream connection.
        """
        port = self.start({
            b"/a": (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\n0\r\n\r\n"),
            b"/b": OK_B,
        })
        client = yield self.connect(port)
        first = yield self.exchange(client, request(b"/a"), b"HTTP/1.1 502 Bad Gateway\r\n")
        self.assertTrue(first.startswith(b"HTTP/1.1 502 Bad Gateway\r\nServer: amazing-proxy\r\n"), first)
        self.assertNotIn(b"hello", first)
        second = yield self.exchange(client, request(b"/b"), PROXY_OK_B)
        self.assertEqual(second, PROXY_OK_B)
        self.assertEqual(self.service.requests, [(0, b"/a"), (1, b"/b")])
        self.assertEqual([r.flags for r in self.proxy.records], ["UPE", "-"])


    @defer.inlineCallbacks
    def assertRefusedCoding(self, response: bytes) -> Any:
        port = self.start({b"/a": response, b"/b": OK_B})
        client = yield self.connect(port)
        first = yield self.exchange(client, request(b"/a"), b"HTTP/1.1 502 Bad Gateway\r\n")
        self.assertTrue(first.startswith(b"HTTP/1.1 502 Bad Gateway\r\nServer: amazing-proxy\r\n"), first)
        self.assertTrue(first.endswith(b"\r\n\r\nupstream sent a malformed response"), first)
        second = yield self.exchange(client, request(b"/b"), PROXY_OK_B)
        self.assertEqual(second, PROXY_OK_B)
        self.assertEqual(self.service.requests, [(0, b"/a"), (1, b"/b")])
        self.assertEqual([r.flags for r in self.proxy.records], ["UPE", "-"])

    def test_gzipThenChunked(self):
        """
        C{Transfer-Encoding: gzip, chunked}: the de-chunked bytes would reach the client
        as identity; 502 C{UPE} (as nginx).
        """
        return self.assertRefusedCoding(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")

    def test_gzipOnly(self):
        """
        C{Transfer-Encoding: gzip} (a body to the end of the connection, coded): 502.
        """
        return self.assertRefusedCoding(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxyz")

    def test_chunkedTwice(self):
        """
        Two C{Transfer-Encoding: chunked} headers (chunked applied twice): 502.
        """
        return self.assertRefusedCoding(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\n\r\n")


class StatusLineTests(ResponseCase):
    """
    A status outside 100-599, or a malformed status line, is a 502 C{UPE}; nothing of
    the bad response reaches the client.
    """

    @defer.inlineCallbacks
    def assertBadStatus(self, response: bytes) -> Any:
        port = self.start({b"/bad": response, b"/b": OK_B})
        client = yield self.connect(port)
        first = yield self.exchange(client, request(b"/bad"), b"HTTP/1.1 502 Bad Gateway\r\n")
        body = b"upstream sent a malformed response"
        self.assertEqual(first, b"HTTP/1.1 502 Bad Gateway\r\nServer: amazing-proxy\r\nContent-Type: text/plain\r\n"
                                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        second = yield self.exchange(client, request(b"/b"), PROXY_OK_B)
        self.assertEqual(second, PROXY_OK_B)
        self.assertEqual([r.flags for r in self.proxy.records], ["UPE", "-"])
        self.assertEqual([r.status for r in self.proxy.records], [502, 200])
        # The bad connection was closed, the next request had a new one.
        self.assertEqual(self.service.requests, [(0, b"/bad"), (1, b"/b")])

    def test_statusBelow100(self):
        """
        C{HTTP/1.1 099 Low} with a body: 502, and C{ok} never reaches the client.
        """
        return self.assertBadStatus(b"HTTP/1.1 099 Low\r\nContent-Length: 2\r\n\r\nok")

    def test_statusAbove599(self):
        """
        C{HTTP/1.1 600 High}: 502.
        """
        return self.assertBadStatus(b"HTTP/1.1 600 High\r\nContent-Length: 2\r\n\r\nok")

    def test_status999(self):
        """
        C{HTTP/1.1 999 Max}: 502.
        """
        return self.assertBadStatus(b"HTTP/1.1 999 Max\r\nContent-Length: 2\r\n\r\nok")

    def test_fourDigitStatus(self):
        """
        A four-digit status cannot be normalised to anything it means: 502.
        """
        return self.assertBadStatus(b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok")

    def test_notHttp11(self):
        """
        A status line of another protocol version than 1.x on an HTTP/1.1 connection:
        502.
        """
        return self.assertBadStatus(b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def test_garbage(self):
        """
        Not a status line at all: 502.
        """
        return self.assertBadStatus(b"HELLO\r\n\r\n")

    def test_nulInReason(self):
        """
        C{HTTP/1.1 200 OK\\x00}: RFC 9112 4 allows only HTAB, SP, VCHAR and obs-text
        in a reason phrase, and a client reading the line up to the NUL could frame
        what follows differently.  502, as Envoy answers; the NUL never reaches the
        client.
        """
        return self.assertBadStatus(b"HTTP/1.1 200 OK\x00\r\nContent-Length: 2\r\n\r\nok")

    def test_controlInReason(self):
        """
        Other control bytes in the reason phrase (ESC, DEL, a bare CR inside it): 502.
        """
        return self.assertBadStatus(b"HTTP/1.1 200 O\x1b[2J\x7fK\r\nContent-Length: 2\r\n\r\nok")


class LenientResponseTests(ResponseCase):
    """
    What RFC 9112 lets a recipient accept, and the proxy can re-serialise safely, is
    accepted (both Envoy and nginx do).
    """

    @defer.inlineCallbacks
    def test_bareLineFeeds(self):
        """
        A response head with bare LF line endings (RFC 9112 2.2: a recipient MAY
        accept them) is re-serialised with CRLF; the next response stays in step.
        """
        port = self.start({b"/a": b"HTTP/1.1 200 OK\nX-A: 1\nContent-Length: 5\n\nhello", b"/b": OK_B})
        client = yield self.connect(port)
        expected = b"HTTP/1.1 200 OK\r\nServer: amazing-proxy\r\nX-A: 1\r\nContent-Length: 5\r\n\r\nhello"
        first = yield self.exchange(client, request(b"/a"), expected)
        self.assertEqual(first, expected)
        second = yield self.exchange(client, request(b"/b"), PROXY_OK_B)
        self.assertEqual(second, PROXY_OK_B)
        self.assertEqual(self.service.requests, [(0, b"/a"), (0, b"/b")])


    @defer.inlineCallbacks
    def test_spacesBeforeStatus(self):
        """
        C{HTTP/1.1  200 OK} (two spaces; nginx and Envoy accept it) is forwarded with a
        well-formed status line, and the connection stays in step.
        """
        port = self.start({b"/a": b"HTTP/1.1   201 Made\r\nContent-Length: 5\r\n\r\nhello", b"/b": OK_B})
        client = yield self.connect(port)
        expected = b"HTTP/1.1 201 Made\r\nServer: amazing-proxy\r\nContent-Length: 5\r\n\r\nhello"
        first = yield self.exchange(client, request(b"/a"), expected)
        self.assertEqual(first, expected)
        second = yield self.exchange(client, request(b"/b"), PROXY_OK_B)
        self.assertEqual(second, PROXY_OK_B)
        self.assertEqual(self.service.requests, [(0, b"/a"), (0, b"/b")])

    @defer.inlineCallbacks
    def test_laterMinorVersion(self):
        """
        C{HTTP/1.2 200 OK}: RFC 9110 2.5, a later minor version is read as the highest
        the recipient implements (Envoy and nginx do); it is forwarded as HTTP/1.1 and
        the connection stays in step.
        """
        port = self.start({b"/a": b"HTTP/1.2 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"/b": OK_B})
        client = yield self.connect(port)
        expected = b"HTTP/1.1 200 OK\r\nServer: amazing-proxy\r\nContent-Length: 5\r\n\r\nhello"
        first = yield self.exchange(client, request(b"/a"), expected)
        self.assertEqual(first, expected)
        second = yield self.exchange(client, request(b"/b"), PROXY_OK_B)
        self.assertEqual(second, PROXY_OK_B)
        self.assertEqual(self.service.requests, [(0, b"/a"), (0, b"/b")])

    @defer.inlineCallbacks
    def test_reasonWithTabAndObsText(self):
        """
        A reason phrase with HTAB, SP and obs-text (RFC 9112 4 allows them) passes byte
        for byte.
        """
        port = self.start({b"/a": b"HTTP/1.1 200 Tout\tva tr\xe8s bien\r\nContent-Length: 2\r\n\r\nok"})
        client = yield self.connect(port)
        expected = b"HTTP/1.1 200 Tout\tva tr\xe8s bien\r\nServer: amazing-proxy\r\nContent-Length: 2\r\n\r\nok"
        first = yield self.exchange(client, request(b"/a"), expected)
        self.assertEqual(first, expected)

    @defer.inlineCallbacks
    def test_emptyChunkExtension(self):
        """
        A chunk extension with no name (C{2;}) is refused by llhttp, which has no
        leniency for it: flag C{UPE}, and as the head has gone, the client's connection
        is closed with the body unfinished (never a desync, never a complete-looking
        body); the next client is served on a new upstream connection.
        """
        port = self.start({
            b"/a": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;\r\nok\r\n0\r\n\r\n",
            b"/b": OK_B,
        })
        client = yield self.connect(port)
        client.transport.write(request(b"/a"))
        yield client.closed
        self.assertEqual(client.received, b"HTTP/1.1 200 OK\r\nServer: amazing-proxy\r\n"
                                          b"Transfer-Encoding: chunked\r\n\r\n")
        other = yield self.connect(port)
        second = yield self.exchange(other, request(b"/b"), PROXY_OK_B)
        self.assertEqual(second, PROXY_OK_B)
        self.assertEqual([r.flags for r in self.proxy.records], ["UPE", "-"])
        self.assertEqual(self.service.requests, [(0, b"/a"), (1, b"/b")])


class ResponseHeadLimitTests(ResponseCase):
    """
    The response head is bounded like the request's: past the size or the count, 502
    C{UPE} at once and the upstream connection is closed.
    """

    @defer.inlineCallbacks
    def assertRefusedHead(self, head: bytes, **proxyArgs: Any) -> Any:
        port = self.start({b"/big": head, b"/b": OK_B}, **proxyArgs)
        client = yield self.connect(port)
        first = yield self.exchange(client, request(b"/big"), b"HTTP/1.1 502 Bad Gateway\r\n")
        self.assertTrue(first.startswith(b"HTTP/1.1 502 Bad Gateway\r\nServer: amazing-proxy\r\n"), first)
        self.assertNotIn(b"X-Big", first)
        yield waitUntil(lambda: self.service.connections[0].lost is not None)
        second = yield self.exchange(client, request(b"/b"), PROXY_OK_B)
        self.assertEqual(second, PROXY_OK_B)
        self.assertEqual([r.flags for r in self.proxy.records], ["UPE", "-"])

    def test_headTooLarge(self):
        """
        A 1 MiB header (sent without the end of the head, so that only a limit can stop
        the proxy reading): 502 at once.
        """
        return self.assertRefusedHead(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (1 << 20))

    def test_tooManyHeaders(self):
        """
        101 headers: 502.
        """
        headers = b"".join(b"X-H%d: 1\r\n" % i for i in range(101))
        return self.assertRefusedHead(b"HTTP/1.1 200 OK\r\n" + headers + b"Content-Length: 2\r\n\r\nok")

    @defer.inlineCallbacks
    def test_limitConfigurable(self):
        """
        With C{maxResponseHeaderBytes=4096}, a 5 kB head is refused and a 3 kB one
        passes.
        """
        port = self.start({
            b"/5k": b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 5000 + b"\r\nContent-Length: 2\r\n\r\nok",
            b"/3k": b"HTTP/1.1 200 OK\r\nX-Mid: " + b"a" * 3000 + b"\r\nContent-Length: 2\r\n\r\nok",
        })
        self.proxy.engine.maxResponseHeaderBytes = 4096
        client = yield self.connect(port)
        first = yield self.exchange(client, request(b"/5k"), b"HTTP/1.1 502 Bad Gateway\r\n")
        self.assertTrue(first.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), first[:100])
        second = yield self.exchange(client, request(b"/3k"), b"HTTP/1.1 200 OK\r\n" + b"x" * 3000)
        self.assertTrue(second.startswith(b"HTTP/1.1 200 OK\r\n"), second[:100])
        self.assertTrue(second.endswith(b"\r\n\r\nok"))


class WebDoorResponseTests(ResponseCase):
    """
    The response-side rules hold through the twisted.web door too (its own head
    formatting differs, so these compare parsed responses).
    """

    engine = "web"

    @defer.inlineCallbacks
    def test_statusBelow100(self):
        """
        C{099}: the web door answers 502 and nothing of the bad response.
        """
        port = self.start({b"/bad": b"HTTP/1.1 099 Low\r\nContent-Length: 2\r\n\r\nok"})
        client = yield self.connect(port)
        first = yield self.exchange(client, request(b"/bad"), b"HTTP/1.1 502 Bad Gateway\r\n")
        self.assertTrue(first.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), first)
        self.assertTrue(first.endswith(b"\r\n\r\nupstream sent a malformed response"), first)
        self.assertEqual([r.flags for r in self.proxy.records], ["UPE"])

    @defer.inlineCallbacks
    def test_nulInReason(self):
        """
        C{HTTP/1.1 200 OK\\x00}: the web door answers 502 (no NUL, nothing of the bad
        response), closes that upstream connection, and the client's connection serves
        the next request in step.
        """
        port = self.start({b"/bad": b"HTTP/1.1 200 OK\x00\r\nContent-Length: 2\r\n\r\nok", b"/b": OK_B})
        client = yield self.connect(port)
        first = yield self.exchange(client, request(b"/bad"), b"HTTP/1.1 502 Bad Gateway\r\n")
        self.assertTrue(first.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), first)
        self.assertTrue(first.endswith(b"\r\n\r\nupstream sent a malformed response"), first)
        self.assertNotIn(b"\x00", first)
        self.assertNotIn(b"\r\n\r\nok", first)
        second = yield self.exchange(client, request(b"/b"), b"HTTP/1.1 200 OK\r\n")
        yield waitUntil(lambda: client.received.endswith(b"\r\n\r\nok"))
        self.assertTrue(second.startswith(b"HTTP/1.1 200 OK\r\n"), second)
        self.assertEqual([r.flags for r in self.proxy.records], ["UPE", "-"])
        self.assertEqual(self.service.requests, [(0, b"/bad"), (1, b"/b")])

    @defer.inlineCallbacks
    def test_laterMinorVersion(self):
        """
        C{HTTP/1.2 200 OK} goes to the client as an HTTP/1.1 200 on the web door too.
        """
        port = self.start({b"/a": b"HTTP/1.2 200 OK\r\nContent-Length: 5\r\n\r\nhello"})
        client = yield self.connect(port)
        first = yield self.exchange(client, request(b"/a"), b"HTTP/1.1 200 OK\r\n")
        yield waitUntil(lambda: client.received.endswith(b"hello"))
        self.assertTrue(client.received.startswith(b"HTTP/1.1 200 OK\r\n"), first)
        self.assertEqual([r.flags for r in self.proxy.records], ["-"])

    @defer.inlineCallbacks
    def test_connectionNominatingContentLength(self):
        """
        C{Connection: Content-Length}: the web door still frames by length.
        """
        port = self.start({
            b"/a": b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\nhello",
            b"/b": OK_B,
        })
        client = yield self.connect(port)
        first = yield self.exchange(client, request(b"/a"), b"HTTP/1.1 200 OK\r\n")
        yield waitUntil(lambda: client.received.endswith(b"hello"))
        self.assertIn(b"\r\nContent-Length: 5\r\n", client.received)
        second = yield self.exchange(client, request(b"/b"), b"HTTP/1.1 200 OK\r\n")
        yield waitUntil(lambda: client.received.endswith(b"ok"))
        self.assertIn(b"\r\nContent-Length: 2\r\n", second)
        self.assertEqual(self.service.requests, [(0, b"/a"), (0, b"/b")])


class StreamIdleTimeoutTests(unittest.SynchronousTestCase):
    """
    Envoy's C{stream_idle_timeout}: no byte either way on an exchange for that long
    ends it (flag C{SI}), checked by the once-a-second sweep, never by a timer per
    request.
    """

    def harness(self, idle: float = 5, responseTimeout: float = 0) -> Harness:
        h = Harness(responseTimeout=responseTimeout or None)
        h.engine.streamIdleTimeout = idle
        return h

    def tick(self, h: Harness, seconds: int) -> None:
        for _ in range(seconds):
            h.reactor.advance(1)
            h.engine.sweepStreams(h.reactor.seconds())

    def test_stalledBodyClosesClient(self):
        """
        After the head, a service that stops sending: once the stream has been idle for
        the timeout, the client's connection is closed (the truncated body is never
        presented as complete), the upstream connection is aborted, one record with
        C{SI}.  No timer was scheduled for it.
        """
        h = self.harness(idle=5)
        door, client = h.client()
        door.dataReceived(GET)
        conn, upstream = h.connectUpstream()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        self.assertEqual(h.reactor.getDelayedCalls(), [])
        self.tick(h, 3)
        conn.dataReceived(b"de")  # activity: the clock starts again
        self.tick(h, 4)
        self.assertFalse(client.disconnecting)
        self.tick(h, 3)
        self.assertTrue(client.disconnecting)
        self.assertTrue(upstream.disconnecting)
        self.assertTrue(client.value().endswith(b"abcde"))
        [rec] = h.records
        self.assertEqual((rec.status, rec.flags, rec.bytesSent), (200, "SI", 5))

    def test_beforeHeadRequestComplete(self):
        """
        The request is complete and no head comes (no upstream timeout set): 504
        C{SI}, as Envoy's C{maybeRequestTimeoutCode}.
        """
        h = self.harness(idle=5)
        door, client = h.client()
        door.dataReceived(GET)
        conn, upstream = h.connectUpstream()
        self.tick(h, 7)
        self.assertTrue(client.value().startswith(b"HTTP/1.1 504 Gateway Timeout\r\n"), client.value())
        self.assertIn(b"stream timeout", client.value())
        self.assertTrue(upstream.disconnecting)
        self.assertEqual([r.flags for r in h.records], ["SI"])

    def test_stalledRequestBody(self):
        """
        A client that stops sending its request body: 408 C{SI}, and its connection is
        closed (the rest of its body can't be told from a next request).
        """
        h = self.harness(idle=5)
        door, client = h.client()
        door.dataReceived(b"POST /up HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\n12345")
        conn, upstream = h.connectUpstream()
        self.tick(h, 7)
        self.assertTrue(client.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n"), client.value())
        self.assertIn(b"Connection: close\r\n", client.value())
        self.assertTrue(client.disconnecting)
        self.assertTrue(upstream.disconnecting)
        self.assertEqual([r.flags for r in h.records], ["SI"])

    def test_activeStreamKept(self):
        """
        A slow but steady body (a byte every 2 s for 20 s) is not cut short.
        """
        h = self.harness(idle=5)
        door, client = h.client()
        door.dataReceived(GET)
        conn, upstream = h.connectUpstream()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        for _ in range(10):
            self.tick(h, 2)
            conn.dataReceived(b"x")
        self.assertFalse(client.disconnecting)
        [rec] = h.records
        self.assertEqual((rec.status, rec.flags, rec.bytesSent), (200, "-", 10))

    def test_disabled(self):
        """
        A timeout of C{None} (C{--stream-idle-timeout 0}): a stall is left alone.
        """
        h = self.harness(idle=5)
        h.engine.streamIdleTimeout = None
        door, client = h.client()
        door.dataReceived(GET)
        conn, upstream = h.connectUpstream()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        self.tick(h, 1000)
        self.assertFalse(client.disconnecting)
        self.assertEqual(h.records, [])

    def test_idleTunnel(self):
        """
        An upgraded connection with no byte either way for the timeout is closed on
        both sides, C{SI}.
        """
        h = self.harness(idle=5)
        door, client = h.client()
        door.dataReceived(b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        conn, upstream = h.connectUpstream()
        conn.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        door.dataReceived(b"ping")
        self.tick(h, 4)
        self.assertFalse(client.disconnecting)
        self.tick(h, 3)
        self.assertTrue(client.disconnecting)
        self.assertTrue(upstream.disconnecting)
        [rec] = h.records
        self.assertEqual((rec.status, rec.flags), (101, "SI"))

    def test_queuedRequestNotTimed(self):
        """
        A pipelined request waiting behind a long but active response is not timed out
        while it waits.
        """
        h = self.harness(idle=5)
        door, client = h.client()
        door.dataReceived(GET + GET)
        conn, upstream = h.connectUpstream()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        for _ in range(10):
            self.tick(h, 2)
            conn.dataReceived(b"x")
        self.assertEqual([r.flags for r in h.records], ["-"])
        self.assertFalse(client.disconnecting)


@implementer(IHalfCloseableProtocol)
class HalfCloseRecorder(Protocol):
    """
    A peer that records what it receives and how its reading side ended: C{"fin"} (a
    clean end of stream), or the reason of a full loss (a reset).
    """

    def __init__(self) -> None:
        self.received = b""
        self.ended: Optional[str] = None
        self.endedAt: Optional[float] = None
        self.lost: Optional[Any] = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.ended = "fin"
        self.endedAt = reactor.seconds()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = reason
        if self.ended is None:
            self.ended = "clean" if reason is not None and reason.check(ConnectionDone) else "reset"
            self.endedAt = reactor.seconds()


UPGRADE = b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


class TunnelService(HalfCloseRecorder):
    """
    The service end of an upgrade: answers 101 to the first request head, then
    records.
    """

    def __init__(self, factory: Any) -> None:
        HalfCloseRecorder.__init__(self)
        self.factory = factory
        self.upgraded = False
        factory.peers.append(self)

    def dataReceived(self, data: bytes) -> None:
        if not self.upgraded:
            self.upgraded = True
            self.transport.write(SWITCHING)
            data = data.split(b"\r\n\r\n", 1)[1]
        self.received += data


class TunnelCloseMixin:
    """
    After a 101, a close or half-close on either side is passed on as a FIN at once.
    """

    engine = "fast"

    @defer.inlineCallbacks
    def setUpTunnel(self) -> Any:
        factory = Factory()
        factory.peers = []
        factory.buildProtocol = lambda addr: TunnelService(factory)  # type: ignore[method-assign]
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        proxy = Proxy(listening.getHost().port, engine=self.engine)
        port = proxy.start(self)
        self.proxy = proxy
        client = HalfCloseRecorder()
        connected: defer.Deferred = defer.Deferred()
        cf = ClientFactory.forProtocol(lambda: client)
        connector = reactor.connectTCP("127.0.0.1", port, cf)
        self.addCleanup(connector.disconnect)
        client.connectionMade = lambda: connected.callback(None)  # type: ignore[method-assign]
        yield connected
        client.transport.write(UPGRADE)
        yield waitUntil(lambda: client.received.endswith(b"\r\n\r\n"))
        self.assertTrue(client.received.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"))
        [service] = factory.peers
        self.addCleanup(lambda: service.transport.connected and service.transport.abortConnection())
        self.addCleanup(lambda: client.transport.connected and client.transport.abortConnection())
        client.transport.write(b"up")
        service.transport.write(b"down")
        yield waitUntil(lambda: service.received == b"up" and client.received.endswith(b"down"))
        return client, service

    @defer.inlineCallbacks
    def test_serviceHalfCloses(self):
        """
        The service half-closes: the client sees the end of the stream at once, and
        can still send (the service receives it); then the client closes and the
        service gets a FIN, not a reset; one record.
        """
        client, service = yield self.setUpTunnel()
        service.transport.write(b"bye")
        service.transport.loseWriteConnection()
        yield waitUntil(lambda: client.ended is not None, timeout=2)
        self.assertEqual(client.ended, "fin")
        self.assertTrue(client.received.endswith(b"downbye"))
        client.transport.write(b"late")
        yield waitUntil(lambda: service.received == b"uplate", timeout=2)
        client.transport.loseWriteConnection()
        yield waitUntil(lambda: service.ended is not None, timeout=2)
        self.assertEqual(service.ended, "fin")
        yield waitUntil(lambda: self.proxy.records, timeout=2)
        [rec] = self.proxy.records
        self.assertEqual((rec.status, rec.flags), (101, "-"))

    @defer.inlineCallbacks
    def test_serviceCloses(self):
        """
        The service closes its connection: the client sees the end of the stream
        promptly (well under a WebSocket library's 5 s close timeout).
        """
        client, service = yield self.setUpTunnel()
        closed = reactor.seconds()
        service.transport.loseConnection()
        yield waitUntil(lambda: client.ended is not None, timeout=2)
        self.assertIn(client.ended, ("fin", "clean"))
        self.assertLess(client.endedAt - closed, 0.5)
        # The client closes in turn (as a WebSocket client does at the end of the
        # stream): the exchange ends.
        client.transport.loseConnection()
        yield waitUntil(lambda: self.proxy.records, timeout=2)
        [rec] = self.proxy.records
        self.assertEqual((rec.status, rec.flags), (101, "-"))

    @defer.inlineCallbacks
    def test_clientHalfCloses(self):
        """
        The client half-closes: the service gets a FIN (never a reset), and may still
        answer; the client receives the answer, then the service's FIN.
        """
        client, service = yield self.setUpTunnel()
        client.transport.loseWriteConnection()
        yield waitUntil(lambda: service.ended is not None, timeout=2)
        self.assertEqual(service.ended, "fin")
        service.transport.write(b"answer")
        yield waitUntil(lambda: client.received.endswith(b"answer"), timeout=2)
        service.transport.loseWriteConnection()
        yield waitUntil(lambda: client.ended is not None, timeout=2)
        self.assertEqual(client.ended, "fin")
        yield waitUntil(lambda: self.proxy.records, timeout=2)

    @defer.inlineCallbacks
    def test_clientCloses(self):
        """
        The client closes its connection: the service gets a FIN, not a reset.
        """
        client, service = yield self.setUpTunnel()
        client.transport.loseConnection()
        yield waitUntil(lambda: service.ended is not None, timeout=2)
        self.assertEqual(service.ended, "fin")
        service.transport.loseConnection()
        yield waitUntil(lambda: self.proxy.records, timeout=2)


    @defer.inlineCallbacks
    def test_clientResets(self):
        """
        Even when the client resets its connection, the service gets a FIN from the
        proxy (the reset is the client's business); the exchange ends.
        """
        import socket
        import struct

        client, service = yield self.setUpTunnel()
        client.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.transport.abortConnection()
        yield waitUntil(lambda: service.ended is not None, timeout=2)
        self.assertEqual(service.ended, "fin")
        yield waitUntil(lambda: self.proxy.records, timeout=2)


class FastDoorTunnelCloseTests(TunnelCloseMixin, unittest.TestCase):
    """
    Tunnel close through the fast door.
    """


class WebDoorTunnelCloseTests(TunnelCloseMixin, unittest.TestCase):
    """
    Tunnel close through the twisted.web door.
    """

    engine = "web"


class FlagTests(unittest.TestCase):
    """
    The new flags, validated at start-up and wired through C{twistd sidecar}.
    """

    def test_badValues(self):
        """
        A bad C{--stream-idle-timeout} or C{--max-response-header-bytes} fails with one
        sentence naming the flag; 0 turns the stream idle timeout off.
        """
        from twisted.python import usage

        from sidecar.tap import Options

        for flag, value in (("--stream-idle-timeout", "-1"), ("--stream-idle-timeout", "soon"),
                            ("--max-response-header-bytes", "100"), ("--max-response-header-bytes", "x")):
            with self.assertRaises(usage.UsageError) as caught:
                Options().parseOptions(["--admin", "none", flag, value])
            self.assertTrue(str(caught.exception).startswith(flag + ":"), str(caught.exception))
        options = Options()
        options.parseOptions(["--admin", "none", "--stream-idle-timeout", "0", "--max-response-header-bytes", "4096"])
        self.assertEqual((options["config"].streamIdleTimeout, options["config"].maxResponseHeaderBytes), (None, 4096))
        options = Options()
        options.parseOptions(["--admin", "none"])
        self.assertEqual((options["config"].streamIdleTimeout, options["config"].maxResponseHeaderBytes),
                         (300.0, 81920))

    @defer.inlineCallbacks
    def test_stalledBodyThroughTwistd(self):
        """
        C{twistd sidecar --stream-idle-timeout 1}: a service that sends a head and part of
        the body, then stalls, has the client's connection closed within about two
        seconds, the body left unfinished, and the record says C{SI}.
        """
        from tests.support import startSidecar

        def stall(service: ScriptedService) -> None:
            service.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")

        factory = ScriptedServiceFactory({b"/stall": stall})
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.addCleanup(lambda: [c.transport.abortConnection() for c in factory.connections])
        child, port = yield startSidecar(self, "--upstream", str(listening.getHost().port), "--admin", "none",
                                         "--stream-idle-timeout", "1")
        client = RawClient()
        connector = reactor.connectTCP("127.0.0.1", port, ClientFactory.forProtocol(lambda: client))
        self.addCleanup(connector.disconnect)
        yield waitUntil(lambda: client.transport is not None and client.transport.connected)
        started = reactor.seconds()
        client.transport.write(request(b"/stall"))
        yield client.closed
        self.assertLess(reactor.seconds() - started, 4)
        self.assertTrue(client.received.endswith(b"\r\n\r\npartial"), client.received)
        yield waitUntil(lambda: b" SI " in child.out)


class ResponseHeadRuleTests(unittest.SynchronousTestCase):
    """
    L{sidecar.headers.responseHead}: what C{Connection} may nominate in a response, and
    the framing headers the proxy keeps for itself.
    """

    def test_framingAndServerNotNominable(self):
        """
        C{Connection} naming C{Content-Length}, C{Transfer-Encoding} or C{Server}
        removes none of them (the parsed length stays, as the number the front door
        frames by; our C{Server} stays); another nominated header goes.
        """
        from sidecar.headers import responseHead

        head = responseHead([(b"Connection", b"Content-Length, transfer-encoding, SERVER, X-Hop"),
                             (b"X-Hop", b"1"), (b"Content-Length", b"0010"), (b"X-Ok", b"1")], b"p")
        self.assertEqual(head.headers, [(b"Server", b"p"), (b"X-Ok", b"1")])
        self.assertEqual((head.contentLength, head.chunked, head.error), (10, False, None))

    def test_transferCodings(self):
        """
        Only a single C{chunked} is a forwardable transfer coding of a response.
        """
        from sidecar.headers import responseHead

        for values, error in (([b"chunked"], None), ([b" Chunked "], None), ([b"gzip, chunked"], True),
                              ([b"gzip"], True), ([b"chunked", b"chunked"], True), ([b"identity"], True)):
            head = responseHead([(b"Transfer-Encoding", v) for v in values], b"p")
            self.assertEqual(head.error is not None, bool(error), values)
