# -*- test-case-name: tests.test_h2 -*-
"""
HTTP/2 through the sidecar: the pure pieces (L{sidecar.h2wire}), the door and the
upstream with real peers (curl, httpx, h2load, a scripted h2 service, the twisted.web
upstream), the translation between HTTP/1.1 and HTTP/2, flow control, drain, and the
protocol's known attacks refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated, DataReceived, ResponseReceived, StreamEnded, StreamReset, TrailersReceived,
)
from h2.settings import SettingCodes
from hyperframe.frame import ContinuationFrame, HeadersFrame, PingFrame
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from sidecar.config import H2Config
from sidecar.h2door import PREFACE, H2ServerProtocol
from sidecar.h2wire import MessageCounter, grpcLocalReply, requestFromHeaders, requestHeaders
from sidecar.headers import RequestHead
from tests.support import H2Proxy, Upstream, rawRequest
from tests.test_grpc import waitFor

CURL = shutil.which("curl")
H2LOAD = shutil.which("h2load")
NGHTTP = shutil.which("nghttp")


# -- pure pieces ---------------------------------------------------------------------


class MessageCounterTests(unittest.SynchronousTestCase):
    """
    gRPC's length-prefixed messages are counted however the stream is cut.
    """

    def stream(self, sizes: List[int]) -> bytes:
        return b"".join(b"\0" + n.to_bytes(4, "big") + b"m" * n for n in sizes)

    def test_cutAnywhere(self) -> None:
        """
        Messages of sizes 0, 1, 5, 300 and 70000 are counted as five, fed whole, byte
        by byte, or in pieces of 7 and 4096.
        """
        data = self.stream([0, 1, 5, 300, 70000])
        for piece in (len(data), 1, 7, 4096):
            counter = MessageCounter()
            for i in range(0, len(data), piece):
                counter.feed(data[i:i + piece])
            self.assertEqual(counter.messages, 5, piece)

    def test_prefixAcrossFrames(self) -> None:
        """
        A prefix cut in two is one message, counted when its first byte arrives.
        """
        counter = MessageCounter()
        counter.feed(b"\0\0")
        self.assertEqual(counter.messages, 0)
        counter.feed(b"\0\0\x02ab")
        self.assertEqual(counter.messages, 1)
        counter.feed(b"\0\0\0\0\0")
        self.assertEqual(counter.messages, 2)


class HeadsTests(unittest.SynchronousTestCase):
    """
    HTTP/2 heads to the engine's and back.
    """

    def test_request(self) -> None:
        """
        C{:authority} becomes C{Host} (a client's C{Host} never wins), the forwarding
        rules apply (X-Forwarded-For, X-Request-Id), a body without a length is
        chunked for HTTP/1.1, and gRPC is recognised.
        """
        method, path, req, grpc = requestFromHeaders([
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/svc/M"), (b":authority", b"api:80"),
            (b"host", b"evil"), (b"content-type", b"application/grpc+proto"), (b"te", b"trailers"),
            (b"x-forwarded-for", b"1.2.3.4"),
        ], "10.0.0.1", b"http")
        self.assertEqual((method, path, grpc, req.authority, req.chunked, req.error), (b"POST", b"/svc/M", True, "api:80", True, None))
        names = [n for n, _ in req.headers]
        self.assertEqual(req.headers[0], (b"host", b"api:80"))
        self.assertNotIn(b"te", names)
        self.assertEqual(dict(req.headers)[b"X-Forwarded-For"], b"1.2.3.4, 10.0.0.1")
        self.assertIn(b"X-Request-Id", names)

    def test_cookies(self) -> None:
        """
        Cookies an HTTP/2 client split into several headers go on as one, joined with
        C{"; "} (RFC 9113 8.2.3), which HTTP/1.1 services require.
        """
        req = requestFromHeaders([(b":method", b"GET"), (b":path", b"/"), (b":authority", b"a"), (b"cookie", b"a=1"),
                                  (b"x", b"y"), (b"cookie", b"b=2")], "1.1.1.1", b"http", endStream=True)[2]
        self.assertEqual([v for n, v in req.headers if n == b"cookie"], [b"a=1; b=2"])

    def test_requestErrors(self) -> None:
        """
        No C{:path}, CONNECT, or no authority at all: refused with a sentence.
        """
        for headers, word in (([(b":method", b"GET"), (b":authority", b"a")], ":path"),
                              ([(b":method", b"CONNECT"), (b":authority", b"a"), (b":path", b"/")], "CONNECT"),
                              ([(b":method", b"GET"), (b":path", b"/")], ":authority")):
            self.assertIn(word, requestFromHeaders(headers, "1.1.1.1", b"http", endStream=True)[2].error)

    def test_upstreamHead(self) -> None:
        """
        A request from an HTTP/1.1 client goes to an HTTP/2 service with pseudo-headers
        from its request line and Host, lower-case names, its length, C{te: trailers}
        for gRPC, and no connection-specific header.
        """
        req = RequestHead(headers=[(b"Host", b"svc"), (b"X-Thing", b"1"), (b"Connection", b"Upgrade"),
                                   (b"Upgrade", b"websocket")], authority="svc", contentLength=3)
        out = requestHeaders(b"PUT", b"/p?q", req, b"http", True)
        self.assertEqual(out[:4], [(b":method", b"PUT"), (b":scheme", b"http"), (b":path", b"/p?q"), (b":authority", b"svc")])
        self.assertEqual(out[4:], [(b"x-thing", b"1"), (b"te", b"trailers"), (b"content-length", b"3")])

    def test_neverIndexed(self) -> None:
        """
        The request id, credentials and short cookies go to the service as
        never-indexed HPACK literals (kept out of the shared compression table, and
        so by every intermediary after); other headers, long cookies included, may be
        indexed.
        """
        from hpack import Decoder, NeverIndexedHeaderTuple

        from sidecar.compat import PlainEncoder
        req = RequestHead(headers=[(b"X-Request-Id", b"r-1"), (b"Authorization", b"Bearer t"),
                                   (b"Proxy-Authorization", b"Basic x"), (b"Cookie", b"a=1"),
                                   (b"Cookie", b"session=" + b"s" * 30), (b"X-Thing", b"1")],
                          authority="svc")
        out = requestHeaders(b"GET", b"/", req, b"http", False)
        never = {(h[0], h[1]) for h in out if isinstance(h, NeverIndexedHeaderTuple)}
        self.assertEqual(never, {(b"x-request-id", b"r-1"), (b"authorization", b"Bearer t"),
                                 (b"proxy-authorization", b"Basic x"), (b"cookie", b"a=1")})
        decoded = Decoder().decode(PlainEncoder().encode(out), raw=True)
        flagged = {(h[0], h[1]) for h in decoded if isinstance(h, NeverIndexedHeaderTuple)}
        self.assertEqual(flagged, never)

    def test_grpcLocalReply(self) -> None:
        """
        The proxy's own answer to a gRPC call is HTTP 200 with the mapped status and
        the reason percent-encoded.
        """
        code, headers = grpcLocalReply(503, b"upstream overflow\n", b"amazing-proxy")
        self.assertEqual(code, 14)
        self.assertEqual(dict(headers)[b"grpc-message"], b"upstream overflow")
        self.assertEqual(dict(headers)[b":status"], b"200")
        self.assertEqual(grpcLocalReply(504, b"timeout\xc3\xa9", b"x")[0], 14)
        self.assertEqual(dict(grpcLocalReply(404, b"caf\xc3\xa9", b"x")[1])[b"grpc-message"], b"caf%C3%A9")


# -- a scripted HTTP/2 service, and a raw HTTP/2 client ------------------------------


class H2Service(Protocol):
    """
    A scripted h2c service.  Paths: C{/echo} (JSON of the head it got and the body's
    length, with C{x-trailer} trailers), C{/bytes/N} (N bytes, no length), C{/reset}
    (RST_STREAM INTERNAL_ERROR), C{/hang} (never answers).
    """

    def connectionMade(self) -> None:
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.h2.initiate_connection()
        self.transport.write(self.h2.data_to_send())
        self.heads: Dict[int, Any] = {}
        self.sending: Dict[int, int] = {}
        self.bodies: Dict[int, int] = {}
        self.factory.connections += 1

    def dataReceived(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            name = event.__class__.__name__
            if name in ("WindowUpdated", "RemoteSettingsChanged"):
                for sid in list(self.sending):
                    self.send(sid)
            if name == "RequestReceived":
                self.heads[event.stream_id] = event.headers
                self.bodies[event.stream_id] = 0
                self.factory.seen.append(event.headers)
            elif name == "DataReceived":
                self.bodies[event.stream_id] += len(event.data)
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif name == "StreamEnded":
                self.answer(event.stream_id)
        self.transport.write(self.h2.data_to_send())

    def answer(self, sid: int) -> None:
        head = dict(self.heads[sid])
        path = head[b":path"]
        if path == b"/echo":
            body = json.dumps({"headers": [[k.decode(), v.decode()] for k, v in self.heads[sid]],
                               "length": self.bodies[sid]}).encode()
            self.h2.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/json")])
            self.h2.send_data(sid, body)
            self.h2.send_headers(sid, [(b"x-trailer", b"yes")], end_stream=True)
        elif path.startswith(b"/bytes/"):
            self.h2.send_headers(sid, [(b":status", b"200")])
            self.sending[sid] = int(path.split(b"/")[2])
            self.send(sid)
        elif path == b"/reset":
            self.h2.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
        elif path == b"/goaway-once" and not self.factory.wentAway:
            # Going away before this stream: it was not processed (retry elsewhere).
            self.factory.wentAway = True
            self.h2.close_connection(last_stream_id=max(sid - 2, 0))
            self.transport.write(self.h2.data_to_send())
            self.transport.loseConnection()
        elif path == b"/goaway-once":
            self.h2.send_headers(sid, [(b":status", b"200")])
            self.h2.send_data(sid, b"second", end_stream=True)

    def send(self, sid: int) -> None:
        """
        Send what the stream's window allows of its C{/bytes/N} answer.
        """
        left = self.sending[sid]
        while left:
            n = min(left, self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            if n <= 0:
                break
            left -= n
            self.h2.send_data(sid, b"b" * n, end_stream=not left)
        if left:
            self.sending[sid] = left
        else:
            del self.sending[sid]


def startH2Service(case: Any) -> tuple:
    factory = Factory.forProtocol(H2Service)
    factory.seen = []  # type: ignore[attr-defined]
    factory.connections = 0  # type: ignore[attr-defined]
    factory.wentAway = False  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    case.addCleanup(port.stopListening)
    return factory, port.getHost().port


class H2Client(Protocol):
    """
    A raw HTTP/2 client (h2) that records every event, for the tests that must send
    what no polite client would.
    """

    def __init__(self, settings: Optional[Dict[int, int]] = None) -> None:
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.settings = settings or {}
        self.events: List[Any] = []
        self.closed = defer.Deferred()
        #: Streams whose DATA is never acknowledged (only the connection's window is).
        self.slow: set = set()

    def connectionMade(self) -> None:
        self.h2.initiate_connection()
        if self.settings:
            self.h2.update_settings(self.settings)
        self.flush()
        self.factory.connected.callback(self)

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except Exception as e:  # a server's frames after our own error
            self.events.append(e)
            return
        self.events.extend(events)
        for e in events:
            if isinstance(e, DataReceived) and e.flow_controlled_length:
                if e.stream_id in self.slow:
                    self.h2.increment_flow_control_window(e.flow_controlled_length)
                else:
                    self.h2.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        self.flush()

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)

    def get(self, path: bytes, end: bool = True, method: bytes = b"GET") -> int:
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, [(b":method", method), (b":scheme", b"http"), (b":path", path),
                                   (b":authority", b"svc")], end_stream=end)
        self.flush()
        return sid

    def body(self, sid: int) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, DataReceived) and e.stream_id == sid)

    def ended(self, sid: int) -> bool:
        return any(isinstance(e, (StreamEnded, StreamReset)) and e.stream_id == sid for e in self.events)

    def status(self, sid: int) -> Optional[bytes]:
        for e in self.events:
            if isinstance(e, ResponseReceived) and e.stream_id == sid:
                return dict(e.headers)[b":status"]
        return None

    def goaway(self) -> Optional[ConnectionTerminated]:
        return next((e for e in self.events if isinstance(e, ConnectionTerminated)), None)


def connectH2(case: Any, port: int, settings: Optional[Dict[int, int]] = None) -> defer.Deferred:
    from twisted.internet.protocol import ClientFactory

    factory = ClientFactory()
    factory.connected = defer.Deferred()  # type: ignore[attr-defined]
    client = H2Client(settings)
    factory.buildProtocol = lambda addr: client  # type: ignore[method-assign]
    client.factory = factory
    connector = reactor.connectTCP("127.0.0.1", port, factory)
    case.addCleanup(connector.disconnect)
    return factory.connected  # type: ignore[attr-defined]


# -- real peers ----------------------------------------------------------------------


class CurlTests(unittest.TestCase):
    """
    curl with prior knowledge (h2c) through the door to an HTTP/1.1 service.
    """

    if CURL is None:
        skip = "needs curl"

    def setUp(self) -> None:
        self.upstream = Upstream()
        self.proxy = H2Proxy(self.upstream.start(self), upstreamProtocol="http1")
        self.port = self.proxy.start(self)

    def curl(self, *args: str) -> defer.Deferred:
        return getProcessOutputAndValue(CURL, ["-s", "--max-time", "10", "--http2-prior-knowledge", *args])

    @defer.inlineCallbacks
    def test_get(self) -> Any:
        """
        A GET over HTTP/2 reaches the HTTP/1.1 service with C{Host} from
        C{:authority}, the forwarding headers, and no HTTP/2 leftovers; the answer
        comes back over HTTP/2 with our C{server}; the record says HTTP/2.
        """
        out, err, code = yield self.curl("-i", f"http://127.0.0.1:{self.port}/echo?x=1", "-H", "X-Thing: 1")
        self.assertEqual(code, 0, err)
        head, _, body = out.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/2 200"), head)
        self.assertIn(b"server: amazing-proxy", head)
        seen = self.upstream.seen[-1]
        self.assertEqual(seen.uri, b"/echo?x=1")
        self.assertEqual(seen.header(b"host"), [b"127.0.0.1:%d" % self.port])
        self.assertEqual(seen.header(b"x-thing"), [b"1"])
        self.assertEqual(seen.header(b"x-forwarded-for"), [b"127.0.0.1"])
        self.assertEqual(seen.header(b"transfer-encoding"), [])
        self.assertEqual(json.loads(body)["method"], "GET")
        record = self.proxy.records[-1]
        self.assertEqual((record.protocol, record.status, record.grpc), ("HTTP/2", 200, False))

    @defer.inlineCallbacks
    def test_post(self) -> Any:
        """
        A 300 KiB upload over HTTP/2 (beyond the stream's first window) arrives whole,
        byte for byte.
        """
        import hashlib

        data = os.urandom(300 * 1024)
        path = os.path.join(tempfile.mkdtemp(), "body")
        with open(path, "wb") as f:
            f.write(data)
        out, err, code = yield self.curl("--data-binary", f"@{path}", f"http://127.0.0.1:{self.port}/echo")
        self.assertEqual(code, 0, err)
        echoed = json.loads(out)
        self.assertEqual((echoed["length"], echoed["sha256"]), (len(data), hashlib.sha256(data).hexdigest()))
        self.assertEqual(self.proxy.records[-1].bytesReceived, len(data))

    @defer.inlineCallbacks
    def test_largeDownload(self) -> Any:
        """
        A 5 MB response streams through within the client's windows.
        """
        out, err, code = yield self.curl(f"http://127.0.0.1:{self.port}/stream/5000000")
        self.assertEqual(code, 0, err)
        self.assertEqual(len(out), 5000000)
        self.assertEqual(self.proxy.records[-1].bytesSent, 5000000)

    @defer.inlineCallbacks
    def test_http1Alongside(self) -> Any:
        """
        The same port still serves HTTP/1.1 (the preface tells them apart).
        """
        response = (yield rawRequest(self.port, b"GET /bytes/3 HTTP/1.1\r\nHost: x\r\n\r\n")).responses[0]
        self.assertEqual((response.status, response.body), (200, b"xxx"))
        self.assertEqual(self.proxy.records[-1].protocol, "HTTP/1.1")


class H2UpstreamTests(unittest.TestCase):
    """
    The HTTP/2 upstream, against a scripted h2c service.
    """

    def setUp(self) -> None:
        self.service, servicePort = startH2Service(self)
        self.proxy = H2Proxy(servicePort, upstreamProtocol="http2")
        self.port = self.proxy.start(self)

    @defer.inlineCallbacks
    def test_http1ClientToH2Service(self) -> Any:
        """
        An HTTP/1.1 client's request reaches the HTTP/2 service with C{:authority}
        from its C{Host} and its body length; the answer, which has no length, comes
        back chunked, and its trailers are dropped (HTTP/1.1 clients get none).
        """
        response = (yield rawRequest(self.port, b"POST /echo HTTP/1.1\r\nHost: api.local\r\nContent-Length: 5\r\n"
                                               b"Connection: close\r\n\r\nhello")).responses[0]
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header(b"transfer-encoding"), [b"chunked"])
        echoed = dict((k, v) for k, v in json.loads(response.body)["headers"])
        self.assertEqual(echoed[":authority"], "api.local")
        self.assertEqual(echoed["content-length"], "5")
        self.assertNotIn("connection", echoed)
        self.assertEqual(json.loads(response.body)["length"], 5)
        self.assertNotIn(b"x-trailer", response.body)
        self.assertEqual(self.proxy.records[-1].protocol, "HTTP/1.1")

    @defer.inlineCallbacks
    def test_trailersH2ToH2(self) -> Any:
        """
        An HTTP/2 client gets the service's trailers.
        """
        client = yield connectH2(self, self.port)
        sid = client.get(b"/echo")
        yield waitFor(lambda: client.ended(sid))
        trailers = [dict(e.headers) for e in client.events if isinstance(e, TrailersReceived)]
        self.assertEqual(trailers, [{b"x-trailer": b"yes"}])

    @defer.inlineCallbacks
    def test_serviceReset(self) -> Any:
        """
        The service resets the stream before answering: 502 with flag C{UR} (Envoy's
        upstream remote reset), the reason in the body.
        """
        response = (yield rawRequest(self.port, b"GET /reset HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")).responses[0]
        self.assertEqual(response.status, 502)
        self.assertIn(b"remote reset", response.body)
        self.assertEqual(self.proxy.records[-1].flags, "UR")

    @defer.inlineCallbacks
    def test_serviceGoaway(self) -> Any:
        """
        The service's GOAWAY says a GET was not processed: it is sent again on a new
        connection and answered there.
        """
        response = (yield rawRequest(self.port, b"GET /goaway-once HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")).responses[0]
        self.assertEqual((response.status, response.body), (200, b"second"))
        self.assertEqual(self.service.connections, 2)
        self.assertEqual(self.proxy.records[-1].flags, "-")

    @defer.inlineCallbacks
    def test_multiplexed(self) -> Any:
        """
        Thirty concurrent HTTP/1.1 requests share one connection to the service.
        """
        results = yield defer.gatherResults([
            rawRequest(self.port, b"GET /bytes/%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % (i + 1))
            for i in range(30)])
        self.assertEqual(sorted(len(r.responses[0].body) for r in results), list(range(1, 31)))
        self.assertEqual(self.service.connections, 1)

    @defer.inlineCallbacks
    def test_httpx(self) -> Any:
        """
        httpx (h2) with prior knowledge gets a 200 KB body over HTTP/2 through the
        proxy to the HTTP/2 service.
        """
        try:
            import httpx
        except ImportError:  # pragma: no cover
            raise unittest.SkipTest("needs httpx[http2]")
        from twisted.internet.threads import deferToThread

        def fetch() -> Any:
            with httpx.Client(http1=False, http2=True) as client:
                r = client.get(f"http://127.0.0.1:{self.port}/bytes/200000")
                return r.http_version, r.status_code, len(r.content), r.headers.get("server")
        result = yield deferToThread(fetch)
        self.assertEqual(result, ("HTTP/2", 200, 200000, "amazing-proxy"))


class CycleTests(unittest.TestCase):
    """
    A finished stream leaves no reference cycle behind, so its objects are freed as it
    ends, not by the cyclic garbage collector (whose passes cost a proxy dearly).
    """

    @defer.inlineCallbacks
    def test_noCyclesPerStream(self) -> Any:
        """
        After 20 requests through the door and the HTTP/2 upstream (each with a body,
        a response body and trailers), a collection finds no stream door, exchange or
        upstream stream among the unreachable objects.
        """
        import gc

        service, servicePort = startH2Service(self)
        proxy = H2Proxy(servicePort, upstreamProtocol="http2")
        port = proxy.start(self)
        client = yield connectH2(self, port)
        gc.collect()
        flags = gc.get_debug()
        gc.set_debug(gc.DEBUG_SAVEALL)
        self.addCleanup(gc.set_debug, flags)
        self.addCleanup(gc.garbage.clear)
        gc.garbage.clear()
        for _ in range(20):
            sid = client.get(b"/echo", end=False, method=b"POST")
            client.h2.send_data(sid, b"body", end_stream=True)
            client.flush()
            yield waitFor(lambda: client.ended(sid))
        yield waitFor(lambda: len(proxy.records) == 20)
        gc.collect()
        from sidecar.exchange import Exchange
        from sidecar.h2door import H2StreamDoor
        from sidecar.h2upstream import H2UpstreamStream

        # Only this test's objects (another test's may be collected meanwhile).
        left = [type(o).__name__ for o in gc.garbage
                if (isinstance(o, H2StreamDoor) and o.conn.engine is proxy.engine)
                or (isinstance(o, Exchange) and o.engine is proxy.engine)
                or (isinstance(o, H2UpstreamStream) and o.conn.pool is proxy.h2pool)]
        self.assertEqual(left, [])
        self.assertEqual(client.status(sid), b"200")


class H2LoadTests(unittest.TestCase):
    """
    h2load, nghttp2's load generator, at 100 concurrent streams.
    """

    if H2LOAD is None:
        skip = "needs h2load (nghttp2-client)"

    @defer.inlineCallbacks
    def test_hundredStreams(self) -> Any:
        """
        2000 GETs, 100 streams at a time on each of two connections, through the door
        and the HTTP/2 upstream (multiplexed on few connections, at most 100 streams
        each): every one succeeds, each with its record.
        """
        service, servicePort = startH2Service(self)
        proxy = H2Proxy(servicePort)
        port = proxy.start(self)
        out, err, code = yield getProcessOutputAndValue(
            H2LOAD, ["-n", "2000", "-c", "2", "-m", "100", "-T", "20", f"http://127.0.0.1:{port}/bytes/100"])
        bad = [(r.status, r.flags) for r in proxy.records if r.status != 200]
        self.assertIn(b"2000 succeeded, 0 failed, 0 errored", out, (out + err, bad[:5]))
        self.assertEqual(len(proxy.records), 2000)
        self.assertEqual({r.status for r in proxy.records}, {200})
        self.assertLessEqual(service.connections, 3)


class MutualTLSTests(unittest.TestCase):
    """
    HTTP/2 over the mutual-TLS listener, chosen by ALPN.
    """

    if CURL is None:
        skip = "needs curl"

    @defer.inlineCallbacks
    def test_curlHttp2(self) -> Any:
        """
        curl --http2 with a client certificate negotiates h2 and is served by an
        HTTP/1.1 service (ALPN's h2 is the proxy's choice, not the service's); the
        service sees XFCC; the record has the caller's identity.
        """
        from sidecar.config import TLSConfig
        from sidecar.mtls import MutualTLS
        from tests.tlsfixtures import FRONTEND_ID, writeMesh

        upstream = Upstream()
        # "auto": HTTP/2 chosen by ALPN still reaches an HTTP/1.1 service as HTTP/1.1.
        proxy = H2Proxy(upstream.start(self), upstreamProtocol="auto")
        mesh = writeMesh(tempfile.mkdtemp())
        tls = MutualTLS.fromConfig(TLSConfig(listen=None, cert=mesh.crt("backend"), key=mesh.key("backend"),
                                             ca=mesh.crt("ca")), reactor)
        listening = reactor.listenTCP(0, tls.serverFactory(proxy.engine, 65536), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.addCleanup(proxy.pool.closeAll)
        port = listening.getHost().port
        out, err, code = yield getProcessOutputAndValue(CURL, [
            "-s", "-i", "--max-time", "10", "--http2", "--cacert", mesh.crt("ca"), "--cert", mesh.crt("frontend"),
            "--key", mesh.key("frontend"), f"https://localhost:{port}/bytes/10"])
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith(b"HTTP/2 200"), out)
        self.assertTrue(out.endswith(b"x" * 10))
        self.assertIn(FRONTEND_ID.encode(), upstream.seen[-1].header(b"x-forwarded-client-cert")[0])
        record = proxy.records[-1]
        self.assertEqual((record.protocol, record.mutualTLS, record.downstreamPeerPrincipal), ("HTTP/2", True, FRONTEND_ID))
        self.assertEqual(upstream.seen[-1].header(b"x-forwarded-proto"), [b"https"])

    @defer.inlineCallbacks
    def test_refusedIdentity(self) -> Any:
        """
        Over HTTP/2 too, an identity the policy refuses gets 403 RBAC on its streams and
        nothing reaches the service.
        """
        from sidecar.config import TLSConfig
        from sidecar.mtls import MutualTLS
        from tests.tlsfixtures import EVIL_ID, FRONTEND_ID, writeMesh

        upstream = Upstream()
        proxy = H2Proxy(upstream.start(self), upstreamProtocol="http1")
        mesh = writeMesh(tempfile.mkdtemp())
        tls = MutualTLS.fromConfig(TLSConfig(listen=None, cert=mesh.crt("backend"), key=mesh.key("backend"),
                                             ca=mesh.crt("ca"), allow=(FRONTEND_ID,)), reactor)
        listening = reactor.listenTCP(0, tls.serverFactory(proxy.engine, 65536), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port
        out, err, code = yield getProcessOutputAndValue(CURL, [
            "-s", "-i", "--max-time", "10", "--http2", "--cacert", mesh.crt("ca"), "--cert", mesh.crt("evil"),
            "--key", mesh.key("evil"), f"https://localhost:{port}/bytes/10"])
        self.assertTrue(out.startswith(b"HTTP/2 403"), out)
        self.assertIn(b"RBAC: access denied", out)
        self.assertEqual(upstream.seen, [])
        record = proxy.records[-1]
        self.assertEqual((record.status, record.flags, record.downstreamPeerPrincipal), (403, "RBAC", EVIL_ID))


# -- flow control, drain -------------------------------------------------------------


class FlowControlTests(unittest.TestCase):
    """
    A slow reader stalls its own stream only, and memory stays bounded.
    """

    @defer.inlineCallbacks
    def test_slowStreamDoesNotBlockOthers(self) -> Any:
        """
        A client that never opens its window on a 20 MB download holds at most a
        stream window or so in the proxy (the HTTP/1.1 upstream is paused), while a
        second stream on the same connection completes.
        """
        upstream = Upstream()
        proxy = H2Proxy(upstream.start(self), upstreamProtocol="http1")
        port = proxy.start(self)
        client = yield connectH2(self, port)
        # The client never acknowledges what it receives on this stream: its window closes.
        client.slow.add(1)
        big = client.get(b"/stream/20000000")
        yield waitFor(lambda: len(client.body(big)) >= 65535)
        small = client.get(b"/bytes/10")
        yield waitFor(lambda: client.ended(small))
        self.assertEqual(client.body(small), b"x" * 10)
        door = next(iter(proxy.engine.doors))
        stream = door.streams[big]
        self.assertLess(stream.pendingBytes, 1024 * 1024)
        self.assertFalse(client.ended(big))
        self.assertTrue(stream.exchange.stream.paused)

    @defer.inlineCallbacks
    def test_uploadBackpressure(self) -> Any:
        """
        Request DATA is acknowledged only as the upstream takes it: while the
        exchange waits for its upstream, the client's window is not reopened beyond
        what the proxy holds.
        """
        proxy = H2Proxy(1, upstreamProtocol="http1")
        port = proxy.start(self)
        # An upstream that never connects: the exchange holds the body.
        proxy.pool.acquire = lambda exchange, fresh=False: None  # type: ignore[method-assign]
        client = yield connectH2(self, port)
        sid = client.get(b"/sink", end=False, method=b"POST")
        sent = 0
        for _ in range(40):
            window = client.h2.local_flow_control_window(sid)
            if window <= 0:
                break
            n = min(window, 16384)
            client.h2.send_data(sid, b"u" * n)
            sent += n
            client.flush()
            yield waitFor(lambda: True)
            yield deferLater(0.02)
        self.assertLess(sent, 2 * H2Config().streamWindow)
        self.assertEqual(client.h2.local_flow_control_window(sid), 0)


def deferLater(seconds: float) -> defer.Deferred:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


class DrainTests(unittest.TestCase):
    """
    Draining sends GOAWAY; streams in flight finish.
    """

    @defer.inlineCallbacks
    def test_goaway(self) -> Any:
        """
        Once the engine drains, the client (nghttp, which prints the frames) gets a
        GOAWAY without error naming its last stream, that stream's response completes,
        and the connection closes after it.
        """
        if NGHTTP is None:
            raise unittest.SkipTest("needs nghttp (nghttp2-client)")
        upstream = Upstream()
        proxy = H2Proxy(upstream.start(self), upstreamProtocol="http1")
        port = proxy.start(self)
        done = getProcessOutputAndValue(NGHTTP, ["-nv", "-t", "10", f"http://127.0.0.1:{port}/late"])
        yield waitFor(lambda: upstream.seen)
        proxy.engine.draining = True
        for door in list(proxy.engine.doors):
            door.loseConnection()
        out, err, code = yield done
        self.assertIn(b"recv GOAWAY frame", out)
        self.assertIn(b"(last_stream_id=13, error_code=NO_ERROR(0x00)", out)
        self.assertRegex(out, rb"GOAWAY(.|\n)*recv DATA frame <length=4, flags=0x0[01], stream_id=13>(.|\n)*END_STREAM")
        self.assertEqual(proxy.records[-1].status, 200)
        yield waitFor(lambda: not proxy.engine.doors)


# -- attacks -------------------------------------------------------------------------


class AttackTests(unittest.TestCase):
    """
    HTTP/2's known attacks are refused.
    """

    def proxy(self, **limits: Any) -> int:
        self.service, servicePort = startH2Service(self)
        self.p = H2Proxy(servicePort, upstreamProtocol="http2", h2config=H2Config(**limits))
        return self.p.start(self)

    @defer.inlineCallbacks
    def test_rapidReset(self) -> Any:
        """
        CVE-2023-44487: a client that opens and resets streams at once gets GOAWAY
        ENHANCE_YOUR_CALM once it has reset the limit's worth and half its streams,
        and the connection closes; each reset stream is recorded with C{DR}.
        """
        port = self.proxy(prematureResets=50)
        client = yield connectH2(self, port)
        for _ in range(60):
            sid = client.get(b"/hang", end=True)
            client.h2.reset_stream(sid, ErrorCodes.CANCEL)
        client.flush()
        yield client.closed
        self.assertEqual(client.goaway().error_code, ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertGreaterEqual(len(self.p.records), 50)
        self.assertIn("DR", self.p.records[0].flags)

    @defer.inlineCallbacks
    def test_tooManyStreams(self) -> Any:
        """
        The advertised SETTINGS_MAX_CONCURRENT_STREAMS is enforced: a client that opens
        one more stream than allowed loses its connection (GOAWAY PROTOCOL_ERROR).
        """
        port = self.proxy(maxConcurrentStreams=5)
        client = yield connectH2(self, port)
        yield waitFor(lambda: client.h2.remote_settings.max_concurrent_streams == 5)
        frames = []
        for sid in range(1, 13, 2):  # six streams, written as raw frames: h2 would refuse
            frame = HeadersFrame(sid)
            frame.data = client.h2.encoder.encode([(b":method", b"GET"), (b":path", b"/hang"), (b":scheme", b"http"),
                                                   (b":authority", b"a")])
            frame.flags.add("END_HEADERS")
            frame.flags.add("END_STREAM")
            frames.append(frame.serialize())
        client.transport.write(b"".join(frames))
        yield client.closed
        self.assertEqual(client.goaway().error_code, ErrorCodes.PROTOCOL_ERROR)

    @defer.inlineCallbacks
    def test_continuationFlood(self) -> Any:
        """
        A header block that never ends (CONTINUATION frames without END_HEADERS) is
        cut off after a bounded number of frames with GOAWAY.
        """
        port = self.proxy()
        client = yield connectH2(self, port)
        headers = HeadersFrame(1)
        headers.data = client.h2.encoder.encode([(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"),
                                                 (b":authority", b"a")])
        frames = [headers.serialize()]
        for _ in range(200):
            continuation = ContinuationFrame(1)
            continuation.data = b"\0" * 16000
            frames.append(continuation.serialize())
        client.transport.write(b"".join(frames))
        yield client.closed
        self.assertEqual(self.p.records, [])

    @defer.inlineCallbacks
    def test_hpackBomb(self) -> Any:
        """
        A header list larger than C{maxHeaderListSize} once decoded (an HPACK bomb:
        one large header indexed once and referenced many times) is refused with
        GOAWAY and never reaches the service.
        """
        port = self.proxy(maxHeaderListSize=16 * 1024)
        client = yield connectH2(self, port)
        from hpack import Encoder

        encoder = Encoder()
        block = encoder.encode([(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"a"),
                                (b"x-bomb", b"b" * 4000)])
        block += encoder.encode([(b"x-bomb", b"b" * 4000)]) * 50  # indexed references: 4 KB each, decoded
        frame = HeadersFrame(1)
        frame.data = block
        frame.flags.add("END_HEADERS")
        frame.flags.add("END_STREAM")
        client.transport.write(frame.serialize())
        yield client.closed
        self.assertIsNotNone(client.goaway())
        self.assertEqual(self.service.seen, [])

    @defer.inlineCallbacks
    def test_zeroWindowStall(self) -> Any:
        """
        A client that opens a stream with a zero window (so nothing can ever be sent)
        has that stream reset after the stream idle timeout, flag C{SI}.
        """
        port = self.proxy(streamIdleTimeout=0.3)
        client = yield connectH2(self, port, {SettingCodes.INITIAL_WINDOW_SIZE: 0})
        # Larger than the upstream stream's window: the service cannot finish either.
        sid = client.get(b"/bytes/1000000")
        yield waitFor(lambda: client.ended(sid))
        resets = [e for e in client.events if isinstance(e, StreamReset) and e.stream_id == sid]
        self.assertEqual(resets[0].error_code, ErrorCodes.CANCEL)
        yield waitFor(lambda: self.p.records)
        self.assertIn("SI", self.p.records[-1].flags)


class ControlFloodTests(unittest.SynchronousTestCase):
    """
    A client that sends PINGs (or SETTINGS) and does not read the answers is cut off
    once the answers queued while its transport is full pass the limit.
    """

    def test_pingFlood(self) -> None:
        """
        While the transport is full (the producer paused), 10000 PINGs make the proxy
        abort the connection rather than queue 170 KB of acknowledgements.
        """
        from sidecar.exchange import Engine
        from sidecar.stats import Recorder

        clock = MemoryReactorClock()
        engine = Engine(clock, None, Recorder())  # type: ignore[arg-type]
        door = H2ServerProtocol(engine, H2Config(maxQueuedControlBytes=64 * 1024))
        transport = StringTransport()
        door.makeConnection(transport)
        door.dataReceived(PREFACE + b"\0\0\0\x04\0\0\0\0\0")  # the preface and empty SETTINGS
        door.pauseProducing()
        pings = b"".join(PingFrame(0, opaque_data=b"%08d" % i).serialize() for i in range(10000))
        for i in range(0, len(pings), 17 * 100):
            door.dataReceived(pings[i:i + 1700])
            if transport.disconnecting:
                break
        self.assertTrue(transport.disconnecting or getattr(transport, "aborted", False))
        self.assertLess(len(transport.value()), 100 * 1024)


class RecordTests(unittest.SynchronousTestCase):
    """
    What a gRPC call leaves in the access log and the metrics.
    """

    def record(self, **fields: Any) -> Any:
        from sidecar.record import Record

        return Record(1.0, 0.002, 0.001, 10, 10, 200, "POST", "/svc/M", "HTTP/2", "a", "127.0.0.1:9", "-",
                      "id", "1.1.1.1", "grpc-go", "1.1.1.1:5", **fields)

    def test_json(self) -> None:
        """
        The json access log of a gRPC call has its status and message counts; an HTTP/2
        request without gRPC has neither.
        """
        from sidecar.accesslog import toJSON

        fields = toJSON(self.record(grpc=True, grpcStatus="5", requestMessages=1, responseMessages=0))
        self.assertEqual((fields["protocol"], fields["grpc_status"], fields["request_messages"],
                          fields["response_messages"]), ("HTTP/2", "5", 1, 0))
        self.assertNotIn("grpc_status", toJSON(self.record()))

    def test_metrics(self) -> None:
        """
        A gRPC call is counted under C{request_protocol="grpc"} with its
        C{grpc_response_status}, and its messages in C{istio_request_messages_total}
        and C{istio_response_messages_total}; an HTTP/2 request is C{http} with an
        empty status and no message counters.
        """
        from types import SimpleNamespace

        from sidecar.config import MeshLabels
        from sidecar.metrics import SidecarCollector, prometheusText
        from sidecar.stats import Recorder

        recorder = Recorder()
        recorder.record(self.record(grpc=True, grpcStatus="0", requestMessages=3, responseMessages=5))
        recorder.record(self.record(grpc=True, grpcStatus="0", requestMessages=1, responseMessages=1))
        recorder.record(self.record())
        pool = SimpleNamespace(active=0, idle=[], connecting=0, connects=0, connectFailures=0, pending=[],
                               overflows=0)
        text = prometheusText(SidecarCollector(recorder, pool, SimpleNamespace(draining=False), MeshLabels(), 0.0))
        lines = text.decode().splitlines()

        def sample(name: str, **labels: str) -> float:
            for line in lines:
                if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                    return float(line.rsplit(" ", 1)[1])
            raise AssertionError(f"no {name} with {labels}")
        self.assertEqual(sample("istio_requests_total", request_protocol="grpc", grpc_response_status="0"), 2)
        self.assertEqual(sample("istio_requests_total", request_protocol="http", grpc_response_status=""), 1)
        self.assertEqual(sample("istio_request_messages_total", grpc_response_status="0"), 4)
        self.assertEqual(sample("istio_response_messages_total", grpc_response_status="0"), 6)
        self.assertFalse([l for l in lines if l.startswith("istio_request_messages_total") and 'request_protocol="http"' in l])


class BenchConfigTests(unittest.SynchronousTestCase):
    """
    The peers of C{bench/h2_bench.py} speak h2c on both sides.
    """

    def test_envoyAndNginx(self) -> None:
        """
        Envoy's listener takes HTTP/2 (codec AUTO) and its cluster speaks HTTP/2 to the
        service; nginx listens for HTTP/2 and answers gRPC with trailers; our sidecar
        runs with its defaults (auto: HTTP/2 for HTTP/2 clients).
        """
        from pathlib import Path

        from bench.h2_bench import envoyH2Config, nginxH2Config, oursArgv

        config = envoyH2Config(1, 2, 3)
        manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        self.assertEqual(manager["codec_type"], "AUTO")
        cluster = config["static_resources"]["clusters"][0]
        options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        self.assertIn("http2_protocol_options", options["explicit_http_config"])
        text = nginxH2Config(Path("/x"), 9)
        self.assertIn("listen 127.0.0.1:9 http2;", text)
        self.assertIn("add_trailer grpc-status 0 always;", text)
        argv = oursArgv(1, 9)
        self.assertNotIn("--upstream-protocol", argv)
        self.assertIn("127.0.0.1:9", argv)
