# -*- test-case-name: tests.test_grpc -*-
"""
gRPC through the sidecar with real peers: a grpcio service (generic handlers, raw
bytes, no protoc) and grpcio clients, over HTTP/2 with prior knowledge and over the
mutual-TLS listener (ALPN h2).  The proxy runs in-process; the blocking grpcio calls
run in the reactor's thread pool.
"""

from __future__ import annotations

import tempfile
import threading
import time
from concurrent import futures
from typing import Any, List

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from tests.support import H2Proxy, freePort

try:
    import grpc
except ImportError:  # pragma: no cover
    grpc = None

SERVICE = "helloworld.Greeter"


class GreeterService:
    """
    A helloworld-like service: unary C{SayHello} (C{b"missing"} is NOT_FOUND,
    C{b"slow"} sleeps past any short deadline), C{Stream} (five replies), C{Collect}
    (joins the requests) and C{Chat} (echoes each message upper-cased).
    """

    def __init__(self) -> None:
        self.timeRemaining: List[Any] = []
        self.metadata: List[Any] = []
        self.release = threading.Event()

    def unary(self, request: bytes, context: Any) -> bytes:
        self.timeRemaining.append(context.time_remaining())
        self.metadata.append(dict(context.invocation_metadata()))
        if request == b"missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such greeting")
        if request == b"slow":
            self.release.wait(3)
        return b"hello " + request

    def stream(self, request: bytes, context: Any) -> Any:
        for i in range(5):
            yield b"part %d of %s" % (i, request)

    def collect(self, requests: Any, context: Any) -> bytes:
        return b"|".join(requests)

    def chat(self, requests: Any, context: Any) -> Any:
        for message in requests:
            yield message.upper()

    def handler(self) -> Any:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "SayHello": grpc.unary_unary_rpc_method_handler(self.unary),
            "Stream": grpc.unary_stream_rpc_method_handler(self.stream),
            "Collect": grpc.stream_unary_rpc_method_handler(self.collect),
            "Chat": grpc.stream_stream_rpc_method_handler(self.chat),
        })


