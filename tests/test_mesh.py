# -*- test-case-name: tests.test_mesh -*-
"""
The mesh between two pods: the peer-metadata exchange, the outbound listener's
policy and retries, the labels both sidecars report, and, as root, two pods and a
stranger built from network namespaces (L{tests.meshpods}).
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.threads import deferToThread
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from sidecar.config import MeshLabels, UpstreamConfig
from sidecar.headers import requestHead, responseHead
from sidecar.metrics import ISTIO_LABELS, TCP_LABELS, seriesLabels, staticLabels, tcpLabels
from sidecar.outbound import MeshPolicy, meshPolicy
from sidecar.peers import PeerLabels, PeerMemory, decodeMetadata, encodeMetadata, fromPrincipal, metadataOf
from sidecar.spiffe import AllowRule, parseSpiffeId

CLIENT = "spiffe://cluster.local/ns/default/sa/sleep"
SERVER = "spiffe://cluster.local/ns/default/sa/httpbin"


class PeerMetadataTests(SynchronousTestCase):
    """
    L{sidecar.peers}: the header value both sidecars write and read.
    """

    def test_roundTrip(self) -> None:
        """
        A workload's labels go out as base64 JSON and come back as the same labels,
        with the principal from the certificate, never from the metadata.
        """
        value = metadataOf(MeshLabels(workload="sleep", namespace="default", app="sleep", version="v1"))
        self.assertEqual(json.loads(base64.b64decode(value)),
                         {"workload": "sleep", "namespace": "default", "app": "sleep", "version": "v1"})
        self.assertEqual(decodeMetadata(value, CLIENT),
                         PeerLabels(CLIENT, "sleep", "default", "sleep", "v1"))

    def test_namespaceFromTheCertificate(self) -> None:
        """
        A peer cannot claim another namespace than its certificate's SPIFFE id says.
        """
        value = encodeMetadata({"workload": "w", "namespace": "kube-system"})
        self.assertEqual(decodeMetadata(value, CLIENT).namespace, "default")

    def test_garbageIgnored(self) -> None:
        """
        Values that are not base64, not a JSON object, too large, or hold something
        other than label text give no labels; the connection's memory then falls
        back to what the certificate says.
        """
        for value in (b"%%%", base64.b64encode(b"[1]"), base64.b64encode(b'{"app": 3}'),
                      base64.b64encode(b'{"app": "a b"}'), base64.b64encode(b'{"app": "' + b"a" * 5000 + b'"}')):
            self.assertIsNone(decodeMetadata(value, CLIENT), value[:20])
        memory = PeerMemory(CLIENT)
        self.assertEqual(memory.learn(b"%%%"), fromPrincipal(CLIENT))
        self.assertEqual(memory.learn(None), PeerLabels(CLIENT, namespace="default"))

    def test_memoryParsesOncePerValue(self) -> None:
        """
        The same value on every request is parsed once: the same object comes back.
        """
        memory = PeerMemory(CLIENT)
        value = encodeMetadata({"workload": "sleep"})
        first = memory.learn(value)
        self.assertIs(memory.learn(bytes(value)), first)
        self.assertEqual(first.workload, "sleep")


class HeaderTests(SynchronousTestCase):
    """
    The peer-metadata header never passes the proxy, either way, in any spelling.
    """

    def test_requestHeaderKeptAsideAndDropped(self) -> None:
        """
        A request's metadata is kept on the head for a mutual-TLS door to read and is
        not among the headers sent upstream; its underscore spelling is dropped too.
        """
        head = requestHead(b"GET", b"/", "1.1", [(b"Host", b"a"), (b"X-Sidecar-Peer-Metadata", b"abc"),
                                                 (b"x_sidecar_peer_metadata", b"forged")], "10.0.0.1")
        self.assertEqual(head.peerMetadata, b"abc")
        names = [name.lower() for name, _ in head.headers]
        self.assertNotIn(b"x-sidecar-peer-metadata", names)
        self.assertNotIn(b"x_sidecar_peer_metadata", names)

    def test_responseHeaderKeptAsideAndDropped(self) -> None:
        """
        A response's metadata is kept for the originating upstream and never reaches
        the client.
        """
        head = responseHead([(b"X-Sidecar-Peer-Metadata", b"xyz"), (b"X_Sidecar_Peer_Metadata", b"f")], b"s")
        self.assertEqual((head.peerMetadata, head.headers), (b"xyz", [(b"Server", b"s")]))

    def test_outboundLeavesForwardedForAlone(self) -> None:
        """
        Without a client address (the outbound door: the workload is not a hop) no
        address is appended, and no empty X-Forwarded-For is made.
        """
        head = requestHead(b"GET", b"/", "1.1", [(b"Host", b"a")], "")
        self.assertNotIn(b"X-Forwarded-For", [name for name, _ in head.headers])
        head = requestHead(b"GET", b"/", "1.1", [(b"Host", b"a"), (b"X-Forwarded-For", b"1.2.3.4")], "")
        self.assertIn((b"X-Forwarded-For", b"1.2.3.4"), head.headers)


class PlaintextDoorTests(SynchronousTestCase):
    """
    A plaintext client cannot tell the sidecar who it is.
    """

    def test_plaintextMetadataIgnored(self) -> None:
        """
        On a plaintext connection the metadata header is dropped unread: the service
        does not see it and the record has no peer.
        """
        from tests.test_exchange import Harness

        h = Harness()
        door, client = h.client()
        forged = encodeMetadata({"workload": "admin"})
        door.dataReceived(b"GET /x HTTP/1.1\r\nHost: svc\r\nX-Sidecar-Peer-Metadata: " + forged + b"\r\n\r\n")
        conn, upstream = h.connectUpstream()
        self.assertNotIn(b"peer-metadata", upstream.value().lower())
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        [record] = h.records
        self.assertEqual((record.peer, record.direction), (None, "inbound"))


class ConnectRetryTests(SynchronousTestCase):
    """
    Outbound pools retry an idempotent request whose connect failed, as Istio's
    default retry policy (C{connect-failure}, 2 attempts).
    """

    def harness(self):
        from tests.test_exchange import Harness

        h = Harness()
        h.engine.connectRetries = 2
        return h

    def fail(self, h, index: int) -> None:
        _, _, factory, _, _ = h.reactor.tcpClients[index]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))

    def test_retriedThenURX(self) -> None:
        """
        A GET whose connect fails three times (the first and two retries) gets 502
        with flags C{UF,URX}; three connects were tried.
        """
        h = self.harness()
        door, client = h.client()
        door.dataReceived(b"GET /x HTTP/1.1\r\nHost: svc\r\n\r\n")
        for index in range(3):
            self.fail(h, index)
        self.assertEqual(len(h.reactor.tcpClients), 3)
        [record] = h.records
        self.assertEqual((record.status, record.flags), (502, "UF,URX"))

    def test_retrySucceeds(self) -> None:
        """
        A connect that fails once and then succeeds answers the request normally.
        """
        h = self.harness()
        door, client = h.client()
        door.dataReceived(b"GET /x HTTP/1.1\r\nHost: svc\r\n\r\n")
        self.fail(h, 0)
        conn, upstream = h.connectUpstream(1)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        [record] = h.records
        self.assertEqual((record.status, record.flags), (200, "-"))

    def test_postNotRetried(self) -> None:
        """
        A POST is not idempotent: one failed connect is its 502 C{UF}.
        """
        h = self.harness()
        door, client = h.client()
        door.dataReceived(b"POST /x HTTP/1.1\r\nHost: svc\r\nContent-Length: 1\r\n\r\na")
        self.fail(h, 0)
        self.assertEqual(len(h.reactor.tcpClients), 1)
        [record] = h.records
        self.assertEqual((record.status, record.flags), (502, "UF"))


class PolicyTests(SynchronousTestCase):
    """
    L{MeshPolicy}: which destinations get mutual TLS, and whom their servers must be.
    """

    def test_rules(self) -> None:
        """
        In C{--mesh-networks} the server must be of our trust domain; in a
        C{--mesh-peer} range exactly that id (the narrowest range wins); outside
        both, nothing (the connection passes unchanged).
        """
        policy = meshPolicy(["10.0.0.0/8", "fd00::/8"], [("10.1.0.0/16", "spiffe://td/ns/a/sa/x"),
                                                        ("10.1.2.0/24", SERVER)], CLIENT)
        self.assertEqual(policy.expected("10.9.9.9"), AllowRule("cluster.local", None))
        self.assertEqual(policy.expected("fd00::1"), AllowRule("cluster.local", None))
        self.assertEqual(policy.expected("10.1.9.9"), AllowRule("td", "/ns/a/sa/x"))
        self.assertEqual(policy.expected("10.1.2.3"), AllowRule("cluster.local", "/ns/default/sa/httpbin"))
        self.assertIsNone(policy.expected("192.0.2.1"))
        self.assertIsNone(policy.expected("not-an-address"))
        self.assertIsNone(MeshPolicy().expected("10.0.0.1"))

    def test_exactIdIsExact(self) -> None:
        """
        An exact id does not accept another service account of the same trust
        domain, nor a longer path (the reason service-identity's URI-IDs, which
        match scheme and host only, are not used).
        """
        rule = meshPolicy([], [("10.0.0.0/8", SERVER)], CLIENT).expected("10.0.0.1")
        self.assertTrue(rule.matches(parseSpiffeId(SERVER)))
        self.assertFalse(rule.matches(parseSpiffeId(CLIENT)))
        self.assertFalse(rule.matches(parseSpiffeId(SERVER + "/x")))


class FlagTests(SynchronousTestCase):
    """
    The outbound and mesh flags, refused in one sentence when wrong.
    """

    def parse(self, *argv: str):
        from sidecar.tap import Options

        options = Options()
        options.parseOptions(list(argv))
        return options["config"]

    def certs(self) -> list:
        from tests.tlsfixtures import writeMesh

        mesh = writeMesh(self.mktemp())
        return ["--tls-cert", mesh.crt("backend"), "--tls-key", mesh.key("backend"),
                "--tls-ca", os.path.join(mesh.directory, "ca.crt")]

    def test_outboundOnly(self) -> None:
        """
        An outbound listener with the workload's certificate and the mesh's ranges
        is a whole proxy (no inbound listener needed); a bare port listens on every
        interface.
        """
        config = self.parse("--listen", "none", "--outbound-listen", "15001", "--mesh-networks", "10.0.0.0/8,fd00::/8",
                            "--mesh-peer", f"10.1.0.0/16={SERVER}", *self.certs())
        self.assertEqual((config.outbound.listen, config.outbound.meshNetworks, config.outbound.meshPeers),
                         ("tcp:15001", ("10.0.0.0/8", "fd00::/8"), (("10.1.0.0/16", SERVER),)))
        self.assertIsNone(config.tls.listen)

    def test_refusals(self) -> None:
        """
        The mesh without an outbound listener or without a certificate, a CIDR that is
        not one, a peer without an id or with an invalid one: each a usage error
        naming its flag.
        """
        certs = self.certs()
        for argv, flag in (
            (["--mesh-networks", "10.0.0.0/8", *certs], "--mesh-networks"),
            (["--outbound-listen", "15001", "--mesh-networks", "10.0.0.0/8"], "--mesh-networks"),
            (["--outbound-listen", "15001", "--mesh-networks", "10.0.0.0/33", *certs], "--mesh-networks"),
            (["--outbound-listen", "15001", "--mesh-peer", "10.0.0.0/8", *certs], "--mesh-peer"),
            (["--outbound-listen", "15001", "--mesh-peer", "10.0.0.0/8=http://x", *certs], "--mesh-peer"),
            (["--outbound-listen", "15001", "--tls-allow", CLIENT, "--mesh-networks", "10.0.0.0/8", *certs],
             "--tls-allow"),
        ):
            with self.assertRaises(usage.UsageError, msg=argv) as e:
                self.parse(*argv)
            self.assertTrue(str(e.exception).startswith(flag), str(e.exception))

    def test_strictOnRedirectedPorts(self) -> None:
        """
        C{--upstream original} with C{--listen none} and C{--tls-listen}: the init
        script redirects the ports to the mutual-TLS listener (STRICT on every
        captured port).
        """
        config = self.parse("--upstream", "original", "--listen", "none", "--tls-listen", "15006", *self.certs())
        self.assertEqual((config.tls.listen, config.upstream.original), ("tcp:15006", True))


class LabelTests(SynchronousTestCase):
    """
    Both sides of a call as Istio reports them.
    """

    mesh = MeshLabels(workload="sleep", namespace="default", app="sleep", version="v1",
                      service="sleep.default.svc.cluster.local")

    def labels(self, key: tuple, names=ISTIO_LABELS) -> dict:
        return dict(zip(names, seriesLabels(key, staticLabels(self.mesh), CLIENT)))

    def test_outboundToTheMesh(self) -> None:
        """
        An outbound call over originated mutual TLS is C{reporter="source"}: the
        source labels are ours, the destination labels the peer's, both principals
        reported.
        """
        peer = PeerLabels(SERVER, "httpbin", "default", "httpbin", "v1", "httpbin.default.svc.cluster.local")
        labels = self.labels(("HTTP/1.1", 200, "-", "", True, "outbound", peer))
        self.assertEqual(
            {name: labels[name] for name in ("reporter", "source_workload", "source_app", "source_principal",
                                             "destination_workload", "destination_app", "destination_version",
                                             "destination_principal", "destination_service_name",
                                             "destination_canonical_service", "connection_security_policy")},
            {"reporter": "source", "source_workload": "sleep", "source_app": "sleep", "source_principal": CLIENT,
             "destination_workload": "httpbin", "destination_app": "httpbin", "destination_version": "v1",
             "destination_principal": SERVER, "destination_service_name": "httpbin",
             "destination_canonical_service": "httpbin", "connection_security_policy": "mutual_tls"})

    def test_outboundOutsideTheMesh(self) -> None:
        """
        A plaintext outbound call is Istio's C{PassthroughCluster}, no principals.
        """
        labels = self.labels(("HTTP/1.1", 200, "-", "", False, "outbound", None))
        self.assertEqual((labels["destination_service_name"], labels["destination_principal"],
                          labels["source_principal"], labels["destination_workload"]),
                         ("PassthroughCluster", "unknown", "unknown", "unknown"))

    def test_inboundFromAMeshPeer(self) -> None:
        """
        An inbound call from a verified peer with metadata fills the source labels.
        """
        peer = PeerLabels(SERVER, "httpbin", "default", "httpbin", "v2")
        labels = self.labels(("HTTP/1.1", 200, "-", SERVER, True, "inbound", peer))
        self.assertEqual((labels["reporter"], labels["source_workload"], labels["source_version"],
                          labels["source_principal"], labels["destination_workload"]),
                         ("destination", "httpbin", "v2", SERVER, "sleep"))

    def test_tcpOutbound(self) -> None:
        """
        TCP connections get the same labels from the server's certificate.
        """
        labels = dict(zip(TCP_LABELS, tcpLabels(("-", "", True, "outbound", fromPrincipal(SERVER)),
                                                staticLabels(self.mesh), CLIENT)))
        self.assertEqual((labels["reporter"], labels["destination_principal"],
                          labels["destination_workload_namespace"], labels["source_workload"]),
                         ("source", SERVER, "default", "sleep"))


class OriginationLoopbackTests(TestCase):
    """
    Mutual TLS originated by the outbound door, against a real sidecar's STRICT
    mutual-TLS listener on 127.0.0.1 (no root needed): the outbound pool, the
    verification of the server's SPIFFE id, and the metadata exchange both ways.
    """

    def setUp(self):
        from tests.support import Upstream, freePort, startSidecar
        from tests.tlsfixtures import FRONTEND_ID, writeMesh

        self.mesh = writeMesh(self.mktemp())
        self.upstream = Upstream()
        upstreamPort = self.upstream.start(self)
        self.tlsPort = freePort()
        ca = os.path.join(self.mesh.directory, "ca.crt")
        return startSidecar(self, "--upstream", str(upstreamPort), "--tls-listen",
                            f"tcp:{self.tlsPort}:interface=127.0.0.1", "--tls-cert", self.mesh.crt("backend"),
                            "--tls-key", self.mesh.key("backend"), "--tls-ca", ca, "--tls-allow", FRONTEND_ID,
                            "--workload", "backend-wl", "--app", "backend", "--app-version", "v3",
                            "--admin", "none")

    def outbound(self, rule: AllowRule):
        """
        An outbound door (as the outbound listener builds one) on 127.0.0.1, whose
        pool originates mutual TLS as C{frontend} to the sidecar and expects C{rule}.
        """
        from twisted.internet import reactor

        from sidecar.exchange import Engine
        from sidecar.outbound import HTTP11, Origination, OutboundDoorFactory, TLSUpstreamPool
        from sidecar.stats import Recorder
        from sidecar.tls import RotatingServerContext, TLSFiles

        context = RotatingServerContext(TLSFiles(self.mesh.crt("frontend"), self.mesh.key("frontend"),
                                                 os.path.join(self.mesh.directory, "ca.crt")))
        self.records = []
        pool = TLSUpstreamPool(reactor, reactor, UpstreamConfig(host="127.0.0.1", port=self.tlsPort,
                                                               connectTimeout=3),
                               Origination(context, rule, HTTP11, reactor))
        self.addCleanup(pool.closeAll)
        self.pool = pool
        engine = Engine(reactor, pool, Recorder([self.records.append]), b"amazing-proxy", 5.0)
        metadata = metadataOf(MeshLabels(workload="frontend-wl", namespace="default"))
        factory = OutboundDoorFactory(engine, 65536, True, [(b"X-Sidecar-Peer-Metadata", metadata)])
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def test_verifiedServer(self):
        """
        Against the expected id: 200; the service sees the client's id in
        C{X-Forwarded-Client-Cert} and no metadata (the application's forged copy
        dropped); the client sees no metadata; the record is outbound, mutual TLS,
        with the server's id and the labels its sidecar told.
        """
        from tests.support import closeClient, rawRequest
        from tests.tlsfixtures import FRONTEND_ID, SERVER_ID

        port = self.outbound(AllowRule("cluster.local", "/ns/default/sa/backend"))
        forged = encodeMetadata({"workload": "forged"})
        d = rawRequest(port, b"GET /echo HTTP/1.1\r\nHost: backend\r\nX-Sidecar-Peer-Metadata: " + forged + b"\r\n\r\n")

        def check(client):
            self.addCleanup(closeClient, client)
            [response] = client.responses
            self.assertEqual(response.status, 200)
            self.assertEqual(response.header(b"X-Sidecar-Peer-Metadata"), [])
            [seen] = self.upstream.seen
            self.assertIn(f"URI={FRONTEND_ID}".encode(), seen.header(b"X-Forwarded-Client-Cert")[0])
            self.assertEqual(seen.header(b"X-Sidecar-Peer-Metadata"), [])
            [record] = self.records
            self.assertEqual((record.direction, record.mutualTLS, record.flags), ("outbound", True, "-"))
            self.assertEqual((record.peer.principal, record.peer.workload, record.peer.app, record.peer.version),
                             (SERVER_ID, "backend-wl", "backend", "v3"))

        return d.addCallback(check)

    def test_resumesTheSession(self):
        """
        A new connection to the same mesh destination resumes the TLS session of the
        last one (no certificate exchange) and its server is checked again: the
        request is served, and the record names the server's verified id.
        """
        from OpenSSL._util import lib

        from tests.support import closeClient, rawRequest
        from tests.tlsfixtures import SERVER_ID

        def resumed() -> bool:
            [conn] = self.pool.idle
            return bool(lib.SSL_session_reused(conn.transport.getHandle()._ssl))

        port = self.outbound(AllowRule("cluster.local", "/ns/default/sa/backend"))
        request = b"GET /echo HTTP/1.1\r\nHost: backend\r\n\r\n"
        d = rawRequest(port, request)

        def first(client):
            self.addCleanup(closeClient, client)
            self.assertEqual([r.status for r in client.responses], [200])
            self.assertFalse(resumed())
            self.pool.closeAll()
            return rawRequest(port, request)

        def second(client):
            self.addCleanup(closeClient, client)
            self.assertEqual([r.status for r in client.responses], [200])
            self.assertTrue(resumed())
            self.assertEqual([r.peer.principal for r in self.records], [SERVER_ID, SERVER_ID])

        return d.addCallback(first).addCallback(second)

    def test_wrongServerRefused(self):
        """
        A server whose certificate is from the mesh CA but whose id is not the one
        expected is a connect failure: 502 C{UF}, and nothing reaches the service.
        """
        from tests.support import closeClient, rawRequest

        port = self.outbound(AllowRule("cluster.local", "/ns/default/sa/evil"))
        d = rawRequest(port, b"GET /x HTTP/1.1\r\nHost: backend\r\n\r\n")

        def check(client):
            self.addCleanup(closeClient, client)
            [response] = client.responses
            self.assertEqual(response.status, 502)
            self.assertEqual(self.upstream.seen, [])
            [record] = self.records
            self.assertEqual((record.flags, record.peer), ("UF", None))

        return d.addCallback(check)

    def test_otherTrustDomainRefused(self):
        """
        A trust-domain rule for another domain refuses the same server.
        """
        from tests.support import closeClient, rawRequest

        port = self.outbound(AllowRule("example.org", None))
        d = rawRequest(port, b"GET /x HTTP/1.1\r\nHost: backend\r\n\r\n")
        def check(client):
            self.addCleanup(closeClient, client)
            self.assertEqual(([r.status for r in client.responses], self.upstream.seen), ([502], []))

        return d.addCallback(check)


    def splice(self, rule: AllowRule):
        """
        An outbound opaque splice (as the outbound listener builds one) on 127.0.0.1 to
        the sidecar's mutual-TLS port, originating mutual TLS as C{frontend}.
        """
        from twisted.internet import reactor
        from twisted.internet.protocol import Factory

        from sidecar.outbound import Origination
        from sidecar.stats import Recorder
        from sidecar.tcp import TcpProxy
        from sidecar.tls import RotatingServerContext, TLSFiles

        context = RotatingServerContext(TLSFiles(self.mesh.crt("frontend"), self.mesh.key("frontend"),
                                                 os.path.join(self.mesh.directory, "ca.crt")))
        recorder = Recorder()
        self.tcpRecords = []
        recorder.tcpSinks.append(self.tcpRecords.append)
        proxy = TcpProxy(reactor, recorder, 3.0, None)
        origination = Origination(context, rule, None, reactor)
        factory = Factory.forProtocol(lambda: proxy.splice("127.0.0.1", self.tlsPort, "tcp",
                                                           origination=origination, direction="outbound"))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.recorder = recorder
        return port.getHost().port

    def test_spliceOverVerifiedTLS(self):
        """
        Opaque bytes cross the originated mutual TLS to the server's sidecar, which
        detects TCP and splices them to the service (an HTTP server, which answers
        400 to them and closes); the outbound record has the server's id.
        """
        from tests.support import rawRequest
        from tests.tlsfixtures import SERVER_ID

        port = self.splice(AllowRule("cluster.local", "/ns/default/sa/backend"))
        d = rawRequest(port, b"\x00\x01 not a protocol\r\n\r\n")

        def check(client):
            self.assertTrue(client.received.startswith(b"HTTP/1.1 400"), client.received)
            from tests.support import waitUntil

            return waitUntil(lambda: self.tcpRecords).addCallback(lambda _: recorded())

        def recorded():
            [record] = self.tcpRecords
            self.assertEqual((record.direction, record.mutualTLS, record.peer.principal, record.flags),
                             ("outbound", True, SERVER_ID, "-"))
            [(key, series)] = [(k, v) for k, v in self.recorder.tcp.items() if v.opened]
            self.assertEqual((key[3], key[4].principal, series.opened, series.closed), ("outbound", SERVER_ID, 1, 1))

        return d.addCallback(check)

    def test_spliceToTheWrongServer(self):
        """
        A server with another id than the one expected: the client is closed without a
        byte and the record says C{UF} and why.
        """
        from tests.support import rawRequest, waitUntil

        port = self.splice(AllowRule("cluster.local", "/ns/default/sa/evil"))
        d = rawRequest(port, b"\x00\x01 secret\r\n")

        def check(client):
            self.assertEqual(client.received, b"")
            return waitUntil(lambda: self.tcpRecords).addCallback(lambda _: recorded())

        def recorded():
            [record] = self.tcpRecords
            self.assertEqual((record.flags, record.peer), ("UF", None))
            self.assertIn("not spiffe://cluster.local/ns/default/sa/evil", record.detail)

        return d.addCallback(check)


class ClientContextRotationTests(SynchronousTestCase):
    """
    The client context rotates with the server one: new outbound connections present
    the new certificate.
    """

    def test_rotates(self) -> None:
        """
        After the files change, L{RotatingServerContext.clientConnection} uses the new
        generation's client context.
        """
        import shutil

        from sidecar.tls import RotatingServerContext, TLSFiles
        from tests.tlsfixtures import writeMesh

        mesh = writeMesh(self.mktemp())
        cert, key = os.path.join(mesh.directory, "me.crt"), os.path.join(mesh.directory, "me.key")
        shutil.copy(mesh.crt("frontend"), cert)
        shutil.copy(mesh.key("frontend"), key)
        context = RotatingServerContext(TLSFiles(cert, key, os.path.join(mesh.directory, "ca.crt")))
        before = context.material.clientContext
        self.assertIs(context.clientConnection().get_context(), before)
        shutil.copy(mesh.crt("evil"), cert)
        shutil.copy(mesh.key("evil"), key)
        os.utime(cert, (0, 0))
        self.assertTrue(context.check())
        self.assertIsNot(context.material.clientContext, before)
        self.assertIs(context.clientConnection().get_context(), context.material.clientContext)


class TwoPodTests(TestCase):
    """
    The mesh between two pods (L{tests.meshpods}): a client pod whose sidecar
    captures its outbound calls and originates mutual TLS, a server pod whose sidecar
    is STRICT and allows only the client's id, and a pod without a sidecar.
    """

    def setUp(self) -> None:
        from tests.meshpods import missing

        reason = missing()
        if reason is not None:
            raise SkipTest(reason)

    def test_mesh(self):
        """
        (1) The client's plain C{GET http://SERVER/headers} gets 200 and httpbin sees
        C{X-Forwarded-Client-Cert} with the client's id, and no peer metadata (a
        forged one sent by the application included); (2) on the server pod's veth,
        the client's bytes to port 80 and 6379 are TLS handshakes and records, no
        plaintext HTTP or Redis; (3) the stranger pod is refused; (4) Redis SET/GET
        cross as mutual TLS; (5) the client's metrics say C{reporter="source"} and
        the server's C{reporter="destination"}, both with the source and destination
        workloads; (6) the kubelet's probe of the server's health port passes while
        a plain request to its port 80 from the node fails.
        """
        return deferToThread(self._mesh)

    def _mesh(self) -> None:
        from tests.meshpods import CLIENT_ID, HEALTH_PORT, PROBE_PATH, SERVER_ID, Mesh, tcpPayloads

        mesh = Mesh(self, os.path.abspath(self.mktemp()))
        mesh.start()
        server = mesh.addresses["server"]
        stopCapture = mesh.capture("server", f"tcp and host {mesh.addresses['client']}")
        forged = encodeMetadata({"workload": "admin"}).decode()
        done = mesh.inPod("client", ["curl", "-sS", "-i", "--max-time", "10", "-H",
                                     f"X-Sidecar-Peer-Metadata: {forged}", f"http://{server}/headers"])
        head, _, body = done.stdout.partition("\n\n")  # text mode: CRLF read as LF
        self.assertTrue(head.startswith("HTTP/1.1 200"), done.stdout)
        self.assertNotIn("peer-metadata", head.lower())
        seen = json.loads(body)["headers"]
        self.assertIn(f"URI={CLIENT_ID}", seen["X-Forwarded-Client-Cert"])
        self.assertIn(f"By={SERVER_ID}", seen["X-Forwarded-Client-Cert"])
        self.assertNotIn("X-Sidecar-Peer-Metadata", seen)
        redis = mesh.inPod("client", ["sh", "-c", f"redis-cli -h {server} SET meshkey meshvalue && "
                                                  f"redis-cli -h {server} GET meshkey"])
        self.assertEqual(redis.stdout.split(), ["OK", "meshvalue"])
        segments = tcpPayloads(stopCapture())

        # (2) TLS on the wire, both ports, nothing in the clear.
        toServer = [s for s in segments if s[2] == server]
        for port in (80, 6379):
            first = [s[4] for s in toServer if s[3] == port]
            self.assertTrue(first, f"no segment to port {port}")
            self.assertEqual(first[0][:1] + first[0][5:6], b"\x16\x01", f"port {port}: no ClientHello first")
            self.assertTrue(all(p[:1] in (b"\x14", b"\x15", b"\x16", b"\x17") for p in first), port)
        wire = b"".join(s[4] for s in segments)
        for clear in (b"GET /headers", b"HTTP/1.1", b"meshvalue", b"SET", CLIENT_ID.encode()):
            self.assertNotIn(clear, wire)

        # (3) The pod without a sidecar is refused: plaintext meets STRICT mutual TLS.
        stranger = mesh.inPod("stranger", ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
                                           f"http://{server}/headers"], check=False)
        self.assertNotEqual(stranger.returncode, 0)
        self.assertEqual(stranger.stdout, "000")
        strangerRedis = mesh.inPod("stranger", ["redis-cli", "-h", server, "GET", "meshkey"], check=False)
        self.assertNotIn("meshvalue", strangerRedis.stdout)

        # (6) The kubelet's probe passes; the service port stays mutual TLS only.
        probe = mesh.fromNode(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
                               f"http://{server}:{HEALTH_PORT}{PROBE_PATH}"], check=False)
        self.assertEqual(probe.stdout, "200")
        plain = mesh.fromNode(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
                               f"http://{server}/status/200"], check=False)
        self.assertEqual(plain.stdout, "000")

        # (5) Both sides of the HTTP call and of the Redis connections.
        client, serverText = mesh.metrics("client"), mesh.metrics("server")
        source = sample(client, "istio_requests_total", reporter="source", response_code="200")
        self.assertEqual(
            (source["source_workload"], source["source_principal"], source["destination_workload"],
             source["destination_app"], source["destination_principal"], source["connection_security_policy"]),
            ("sleep", CLIENT_ID, "httpbin", "httpbin", SERVER_ID, "mutual_tls"))
        destination = sample(serverText, "istio_requests_total", reporter="destination", response_code="200")
        self.assertEqual(
            (destination["source_workload"], destination["source_app"], destination["source_principal"],
             destination["destination_workload"], destination["destination_principal"]),
            ("sleep", "sleep", CLIENT_ID, "httpbin", SERVER_ID))
        tcpSource = sample(client, "istio_tcp_connections_closed_total", reporter="source")
        self.assertEqual((tcpSource["destination_principal"], tcpSource["source_workload"], tcpSource["value"]),
                         (SERVER_ID, "sleep", "2.0"))
        tcpDestination = sample(serverText, "istio_tcp_connections_closed_total", reporter="destination")
        self.assertEqual((tcpDestination["source_principal"], tcpDestination["destination_workload"]),
                         (CLIENT_ID, "httpbin"))
        self.assertEqual(sum(1 for line in client.splitlines()
                             if line.startswith("istio_tcp_connections_opened_total{")), 1, client)

        # Outbound records in the client's access log, with their direction.
        records = [json.loads(line) for line in open(mesh.logs["client-proxy"]) if line.startswith('{"start_time"')]
        self.assertEqual(sorted((r["protocol"], r["direction"], r["upstream_peer_principal"]) for r in records),
                         [("HTTP/1.1", "outbound", SERVER_ID)] + [("tcp", "outbound", SERVER_ID)] * 2)


class MeshDemoTests(TestCase):
    """
    C{scripts/mesh-demo.py}, which C{make mesh-demo} runs.
    """

    def test_demo(self):
        """
        The demo shows the 200 with the client's id in C{X-Forwarded-Client-Cert},
        TLS on the wire and nothing in the clear, the stranger refused, Redis's answer,
        the probe's 200, both reporters, and exits 0 leaving no namespace behind.
        """
        from tests.meshpods import CLIENT_ID, missing

        reason = missing()
        if reason is not None:
            raise SkipTest(reason)

        def run() -> str:
            import subprocess

            demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "mesh-demo.py")
            done = subprocess.run([sys.executable, demo], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=180)
            self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
            return done.stdout

        def check(out: str) -> None:
            self.assertIn(f"URI={CLIENT_ID}", out)
            self.assertEqual(out.count("(TLS handshake, ClientHello: True)"), 2, out)
            self.assertEqual(out.count("in the clear on the wire: False"), 4, out)
            self.assertNotIn("NOT TLS", out)
            self.assertIn("curl: (52) Empty reply from server", out)
            self.assertIn("OK\ndemo\n", out)
            self.assertIn("ok: HTTP status 200", out)
            self.assertIn('istio_requests_total{reporter="source",source_workload="sleep"', out)
            self.assertIn('istio_requests_total{reporter="destination",source_workload="sleep"', out)
            names = re.findall(r"namespace (sidecar-\S+)\)", out)
            self.assertEqual(len(names), 3, out)
            import subprocess

            listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
            for name in names:
                self.assertNotIn(name, listed)

        return deferToThread(run).addCallback(check)


def sample(text: str, name: str, **match: str) -> dict:
    """
    The labels (and C{value}) of the one sample of C{name} in a Prometheus exposition
    whose labels include C{match}.
    """
    found = []
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line[:line.rindex("}")]))
        if all(labels.get(k) == v for k, v in match.items()):
            labels["value"] = line.rsplit(" ", 1)[1]
            found.append(labels)
    assert len(found) == 1, f"{len(found)} samples of {name} with {match}:\n{text}"
    return found[0]


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run with: python -m twisted.trial tests.test_mesh")
