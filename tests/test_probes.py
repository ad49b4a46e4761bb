# -*- test-case-name: tests.test_probes -*-
"""
Tests for L{sidecar.probes}: the application's probes, performed by the
sidecar for the kubelet at C{/app-health/...}.
"""

from __future__ import annotations

import json
import time
from typing import Any

import yaml
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, RequestReceived, StreamEnded
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web import server
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from sidecar import inject
from sidecar.probes import (
    GRPC_HEALTH_PATH,
    PROBERS_ENV,
    AppHealthResource,
    GRPCHealthCheck,
    Prober,
    ProberError,
    appProbers,
    healthCheckRequest,
    healthCheckStatus,
    parseProbers,
    probePaths,
    probeResource,
    runProbe,
)
from tests.support import Upstream, freePort

PROBERS = {
    "/app-health/web/readyz": {
        "httpGet": {"path": "/echo", "port": 8080, "scheme": "HTTP",
                    "httpHeaders": [{"name": "Cookie", "value": "shop_session-id=x-readiness-probe"}]},
        "timeoutSeconds": 2,
    },
    "/app-health/redis/livez": {"tcpSocket": {"port": 6379}, "timeoutSeconds": 1},
    "/app-health/cart/livez": {"grpc": {"port": 7070, "service": "cart"}},
}


class ParseTests(SynchronousTestCase):
    """
    L{parseProbers} and L{appProbers}: Istio's C{ISTIO_KUBE_APP_PROBERS} JSON.
    """

    def test_istioFormat(self) -> None:
        """
        Each path becomes a L{Prober} of its kind: C{httpGet} with its path,
        scheme and headers in order, C{tcpSocket}, C{grpc} with its service;
        the host defaults to 127.0.0.1 and the timeout to Kubernetes' 1 s.
        """
        probers = parseProbers(json.dumps(PROBERS))
        self.assertEqual(probers[b"/app-health/web/readyz"], Prober(
            path="/app-health/web/readyz", kind="httpGet", port=8080, timeout=2.0, httpPath="/echo",
            headers=(("Cookie", "shop_session-id=x-readiness-probe"),)))
        self.assertEqual(probers[b"/app-health/redis/livez"],
                         Prober(path="/app-health/redis/livez", kind="tcpSocket", port=6379))
        self.assertEqual(probers[b"/app-health/cart/livez"],
                         Prober(path="/app-health/cart/livez", kind="grpc", port=7070, service="cart"))
        self.assertEqual(probers[b"/app-health/web/readyz"].url(), b"http://127.0.0.1:8080/echo")
        self.assertEqual(Prober(path="/p", kind="httpGet", port=443, host="::1", scheme="HTTPS",
                                httpPath="x").url(), b"https://[::1]:443/x")
        self.assertEqual(parseProbers(""), {})

    def test_bad(self) -> None:
        """
        Anything that is not a prober is refused with one sentence naming the
        path and the field.
        """
        for text, words in (
            ("{", "not JSON"),
            ("[]", "JSON object of paths"),
            ('{"/a": {}}', "/a: the probe must have exactly one of httpGet, tcpSocket or grpc."),
            ('{"/a": {"tcpSocket": {"port": 1}, "grpc": {"port": 1}}}', "exactly one"),
            ('{"/a": {"tcpSocket": {"port": "http"}}}', "/a: the port must be a number from 1 to 65535, not 'http'."),
            ('{"/a": {"tcpSocket": {"port": 70000}}}', "not 70000"),
            ('{"/a": {"tcpSocket": {"port": 80}, "timeoutSeconds": 0}}', "timeoutSeconds must be"),
            ('{"/a": {"httpGet": {"port": 80, "scheme": "FTP"}}}', "scheme must be HTTP or HTTPS"),
            ('{"/a": {"httpGet": {"port": 80, "httpHeaders": {"a": "b"}}}}', "httpHeaders must be a list"),
            ('{"/a": {"httpGet": {"port": 80, "path": "/\\r\\nX: y"}}}', "path must be printable"),
            ('{"a": {"tcpSocket": {"port": 80}}}', "'a' is not a path."),
        ):
            with self.assertRaises(ProberError) as caught:
                parseProbers(text)
            message = str(caught.exception)
            self.assertIn(words, message)
            self.assertTrue(message.endswith(".") and "\n" not in message, message)

    def test_flagOrEnvironment(self) -> None:
        """
        C{--app-probers} wins over C{ISTIO_KUBE_APP_PROBERS}; errors name the
        one that was read.
        """
        environ = {PROBERS_ENV: json.dumps({"/e": {"tcpSocket": {"port": 1}}})}
        self.assertEqual(list(appProbers(None, environ)), [b"/e"])
        self.assertEqual(list(appProbers('{"/f": {"tcpSocket": {"port": 2}}}', environ)), [b"/f"])
        self.assertEqual(appProbers(None, {}), {})
        with self.assertRaises(ProberError) as caught:
            appProbers(None, {PROBERS_ENV: "nope"})
        self.assertTrue(str(caught.exception).startswith("ISTIO_KUBE_APP_PROBERS: the probers are not JSON"))
        with self.assertRaises(ProberError) as caught:
            appProbers("[]", {})
        self.assertTrue(str(caught.exception).startswith("--app-probers: "))

    def test_injectorWritesWhatTheProxyReads(self) -> None:
        """
        The injector's environment variable and path prefix are the ones the
        proxy reads (C{tests.test_inject.ProbeRewriteTests.test_proxyParsesThem}
        parses what it writes).
        """
        self.assertEqual(inject.PROBERS_ENV, PROBERS_ENV)
        self.assertEqual(inject.APP_HEALTH, "/app-health")


