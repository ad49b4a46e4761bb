# -*- test-case-name: tests.test_newconn -*-
"""
A new connection per request, through the whole inbound path (listener, protocol
detection, the fast door, the pool): what each connection leaves behind once closed.
Real sockets on 127.0.0.1, the real reactor, a real upstream.
"""

from __future__ import annotations

import gc
import socket
from typing import Any, List

import httptools
from twisted.internet import defer, reactor, tcp
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.trial import unittest

from sidecar.compat import listeningPort
from sidecar.config import ProxyConfig, UpstreamConfig
from sidecar.detect import HTTP1, TCP, DetectingFactory
from sidecar.service import SidecarService
from tests.support import Upstream, rawRequest

#: The types of a client connection's objects on the proxy's side that are not sidecar's.
SERVER_SIDE = (tcp.Server, httptools.HttpRequestParser)

CLOSING_GET = b"GET /bytes/5 HTTP/1.1\r\nHost: example\r\nConnection: close\r\n\r\n"


class NewConnectionTests(unittest.TestCase):
    """
    Connections that carry one request each and close.
    """

    @defer.inlineCallbacks
    def startSidecar(self) -> Any:
        upstream = Upstream()
        upstreamPort = upstream.start(self)
        config = ProxyConfig(listen="tcp:0:interface=127.0.0.1", admin=None, health=None, accessLog=None,
                             upstream=UpstreamConfig(port=upstreamPort))
        service = SidecarService(config, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        port = yield whenListening(service.listeners[0])
        return service, upstream, port.getHost().port

    @defer.inlineCallbacks
    def test_noCyclesLeftBehind(self) -> None:
        """
        A closed client connection is freed by reference counting alone: none of its
        objects (the detector, the door, its parser, the transport, the socket) is left
        in a reference cycle for the garbage collector, whose collections would
        otherwise cost every new connection.  The upstream connection is pooled and
        reused for every request.
        """
        service, upstream, port = yield self.startSidecar()
        for _ in range(3):
            client = yield rawRequest(port, CLOSING_GET)
            self.assertEqual(client.responses[0].status, 200)
        gc.collect()
        wasEnabled = gc.isenabled()
        gc.disable()
        self.addCleanup(lambda: gc.enable() if wasEnabled else None)
        for _ in range(20):
            client = yield rawRequest(port, CLOSING_GET)
            self.assertEqual((client.responses[0].status, client.responses[0].body), (200, b"xxxxx"))
        # Let the proxy see every close.
        for _ in range(50):
            if service.recorder.downstreamConnectionsActive == 0:
                break
            yield deferLater(0.02)
        self.assertEqual(service.recorder.downstreamConnectionsActive, 0)
        self.assertEqual(len(service.engine.doors), 0)
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            # The proxy's side only (the test's own client lives in cycles of its own).
            left = [type(o).__name__ for o in gc.garbage
                    if type(o).__module__.startswith("sidecar.") or type(o) in SERVER_SIDE]
        finally:
            gc.set_debug(0)
            del gc.garbage[:]
        self.assertEqual(left, [])
        self.assertEqual(upstream.connections, 1)


def deferLater(seconds: float) -> defer.Deferred:
    """
    A Deferred that fires after C{seconds} on the real reactor.
    """
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)

    @defer.inlineCallbacks
    def test_acceptLoggerKept(self) -> None:
        """
        The listening port keeps one logger, the one Twisted's class-level descriptor
        builds (same namespace, same observer), instead of a new one per accept.
        """
        service, upstream, number = yield self.startSidecar()
        port = yield whenListening(service.listeners[0])
        self.assertIn("_logger", vars(port))
        built = vars(tcp.Port)["_logger"].__get__(port, type(port))
        self.assertEqual((port._logger.namespace, port._logger.observer, port._logger.source),
                         (built.namespace, built.observer, port))
        self.assertIs(port._logger, port._logger)


def whenListening(listener: Any) -> defer.Deferred:
    """
    The listening port of a listener service, read without consuming its Deferred.
    """
    got: defer.Deferred = defer.Deferred()

    def seen(port: Any) -> Any:
        got.callback(port)
        return port

    listeningPort(listener).addCallback(seen)
    return got


class Recorded(Protocol):
    """
    The protocol a route builds in these tests: it keeps what it is given.
    """

    def __init__(self, detector: Any) -> None:
        self.how = detector.how
        self.received: List[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)


class CountingClock(Clock):
    """
    A clock that counts the timers ever started on it.
    """

    started = 0

    def callLater(self, *args: Any, **kwargs: Any) -> Any:
        self.started += 1
        return Clock.callLater(self, *args, **kwargs)


class FirstBytesAtAcceptTests(unittest.TestCase):
    """
    A detecting listener reads a new connection's first bytes when it accepts it.
    """

    def listen(self) -> Any:
        clock = CountingClock()
        built: List[Recorded] = []

        def route(detector: Any) -> Recorded:
            proto = Recorded(detector)
            built.append(proto)
            return proto

        factory = DetectingFactory({HTTP1: route, TCP: route}, clock, 1.0)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port, clock, built

    def client(self, port: Any) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
        self.addCleanup(sock.close)
        return sock

    @defer.inlineCallbacks
    def test_bytesAlreadyThere(self) -> None:
        """
        When the client's request line is in the socket by the time the listener
        accepts (the listener paused while the client connects and sends), the
        connection is decided during the accept: its protocol has the bytes, and no
        detection timer was ever started.
        """
        port, clock, built = self.listen()
        port.stopReading()
        sock = self.client(port)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        yield deferLater(0.05)
        port.startReading()
        yield waitFor(lambda: built)
        [proto] = built
        self.assertEqual((proto.how, b"".join(proto.received)), (HTTP1, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
        self.assertEqual(clock.started, 0)

    @defer.inlineCallbacks
    def test_silentAtAccept(self) -> None:
        """
        A client that has sent nothing when it is accepted gets the detection timer,
        and is decided by its bytes when they come (the timer then cancelled), or by
        the timer when they do not.
        """
        port, clock, built = self.listen()
        sock = self.client(port)
        yield waitFor(lambda: clock.getDelayedCalls())
        self.assertEqual(built, [])
        sock.sendall(b"GET / HTTP/1.1\r\n")
        yield waitFor(lambda: built)
        self.assertEqual([p.how for p in built], [HTTP1])
        self.assertEqual((clock.started, clock.getDelayedCalls()), (1, []))
        quiet = self.client(port)
        yield waitFor(lambda: clock.getDelayedCalls())
        clock.advance(1.0)
        self.assertEqual([p.how for p in built], [HTTP1, "timeout"])
        quiet.close()

    @defer.inlineCallbacks
    def test_closedBeforeAccept(self) -> None:
        """
        A client that connected and closed before the accept, without a byte (a TCP
        probe), is closed by the proxy and builds nothing.
        """
        port, clock, built = self.listen()
        port.stopReading()
        sock = self.client(port)
        sock.close()
        yield deferLater(0.05)
        port.startReading()
        yield deferLater(0.2)
        self.assertEqual((built, clock.getDelayedCalls()), ([], []))


@defer.inlineCallbacks
def waitFor(predicate: Any, timeout: float = 5.0) -> Any:
    """
    Wait on the real reactor until C{predicate()} is true, at most C{timeout} seconds.
    """
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        yield deferLater(0.01)
    raise AssertionError("condition not met in time")
