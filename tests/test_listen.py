# -*- test-case-name: tests.test_listen -*-
"""
The sidecar's accept loop and accepted transports (L{sidecar.listen}), on real
sockets and the real reactor.
"""

from __future__ import annotations

import errno
import socket
from typing import Any, List

from twisted.internet import address, defer, reactor, tcp
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from sidecar.config import ProxyConfig, UpstreamConfig
from sidecar.detect import HTTP1, TCP, DetectingFactory
from sidecar.listen import FastPort, FastServer, speedUp
from sidecar.service import SidecarService
from tests.support import Upstream
from tests.test_newconn import CLOSING_GET, CountingClock, Recorded, deferLater, waitFor, whenListening


class Kept(Protocol):
    """
    A server protocol that keeps what it is given, and answers C{b"ok"} to each read
    when told to.
    """

    def __init__(self, addr: Any, answer: bytes = b"") -> None:
        self.addr = addr
        self.answer = answer
        self.received: List[bytes] = []
        self.lost: List[Any] = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        if self.answer:
            self.transport.write(self.answer)

    def connectionLost(self, reason: Any) -> None:
        self.lost.append(reason)


class KeptFactory(Factory):
    noisy = False

    def __init__(self, answer: bytes = b"") -> None:
        self.answer = answer
        self.built: List[Kept] = []

    def buildProtocol(self, addr: Any) -> Kept:
        proto = Kept(addr, self.answer)
        self.built.append(proto)
        return proto


def readAll(sock: socket.socket) -> bytes:
    """
    What C{sock} receives until the peer closes (blocking, with the socket's timeout).
    """
    got = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(got)
        got.append(data)