class GRPCMessageTests(SynchronousTestCase):
    """
    The gRPC health protocol's two messages.
    """

    def test_request(self) -> None:
        """
        A C{HealthCheckRequest} is a length-prefixed message with the service
        as field 1; the server's own health is the empty message.
        """
        self.assertEqual(healthCheckRequest(""), b"\x00\x00\x00\x00\x00")
        self.assertEqual(healthCheckRequest("cart"), b"\x00\x00\x00\x00\x06\x0a\x04cart")

    def test_response(self) -> None:
        """
        The status is field 1 of the C{HealthCheckResponse}; absent, it is
        0 (C{UNKNOWN}); unknown fields are skipped; a truncated or compressed
        message is not a status.
        """
        self.assertEqual(healthCheckStatus(b"\x00\x00\x00\x00\x02\x08\x01"), 1)
        self.assertEqual(healthCheckStatus(b"\x00\x00\x00\x00\x02\x08\x02"), 2)
        self.assertEqual(healthCheckStatus(b"\x00\x00\x00\x00\x00"), 0)
        self.assertEqual(healthCheckStatus(b"\x00\x00\x00\x00\x05\x12\x01x\x08\x01"), 1)
        self.assertIsNone(healthCheckStatus(b"\x00\x00\x00\x00\x05\x08\x01"))
        self.assertIsNone(healthCheckStatus(b"\x01\x00\x00\x00\x02\x08\x01"))
        self.assertIsNone(healthCheckStatus(b"\x00\x00"))
        self.assertIsNone(healthCheckStatus(b"\x00\x00\x00\x00\x01\x08"))


class H2Server:
    """
    The server end of one HTTP/2 connection, in memory, for L{GRPCHealthCheck}.
    """

    def __init__(self) -> None:
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        self.h2.initiate_connection()
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.stream: int | None = None
        self._headers: dict[str, str] = {}
        self._body = b""

    def receive(self, data: bytes) -> bytes:
        """
        @param data: the client's bytes.
        @return: the server's bytes in reply (settings, acknowledgements).
        """
        for event in self.h2.receive_data(data):
            if isinstance(event, RequestReceived):
                self.stream = event.stream_id
                self._headers = dict(event.headers)
            elif isinstance(event, DataReceived):
                self._body += event.data
            elif isinstance(event, StreamEnded):
                self.requests.append((self._headers, self._body))
        return self.h2.data_to_send()

    def answer(self, status: int | None, grpcStatus: str = "0", trailersOnly: bool = False,
               httpStatus: str = "200") -> bytes:
        """
        @return: the bytes of a health answer on the request's stream.
        """
        assert self.stream is not None
        head = [(":status", httpStatus), ("content-type", "application/grpc")]
        if trailersOnly:
            self.h2.send_headers(self.stream, head + [("grpc-status", grpcStatus)], end_stream=True)
        else:
            self.h2.send_headers(self.stream, head)
            if status is not None:
                self.h2.send_data(self.stream, b"\x00\x00\x00\x00\x02\x08" + bytes([status]))
            self.h2.send_headers(self.stream, [("grpc-status", grpcStatus)], end_stream=True)
        return self.h2.data_to_send()


