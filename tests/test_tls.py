# -*- test-case-name: tests.test_tls -*-
"""
Unit tests of mutual TLS: the pure SPIFFE/policy/XFCC functions, the material loader
and its rotation, the door's identity hooks, the permissive first-byte switch and the
command line.  No network and no real time: fake transports and a fake clock.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import attrs
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger
from twisted.python import usage
from twisted.trial import unittest

from sidecar import http1
from sidecar.config import ProxyConfig, TLSConfig, UpstreamConfig
from sidecar.exchange import Engine
from sidecar.headers import requestHead
from sidecar.stats import Recorder
from sidecar.tap import Options
from sidecar.mtls import MutualTLS, MutualTLSDownstreamFactory, PermissiveFactory
from sidecar.spiffe import (
    DENIAL_BODY,
    AllowPolicy,
    AllowRule,
    InvalidSpiffeId,
    PeerIdentity,
    SpiffeId,
    admit,
    identityFromURIs,
    parseAllowRule,
    parseSpiffeId,
    peerIdentity,
    xfccElement,
)
from sidecar.tls import RotatingServerContext, TLSFileError, TLSFiles, loadMaterial
from sidecar.upstream import UpstreamPool
from tests.tlsfixtures import EVIL_ID, FRONTEND_ID, SERVER_ID, KubernetesSecret, writeMesh


class SpiffeIdTests(unittest.TestCase):
    """
    L{parseSpiffeId} follows the SPIFFE-ID standard strictly.
    """

    def test_valid(self) -> None:
        """
        An Istio-style id splits into trust domain and path; a bare trust domain has an
        empty path; C{str} gives the id back.
        """
        parsed = parseSpiffeId(FRONTEND_ID)
        self.assertEqual(parsed, SpiffeId("cluster.local", "/ns/default/sa/frontend"))
        self.assertEqual(str(parsed), FRONTEND_ID)
        self.assertEqual(parseSpiffeId("spiffe://example.org"), SpiffeId("example.org", ""))

    def test_invalid(self) -> None:
        """
        Wrong scheme, upper case, ports, user info, empty or dot segments, trailing
        slashes, queries, fragments, percent-encoding and over-long ids are refused.
        """
        for bad in [
            "https://cluster.local/ns/a", "SPIFFE://cluster.local/a", "spiffe://", "spiffe:///ns/a",
            "spiffe://Cluster.local/a", "spiffe://cluster.local:8443/a", "spiffe://user@cluster.local/a",
            "spiffe://cluster.local/ns//a", "spiffe://cluster.local/ns/./a", "spiffe://cluster.local/ns/../a",
            "spiffe://cluster.local/ns/a/", "spiffe://cluster.local/a?x=1", "spiffe://cluster.local/a#f",
            "spiffe://cluster.local/a%20b", "spiffe://cluster.local/" + "a" * 2100,
        ]:
            with self.assertRaises(InvalidSpiffeId, msg=bad):
                parseSpiffeId(bad)


class IdentityTests(unittest.TestCase):
    """
    A certificate's identity is its single C{spiffe://} URI SAN.
    """

    def test_one(self) -> None:
        """
        One SPIFFE URI among other URIs is the identity.
        """
        identity = identityFromURIs(["https://example.org/x", FRONTEND_ID])
        self.assertEqual(identity.principal, FRONTEND_ID)
        self.assertIsNone(identity.problem)

    def test_none(self) -> None:
        """
        No SPIFFE URI: no identity, and the problem says so.
        """
        identity = identityFromURIs(["https://example.org/x"])
        self.assertEqual((identity.spiffeId, identity.principal), (None, ""))
        self.assertIn("no SPIFFE id", identity.problem)

    def test_several(self) -> None:
        """
        Two SPIFFE URIs: no identity (which one would be meant?).
        """
        identity = identityFromURIs([FRONTEND_ID, EVIL_ID])
        self.assertIsNone(identity.spiffeId)
        self.assertIn("2 SPIFFE ids", identity.problem)

    def test_invalid(self) -> None:
        """
        A single but malformed SPIFFE URI gives no identity.
        """
        identity = identityFromURIs(["spiffe://cluster.local/ns/../sa/x"])
        self.assertIsNone(identity.spiffeId)
        self.assertIn("invalid", identity.problem)

    def test_fromCertificates(self) -> None:
        """
        L{peerIdentity} reads the URI SANs of real certificates, including one without
        any SAN extension.
        """
        mesh = writeMesh(self.mktemp())
        self.assertEqual(peerIdentity(mesh.issued["frontend"].certificate).principal, FRONTEND_ID)
        self.assertIsNone(peerIdentity(mesh.issued["noid"].certificate).spiffeId)
        self.assertIsNone(peerIdentity(mesh.issued["twoids"].certificate).spiffeId)
        from sidecar.certs import issue
        from tests.tlsfixtures import now

        bare = issue(mesh.ca, [], now()).certificate
        self.assertEqual(peerIdentity(bare), PeerIdentity(None, (), "the certificate has no SPIFFE id"))


class PolicyTests(unittest.TestCase):
    """
    L{AllowPolicy} compares SPIFFE ids exactly, or by whole trust domain.
    """

    def test_parseRules(self) -> None:
        """
        An exact id and a trust-domain wildcard parse; other wildcards do not.
        """
        self.assertEqual(parseAllowRule(FRONTEND_ID), AllowRule("cluster.local", "/ns/default/sa/frontend"))
        self.assertEqual(parseAllowRule("spiffe://cluster.local/*"), AllowRule("cluster.local", None))
        for bad in ["spiffe://cluster.local/ns/*", "*", "spiffe://*", "spiffe://cluster.local/ns/de*",
                    "https://cluster.local/x"]:
            with self.assertRaises(InvalidSpiffeId, msg=bad):
                parseAllowRule(bad)

    def test_empty(self) -> None:
        """
        Without rules any certificate from the CA is allowed, even one without id.
        """
        self.assertTrue(AllowPolicy().decide(identityFromURIs([])).allowed)

    def test_exact(self) -> None:
        """
        An exact rule allows that id only: not a longer path, not another trust domain
        with the same path, not an id that merely starts the same.
        """
        policy = AllowPolicy.fromStrings([FRONTEND_ID])
        self.assertTrue(policy.decide(identityFromURIs([FRONTEND_ID])).allowed)
        for other in [FRONTEND_ID + "-evil", FRONTEND_ID + "/x", "spiffe://cluster.local.evil/ns/default/sa/frontend",
                      "spiffe://evil.local/ns/default/sa/frontend", EVIL_ID]:
            decision = policy.decide(identityFromURIs([other]))
            self.assertFalse(decision.allowed, other)
            self.assertIn("matches no --tls-allow rule", decision.reason)

    def test_trustDomain(self) -> None:
        """
        C{spiffe://TD/*} allows every id of that trust domain and no other.
        """
        policy = AllowPolicy.fromStrings(["spiffe://cluster.local/*"])
        self.assertTrue(policy.decide(identityFromURIs([EVIL_ID])).allowed)
        self.assertTrue(policy.decide(identityFromURIs(["spiffe://cluster.local"])).allowed)
        self.assertFalse(policy.decide(identityFromURIs(["spiffe://cluster.localx/ns/a"])).allowed)

    def test_noIdentity(self) -> None:
        """
        With rules, a certificate without a single SPIFFE id is refused, saying why.
        """
        policy = AllowPolicy.fromStrings(["spiffe://cluster.local/*"])
        decision = policy.decide(identityFromURIs([FRONTEND_ID, EVIL_ID]))
        self.assertEqual((decision.allowed, decision.reason), (False, "the certificate has 2 SPIFFE ids"))


class XFCCTests(unittest.TestCase):
    """
    The C{X-Forwarded-Client-Cert} value is Envoy's By/Hash/URI element.
    """

    def test_format(self) -> None:
        """
        C{By=<ours>;Hash=<sha256 hex of the DER>;URI=<theirs>}.
        """
        der = b"\x30\x03\x02\x01\x01"
        self.assertEqual(
            xfccElement(SERVER_ID, der, FRONTEND_ID),
            f"By={SERVER_ID};Hash={hashlib.sha256(der).hexdigest()};URI={FRONTEND_ID}".encode(),
        )

    def test_omitted(self) -> None:
        """
        Empty C{By} or C{URI} are left out; the hash is always there.
        """
        self.assertEqual(xfccElement("", b"x", ""), f"Hash={hashlib.sha256(b'x').hexdigest()}".encode())

    def test_quoted(self) -> None:
        """
        A value holding C{,;="} is quoted, inner quotes escaped, so it can't add fields.
        """
        value = xfccElement('a;URI=spiffe://x,"y"', b"x", "")
        self.assertTrue(value.startswith(b'By="a;URI=spiffe://x,\\"y\\"";Hash='), value)

    def test_admit(self) -> None:
        """
        L{admit} ties identity, policy and header together for a real certificate.
        """
        mesh = writeMesh(self.mktemp())
        cert = mesh.issued["evil"].certificate
        der = cert.public_bytes(serialization.Encoding.DER)
        admission = admit(AllowPolicy.fromStrings([FRONTEND_ID]), SERVER_ID, cert, der)
        self.assertEqual((admission.principal, admission.allowed), (EVIL_ID, False))
        self.assertEqual(admission.xfcc, xfccElement(SERVER_ID, der, EVIL_ID))

    def test_clientCopyDropped(self) -> None:
        """
        The forwarding rules drop every client-sent C{X-Forwarded-Client-Cert}, in any
        case, and append the proxy's.
        """
        req = requestHead(b"GET", b"/", "1.1", [
            (b"Host", b"x"), (b"X-Forwarded-Client-Cert", b"By=forged"), (b"x-forwarded-client-cert", b"URI=forged"),
        ], "127.0.0.1", b"https", [(b"X-Forwarded-Client-Cert", b"Hash=real")])
        head = http1.requestHead(b"GET", b"/", req.headers, req.contentLength, req.chunked)
        self.assertNotIn(b"forged", head)
        self.assertEqual(head.lower().count(b"x-forwarded-client-cert"), 1)
        self.assertIn(b"X-Forwarded-Client-Cert: Hash=real\r\n", head)
        self.assertIn(b"X-Forwarded-Proto: https\r\n", head)


class MaterialTests(unittest.TestCase):
    """
    L{loadMaterial} checks the files and names the one at fault.
    """

    def setUp(self) -> None:
        self.mesh = writeMesh(self.mktemp())
        self.files = TLSFiles(self.mesh.crt("backend"), self.mesh.key("backend"),
                              os.path.join(self.mesh.directory, "ca.crt"))

    def assertRefused(self, files: TLSFiles, flag: str, path: str, words: str) -> None:
        with self.assertRaises(TLSFileError) as caught:
            loadMaterial(files)
        message = str(caught.exception)
        self.assertTrue(message.startswith(f"{flag}: {path}: "), message)
        self.assertIn(words, message)
        self.assertTrue(message.endswith("."))

    def test_good(self) -> None:
        """
        Good files give a context, our SPIFFE id and our serial.
        """
        material = loadMaterial(self.files)
        self.assertIsInstance(material.context, SSL.Context)
        self.assertEqual(material.localId, SERVER_ID)
        self.assertEqual(material.serial, self.mesh.issued["backend"].certificate.serial_number)

    def test_missing(self) -> None:
        """
        A missing file is named.
        """
        gone = os.path.join(self.mesh.directory, "gone.crt")
        self.assertRefused(attrs.evolve(self.files, cert=gone), "--tls-cert", gone, "no such file")
        self.assertRefused(attrs.evolve(self.files, ca=gone), "--tls-ca", gone, "no such file")

    def test_unreadable(self) -> None:
        """
        A path that can't be read as a file (a directory) is named.
        """
        self.assertRefused(attrs.evolve(self.files, key=self.mesh.directory), "--tls-key", self.mesh.directory,
                           "is a directory")

    def test_garbage(self) -> None:
        """
        Files without PEM, or with broken PEM, are named.
        """
        junk = os.path.join(self.mesh.directory, "junk")
        with open(junk, "wb") as f:
            f.write(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        self.assertRefused(attrs.evolve(self.files, cert=junk), "--tls-cert", junk, "cannot be parsed")
        self.assertRefused(attrs.evolve(self.files, key=junk), "--tls-key", junk, "no usable PEM private key")
        self.assertRefused(attrs.evolve(self.files, ca=self.files.key), "--tls-ca", self.files.key,
                           "no PEM certificate")

    def test_mismatch(self) -> None:
        """
        A key that is not the certificate's is refused, naming both files.
        """
        other = self.mesh.key("frontend")
        self.assertRefused(attrs.evolve(self.files, key=other), "--tls-key", other,
                           f"does not match the certificate in {self.files.cert}")

    def test_encrypted(self) -> None:
        """
        An encrypted key is refused in words.
        """
        path = os.path.join(self.mesh.directory, "locked.key")
        with open(path, "wb") as f:
            f.write(self.mesh.issued["backend"].key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret")))
        self.assertRefused(attrs.evolve(self.files, key=path), "--tls-key", path, "encrypted")

    def test_notCA(self) -> None:
        """
        A CA bundle holding a workload certificate is refused.
        """
        self.assertRefused(attrs.evolve(self.files, ca=self.files.cert), "--tls-ca", self.files.cert, "not a CA")

    def test_chainInCertFile(self) -> None:
        """
        A certificate file that also holds the chain is accepted.
        """
        chained = os.path.join(self.mesh.directory, "chained.crt")
        with open(chained, "wb") as f:
            f.write(self.mesh.issued["backend"].certificatePEM() + self.mesh.ca.certificatePEM())
        self.assertEqual(loadMaterial(attrs.evolve(self.files, cert=chained)).localId, SERVER_ID)


class RotationTests(unittest.TestCase):
    """
    L{RotatingServerContext.check} swaps in new material when the files change and is
    valid, and keeps the old material otherwise.
    """

    def setUp(self) -> None:
        self.mesh = writeMesh(self.mktemp())
        self.secret = KubernetesSecret(os.path.join(self.mesh.directory, "secret"))
        self.publish("backend")
        self.files = TLSFiles(*(self.secret.path(n) for n in KubernetesSecret.FILES))
        self.events: list = []
        self.context = RotatingServerContext(self.files, log=Logger(observer=self.events.append))

    def publish(self, name: str, cert: bytes = b"") -> None:
        with open(self.mesh.crt(name), "rb") as f:
            certData = cert or f.read()
        with open(self.mesh.key(name), "rb") as f:
            keyData = f.read()
        self.secret.update(certData, keyData, self.mesh.ca.certificatePEM())

    def servedSerial(self) -> int:
        connection = self.context.serverConnectionForTLS(None)
        return connection.get_certificate().to_cryptography().serial_number  # type: ignore[union-attr]

    def test_unchanged(self) -> None:
        """
        Nothing changed: nothing is rebuilt.
        """
        material = self.context.material
        self.assertFalse(self.context.check())
        self.assertIs(self.context.material, material)

    def test_sameContents(self) -> None:
        """
        A swap to identical contents changes nothing.
        """
        material = self.context.material
        self.publish("backend")
        self.assertFalse(self.context.check())
        self.assertIs(self.context.material, material)

    def test_rotated(self) -> None:
        """
        A symlink swap to a new certificate is picked up; new connections get it.
        """
        old = self.servedSerial()
        new = self.mesh.newServer("backend2")
        self.publish("backend2")
        self.assertTrue(self.context.check())
        self.assertNotEqual(old, new.certificate.serial_number)
        self.assertEqual(self.servedSerial(), new.certificate.serial_number)
        self.assertEqual(self.context.rotations, 1)
        self.assertIn("reloaded", self.events[-1]["log_format"])

    def test_corrupt(self) -> None:
        """
        A corrupt new certificate is logged once and ignored; fixing it later is
        picked up.
        """
        old = self.servedSerial()
        self.publish("backend", cert=b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
        self.assertFalse(self.context.check())
        self.assertEqual(self.servedSerial(), old)
        errors = [e for e in self.events if e["log_level"].name == "error"]
        self.assertEqual(len(errors), 1)
        self.assertIn("--tls-cert", errors[0]["why"])
        os.utime(self.secret.path("tls.crt"))
        self.assertFalse(self.context.check())
        self.assertEqual(len([e for e in self.events if e["log_level"].name == "error"]), 1)
        new = self.mesh.newServer("backend3")
        self.publish("backend3")
        self.assertTrue(self.context.check())
        self.assertEqual(self.servedSerial(), new.certificate.serial_number)

    def test_halfWritten(self) -> None:
        """
        A new certificate whose key has not arrived yet (a mismatch) is refused; when
        the key follows, the pair is used.
        """
        new = self.mesh.newServer("backend4")
        shutil.copy(self.mesh.crt("backend4"), os.path.join(self.secret.directory, "..data", "tls.crt"))
        self.assertFalse(self.context.check())
        self.assertIn("does not match", self.events[-1]["why"])
        shutil.copy(self.mesh.key("backend4"), os.path.join(self.secret.directory, "..data", "tls.key"))
        self.assertTrue(self.context.check())
        self.assertEqual(self.servedSerial(), new.certificate.serial_number)

    def test_missingFile(self) -> None:
        """
        A file that disappears is logged and the old material stays.
        """
        old = self.servedSerial()
        os.unlink(os.path.join(self.secret.directory, "..data", "ca.crt"))
        self.assertFalse(self.context.check())
        self.assertIn("no such file", self.events[-1]["why"])
        self.assertEqual(self.servedSerial(), old)

    def test_timerInService(self) -> None:
        """
        In the assembled service a timer on the injected clock looks at the files every
        C{reloadInterval} seconds.
        """
        from sidecar.service import SidecarService

        clock = MemoryReactorClock()
        config = ProxyConfig(
            listen=None, accessLog=None, admin=None, upstream=UpstreamConfig(port=9),
            tls=TLSConfig(listen="tcp:0", cert=self.files.cert, key=self.files.key, ca=self.files.ca,
                          reloadInterval=2.0),
        )
        service = SidecarService(config, clock)
        service.startService()
        self.addCleanup(service.stopService)
        new = self.mesh.newServer("backend5")
        self.publish("backend5")
        clock.advance(1.0)
        self.assertNotEqual(service.tls.context.material.serial, new.certificate.serial_number)
        clock.advance(1.0)
        self.assertEqual(service.tls.context.material.serial, new.certificate.serial_number)


class FakeTLSTransport(StringTransport):
    """
    A transport that says it carries TLS with a given client certificate.
    """

    def __init__(self, peer: crypto.X509) -> None:
        StringTransport.__init__(self)
        self.peer = peer

    def getPeerCertificate(self) -> crypto.X509:
        return self.peer


class DoorFixture(unittest.TestCase):
    """
    A mutual-TLS door on a fake reactor, with fake TLS transports.
    """

    def setUp(self) -> None:
        self.mesh = writeMesh(self.mktemp())
        self.reactor = MemoryReactorClock()
        self.recorder = Recorder()
        pool = UpstreamPool(self.reactor, self.reactor, UpstreamConfig(port=8080))
        self.engine = Engine(self.reactor, pool, self.recorder)
        files = TLSFiles(self.mesh.crt("backend"), self.mesh.key("backend"),
                         os.path.join(self.mesh.directory, "ca.crt"))
        self.events: list = []
        log = Logger(observer=self.events.append)
        self.tls = MutualTLS(RotatingServerContext(files, log=log), AllowPolicy.fromStrings([FRONTEND_ID]),
                             self.reactor, log)

    def connect(self, name: str) -> tuple:
        factory = MutualTLSDownstreamFactory(self.engine, 64 * 1024, self.tls)
        door = factory.buildProtocol(None)
        cert = self.mesh.issued[name].certificate
        transport = FakeTLSTransport(crypto.X509.from_cryptography(cert))
        door.makeConnection(transport)
        door.handshakeCompleted()
        return door, transport, cert.public_bytes(serialization.Encoding.DER)



class DoorTests(DoorFixture):
    """
    L{MutualTLSDownstreamProtocol} learns the client at its first request, adds the
    XFCC header upstream, and answers 403 to refused identities.
    """

    def test_allowed(self) -> None:
        """
        An allowed client's request goes upstream with our XFCC (the client's forged
        one gone) and C{X-Forwarded-Proto: https}; the record carries the principal
        and mutual TLS.
        """
        door, transport, der = self.connect("frontend")
        door.dataReceived(b"GET /x HTTP/1.1\r\nHost: svc\r\nX-Forwarded-Client-Cert: By=forged;URI=spiffe://x/admin\r\n"
                          b"\r\n")
        self.assertEqual(door.peerPrincipal, FRONTEND_ID)
        host, port, factory, _, _ = self.reactor.tcpClients[0]
        upstream = factory.buildProtocol(None)
        upstreamTransport = StringTransport()
        upstream.makeConnection(upstreamTransport)
        sent = upstreamTransport.value()
        self.assertNotIn(b"forged", sent)
        self.assertIn(b"X-Forwarded-Client-Cert: " + xfccElement(SERVER_ID, der, FRONTEND_ID) + b"\r\n", sent)
        self.assertIn(b"X-Forwarded-Proto: https\r\n", sent)
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK\r\n"))
        record = self.recorder.lastRecord
        self.assertEqual((record.downstreamPeerPrincipal, record.mutualTLS, record.flags), (FRONTEND_ID, True, "-"))
        self.assertEqual(self.tls.handshakes, 1)

    def test_refused(self) -> None:
        """
        A refused identity gets 403 with the short body on every request, nothing goes
        upstream, the record says RBAC and who, and one log line says why.
        """
        door, transport, _ = self.connect("evil")
        door.dataReceived(b"GET /a HTTP/1.1\r\nHost: svc\r\n\r\nGET /b HTTP/1.1\r\nHost: svc\r\n\r\n")
        self.assertEqual(self.reactor.tcpClients, [])
        out = transport.value()
        self.assertEqual(out.count(b"HTTP/1.1 403 Forbidden\r\n"), 2)
        self.assertTrue(out.endswith(DENIAL_BODY))
        record = self.recorder.lastRecord
        self.assertEqual((record.status, record.flags, record.downstreamPeerPrincipal), (403, "RBAC", EVIL_ID))
        self.assertEqual(self.tls.denials, 1)
        warnings = [e for e in self.events if e["log_level"].name == "warn"]
        self.assertEqual(len(warnings), 1)
        self.assertIn("matches no --tls-allow rule", warnings[0]["reason"])

    def test_noIdentityRefused(self) -> None:
        """
        With a policy, a certificate with two SPIFFE ids has no identity and is refused.
        """
        door, transport, _ = self.connect("twoids")
        door.dataReceived(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 403 "))
        self.assertEqual(self.recorder.lastRecord.downstreamPeerPrincipal, "")

    def test_handshakeFailureCounted(self) -> None:
        """
        A connection that ends before its handshake completed is counted as a failure.
        """
        factory = MutualTLSDownstreamFactory(self.engine, 64 * 1024, self.tls)
        door = factory.buildProtocol(None)
        door.makeConnection(StringTransport())
        door.connectionLost()
        self.assertEqual((self.tls.handshakes, self.tls.handshakeFailures), (0, 1))


class Recording(Protocol):
    """
    A protocol that remembers what happened to it.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.data = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True


class PermissiveTests(unittest.TestCase):
    """
    L{PermissiveFactory} tells TLS from plain HTTP by the first byte.
    """

    def setUp(self) -> None:
        self.built: list = []

        def factory(name: str) -> Factory:
            f = Factory()
            f.buildProtocol = lambda addr: self.built.append(Recording(name)) or self.built[-1]  # type: ignore
            return f

        self.factory = PermissiveFactory(factory("plain"), factory("tls"))

    def test_tls(self) -> None:
        """
        A first byte of 0x16 (a TLS handshake record) goes to the TLS factory, with all
        bytes, and so does the end of the connection.
        """
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(b"\x16\x03\x01")
        proto.dataReceived(b"rest")
        proto.connectionLost(None)
        [inner] = self.built
        self.assertEqual((inner.name, inner.data, inner.lost, inner.transport), ("tls", b"\x16\x03\x01rest", True,
                                                                                   transport))

    def test_plain(self) -> None:
        """
        Anything else goes to the plain factory.
        """
        proto = self.factory.buildProtocol(None)
        proto.makeConnection(StringTransport())
        proto.dataReceived(b"GET / HTTP/1.1\r\n")
        self.assertEqual([(p.name, p.data) for p in self.built], [("plain", b"GET / HTTP/1.1\r\n")])

    def test_silent(self) -> None:
        """
        A connection that closes before its first byte builds nothing.
        """
        proto = self.factory.buildProtocol(None)
        proto.makeConnection(StringTransport())
        proto.connectionLost(None)
        self.assertEqual(self.built, [])


class OptionsTests(unittest.TestCase):
    """
    The mutual-TLS flags of C{twistd sidecar}.
    """

    def setUp(self) -> None:
        self.mesh = writeMesh(self.mktemp())
        self.tlsFlags = ["--tls-cert", self.mesh.crt("backend"), "--tls-key", self.mesh.key("backend"),
                         "--tls-ca", os.path.join(self.mesh.directory, "ca.crt")]

    def parse(self, *argv: str) -> ProxyConfig:
        options = Options()
        options.parseOptions(["--access-log", "none", "--admin", "none", *argv])
        return options["config"]

    def refused(self, *argv: str) -> str:
        with self.assertRaises(usage.UsageError) as caught:
            self.parse(*argv)
        return str(caught.exception)

    def test_none(self) -> None:
        """
        Without TLS flags there is no TLS configuration.
        """
        self.assertIsNone(self.parse().tls)

    def test_tlsOnly(self) -> None:
        """
        C{--listen none} is allowed with C{--tls-listen}; the flags land in the config.
        """
        config = self.parse("--listen", "none", "--tls-listen", "8443", *self.tlsFlags,
                            "--tls-allow", FRONTEND_ID, "--tls-allow", "spiffe://cluster.local/*")
        self.assertIsNone(config.listen)
        self.assertEqual((config.tls.listen, config.tls.mode, config.tls.allow),
                         ("tcp:8443", "strict", (FRONTEND_ID, "spiffe://cluster.local/*")))
        self.assertEqual(config.tls.cert, os.path.abspath(self.mesh.crt("backend")))

    def test_noListener(self) -> None:
        """
        C{--listen none} alone leaves no listener.
        """
        self.assertIn("no listener", self.refused("--listen", "none"))

    def test_missingFile(self) -> None:
        """
        A missing file stops the start with a sentence naming it.
        """
        gone = os.path.join(self.mesh.directory, "gone.key")
        flags = list(self.tlsFlags)
        flags[3] = gone
        self.assertEqual(self.refused("--tls-listen", "8443", *flags), f"--tls-key: {gone}: no such file.")

    def test_mismatch(self) -> None:
        """
        A key that does not match the certificate stops the start.
        """
        flags = list(self.tlsFlags)
        flags[3] = self.mesh.key("frontend")
        self.assertIn("does not match the certificate", self.refused("--tls-listen", "8443", *flags))

    def test_incomplete(self) -> None:
        """
        C{--tls-listen} needs all three files; files without a TLS listener are refused.
        """
        self.assertIn("needs --tls-cert, --tls-key and --tls-ca", self.refused("--tls-listen", "8443",
                                                                               *self.tlsFlags[:4]))
        self.assertIn("needs --tls-listen", self.refused(*self.tlsFlags))
        self.assertIn("needs --tls-listen", self.refused("--tls-allow", FRONTEND_ID))

    def test_badAllow(self) -> None:
        """
        A C{--tls-allow} that is not a SPIFFE id or trust-domain wildcard is refused.
        """
        self.assertIn("--tls-allow:", self.refused("--tls-listen", "8443", *self.tlsFlags,
                                                   "--tls-allow", "spiffe://cluster.local/ns/*"))

    def test_modes(self) -> None:
        """
        Permissive mode needs the plain listener but no TLS listener; unknown modes and
        C{ssl:} endpoints are refused.
        """
        config = self.parse("--tls-mode", "permissive", *self.tlsFlags)
        self.assertEqual((config.tls.mode, config.tls.listen, config.tls.permissive), ("permissive", None, True))
        self.assertIn("needs the plain --listen", self.refused("--listen", "none", "--tls-mode", "permissive",
                                                               *self.tlsFlags))
        self.assertIn("--tls-mode:", self.refused("--tls-mode", "lenient", "--tls-listen", "8443", *self.tlsFlags))
        self.assertIn("adds the TLS layer itself", self.refused("--tls-listen", "ssl:8443", *self.tlsFlags))


class AdmissionMemoryTests(unittest.TestCase):
    """
    L{MutualTLS.admission} parses a client certificate once, not at every connection.
    """

    def setUp(self) -> None:
        self.mesh = writeMesh(self.mktemp())
        files = TLSFiles(self.mesh.crt("backend"), self.mesh.key("backend"),
                         os.path.join(self.mesh.directory, "ca.crt"))
        self.tls = MutualTLS(RotatingServerContext(files), AllowPolicy.fromStrings([FRONTEND_ID]),
                             MemoryReactorClock())

    def der(self, name: str) -> bytes:
        return self.mesh.issued[name].certificate.public_bytes(serialization.Encoding.DER)

    def test_remembered(self) -> None:
        """
        The same certificate gets the same admission object; another certificate its
        own, decided on its own.
        """
        first = self.tls.admission(self.der("frontend"))
        self.assertIs(self.tls.admission(self.der("frontend")), first)
        self.assertTrue(first.allowed)
        other = self.tls.admission(self.der("evil"))
        self.assertEqual((other.principal, other.allowed), (EVIL_ID, False))

    def test_bounded(self) -> None:
        """
        The memory starts afresh when full, so it never holds more than its bound.
        """
        from sidecar import mtls

        self.patch(mtls, "ADMISSION_MEMORY", 1)
        self.tls.admission(self.der("frontend"))
        self.tls.admission(self.der("evil"))
        self.assertEqual(len(self.tls._admissions), 1)


class BenchConfigTests(unittest.TestCase):
    """
    The Envoy peer of C{bench/tls_bench.py} is configured for the same mutual TLS.
    """

    def test_envoyMutualTLS(self) -> None:
        """
        Envoy requires and verifies client certificates against the CA, speaks TLS
        1.2-1.3 with ALPN http/1.1, sets XFCC with the URI, and allows one principal.
        """
        from pathlib import Path

        from bench.tls_bench import envoyMutualTLSConfig

        certs = {k: Path(f"/x/{k}") for k in ("ca", "backend.crt", "backend.key")}
        config = envoyMutualTLSConfig(1, 2, 3, certs)
        chain = config["static_resources"]["listeners"][0]["filter_chains"][0]
        tlsContext = chain["transport_socket"]["typed_config"]
        self.assertTrue(tlsContext["require_client_certificate"])
        common = tlsContext["common_tls_context"]
        self.assertEqual(common["validation_context"]["trusted_ca"]["filename"], "/x/ca")
        self.assertEqual(common["alpn_protocols"], ["http/1.1"])
        self.assertEqual(common["tls_params"]["tls_minimum_protocol_version"], "TLSv1_2")
        manager = chain["filters"][0]["typed_config"]
        self.assertEqual((manager["forward_client_cert_details"], manager["set_current_client_cert_details"]),
                         ("SANITIZE_SET", {"uri": True}))
        self.assertEqual(manager["http_filters"][0]["name"], "envoy.filters.http.rbac")

    def test_callgrindTotal(self) -> None:
        """
        C{--callgrind} reads a dump's C{totals:} line (0 when there is none).
        """
        from pathlib import Path

        from bench.tls_bench import callgrindTotal

        path = Path(self.mktemp())
        path.write_bytes(b"events: Ir\nsummary: 12\ntotals: 123456\n")
        self.assertEqual(callgrindTotal(path), 123456)
        path.write_bytes(b"events: Ir\n")
        self.assertEqual(callgrindTotal(path), 0)


class HandshakeTimeoutTests(DoorFixture):
    """
    A client that connects but never finishes its handshake is cut off.
    """

    def test_timeout(self) -> None:
        """
        Without a completed handshake the connection is aborted after
        C{handshakeTimeout} seconds of the injected clock, and counted.
        """
        door = MutualTLSDownstreamFactory(self.engine, 64 * 1024, self.tls).buildProtocol(None)
        transport = StringTransport()
        door.makeConnection(transport)
        self.reactor.advance(self.tls.handshakeTimeout - 0.1)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(0.1)
        self.assertTrue(transport.disconnecting)
        door.connectionLost()
        self.assertEqual((self.tls.handshakeTimeouts, self.tls.handshakeFailures), (1, 1))

    def test_completed(self) -> None:
        """
        A completed handshake cancels the timer; so does a connection that ends first.
        """
        door, transport, _ = self.connect("frontend")
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        other = MutualTLSDownstreamFactory(self.engine, 64 * 1024, self.tls).buildProtocol(None)
        other.makeConnection(StringTransport())
        other.connectionLost()
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class PermissiveCloseTests(unittest.TestCase):
    """
    Closing a permissive connection goes through its TLS layer when it has one.
    """

    def test_loseConnection(self) -> None:
        """
        L{_FirstByte.loseConnection} asks the TLS wrapper to close (close_notify first)
        and closes a plain connection's transport directly.
        """
        from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

        from sidecar.mtls import _FirstByte

        closed = []
        wrapper = ProtocolWrapper(WrappingFactory(Factory()), Protocol())
        wrapper.loseConnection = lambda: closed.append("tls")  # type: ignore[method-assign]
        plain = PermissiveFactory(Factory.forProtocol(Protocol), Factory())
        proto = _FirstByte(plain, None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.inner = wrapper
        proto.loseConnection()
        self.assertEqual((closed, transport.disconnecting), (["tls"], False))
        proto.inner = Protocol()
        proto.loseConnection()
        self.assertTrue(transport.disconnecting)
