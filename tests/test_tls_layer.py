# -*- test-case-name: tests.test_tls_layer -*-
"""
The TLS layer every mutual-TLS connection runs over (L{sidecar.tls.TLSLayer}) and
session resumption, both sides: real OpenSSL handshakes between memory transports, no
network and no real time.  A client here is a bare pyOpenSSL connection (or a
L{TLSLayer} as a client) whose records are carried by hand.
"""

from __future__ import annotations

import os
from typing import Any, List

from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest
from zope.interface import implementer

from sidecar.mtls import EXPIRED, MutualTLS
from sidecar.outbound import SessionMemory
from sidecar.spiffe import AllowPolicy
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure

from sidecar.tls import _BINDING, PortableTLSLayer, RotatingServerContext, TLSFiles, TLSLayer, TLSLayerFactory
from tests.tlsfixtures import FRONTEND_ID, SERVER_ID as SERVER_ID_, KubernetesSecret, writeMesh


def resumed(connection: SSL.Connection) -> bool:
    """
    Whether OpenSSL resumed a session on C{connection} (pyOpenSSL has no public
    call for C{SSL_session_reused}; the tests read it from the binding).
    """
    from OpenSSL._util import lib

    return bool(lib.SSL_session_reused(connection._ssl))


@implementer(IHandshakeListener)
class Application(Protocol):
    """
    Keeps what it receives and whether the handshake completed.
    """

    def __init__(self) -> None:
        self.received: List[bytes] = []
        self.handshaken = False
        self.lost: Any = None

    def handshakeCompleted(self) -> None:
        self.handshaken = True

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.lost = reason


def drain(transport: StringTransport) -> bytes:
    """
    What C{transport} was given since the last look.
    """
    data = transport.value()
    transport.clear()
    return data


def pull(connection: SSL.Connection) -> bytes:
    """
    What a pyOpenSSL connection has written, or C{b""}.
    """
    try:
        return connection.bio_read(1 << 20)
    except SSL.WantReadError:
        return b""


def read(connection: SSL.Connection) -> bytes:
    """
    The plaintext a pyOpenSSL connection can decrypt now, or C{b""}.
    """
    out = b""
    while True:
        try:
            out += connection.recv(1 << 16)
        except SSL.WantReadError:
            return out


class Fixture(unittest.TestCase):
    """
    The test mesh, our server material and a C{frontend} client's.

    @ivar layer: the TLS layer class under test (the factory's choice when C{None}).
    """

    layer: Any = None

    def setUp(self) -> None:
        self.mesh = writeMesh(self.mktemp())
        self.ca = os.path.join(self.mesh.directory, "ca.crt")
        self.server = RotatingServerContext(TLSFiles(self.mesh.crt("backend"), self.mesh.key("backend"), self.ca))
        self.client = RotatingServerContext(TLSFiles(self.mesh.crt("frontend"), self.mesh.key("frontend"), self.ca))
        self.clock = MemoryReactorClock()

    def serve(self, context: Any = None) -> tuple:
        """
        A server L{TLSLayer} on a memory transport; returns it, the application
        behind it and the transport.
        """
        factory = TLSLayerFactory(context or self.server, False, Factory.forProtocol(Application), clock=self.clock)
        if self.layer is not None:
            factory.protocol = self.layer
        layer = factory.buildProtocol(None)
        transport = StringTransport()
        layer.makeConnection(transport)
        return layer, layer.wrappedProtocol, transport

    def handshake(self, layer: TLSLayer, transport: StringTransport, client: SSL.Connection) -> None:
        """
        Carry records between C{client} and the server C{layer} until the client's
        handshake is done and its last flight is delivered.
        """
        for _ in range(10):
            try:
                client.do_handshake()
                done = True
            except SSL.WantReadError:
                done = False
            out = pull(client)
            if out:
                layer.dataReceived(out)
            back = drain(transport)
            if back:
                client.bio_write(back)
            if done and not out:
                return
        raise AssertionError("the handshake did not finish")