class FastPortTests(unittest.TestCase):
    """
    A Twisted port made a L{FastPort}.
    """

    def listen(self, factory: Any, interface: str = "127.0.0.1") -> Any:
        port = reactor.listenTCP(0, factory, interface=interface)
        self.addCleanup(port.stopListening)
        self.assertIs(speedUp(port), port)
        self.assertIs(type(port), FastPort)
        return port

    def client(self, port: Any, family: int = socket.AF_INET, host: str = "127.0.0.1") -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect((host, port.getHost().port))
        self.addCleanup(sock.close)
        return sock

    @defer.inlineCallbacks
    def test_acceptsEveryWaitingClient(self) -> None:
        """
        Clients that connected while the port was not reading are all accepted in
        one turn, each with its own L{FastServer} and the address it came from.
        """
        factory = KeptFactory()
        port = self.listen(factory)
        port.stopReading()
        clients = [self.client(port) for _ in range(5)]
        for i, sock in enumerate(clients):
            sock.sendall(b"hello %d" % i)
        yield deferLater(0.05)
        port.startReading()
        yield waitFor(lambda: len(factory.built) == 5 and all(p.received for p in factory.built))
        ports = sorted(sock.getsockname()[1] for sock in clients)
        self.assertEqual(sorted(p.addr.port for p in factory.built), ports)
        for proto in factory.built:
            self.assertIs(type(proto.transport), FastServer)
            self.assertEqual(proto.addr, address.IPv4Address("TCP", "127.0.0.1", proto.addr.port))
            self.assertEqual(proto.transport.getPeer(), proto.addr)
            self.assertEqual(proto.transport.getHost(), port.getHost())
        self.assertEqual(sorted(b"".join(p.received) for p in factory.built), [b"hello %d" % i for i in range(5)])

    @defer.inlineCallbacks
    def test_ipv6(self) -> None:
        """
        An IPv6 listener gives L{address.IPv6Address}es, as Twisted's loop does.
        """
        try:
            port = self.listen(KeptFactory(), interface="::1")
        except Exception as e:  # pragma: no cover
            raise unittest.SkipTest(f"no IPv6 loopback: {e}")
        factory = port.factory
        sock = self.client(port, socket.AF_INET6, "::1")
        sock.sendall(b"x")
        yield waitFor(lambda: factory.built and factory.built[0].received)
        [proto] = factory.built
        self.assertEqual(proto.addr, address.IPv6Address("TCP", "::1", sock.getsockname()[1]))
        self.assertIs(type(proto.transport), FastServer)
        self.assertEqual(proto.transport.getPeer(), proto.addr)

    @defer.inlineCallbacks
    def test_noDelayInherited(self) -> None:
        """
        The accepted socket has C{TCP_NODELAY} from the listening socket, and asking
        for it again makes no system call.
        """
        factory = KeptFactory()
        port = self.listen(factory)
        self.assertTrue(port.noDelay)
        self.client(port).sendall(b"x")
        yield waitFor(lambda: factory.built)
        transport = factory.built[0].transport
        self.assertTrue(transport.getTcpNoDelay())
        calls = []
        transport.socket = _Recording(transport.socket, calls)
        transport.setTcpNoDelay(True)
        self.assertEqual(calls, [])
        transport.setTcpNoDelay(False)
        self.assertEqual(calls, ["setsockopt"])
        self.assertFalse(transport.getTcpNoDelay())

    @defer.inlineCallbacks
    def test_closeSendsFin(self) -> None:
        """
        A close after a write sends everything then an orderly FIN (the client reads
        its bytes and then the end), without C{shutdown()}; the protocol is told.
        """
        factory = KeptFactory(answer=b"ok")
        port = self.listen(factory)
        sock = self.client(port)
        sock.sendall(b"x")
        yield waitFor(lambda: factory.built and factory.built[0].received)
        proto = factory.built[0]
        calls: List[str] = []
        proto.transport.socket = _Recording(proto.transport.socket, calls)
        proto.transport.loseConnection()
        yield waitFor(lambda: proto.lost)
        self.assertNotIn("shutdown", calls)
        self.assertIn("close", calls)
        sock.setblocking(True)
        self.assertEqual(readAll(sock), b"ok")

    @defer.inlineCallbacks
    def test_abortResets(self) -> None:
        """
        An aborted connection is reset (RST), as Twisted's are.
        """
        factory = KeptFactory()
        port = self.listen(factory)
        sock = self.client(port)
        sock.sendall(b"x")
        yield waitFor(lambda: factory.built and factory.built[0].received)
        proto = factory.built[0]
        proto.transport.abortConnection()
        yield waitFor(lambda: proto.lost)
        sock.setblocking(True)
        with self.assertRaises(ConnectionResetError):
            readAll(sock)

    @defer.inlineCallbacks
    def test_closeAtOnceLeavesReactor(self) -> None:
        """
        A transport closed by C{connectionLost} directly (the fast door's close at
        once) is no longer among the reactor's readers or writers.
        """
        factory = KeptFactory()
        port = self.listen(factory)
        sock = self.client(port)
        sock.sendall(b"x")
        yield waitFor(lambda: factory.built and factory.built[0].received)
        transport = factory.built[0].transport
        self.assertIn(transport, reactor.getReaders())
        transport.startWriting()
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        transport.connectionLost(Failure(ConnectionDone()))
        self.assertNotIn(transport, reactor.getReaders())
        self.assertNotIn(transport, reactor.getWriters())
        self.assertEqual(len(factory.built[0].lost), 1)
        # A second call is ignored, as Twisted's is.
        transport.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(factory.built[0].lost), 1)
        sock.setblocking(True)
        self.assertEqual(readAll(sock), b"")

    @defer.inlineCallbacks
    def test_acceptErrorToTwisted(self) -> None:
        """
        An accept error other than "no more clients" goes to Twisted's own loop,
        which meets it again and deals with it (here: an aborted connection is
        skipped), and the clients after it are accepted.
        """
        factory = KeptFactory()
        port = self.listen(factory)
        port.stopReading()
        sock = self.client(port)
        sock.sendall(b"y")
        yield deferLater(0.05)
        real = port.socket
        failing = _FailOnce(real, errno.ECONNABORTED)
        port.socket = failing
        self.addCleanup(setattr, port, "socket", real)
        port.startReading()
        yield waitFor(lambda: factory.built and factory.built[0].received)
        self.assertEqual(failing.failed, 1)
        self.assertEqual(factory.built[0].received, [b"y"])
        # Twisted's loop built this one (a tcp.Server), and the port stays fast.
        self.assertIs(type(port), FastPort)

    def test_othersLeftAlone(self) -> None:
        """
        A port that is not exactly Twisted's TCP port keeps its own loop.
        """

        class Mine(tcp.Port):
            pass

        port = Mine(0, KeptFactory(), interface="127.0.0.1", reactor=reactor)
        port.startListening()
        self.addCleanup(port.stopListening)
        self.assertIs(speedUp(port), port)
        self.assertIs(type(port), Mine)

    @defer.inlineCallbacks
    def test_stopListening(self) -> None:
        """
        A fast port stops accepting when it stops listening (drain), and its open
        connections stay open.
        """
        factory = KeptFactory(answer=b"ok")
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        speedUp(port)
        number = port.getHost().port
        sock = self.client(port)
        sock.sendall(b"x")
        yield waitFor(lambda: factory.built and factory.built[0].received)
        yield port.stopListening()
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", number), timeout=2).close()
        self.assertEqual(sock.recv(10), b"ok")
        factory.built[0].transport.loseConnection()


