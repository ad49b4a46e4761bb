# -*- test-case-name: tests.test_compat -*-
"""
L{sidecar.compat}: the Twisted internals the sidecar reads are there, and mean
what it takes them to mean, on the Twisted installed; and the dependency's
upper bound is the release they were checked against.
"""

from __future__ import annotations

import re
import socket

import twisted
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, reactor
from twisted.internet.abstract import FileDescriptor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from sidecar.compat import PRIVATE_ATTRIBUTES, TESTED_TWISTED, listeningPort, writeQueueEmpty
from twisted.python.filepath import FilePath

from tests.support import ROOT, waitUntil


class _Server(Protocol):
    def connectionMade(self) -> None:
        self.factory.made.append(self)


class PrivateAttributeTests(unittest.TestCase):
    """
    Each private attribute named in L{sidecar.compat} on the installed Twisted.
    """

    def test_attributesExist(self) -> None:
        """
        Every attribute in L{PRIVATE_ATTRIBUTES} exists on a fresh instance of
        its class (a Twisted release that renames one fails here, in CI).
        """
        instances = {
            FileDescriptor: FileDescriptor(reactor),
            StreamServerEndpointService: StreamServerEndpointService(
                TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), Factory()),
        }
        for cls, names in PRIVATE_ATTRIBUTES.items():
            for name in names:
                holder = instances.get(cls, cls)
                self.assertTrue(hasattr(holder, name), f"{cls.__qualname__}.{name} is gone")

    def test_upperBound(self) -> None:
        """
        The installed Twisted is the release checked (L{TESTED_TWISTED}), and
        the package declares Twisted below the next minor release.
        """
        installed = tuple(int(part) for part in twisted.__version__.split(".")[:2])
        self.assertEqual(installed, TESTED_TWISTED, twisted.__version__)
        pyproject = FilePath(ROOT).child("pyproject.toml").getContent().decode()
        major, minor = TESTED_TWISTED
        self.assertRegex(pyproject, re.escape(f'"twisted[tls]>={major}.{minor},<{major}.{minor + 1}"'))

    @defer.inlineCallbacks
    def test_writeQueueEmpty(self):
        """
        On a real loopback connection the check says true while Twisted holds
        nothing, false once a write is buffered or a close is pending.
        """
        factory = Factory.forProtocol(_Server)
        factory.made = []
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        peer = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(peer.close)
        yield waitUntil(lambda: factory.made)
        transport = factory.made[0].transport
        self.addCleanup(transport.abortConnection)
        idle = writeQueueEmpty(transport)
        self.assertTrue(idle())
        transport.write(b"queued")
        self.assertFalse(idle())
        yield waitUntil(lambda: idle())
        transport.loseConnection()
        self.assertFalse(idle())

    def test_writeQueueEmptyWithoutTheAttributes(self) -> None:
        """
        For a transport without Twisted's internals the check always says
        false, so every write takes the transport's own buffered path.
        """
        self.assertFalse(writeQueueEmpty(object())())

    @defer.inlineCallbacks
    def test_listeningPort(self):
        """
        A started listener service gives the port it opened, with the port the
        kernel chose for port 0; one never started gives L{None}.
        """
        service = StreamServerEndpointService(
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), Factory())
        self.assertIsNone(listeningPort(service))
        service.startService()
        self.addCleanup(service.stopService)
        got: defer.Deferred = defer.Deferred()

        def keep(port):
            got.callback(port)
            return port

        listeningPort(service).addCallback(keep)
        port = yield got
        self.assertNotEqual(port.getHost().port, 0)
        self.assertEqual(port.getHost().host, "127.0.0.1")


class ListenErrorTests(unittest.TestCase):
    """
    The listeners report a port they cannot open at once, through the public
    L{twisted.application.strports.service}, so C{twistd} stops at start-up.
    """

    def test_portInUse(self):
        """
        Starting the sidecar's service on a port already taken raises
        L{CannotListenError} synchronously, from C{privilegedStartService}.
        """
        from twisted.internet.error import CannotListenError

        from sidecar.service import makeService
        from sidecar.tap import Options

        taken = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        options = Options()
        options.parseOptions(["--listen", f"tcp:{taken.getHost().port}:interface=127.0.0.1",
                              "--admin", "none", "--access-log", "none"])
        service = makeService(options["config"], reactor)
        self.assertRaises(CannotListenError, service.privilegedStartService)


class H2TuningTests(unittest.SynchronousTestCase):
    """
    The uses of h2's and hyperframe's internals in L{tuneH2Connection}.
    """

    def test_frameReprText(self) -> None:
        """
        For empty, short, 10-, 11- and 16384-byte bodies the trimmed helper's text is
        hyperframe's; hyperframe still has the helper it replaces, and a tuned
        connection leaves hyperframe using it, so a DATA frame's repr reads as before.
        """
        import binascii
        import os

        import hyperframe.frame
        from h2.config import H2Configuration
        from h2.connection import H2Connection

        from sidecar.compat import _rawDataRepr, tuneH2Connection

        def original(data: object) -> str:
            if not data:
                return "None"
            r = binascii.hexlify(data).decode("ascii")  # type: ignore[arg-type]
            if len(r) > 20:
                r = r[:20] + "..."
            return "<hex:" + r + ">"
        for data in (b"", b"ab", b"0123456789", b"0123456789a", os.urandom(16384)):
            self.assertEqual(_rawDataRepr(data), original(data))
        tuneH2Connection(H2Connection(H2Configuration()))
        self.assertIs(hyperframe.frame._raw_data_repr, _rawDataRepr)
        frame = hyperframe.frame.DataFrame(1, b"\x01" * 16384)
        self.assertEqual(repr(frame), "DataFrame(stream_id=1, flags=[]): <hex:01010101010101010101...>")

    def test_plainLiterals(self) -> None:
        """
        A tuned connection's HEADERS carry literals without Huffman coding (the H bit
        of every string clear), still indexed, and decode to the same header list;
        without the tuning h2 Huffman-codes them.
        """
        from h2.config import H2Configuration
        from h2.connection import H2Connection
        from hpack import Decoder
        from sidecar.compat import PlainEncoder, tuneH2Connection

        headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/p"),
                   (b":authority", b"svc"), (b"x-thing", b"some value")]

        config = H2Configuration(client_side=True, header_encoding=None)
        tuned = tuneH2Connection(H2Connection(config))
        self.assertIsInstance(tuned.encoder, PlainEncoder)
        tuned.initiate_connection()
        tuned.clear_outbound_data_buffer()
        tuned.send_headers(1, headers, end_stream=True)
        plain = tuned.data_to_send()[9:]
        stock = H2Connection(config)
        stock.initiate_connection()
        stock.clear_outbound_data_buffer()
        stock.send_headers(1, headers, end_stream=True)
        huffman = stock.data_to_send()[9:]
        self.assertIn(b"some value", plain)
        self.assertIn(b"/p", plain)
        self.assertNotIn(b"some value", huffman)
        self.assertEqual(Decoder().decode(plain, raw=True), headers)
        self.assertEqual(Decoder().decode(huffman, raw=True), headers)
        # Indexed all the same: the second identical head is one byte a field.
        tuned.send_headers(3, headers, end_stream=True)
        self.assertEqual(len(tuned.data_to_send()) - 9, len(headers))