class GRPCHealthCheckTests(SynchronousTestCase):
    """
    L{GRPCHealthCheck} against an in-memory HTTP/2 server.
    """

    def check(self, **answer: Any) -> tuple[tuple[bool, str], H2Server, StringTransport]:
        """
        Run one health check of service C{cart} to its answer.

        @param answer: L{H2Server.answer}'s arguments.
        @return: the verdict, the server and the client's transport.
        """
        protocol = GRPCHealthCheck("127.0.0.1:7070", "cart", "kube-probe/1.29")
        transport = StringTransport()
        protocol.makeConnection(transport)
        server_ = H2Server()
        protocol.dataReceived(server_.receive(transport.value()))
        transport.clear()
        protocol.dataReceived(server_.answer(**answer))
        return self.successResultOf(protocol.done), server_, transport

    def test_serving(self) -> None:
        """
        The call is a POST of C{/grpc.health.v1.Health/Check} with gRPC's
        headers and the service's request; C{SERVING} with C{grpc-status: 0}
        passes, and the connection is closed.
        """
        verdict, server_, transport = self.check(status=1)
        self.assertEqual(verdict, (True, "SERVING"))
        [(headers, body)] = server_.requests
        self.assertEqual(headers[":method"], "POST")
        self.assertEqual(headers[":path"], GRPC_HEALTH_PATH.decode())
        self.assertEqual(headers["content-type"], "application/grpc")
        self.assertEqual(headers["te"], "trailers")
        self.assertEqual(headers[":authority"], "127.0.0.1:7070")
        self.assertEqual(headers["user-agent"], "kube-probe/1.29")
        self.assertEqual(body, healthCheckRequest("cart"))
        self.assertTrue(transport.disconnecting)

    def test_notServing(self) -> None:
        """
        C{NOT_SERVING}, an error status (a server without the health service
        answers C{UNIMPLEMENTED}, 12, trailers only), a missing message and an
        HTTP error fail, each with its reason.
        """
        self.assertEqual(self.check(status=2)[0], (False, "health status 2"))
        self.assertEqual(self.check(status=None, grpcStatus="12", trailersOnly=True)[0],
                         (False, "grpc-status 12"))
        self.assertEqual(self.check(status=None)[0], (False, "health status None"))
        self.assertEqual(self.check(status=1, httpStatus="404")[0], (False, "HTTP status 404"))

    def test_notHTTP2(self) -> None:
        """
        A service that answers in HTTP/1.1 fails the check, and the connection
        is closed.
        """
        protocol = GRPCHealthCheck("127.0.0.1:7070", "", "kube-probe")
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        passed, reason = self.successResultOf(protocol.done)
        self.assertFalse(passed)
        self.assertIn("did not speak HTTP/2", reason)
        self.assertTrue(transport.disconnecting)

    def test_closed(self) -> None:
        """
        A service that closes the connection before answering fails the check.
        """
        protocol = GRPCHealthCheck("127.0.0.1:7070", "", "kube-probe")
        protocol.makeConnection(StringTransport())
        protocol.connectionLost(Failure(ConnectionRefusedError()))
        self.assertEqual(self.successResultOf(protocol.done), (False, "the service closed the connection"))


