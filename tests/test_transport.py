# -*- test-case-name: tests.test_transport -*-
"""
L{sidecar.transport.prepare}: optimistic writes on real loopback sockets.
"""

from __future__ import annotations

import socket

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial import unittest

from sidecar.transport import BUFFER_SIZE, prepare
from tests.support import waitUntil


class _Server(Protocol):
    def connectionMade(self) -> None:
        self.factory.made.append(self)


class PrepareTests(unittest.TestCase):
    """
    A prepared plain TCP transport sends at once, keeps order behind buffered data, and
    is tuned; a TLS layer's TCP transport gets the same sends.
    """

    @defer.inlineCallbacks
    def connected(self):
        factory = Factory.forProtocol(_Server)
        factory.made = []
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        peer = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(peer.close)
        yield waitUntil(lambda: factory.made)
        server = factory.made[0]
        self.addCleanup(server.transport.abortConnection)
        peer.settimeout(2)
        return server.transport, peer

    @defer.inlineCallbacks
    def test_sendsAtOnce(self):
        """
        C{write} and C{writeSequence} reach the peer before the reactor runs again, and
        the transport reads C{BUFFER_SIZE} at a time with Nagle off.
        """
        transport, peer = yield self.connected()
        write, writeSequence = prepare(transport)
        write(b"head ")
        writeSequence([b"a", b"", b"bc"])
        received = b""
        while len(received) < 8:
            received += peer.recv(100)
        self.assertEqual(received, b"head abc")
        self.assertEqual(transport.bufferSize, BUFFER_SIZE)
        self.assertEqual(transport.getTcpNoDelay(), 1)

    @defer.inlineCallbacks
    def test_orderBehindBuffered(self):
        """
        Behind bytes the transport still holds, a write waits its turn.
        """
        transport, peer = yield self.connected()
        write, writeSequence = prepare(transport)
        transport.write(b"first ")  # Twisted's own, buffered until the next poll
        write(b"second ")
        writeSequence([b"third"])
        self.assertEqual(transport._tempDataLen, len(b"first second third"), "all queued behind")
        peer.setblocking(False)
        received = b""
        for _ in range(200):
            if len(received) >= 18:
                break
            yield deferLater(reactor, 0.01, lambda: None)
            try:
                received += peer.recv(100)
            except BlockingIOError:
                pass
        self.assertEqual(received, b"first second third")

    @defer.inlineCallbacks
    def test_tlsLayer(self):
        """
        For a layer over TCP (as TLS is), the layer's own methods are returned and the
        TCP transport under it is given the direct sends, once.
        """
        transport, peer = yield self.connected()

        class Layer:
            def __init__(self, inner):
                self.transport = inner

            def write(self, data):
                self.transport.write(b"[" + data + b"]")

            def writeSequence(self, parts):
                self.write(b"".join(parts))

        layer = Layer(transport)
        write, writeSequence = prepare(layer)
        installed = transport.write
        prepare(layer)
        self.assertIs(transport.write, installed)
        write(b"record")
        self.assertEqual(peer.recv(100), b"[record]")