def startService(case: Any) -> tuple:
    """
    A grpcio service on 127.0.0.1; stopped when C{case} ends.
    """
    service = GreeterService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((service.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    def stop() -> None:
        service.release.set()
        server.stop(0)

    case.addCleanup(stop)
    return service, port


class GrpcMixin:
    """
    Calls made in threads against a channel closed when the test ends.
    """

    def channel(self, target: str, credentials: Any = None, options: Any = ()) -> Any:
        channel = (grpc.secure_channel(target, credentials, options=list(options)) if credentials is not None
                   else grpc.insecure_channel(target))
        self.addCleanup(channel.close)  # type: ignore[attr-defined]
        return channel

    def call(self, f: Any, *args: Any, **kwargs: Any) -> defer.Deferred:
        return deferToThread(f, *args, **kwargs)

    def failing(self, f: Any, *args: Any, **kwargs: Any) -> defer.Deferred:
        """
        Run a call expected to fail; fire with its C{grpc.RpcError}.
        """
        def run() -> Any:
            try:
                f(*args, **kwargs)
            except grpc.RpcError as e:
                return e
            raise AssertionError("the call succeeded")
        return deferToThread(run)


class GrpcH2cTests(GrpcMixin, unittest.TestCase):
    """
    grpcio through the plain listener (h2c) to a grpcio service over HTTP/2.
    """

    if grpc is None:
        skip = "needs grpcio"

    def setUp(self) -> None:
        self.service, servicePort = startService(self)
        self.proxy = H2Proxy(servicePort)
        self.port = self.proxy.start(self)
        self.ch = self.channel(f"127.0.0.1:{self.port}")

    @defer.inlineCallbacks
    def test_unary(self) -> Any:
        """
        A unary call is answered; its record says HTTP/2, gRPC, status 0, one message
        each way; the service saw the proxy's request id and forwarded-for.
        """
        reply = yield self.call(self.ch.unary_unary(f"/{SERVICE}/SayHello"), b"world", timeout=5)
        self.assertEqual(reply, b"hello world")
        record = self.proxy.records[-1]
        self.assertEqual((record.protocol, record.status, record.grpc, record.grpcStatus, record.flags),
                         ("HTTP/2", 200, True, "0", "-"))
        self.assertEqual((record.requestMessages, record.responseMessages), (1, 1))
        self.assertEqual(record.method, "POST")
        self.assertEqual(record.path, f"/{SERVICE}/SayHello")
        seen = self.service.metadata[-1]
        self.assertEqual(seen["x-request-id"], record.requestId)
        self.assertEqual(seen["x-forwarded-for"], "127.0.0.1")
        self.assertEqual(self.proxy.h2pool.connects, 1)

    @defer.inlineCallbacks
    def test_notFound(self) -> Any:
        """
        A status in the service's trailers (NOT_FOUND and its message) reaches the
        client and the record.
        """
        error = yield self.failing(self.ch.unary_unary(f"/{SERVICE}/SayHello"), b"missing", timeout=5)
        self.assertEqual(error.code(), grpc.StatusCode.NOT_FOUND)
        self.assertEqual(error.details(), "no such greeting")
        self.assertEqual(self.proxy.records[-1].grpcStatus, "5")

    @defer.inlineCallbacks
    def test_unimplemented(self) -> Any:
        """
        A method the service does not have: UNIMPLEMENTED, as the service says.
        """
        error = yield self.failing(self.ch.unary_unary(f"/{SERVICE}/Nope"), b"x", timeout=5)
        self.assertEqual(error.code(), grpc.StatusCode.UNIMPLEMENTED)
        self.assertEqual(self.proxy.records[-1].grpcStatus, "12")

    @defer.inlineCallbacks
    def test_serverStreaming(self) -> Any:
        """
        Server streaming: five messages arrive in order; the record counts them.
        """
        replies = yield self.call(lambda: list(self.ch.unary_stream(f"/{SERVICE}/Stream")(b"x", timeout=5)))
        self.assertEqual(replies, [b"part %d of x" % i for i in range(5)])
        record = self.proxy.records[-1]
        self.assertEqual((record.requestMessages, record.responseMessages, record.grpcStatus), (1, 5, "0"))

    @defer.inlineCallbacks
    def test_clientStreaming(self) -> Any:
        """
        Client streaming: three messages go up, one reply comes back.
        """
        reply = yield self.call(self.ch.stream_unary(f"/{SERVICE}/Collect"), iter([b"a", b"bb", b"ccc"]), timeout=5)
        self.assertEqual(reply, b"a|bb|ccc")
        record = self.proxy.records[-1]
        self.assertEqual((record.requestMessages, record.responseMessages), (3, 1))

    @defer.inlineCallbacks
    def test_bidi(self) -> Any:
        """
        Bidirectional streaming, each reply sent before the next request is made: the
        two directions are independent through the proxy.
        """
        def run() -> List[bytes]:
            got: List[bytes] = []
            gate = threading.Semaphore(0)

            def requests() -> Any:
                for word in (b"one", b"two", b"three"):
                    yield word
                    gate.acquire(timeout=5)  # the previous reply came back first
            for reply in self.ch.stream_stream(f"/{SERVICE}/Chat")(requests(), timeout=5):
                got.append(reply)
                gate.release()
            return got
        replies = yield self.call(run)
        self.assertEqual(replies, [b"ONE", b"TWO", b"THREE"])
        self.assertEqual(self.proxy.records[-1].responseMessages, 3)

    @defer.inlineCallbacks
    def test_deadline(self) -> Any:
        """
        The client's deadline goes to the service as C{grpc-timeout} (it sees less
        than the deadline left); the client gets DEADLINE_EXCEEDED and the record shows
        how the call ended: the client's reset (C{DR}), or, when the service's own
        copy of the deadline fired first (both expire at about the same moment), the
        service's DEADLINE_EXCEEDED status (C{grpc-status} 4) passed through.
        """
        error = yield self.failing(self.ch.unary_unary(f"/{SERVICE}/SayHello"), b"slow", timeout=0.5)
        self.assertEqual(error.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
        self.assertIsNotNone(self.service.timeRemaining[-1])
        self.assertLess(self.service.timeRemaining[-1], 0.5)
        yield waitFor(lambda: self.proxy.records)
        record = self.proxy.records[-1]
        self.assertTrue("DR" in record.flags.split(",") or record.grpcStatus == "4",
                        (record.flags, record.grpcStatus))

    @defer.inlineCallbacks
    def test_manyConcurrentOnFewConnections(self) -> Any:
        """
        Fifty concurrent calls share one client connection and few service
        connections (multiplexed streams).
        """
        call = self.ch.unary_unary(f"/{SERVICE}/SayHello")
        replies = yield defer.gatherResults([self.call(call, b"%d" % i, timeout=5) for i in range(50)])
        self.assertEqual(sorted(replies), sorted(b"hello %d" % i for i in range(50)))
        self.assertLessEqual(self.proxy.h2pool.connects, 2)
        self.assertEqual(len(self.proxy.records), 50)


class GrpcUnavailableTests(GrpcMixin, unittest.TestCase):
    """
    The service is down.
    """

    if grpc is None:
        skip = "needs grpcio"

    @defer.inlineCallbacks
    def test_unavailable(self) -> Any:
        """
        No service: the client gets UNAVAILABLE from the proxy's trailers-only reply
        (HTTP 200, grpc-status 14, the reason as grpc-message); the record has flag
        C{UF} and gRPC status 14.
        """
        proxy = H2Proxy(freePort())
        port = proxy.start(self)
        ch = self.channel(f"127.0.0.1:{port}")
        error = yield self.failing(ch.unary_unary(f"/{SERVICE}/SayHello"), b"x", timeout=5)
        self.assertEqual(error.code(), grpc.StatusCode.UNAVAILABLE)
        self.assertIn("connection failure", error.details())
        record = proxy.records[-1]
        self.assertEqual((record.status, record.flags, record.grpcStatus), (200, "UF", "14"))


class GrpcMutualTLSTests(GrpcMixin, unittest.TestCase):
    """
    grpcio with a client certificate through the mutual-TLS listener (ALPN h2).
    """

    if grpc is None:
        skip = "needs grpcio"

    def setUp(self) -> None:
        from twisted.protocols.tls import TLSMemoryBIOFactory  # noqa: F401

        from sidecar.config import TLSConfig
        from sidecar.mtls import MutualTLS
        from tests.tlsfixtures import writeMesh

        self.service, servicePort = startService(self)
        directory = tempfile.mkdtemp()
        self.mesh = writeMesh(directory)
        self.proxy = H2Proxy(servicePort)
        tls = MutualTLS.fromConfig(TLSConfig(listen=None, cert=self.mesh.crt("backend"), key=self.mesh.key("backend"),
                                             ca=self.mesh.crt("ca")), reactor)
        tls.h2config = self.proxy.h2config
        listening = reactor.listenTCP(0, tls.serverFactory(self.proxy.engine, 65536), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.addCleanup(self._closeDoors)
        self.port = listening.getHost().port

    def _closeDoors(self) -> None:
        for door in list(self.proxy.engine.doors):
            if door.transport is not None:
                door.transport.abortConnection()

    def credentials(self, name: str) -> Any:
        with open(self.mesh.crt("ca"), "rb") as f:
            ca = f.read()
        with open(self.mesh.crt(name), "rb") as f:
            cert = f.read()
        with open(self.mesh.key(name), "rb") as f:
            key = f.read()
        return grpc.ssl_channel_credentials(ca, key, cert)

    @defer.inlineCallbacks
    def test_unaryAndStreaming(self) -> Any:
        """
        Over mutual TLS a unary and a server-streaming call succeed; the service sees
        the caller's identity in C{x-forwarded-client-cert}; the record has the
        caller's SPIFFE id, mutual TLS, HTTP/2.
        """
        ch = self.channel(f"localhost:{self.port}", self.credentials("frontend"))
        reply = yield self.call(ch.unary_unary(f"/{SERVICE}/SayHello"), b"tls", timeout=5)
        self.assertEqual(reply, b"hello tls")
        replies = yield self.call(lambda: list(ch.unary_stream(f"/{SERVICE}/Stream")(b"y", timeout=5)))
        self.assertEqual(len(replies), 5)
        self.assertIn("spiffe://cluster.local/ns/default/sa/frontend",
                      self.service.metadata[-1]["x-forwarded-client-cert"])
        record = self.proxy.records[-1]
        self.assertEqual((record.protocol, record.mutualTLS, record.downstreamPeerPrincipal, record.grpcStatus),
                         ("HTTP/2", True, "spiffe://cluster.local/ns/default/sa/frontend", "0"))


def waitFor(predicate: Any, timeout: float = 5.0) -> defer.Deferred:
    """
    Fire once C{predicate()} is true (polling the real reactor).
    """
    d: defer.Deferred = defer.Deferred()
    deadline = time.monotonic() + timeout

    def check() -> None:
        if predicate():
            d.callback(None)
        elif time.monotonic() > deadline:
            d.errback(AssertionError("condition not met in time"))
        else:
            reactor.callLater(0.02, check)
    check()
    return d


class SidecarProcessTests(GrpcMixin, unittest.TestCase):
    """
    The whole sidecar (C{twistd -n sidecar}) as a child process: its listeners detect
    HTTP/2 and route it to the HTTP/2 door, in plain text on a port declared C{grpc} and
    under mutual TLS.
    """

    if grpc is None:
        skip = "needs grpcio"

    def records(self, log: str, count: int) -> defer.Deferred:
        import json
        import os

        def found() -> List[dict]:
            if not os.path.exists(log):
                return []
            with open(log) as f:
                records = [json.loads(line) for line in f if line.startswith("{")]
            return [r for r in records if r["protocol"] != "tcp"]  # not the readiness probes' connections
        d = waitFor(lambda: len(found()) >= count, timeout=10).addCallback(lambda _: found())
        d.addErrback(lambda f: self.fail(f"records: {open(log).read() if os.path.exists(log) else None}"))
        return d

    @defer.inlineCallbacks
    def test_declaredGrpcPortAndMutualTLS(self) -> Any:
        """
        A port declared C{grpc} takes a unary call at L7 (the record has its status and
        messages); the mutual-TLS listener takes a call by ALPN h2 and names the caller.
        """
        from tests.support import PYTHON, ChildProcess, portAnswers
        from tests.tlsfixtures import FRONTEND_ID, writeMesh

        service, servicePort = startService(self)
        mesh = writeMesh(tempfile.mkdtemp())
        log = self.mktemp()
        port, tlsPort = freePort(), freePort()
        ChildProcess(self, [
            PYTHON, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "sidecar",
            "--listen", f"tcp:{port}:interface=127.0.0.1", "--upstream", str(servicePort), "--admin", "none",
            "--health", "none", "--access-log", log, "--log-format", "json", "--port-protocol", f"{port}=grpc",
            "--tls-listen", f"tcp:{tlsPort}:interface=127.0.0.1", "--tls-cert", mesh.crt("backend"),
            "--tls-key", mesh.key("backend"), "--tls-ca", mesh.crt("ca")])
        yield portAnswers(port)
        yield portAnswers(tlsPort)
        reply = yield self.call(self.channel(f"127.0.0.1:{port}").unary_unary(f"/{SERVICE}/SayHello"), b"a",
                                timeout=10)
        self.assertEqual(reply, b"hello a")
        with open(mesh.crt("ca"), "rb") as f:
            ca = f.read()
        with open(mesh.crt("frontend"), "rb") as f:
            cert = f.read()
        with open(mesh.key("frontend"), "rb") as f:
            key = f.read()
        ch = self.channel(f"localhost:{tlsPort}", grpc.ssl_channel_credentials(ca, key, cert))
        reply = yield self.call(ch.unary_unary(f"/{SERVICE}/SayHello"), b"b", timeout=10)
        self.assertEqual(reply, b"hello b")
        records = yield self.records(log, 2)
        self.assertEqual([(r["protocol"], r["grpc_status"], r["request_messages"], r["response_messages"])
                          for r in records], [("HTTP/2", "0", 1, 1)] * 2)
        self.assertEqual([r["downstream_peer_principal"] for r in records], [None, FRONTEND_ID])
        self.assertIn(FRONTEND_ID, service.metadata[-1]["x-forwarded-client-cert"])