class RunProbeTests(SynchronousTestCase):
    """
    L{runProbe} with a memory reactor: the connection attempts and the timeout.
    """

    def test_tcpConnect(self) -> None:
        """
        A C{tcpSocket} probe connects to 127.0.0.1 on the port, passes once
        connected, and closes the connection.
        """
        clock = MemoryReactorClock()
        d = runProbe(Prober(path="/p", kind="tcpSocket", port=6379), clock)
        [(host, port, factory, _, _)] = clock.tcpClients
        self.assertEqual((host, port), ("127.0.0.1", 6379))
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertEqual(self.successResultOf(d), (True, "connected"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_tcpRefused(self) -> None:
        """
        A refused connect fails the probe with the reason.
        """
        clock = MemoryReactorClock()
        d = runProbe(Prober(path="/p", kind="tcpSocket", port=6379, host="::1"), clock)
        [(host, _, factory, _, _)] = clock.tcpClients
        self.assertEqual(host, "::1")
        factory.clientConnectionFailed(clock.connectors[0], Failure(ConnectionRefusedError()))
        passed, reason = self.successResultOf(d)
        self.assertFalse(passed)
        self.assertIn("refused", reason)

    def test_timeout(self) -> None:
        """
        A probe of any kind that gets no answer within its timeout fails at
        that time, and its connection attempt is abandoned; not a moment
        before.
        """
        for kind in ("tcpSocket", "httpGet", "grpc"):
            clock = MemoryReactorClock()
            d = runProbe(Prober(path="/p", kind=kind, port=8080, timeout=2), clock)
            clock.advance(1.9)
            self.assertNoResult(d)
            clock.advance(0.1)
            self.assertEqual(self.successResultOf(d), (False, "no answer within 2 s"), kind)
            self.assertEqual(clock.connectors[0].stoppedConnecting, True, kind)

    def test_cancel(self) -> None:
        """
        Cancelling a probe (the kubelet went away) abandons it: it fails with
        L{CancelledError} and leaves no timer behind.
        """
        clock = MemoryReactorClock()
        d = runProbe(Prober(path="/p", kind="tcpSocket", port=1), clock)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(clock.getDelayedCalls(), [])


class ResourceTests(SynchronousTestCase):
    """
    L{AppHealthResource} with a memory reactor.
    """

    def request(self, resource: Resource, path: bytes) -> DummyRequest:
        """
        @return: a rendered GET of C{path}.
        """
        request = DummyRequest(path.split(b"/")[1:])
        request.path = path
        request.requestHeaders.setRawHeaders(b"user-agent", [b"kube-probe/1.31"])
        result = resource.render(request)
        if result is not NOT_DONE_YET:
            request.write(result)
            request.finish()
        return request

    def test_answers(self) -> None:
        """
        A known path answers 200 once its probe passes and 503 when it fails,
        the reason in a plain-text body that is never cached; an unknown path
        is 404 at once.
        """
        clock = MemoryReactorClock()
        probers = parseProbers(json.dumps(PROBERS))
        resource = probeResource(probers, clock)
        self.assertEqual(probePaths(resource), dict.fromkeys(probers, resource))
        ok = self.request(resource, b"/app-health/redis/livez")
        self.assertEqual(ok.finished, 0)
        clock.tcpClients[0][2].buildProtocol(None).makeConnection(StringTransport())
        self.assertEqual((ok.finished, ok.responseCode, b"".join(ok.written)), (1, 200, b"ok: connected\n"))
        self.assertEqual(ok.responseHeaders.getRawHeaders(b"cache-control"), [b"no-store"])
        failed = self.request(resource, b"/app-health/redis/livez")
        clock.advance(1)
        self.assertEqual((failed.finished, failed.responseCode), (1, 503))
        self.assertEqual(b"".join(failed.written), b"failed: no answer within 1 s\n")
        missing = self.request(resource, b"/app-health/other/livez")
        self.assertEqual((missing.finished, missing.responseCode), (1, 404))

    def test_kubeletGone(self) -> None:
        """
        When the kubelet closes its connection first, the probe is abandoned
        and nothing is written to the finished request.
        """
        clock = MemoryReactorClock()
        resource = AppHealthResource(parseProbers(json.dumps(PROBERS)), clock)
        request = self.request(resource, b"/app-health/redis/livez")
        request.processingFailed(Failure(ConnectionRefusedError()))  # as a lost connection does
        self.assertTrue(clock.connectors[0].stoppedConnecting)
        self.assertEqual(request.written, [])
        self.assertEqual(clock.getDelayedCalls(), [])


@inlineCallbacks
def kubeletGet(port: int, path: str) -> Any:
    """
    GET a path of 127.0.0.1:C{port} as the kubelet does (its C{User-Agent}, a
    new connection).

    @return: a Deferred firing with the status and the body.
    """
    from twisted.web.client import HTTPConnectionPool

    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    response = yield agent.request(b"GET", f"http://127.0.0.1:{port}{path}".encode(),
                                   Headers({b"user-agent": [b"kube-probe/1.31"]}))
    body = yield readBody(response)
    return response.code, body


class _HealthService:
    """
    A real gRPC server (grpcio) with the health service, by hand: C{cart} is
    SERVING, C{down} NOT_SERVING, anything else NOT_FOUND.
    """

    def __init__(self, case: TestCase) -> None:
        import grpc
        from concurrent import futures

        def check(request: bytes, context: Any) -> bytes:
            service = request[2:].decode() if request else ""
            if service == "down":
                return b"\x08\x02"
            if service not in ("", "cart"):
                context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
            return b"\x08\x01"

        handler = grpc.method_handlers_generic_handler(
            "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check)})
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        case.addCleanup(lambda: self.server.stop(0).wait(5))


class IntegrationTests(TestCase):
    """
    The probe resource on a real site on 127.0.0.1, probing real services.
    """

    def serve(self, probers: dict[str, Any]) -> int:
        """
        Serve L{probeResource} for these probers on 127.0.0.1, port 0.

        @return: its port.
        """
        root = Resource()
        root.putChild(b"app-health", probeResource(parseProbers(json.dumps(probers)), reactor))
        site = server.Site(root)
        site.noisy = False
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def get(self, port: int, path: str) -> Deferred[tuple[int, bytes]]:
        """
        @return: the status and body of a kubelet-like GET of the probe port.
        """
        return kubeletGet(port, path)

    @inlineCallbacks
    def test_httpGet(self):
        """
        An C{httpGet} prober asks the real service with the probe's headers and
        the kubelet's C{User-Agent}: 200 and a 302 pass, a 500 fails, a
        service that closes without an answer fails, a closed port fails.
        """
        upstream = Upstream()
        app = upstream.start(self)
        closed = freePort()
        probers = {
            "/app-health/web/readyz": {"httpGet": {"path": "/echo", "port": app, "httpHeaders": [
                {"name": "Cookie", "value": "shop_session-id=x-readiness-probe"}]}},
            "/app-health/web/livez": {"httpGet": {"path": "/status/302", "port": app}},
            "/app-health/web/startupz": {"httpGet": {"path": "/status/500", "port": app}},
            "/app-health/close/livez": {"httpGet": {"path": "/close", "port": app}},
            "/app-health/gone/livez": {"httpGet": {"path": "/", "port": closed}},
        }
        port = self.serve(probers)
        self.assertEqual((yield self.get(port, "/app-health/web/readyz")), (200, b"ok: HTTP status 200\n"))
        seen = upstream.seen[-1]
        self.assertEqual((seen.method, seen.uri), (b"GET", b"/echo"))
        self.assertEqual(seen.header(b"cookie"), [b"shop_session-id=x-readiness-probe"])
        self.assertEqual(seen.header(b"user-agent"), [b"kube-probe/1.31"])
        self.assertEqual(seen.header(b"host"), [f"127.0.0.1:{app}".encode()])
        self.assertEqual((yield self.get(port, "/app-health/web/livez")), (200, b"ok: HTTP status 302\n"))
        self.assertEqual((yield self.get(port, "/app-health/web/startupz")), (503, b"failed: HTTP status 500\n"))
        code, body = yield self.get(port, "/app-health/close/livez")
        self.assertEqual((code, body), (503, b"failed: the service closed the connection without a complete answer\n"))
        code, body = yield self.get(port, "/app-health/gone/livez")
        self.assertEqual(code, 503)
        self.assertIn(b"refused", body)
        self.assertEqual((yield self.get(port, "/app-health/web/other"))[0], 404)

    @inlineCallbacks
    def test_https(self):
        """
        An C{HTTPS} prober speaks TLS to the service and, as the kubelet,
        does not check its certificate (here from a CA nobody trusts, for
        another name).
        """
        from twisted.internet import ssl

        from tests.tlsfixtures import writeMesh

        mesh = writeMesh(self.mktemp())
        upstream = Upstream()
        context = ssl.DefaultOpenSSLContextFactory(mesh.key("backend"), mesh.crt("backend"))
        listening = reactor.listenSSL(0, upstream.site, context, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        app = listening.getHost().port
        port = self.serve({"/app-health/tls/readyz": {"httpGet": {"path": "/echo", "port": app, "scheme": "HTTPS"}},
                           "/app-health/plain/readyz": {"httpGet": {"path": "/echo", "port": app}}})
        self.assertEqual((yield self.get(port, "/app-health/tls/readyz")), (200, b"ok: HTTP status 200\n"))
        self.assertEqual([seen.uri for seen in upstream.seen], [b"/echo"])
        self.assertEqual((yield self.get(port, "/app-health/plain/readyz"))[0], 503)

    @inlineCallbacks
    def test_httpTimeout(self):
        """
        A service that never answers fails the probe after its timeout (1 s),
        not later, and the proxy's connection to it is closed.
        """
        upstream = Upstream()
        app = upstream.start(self)
        port = self.serve({"/app-health/slow/readyz": {"httpGet": {"path": "/never", "port": app}}})
        started = time.monotonic()
        self.assertEqual((yield self.get(port, "/app-health/slow/readyz")), (503, b"failed: no answer within 1 s\n"))
        self.assertLess(time.monotonic() - started, 1.8)
        [pending] = upstream.resource.pending
        lost: Deferred[type] = Deferred()
        pending.notifyFinish().addCallbacks(lambda _: lost.callback(None), lambda f: lost.callback(f.type))
        self.assertTrue(issubclass((yield lost), ConnectionLost))

    @inlineCallbacks
    def test_tcpSocket(self):
        """
        A C{tcpSocket} prober passes while something listens on the port and
        fails once nothing does.
        """
        site = server.Site(Resource())
        listening = reactor.listenTCP(0, site, interface="127.0.0.1")
        app = listening.getHost().port
        port = self.serve({"/app-health/redis/livez": {"tcpSocket": {"port": app}}})
        self.assertEqual((yield self.get(port, "/app-health/redis/livez")), (200, b"ok: connected\n"))
        yield listening.stopListening()
        code, body = yield self.get(port, "/app-health/redis/livez")
        self.assertEqual(code, 503)
        self.assertIn(b"refused", body)

    @inlineCallbacks
    def test_grpc(self):
        """
        A C{grpc} prober runs the gRPC health protocol against a real grpcio
        server: a SERVING service and the server itself pass, NOT_SERVING and
        an unknown service fail, and a plain HTTP/1.1 service on the port
        fails too.
        """
        try:
            import grpc  # noqa: F401
        except ImportError:
            raise SkipTest("needs grpcio (pip install -r requirements-test.txt)")
        health = _HealthService(self)
        upstream = Upstream()
        http1 = upstream.start(self)
        port = self.serve({
            "/app-health/cart/livez": {"grpc": {"port": health.port, "service": "cart"}},
            "/app-health/cart/readyz": {"grpc": {"port": health.port}},
            "/app-health/down/livez": {"grpc": {"port": health.port, "service": "down"}},
            "/app-health/what/livez": {"grpc": {"port": health.port, "service": "what"}},
            "/app-health/http1/livez": {"grpc": {"port": http1}},
        })
        self.assertEqual((yield self.get(port, "/app-health/cart/livez")), (200, b"ok: SERVING\n"))
        self.assertEqual((yield self.get(port, "/app-health/cart/readyz")), (200, b"ok: SERVING\n"))
        self.assertEqual((yield self.get(port, "/app-health/down/livez")), (503, b"failed: health status 2\n"))
        self.assertEqual((yield self.get(port, "/app-health/what/livez")), (503, b"failed: grpc-status 5\n"))
        self.assertEqual((yield self.get(port, "/app-health/http1/livez")),
                         (503, b"failed: the service did not speak HTTP/2 (no SETTINGS frame first)\n"))


class FlagTests(SynchronousTestCase):
    """
    C{twistd sidecar --app-probers}.
    """

    def test_flag(self) -> None:
        """
        C{--app-probers} puts the probers into the configuration; a bad value
        stops the start with one sentence naming the flag.
        """
        from twisted.python import usage

        from sidecar.tap import Options

        options = Options()
        options.parseOptions(["--app-probers", json.dumps(PROBERS)])
        self.assertEqual({p.path for p in options["config"].appProbers}, set(PROBERS))
        options = Options()
        with self.assertRaises(usage.UsageError) as caught:
            options.parseOptions(["--app-probers", '{"/a": {"tcpSocket": {"port": 0}}}'])
        self.assertEqual(str(caught.exception),
                         "--app-probers: /a: the port must be a number from 1 to 65535, not 0.")


class StrictMutualTLSTests(TestCase):
    """
    A real C{twistd sidecar} serving mutual TLS only, with the probers that
    C{sidecar-inject} writes for its pod: the kubelet's probe passes on the
    health port while the service port stays mTLS-only.
    """

    @inlineCallbacks
    def test_kubeletProbeUnderStrictMutualTLS(self):
        """
        The kubelet's plain GET of the service port gets no HTTP answer (the
        listener speaks mutual TLS only); the rewritten probe, a plain GET of
        C{/app-health/service/readyz} on the health port, is 200 while the
        application answers (the application saw the probe's path and header)
        and 503 once it stops; the health port's own paths still answer.
        """
        from sidecar.inject import INIT_NAME, PROXY_NAME, InjectionSettings, injectStream
        from tests.support import PYTHON, ChildProcess, portAnswers, subprocessEnv
        from tests.test_inject import container, podSpecOf, workload
        from tests.tlsfixtures import writeMesh

        upstream = Upstream()
        app = upstream.start(self)
        spec = (
            "      containers:\n      - name: service\n        image: kennethreitz/httpbin\n        ports:\n"
            f"        - {{name: http, containerPort: {app}}}\n        readinessProbe:\n          httpGet:\n"
            "            path: /echo\n            port: http\n            httpHeaders:\n"
            "            - {name: X-Probe, value: readiness}\n"
        )
        output, _ = injectStream(workload("Deployment", "apps/v1", spec), InjectionSettings(tlsSecret="certs"))
        pod = podSpecOf(yaml.safe_load(output))
        probe = container(pod, "service")["readinessProbe"]["httpGet"]
        self.assertEqual(probe, {"path": "/app-health/service/readyz", "port": 15021, "scheme": "HTTP"})
        [env] = [v["value"] for v in container(pod, PROXY_NAME)["env"] if v["name"] == PROBERS_ENV]
        self.assertEqual(container(pod, INIT_NAME)["args"][:4], ["-p", "8443", "-b", str(app)])

        mesh = writeMesh(self.mktemp())
        tlsPort, health = freePort(), freePort()
        ChildProcess(self, [
            PYTHON, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "sidecar",
            "--listen", "none", "--tls-listen", f"tcp:{tlsPort}:interface=127.0.0.1",
            "--tls-cert", mesh.crt("backend"), "--tls-key", mesh.key("backend"),
            "--tls-ca", f"{mesh.directory}/ca.crt", "--admin", "none",
            "--health", f"tcp:{health}:interface=127.0.0.1", "--upstream", str(app), "--access-log", "none",
        ], env=subprocessEnv(**{PROBERS_ENV: env}))
        yield portAnswers(health)
        yield portAnswers(tlsPort)

        kubeletDirect = yield Agent(reactor).request(b"GET", f"http://127.0.0.1:{tlsPort}/echo".encode()).addCallbacks(
            lambda response: response.code, lambda failure: failure.type)
        self.assertNotIsInstance(kubeletDirect, int)
        self.assertEqual(len(upstream.seen), 0)

        code, body = yield kubeletGet(health, "/app-health/service/readyz")
        self.assertEqual((code, body), (200, b"ok: HTTP status 200\n"))
        [seen] = upstream.seen
        self.assertEqual((seen.uri, seen.header(b"x-probe")), (b"/echo", [b"readiness"]))
        self.assertEqual((yield kubeletGet(health, "/healthz/ready"))[0], 200)
        self.assertEqual((yield kubeletGet(health, "/app-health/other/readyz"))[0], 404)
        yield upstream.port.stopListening()
        code, body = yield kubeletGet(health, "/app-health/service/readyz")
        self.assertEqual(code, 503)
        self.assertIn(b"refused", body)