class FastServerTests(unittest.TestCase):
    """
    L{FastServer} against Twisted's C{tcp.Server}.
    """

    def test_sameAttributes(self) -> None:
        """
        A L{FastServer} holds every attribute a stock C{tcp.Server} sets when built
        (a Twisted that adds one fails here), with the same values but for the two
        strings formatted when read.
        """
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        listening.listen(2)
        self.addCleanup(listening.close)
        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        built = []
        for cls in (tcp.Server, FastServer):
            client = socket.create_connection(listening.getsockname())
            self.addCleanup(client.close)
            skt, addr = listening.accept()
            transport = cls(skt, Protocol(), addr, port, 7, reactor)
            self.addCleanup(transport.connectionLost, _done())
            built.append(transport)
        stock, fast = built
        self.assertEqual(set(vars(stock)) - {"logstr", "repstr"}, set(vars(fast)))
        self.assertEqual((fast.logstr, fast.repstr), (stock.logstr, stock.repstr))
        self.assertEqual(repr(fast), repr(stock))
        self.assertEqual(fast.logPrefix(), stock.logPrefix())
        self.assertIn(fast, reactor.getReaders())
        self.assertEqual(fast.socket.gettimeout(), 0.0)

    @defer.inlineCallbacks
    def test_writeNowPartial(self) -> None:
        """
        What the kernel does not take of an at-once write is queued by Twisted, and
        later writes wait behind it: the peer gets every byte in order.
        """
        factory = KeptFactory()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        speedUp(port)
        sock = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
        self.addCleanup(sock.close)
        sock.sendall(b"x")
        sock.setblocking(False)
        yield waitFor(lambda: factory.built and factory.built[0].received)
        transport = factory.built[0].transport
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        write, writeSequence = transport.writers(128 * 1024)
        big = bytes(range(256)) * 4096  # 1 MiB
        write(big)
        self.assertTrue(transport._tempDataLen or transport.dataBuffer)
        writeSequence([b"<", b"tail", b">"])
        write(b"!")
        transport.loseConnection()
        got = []

        def drain() -> bool:
            try:
                while True:
                    data = sock.recv(65536)
                    if not data:
                        return True
                    got.append(data)
            except BlockingIOError:
                return False

        yield waitFor(drain, timeout=10)
        self.assertEqual(b"".join(got), big + b"<tail>!")


class FastListenerServiceTests(unittest.TestCase):
    """
    The sidecar's proxied listeners are fast ports; connection-per-request clients
    are served through them.
    """

    @defer.inlineCallbacks
    def test_servedThroughFastPort(self) -> None:
        upstream = Upstream()
        upstreamPort = upstream.start(self)
        config = ProxyConfig(listen="tcp:0:interface=127.0.0.1", admin=None, health=None, accessLog=None,
                             upstream=UpstreamConfig(port=upstreamPort))
        service = SidecarService(config, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        port = yield whenListening(service.listeners[0])
        self.assertIs(type(port), FastPort)
        self.assertEqual(port.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN), 1)
        for _ in range(5):
            sock = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
            self.addCleanup(sock.close)
            sock.sendall(CLOSING_GET)
            response = yield _readInThread(sock)
            self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response[:40])
            self.assertTrue(response.endswith(b"\r\n\r\nxxxxx"), response[-40:])
        self.assertEqual(upstream.connections, 1)
        yield waitFor(lambda: service.recorder.downstreamConnectionsActive == 0)


class FirstBytesAtAcceptFastTests(unittest.TestCase):
    """
    Detection's read at accept on a L{FastServer}.
    """

    @defer.inlineCallbacks
    def test_bytesAlreadyThere(self) -> None:
        clock = CountingClock()
        built: List[Recorded] = []

        def route(detector: Any) -> Recorded:
            proto = Recorded(detector)
            built.append(proto)
            return proto

        port = reactor.listenTCP(0, DetectingFactory({HTTP1: route, TCP: route}, clock, 1.0), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        speedUp(port)
        port.stopReading()
        sock = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
        self.addCleanup(sock.close)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        yield deferLater(0.05)
        port.startReading()
        yield waitFor(lambda: built)
        self.assertEqual((built[0].how, b"".join(built[0].received)), (HTTP1, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
        self.assertEqual(clock.started, 0)


class _Recording:
    """
    A socket that records the names of the methods called on it.
    """

    def __init__(self, sock: Any, calls: List[str]) -> None:
        self._sock = sock
        self._calls = calls

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._sock, name)
        if callable(attribute):
            def call(*args: Any, **kwargs: Any) -> Any:
                self._calls.append(name)
                return attribute(*args, **kwargs)
            return call
        return attribute


class _FailOnce:
    """
    A listening socket whose first accept fails with C{code}.
    """

    def __init__(self, sock: socket.socket, code: int) -> None:
        self._sock = sock
        self._code = code
        self.failed = 0

    def _fail(self) -> None:
        if not self.failed:
            self.failed += 1
            raise OSError(self._code, "test")

    def _accept(self) -> Any:
        self._fail()
        return self._sock._accept()

    def accept(self) -> Any:
        return self._sock.accept()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _done() -> Any:
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    return Failure(ConnectionDone())


def _readInThread(sock: socket.socket) -> defer.Deferred:
    from twisted.internet.threads import deferToThread

    return deferToThread(readAll, sock)