class TLSLayerTests(Fixture):
    """
    L{TLSLayer} sends what is written at once, whole, and holds only a server's TLS
    1.3 session tickets until its first bytes.
    """

    def test_writeAtOnce(self) -> None:
        """
        A write goes to the transport during the call, without a timer (Twisted's
        default layer holds it for a C{callLater(0)}), and the client reads it.
        """
        layer, app, transport = self.serve()
        client = self.client.clientConnection()
        self.handshake(layer, transport, client)
        self.assertTrue(app.handshaken)
        layer.write(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        client.bio_write(drain(transport))
        self.assertEqual(read(client), b"HTTP/1.1 200 OK\r\n\r\n")

    def test_largeWriteIntact(self) -> None:
        """
        A 300 KiB write (many records) and a write sequence arrive byte for byte, in
        order.
        """
        layer, app, transport = self.serve()
        client = self.client.clientConnection()
        self.handshake(layer, transport, client)
        body = bytes(range(256)) * 1200
        layer.write(body)
        layer.writeSequence([b"one,", b"two"])
        client.bio_write(drain(transport))
        self.assertEqual(read(client), body + b"one,two")

    def test_readsDelivered(self) -> None:
        """
        Several records arriving in one read are all delivered, in order.
        """
        layer, app, transport = self.serve()
        client = self.client.clientConnection()
        self.handshake(layer, transport, client)
        client.send(b"GET / HTTP/1.1\r\n")
        client.send(b"Host: x\r\n\r\n")
        layer.dataReceived(pull(client))
        self.assertEqual(b"".join(app.received), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")

    def test_ticketsRideWithTheFirstBytes(self) -> None:
        """
        Once a TLS 1.3 client's last flight is in, the server sends nothing of its own
        (its session tickets wait); its first write carries them, and the client can
        then resume.
        """
        layer, app, transport = self.serve()
        client = self.client.clientConnection()
        self.handshake(layer, transport, client)
        self.assertEqual(client.get_protocol_version_name(), "TLSv1.3")
        self.assertEqual(transport.value(), b"")
        layer.write(b"hello")
        client.bio_write(drain(transport))
        self.assertEqual(read(client), b"hello")
        session = client.get_session()
        client.shutdown()

        again, _, againTransport = self.serve()
        second = self.client.clientConnection()
        second.set_session(session)
        self.handshake(again, againTransport, second)
        self.assertTrue(resumed(second))

    def test_tls12FlightAtOnce(self) -> None:
        """
        With a TLS 1.2 client the server's last flight (its Finished) goes at once,
        with no application write: only TLS 1.3 tickets wait.
        """
        layer, app, transport = self.serve()
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_max_proto_version(SSL.TLS1_2_VERSION)
        context.use_certificate_file(self.mesh.crt("frontend"))
        context.use_privatekey_file(self.mesh.key("frontend"))
        client = SSL.Connection(context, None)
        client.set_connect_state()
        self.handshake(layer, transport, client)
        self.assertEqual(client.get_protocol_version_name(), "TLSv1.2")
        self.assertTrue(app.handshaken)

    def test_clientFinishedAtOnce(self) -> None:
        """
        A client L{TLSLayer} sends its last flight as soon as the server's arrives,
        with nothing written by its application (the server's handshake completes).
        """
        server = SSL.Connection(self.server.material.context, None)
        server.set_accept_state()
        factory = TLSLayerFactory(_Creator(self.client), True, Factory.forProtocol(Application), clock=self.clock)
        if self.layer is not None:
            factory.protocol = self.layer
        layer = factory.buildProtocol(None)
        transport = StringTransport()
        layer.makeConnection(transport)
        serverDone = False
        for _ in range(10):
            data = drain(transport)
            if data:
                server.bio_write(data)
            try:
                server.do_handshake()
                serverDone = True
            except SSL.WantReadError:
                pass
            back = pull(server)
            if back:
                layer.dataReceived(back)
            if serverDone:
                break
        self.assertTrue(serverDone)
        self.assertTrue(layer.wrappedProtocol.handshaken)


    def test_recordsSplitAcrossReads(self) -> None:
        """
        Records cut anywhere by TCP are delivered once whole: a record and a half,
        then the rest, byte by byte.
        """
        layer, app, transport = self.serve()
        client = self.client.clientConnection()
        self.handshake(layer, transport, client)
        client.send(b"first record")
        client.send(b"second record")
        wire = pull(client)
        cut = len(wire) // 2 + 7
        layer.dataReceived(wire[:cut])
        self.assertEqual(app.received, [b"first record"])
        for i in range(cut, len(wire)):
            layer.dataReceived(wire[i:i + 1])
        self.assertEqual(app.received, [b"first record", b"second record"])

    def test_endWithoutCloseNotify(self) -> None:
        """
        A client whose TCP connection ends without close_notify (as most do) is lost
        as Twisted reports it: C{ConnectionLost}, after what it sent is delivered.
        """
        layer, app, transport = self.serve()
        client = self.client.clientConnection()
        self.handshake(layer, transport, client)
        client.send(b"last words")
        layer.dataReceived(pull(client))
        layer.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(app.received, [b"last words"])
        self.assertIsInstance(app.lost.value, ConnectionLost)

    def test_closeNotify(self) -> None:
        """
        A client's close_notify is answered with ours and the TCP connection is
        closed; the application then loses its connection for the transport's reason.
        """
        layer, app, transport = self.serve()
        client = self.client.clientConnection()
        self.handshake(layer, transport, client)
        layer.write(b"x")
        client.bio_write(drain(transport))
        read(client)
        client.shutdown()
        layer.dataReceived(pull(client))
        self.assertTrue(transport.disconnecting)
        client.bio_write(drain(transport))
        self.assertRaises(SSL.ZeroReturnError, client.recv, 10)
        layer.connectionLost(Failure(ConnectionDone()))
        self.assertIsInstance(app.lost.value, ConnectionDone)

    def test_corruptRecord(self) -> None:
        """
        A record that does not decrypt ends the connection with OpenSSL's error, an
        alert sent, nothing delivered.
        """
        layer, app, transport = self.serve()
        client = self.client.clientConnection()
        self.handshake(layer, transport, client)
        client.send(b"GET / HTTP/1.1\r\n\r\n")
        wire = bytearray(pull(client))
        wire[-3] ^= 0xFF
        layer.dataReceived(bytes(wire))
        self.assertEqual(app.received, [])
        self.assertTrue(transport.disconnecting)
        self.assertNotEqual(transport.value(), b"")
        layer.connectionLost(Failure(ConnectionDone()))
        self.assertIsInstance(app.lost.value, SSL.Error)

    def test_writeBeforeHandshakeWaits(self) -> None:
        """
        A client layer's write before its handshake completes waits, and leaves once
        it has, whole and in order.
        """
        server = SSL.Connection(self.server.material.context, None)
        server.set_accept_state()
        factory = TLSLayerFactory(_Creator(self.client), True, Factory.forProtocol(Application), clock=self.clock)
        if self.layer is not None:
            factory.protocol = self.layer
        layer = factory.buildProtocol(None)
        transport = StringTransport()
        layer.makeConnection(transport)
        layer.write(b"early ")
        layer.writeSequence([b"bytes"])
        received = b""
        for _ in range(10):
            data = drain(transport)
            if data:
                server.bio_write(data)
            try:
                server.do_handshake()
            except SSL.WantReadError:
                pass
            received += read(server) if layer._handshakeDone else b""
            back = pull(server)
            if back:
                layer.dataReceived(back)
        self.assertEqual(received, b"early bytes")


class BindingTests(Fixture):
    """
    Which layer a connection gets when no test chooses it.
    """

    def test_usesTheBinding(self) -> None:
        """
        Where pyOpenSSL's binding is as expected (it is, with the pinned pyOpenSSL),
        every connection gets the L{TLSLayer} that calls it directly.
        """
        self.assertIsNotNone(_BINDING)
        layer, _, _ = self.serve()
        self.assertIs(type(layer), TLSLayer)


class PortableTLSLayerTests(TLSLayerTests):
    """
    The same, over L{PortableTLSLayer}, which every connection uses where
    pyOpenSSL's binding is not as L{TLSLayer} expects.
    """

    layer = PortableTLSLayer


@implementer(IOpenSSLClientConnectionCreator)
class _Creator:
    """
    Client connections on a material's client context.
    """

    def __init__(self, context: RotatingServerContext) -> None:
        self.context = context

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return self.context.clientConnection()


class ServerResumptionTests(Fixture):
    """
    A client that resumes a session is the client whose certificate was verified when
    the session was made; a rotation of our material ends every earlier session; a
    certificate that expired since is refused.
    """

    def session(self, layer: TLSLayer, transport: StringTransport, client: SSL.Connection) -> Any:
        """
        Handshake C{client} with C{layer}, read the server's first bytes (and its
        tickets), close cleanly and return the client's session.
        """
        self.handshake(layer, transport, client)
        layer.write(b"x")
        client.bio_write(drain(transport))
        read(client)
        client.shutdown()
        return client.get_session()

    def test_resumedIdentity(self) -> None:
        """
        On a resumed connection the server sees the certificate of the full handshake
        (the SPIFFE id it admits is the one verified then).
        """
        layer, _, transport = self.serve()
        session = self.session(layer, transport, self.client.clientConnection())
        again, _, againTransport = self.serve()
        client = self.client.clientConnection()
        client.set_session(session)
        self.handshake(again, againTransport, client)
        self.assertTrue(resumed(again.getHandle()))
        der = self.mesh.issued["frontend"].certificate.public_bytes(serialization.Encoding.DER)
        peer = again.getPeerCertificate().to_cryptography().public_bytes(serialization.Encoding.DER)
        self.assertEqual(peer, der)
        tls = MutualTLS(self.server, AllowPolicy.fromStrings([FRONTEND_ID]), self.clock)
        self.assertEqual((tls.admission(peer).principal, tls.admission(peer).allowed), (FRONTEND_ID, True))

    def test_rotationEndsResumption(self) -> None:
        """
        After our material rotates (here: a new trust bundle), a session from before
        is not resumed: the client gets a full handshake, verified again.
        """
        secret = KubernetesSecret(os.path.join(self.mesh.directory, "secret"))
        secret.update(open(self.mesh.crt("backend"), "rb").read(), open(self.mesh.key("backend"), "rb").read(),
                      self.mesh.ca.certificatePEM())
        rotating = RotatingServerContext(TLSFiles(secret.path("tls.crt"), secret.path("tls.key"),
                                                  secret.path("ca.crt")))
        layer, _, transport = self.serve(rotating)
        session = self.session(layer, transport, self.client.clientConnection())
        # The same CA plus another one: still trusted, but a new generation.
        secret.update(open(self.mesh.crt("backend"), "rb").read(), open(self.mesh.key("backend"), "rb").read(),
                      self.mesh.ca.certificatePEM() + self.mesh.otherCA.certificatePEM())
        self.assertTrue(rotating.check())
        again, app, againTransport = self.serve(rotating)
        client = self.client.clientConnection()
        client.set_session(session)
        self.handshake(again, againTransport, client)
        self.assertTrue(app.handshaken)
        self.assertFalse(resumed(again.getHandle()))

    def test_sessionsBelongToTheirContext(self) -> None:
        """
        A session is resumed only by the context that made it (the sessions are held
        by its cache): a context loaded from the same files (another worker, or the
        next generation) gives the client a full handshake.
        """
        layer, _, transport = self.serve()
        session = self.session(layer, transport, self.client.clientConnection())
        again, _, againTransport = self.serve()
        client = self.client.clientConnection()
        client.set_session(session)
        self.handshake(again, againTransport, client)
        self.assertTrue(resumed(client))
        other = RotatingServerContext(TLSFiles(self.mesh.crt("backend"), self.mesh.key("backend"), self.ca))
        third, app, thirdTransport = self.serve(other)
        client = self.client.clientConnection()
        client.set_session(session)
        self.handshake(third, thirdTransport, client)
        self.assertTrue(app.handshaken)
        self.assertFalse(resumed(client))

    def test_expiredSinceRefused(self) -> None:
        """
        A certificate past its end is refused by the admission, whatever the
        handshake (a resumed session is not checked again by OpenSSL).
        """
        tls = MutualTLS(self.server, AllowPolicy.fromStrings([FRONTEND_ID]), self.clock)
        certificate = self.mesh.issued["frontend"].certificate
        der = certificate.public_bytes(serialization.Encoding.DER)
        self.clock.advance(certificate.not_valid_after_utc.timestamp() - 1)
        self.assertTrue(tls.admission(der).allowed)
        self.clock.advance(1)
        refused = tls.admission(der)
        self.assertEqual((refused.principal, refused.allowed, refused.reason), (FRONTEND_ID, False, EXPIRED))


class SessionMemoryTests(Fixture):
    """
    L{SessionMemory}, the client's side: a session learnt from a verified connection is
    offered to the next one on the same client context only.
    """

    def learnt(self) -> SessionMemory:
        """
        A memory that learnt the session of one verified connection.
        """
        memory = SessionMemory()
        layer, _, transport = self.serve()
        client = self.client.clientConnection()
        self.handshake(layer, transport, client)
        layer.write(b"x")
        client.bio_write(drain(transport))
        read(client)
        memory.learn(client)
        client.shutdown()
        return memory

    def test_offered(self) -> None:
        """
        The next connection on the same context resumes.
        """
        memory = self.learnt()
        client = self.client.clientConnection()
        memory.offer(client)
        layer, _, transport = self.serve()
        self.handshake(layer, transport, client)
        self.assertTrue(resumed(client))

    def test_notAcrossRotation(self) -> None:
        """
        Once our client material rotates, the old session is not offered (and is
        forgotten): a full handshake.
        """
        memory = self.learnt()
        other = RotatingServerContext(TLSFiles(self.mesh.crt("frontend"), self.mesh.key("frontend"), self.ca))
        client = other.clientConnection()
        memory.offer(client)
        layer, _, transport = self.serve()
        self.handshake(layer, transport, client)
        self.assertFalse(resumed(client))
        self.assertIsNone(memory._session)

    def test_forget(self) -> None:
        """
        After L{SessionMemory.forget} nothing is offered.
        """
        memory = self.learnt()
        memory.forget()
        client = self.client.clientConnection()
        memory.offer(client)
        layer, _, transport = self.serve()
        self.handshake(layer, transport, client)
        self.assertFalse(resumed(client))


class ChainTests(unittest.TestCase):
    """
    The chain a context presents is decided once, at load: the certificate file's own,
    or the CA bundle's intermediates that lead to the leaf (what OpenSSL's automatic
    chain, built at every handshake, would send); never the root.
    """

    def setUp(self) -> None:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import NameOID

        from sidecar.certs import issue, makeCA, newKey

        self.directory = self.mktemp()
        os.makedirs(self.directory)
        now = datetime.datetime.now(datetime.timezone.utc)
        self.root = makeCA("cluster.local", now)
        def authority(name: x509.Name, key: Any, issuerName: x509.Name, issuerKey: Any, serial: int,
                      pathLength: int) -> x509.Certificate:
            return (x509.CertificateBuilder().subject_name(name).issuer_name(issuerName)
                    .public_key(key.public_key()).serial_number(serial)
                    .not_valid_before(now - datetime.timedelta(hours=1))
                    .not_valid_after(now + datetime.timedelta(days=1))
                    .add_extension(x509.BasicConstraints(ca=True, path_length=pathLength), critical=True)
                    .sign(issuerKey, hashes.SHA256()))

        # A root that may sign CAs, and an intermediate under it.
        rootKey = newKey()
        rootName = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chain root")])
        root = authority(rootName, rootKey, rootName, rootKey, 1, 1)
        middleKey = newKey()
        middleName = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chain intermediate")])
        middle = authority(middleName, middleKey, rootName, rootKey, 2, 0)
        from sidecar.certs import Issued

        self.chainRoot = Issued(root, rootKey)
        self.middle = Issued(middle, middleKey)
        self.underMiddle = issue(self.middle, [SERVER_ID_], now, dnsNames=["localhost"])
        self.underRoot = issue(self.root, [SERVER_ID_], now, dnsNames=["localhost"])

    def write(self, name: str, data: bytes) -> str:
        """
        Write C{data} to file C{name} in the test's directory; return its path.
        """
        path = os.path.join(self.directory, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def presented(self, leaf: Any, bundle: bytes, trusted: bytes) -> List[Any]:
        """
        The certificates a server with C{leaf} (file holding the leaf only) and CA
        bundle C{bundle} presents to a client trusting C{trusted}, after a verified
        handshake.
        """
        files = TLSFiles(self.write("leaf.crt", leaf.certificatePEM()), self.write("leaf.key", leaf.keyPEM()),
                         self.write("bundle.crt", bundle))
        server = SSL.Connection(RotatingServerContext(files).material.context, None)
        server.set_accept_state()
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.load_verify_locations(self.write("trusted.crt", trusted))
        context.set_verify(SSL.VERIFY_PEER)
        client = SSL.Connection(context, None)
        client.set_connect_state()
        done = False
        for _ in range(6):
            try:
                client.do_handshake()
                done = True
            except SSL.WantReadError:
                pass
            data = pull(client)
            if data:
                server.bio_write(data)
            try:
                server.do_handshake()
            except (SSL.WantReadError, SSL.Error):
                pass
            data = pull(server)
            if data:
                client.bio_write(data)
        self.assertTrue(done)
        return [c.to_cryptography() for c in client.get_peer_cert_chain()]

    def test_intermediateFromTheBundle(self) -> None:
        """
        A leaf file without its chain, issued by an intermediate that is in the CA
        bundle: the intermediate is presented (a client trusting only the root
        verifies), the root is not.
        """
        bundle = self.chainRoot.certificatePEM() + self.middle.certificatePEM()
        chain = self.presented(self.underMiddle, bundle, self.chainRoot.certificatePEM())
        self.assertEqual(chain, [self.underMiddle.certificate, self.middle.certificate])

    def test_leafUnderTheRoot(self) -> None:
        """
        A leaf issued by the root itself is presented alone.
        """
        chain = self.presented(self.underRoot, self.root.certificatePEM(), self.root.certificatePEM())
        self.assertEqual(chain, [self.underRoot.certificate])
