# -*- test-case-name: tests.test_detect -*-
"""
Protocol detection: L{classify} on byte prefixes, and the L{Detector} on a
L{StringTransport} with a L{MemoryReactorClock} (no network, no real time).
"""

from __future__ import annotations

from typing import Any, List

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from sidecar.detect import (
    HTTP1, HTTP2, HTTP2_PREFACE, NO_ROUTE, TCP, TLS, DetectingFactory, classify,
)

CLIENT_HELLO = bytes.fromhex("160301020001") + b"\x00" * 40


class ClassifyTests(SynchronousTestCase):
    """
    L{classify} tells the protocol from the first bytes, or asks for more.
    """

    def test_tls(self):
        """
        A TLS ClientHello record (16 03 0x .. .. 01) is TLS; its prefixes need more;
        a handshake record that is not a ClientHello, or a bad version, is TCP.
        """
        self.assertEqual(classify(CLIENT_HELLO), TLS)
        for n in range(1, 6):
            self.assertIsNone(classify(CLIENT_HELLO[:n]), n)
        self.assertEqual(classify(bytes.fromhex("160303002a02")), TCP)
        self.assertEqual(classify(bytes.fromhex("1602")), TCP)
        self.assertEqual(classify(bytes.fromhex("160309")), TCP)

    def test_http1(self):
        """
        A request line (token method, target, C{HTTP/1.}) is HTTP/1.x, whatever the
        method token; every prefix of one needs more bytes.
        """
        for line in (b"GET / HTTP/1.1\r\n", b"POST /a?b=c HTTP/1.0\r\n", b"M-SEARCH * HTTP/1.1\r\n",
                     b"OPTIONS * HTTP/1.1", b"CONNECT example.com:443 HTTP/1.1\r\n"):
            self.assertEqual(classify(line), HTTP1, line)
        line = b"GET /index.html HTTP/1.1"
        for n in range(1, len(b"GET /index.html HTTP/")):
            self.assertIsNone(classify(line[:n]), line[:n])

    def test_malformedHttpIsHttp(self):
        """
        A request line that names HTTP but is malformed goes to the HTTP door, which
        refuses it (400, 505): a control byte in the target, two spaces, a space in the
        target, HTTP/2.0 or HTTP/3 as the version.  Its bytes never reach the service
        unparsed, where a lenient server would take it and skip the proxy's header
        policy.
        """
        for data in (b"GET /\x01 HTTP/1.1", b"GET / HTTP/2.0\r\n", b"GET / HTTP/3", b"GET  / HTTP/1.1",
                     b"GET /foo bar/ HTTP/1.1\r\n", b"GET /g HTTP/1.1 x\r\n"):
            self.assertEqual(classify(data), HTTP1, data)

    def test_emptyLinesBeforeRequestLine(self):
        """
        Empty lines (CRLF or bare LF) before a request line are skipped before deciding
        (RFC 9112 2.2: a server SHOULD ignore at least one; both HTTP doors do), so the
        request reaches the HTTP door rather than the splice; what follows them decides,
        and while only they have arrived more bytes are needed, up to the limit.
        """
        for data in (b"\r\nGET / HTTP/1.1\r\n", b"\nGET / HTTP/1.1\r\n", b"\r\n\r\nGET / HTTP/1.1"):
            self.assertEqual(classify(data), HTTP1, data)
        for data in (b"\r", b"\r\n", b"\r\nGET / HT"):
            self.assertIsNone(classify(data), data)
        self.assertEqual(classify(b"\r\n*1\r\n$4\r\nPING\r\n"), TCP)
        self.assertEqual(classify(b"\r\n" * 8, limit=16), TCP)

    def test_notHttp1(self):
        """
        Bytes that can no longer start an HTTP request are TCP at once: a Redis
        command (inline too), a space first, a method longer than any, RTSP (as
        Envoy's http_inspector tells it), SSH, binary.
        """
        for data in (b"*1\r\n$4\r\nPING\r\n", b"PING\r\n", b"GET key\r\n", b" GET / HTTP/1.1",
                     b"A" * 40 + b" / HTTP/1.1", b"DESCRIBE rtsp://a/b RTSP/1.0\r\n", b"GET /g RTSP/1.0\r\n",
                     b"\x00\x00\x00", b"SSH-2.0-OpenSSH_9.2\r\n"):
            self.assertEqual(classify(data), TCP, data)

    def test_longTargetWaitsUpToTheLimit(self):
        """
        A request line with a long target waits for more bytes until the limit, and
        past it is TCP.
        """
        prefix = b"GET /" + b"a" * 5000
        self.assertIsNone(classify(prefix, limit=8192))
        self.assertEqual(classify(prefix + b" HTTP/1.1", limit=8192), HTTP1)
        self.assertEqual(classify(b"GET /" + b"a" * 9000, limit=8192), TCP)

    def test_http2(self):
        """
        The HTTP/2 client preface is HTTP/2; its prefixes need more (C{PRI * HTTP/2.0}
        is not taken for an HTTP/1 request line); a broken preface names HTTP, so it
        goes to the HTTP/1 door, which refuses its version (505).
        """
        self.assertEqual(classify(HTTP2_PREFACE + b"\x00\x00\x12\x04"), HTTP2)
        for n in range(1, len(HTTP2_PREFACE)):
            self.assertIsNone(classify(HTTP2_PREFACE[:n]), n)
        self.assertEqual(classify(b"PRI * HTTP/2.0\r\n\r\nXX"), HTTP1)

    def test_nothing(self):
        """
        No bytes: not yet known.
        """
        self.assertIsNone(classify(b""))


class Recorded(Protocol):
    """
    A protocol that keeps what it is given.
    """

    def __init__(self, kind: str, detector: Any) -> None:
        self.kind = kind
        self.detector = detector
        self.received: List[bytes] = []
        self.lost: List[Any] = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.append(reason)


@implementer(IHalfCloseableProtocol)
class HalfCloseable(Recorded):
    finished = False

    def readConnectionLost(self) -> None:
        self.finished = True

    def writeConnectionLost(self) -> None:
        pass


class Harness:
    """
    A detecting factory on a memory clock with recording routes, and connections
    to it on string transports.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.built: List[Recorded] = []

    def route(self, kind: str, cls: type = Recorded) -> Any:
        def build(detector: Any) -> Recorded:
            proto = cls(kind, detector)
            self.built.append(proto)
            return proto
        return build

    def connect(self, timeout: Any = 1.0, declared: Any = None, original: bool = False,
                swap: frozenset = frozenset(), tls: Any = None, port: int = 12345, half: bool = False,
                tlsRoute: bool = True):
        routes = {kind: self.route(kind, HalfCloseable if half else Recorded)
                  for kind in (HTTP1, TCP, TLS, NO_ROUTE)}
        if tls is not None or not tlsRoute:
            del routes[TLS]
        factory = DetectingFactory(routes, self.clock, timeout, declared or {}, original=original,
                                   swap=swap, tls=tls)
        detector = factory.buildProtocol(None)
        transport = StringTransport()
        transport.hostAddress = transport.getHost().__class__("TCP", "10.0.0.1", port)
        transport.protocol = detector
        detector.makeConnection(transport)
        return detector, transport


class DetectorTests(Harness, SynchronousTestCase):
    """
    L{Detector} buffers without consuming, builds the protocol of the kind found on
    the same transport and replays what it buffered.
    """

    def test_bytesReplayedToTheChosenProtocol(self):
        """
        A request line arriving in pieces goes, whole and in order, to the HTTP/1
        protocol, made on the same transport; later bytes pass straight through; the
        timer is gone.
        """
        detector, transport = self.connect()
        detector.dataReceived(b"GET / HT")
        self.assertEqual(self.built, [])
        detector.dataReceived(b"TP/1.1\r\n")
        [proto] = self.built
        self.assertEqual((proto.kind, proto.transport, b"".join(proto.received)),
                         (HTTP1, transport, b"GET / HTTP/1.1\r\n"))
        detector.dataReceived(b"Host: x\r\n\r\n")
        self.assertEqual(proto.received[-1], b"Host: x\r\n\r\n")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(transport.value(), b"")

    def test_unknownBytesAreTcp(self):
        """
        A Redis command goes to the TCP route at once, told by its bytes.
        """
        detector, _ = self.connect()
        detector.dataReceived(b"*1\r\n$4\r\nPING\r\n")
        [proto] = self.built
        self.assertEqual((proto.kind, detector.how, proto.received), (TCP, TCP, [b"*1\r\n$4\r\nPING\r\n"]))

    def test_silentClientIsTcpAfterTheTimeout(self):
        """
        A client that sends nothing (server-first protocol) goes to TCP when the
        detection timeout passes, not before.
        """
        detector, _ = self.connect(timeout=1.0)
        self.clock.advance(0.99)
        self.assertEqual(self.built, [])
        self.clock.advance(0.01)
        [proto] = self.built
        self.assertEqual((proto.kind, detector.how), (TCP, "timeout"))

    def test_noTimeoutWaitsForEver(self):
        """
        Without a timeout, a silent client is never decided on.
        """
        self.connect(timeout=None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_declaredPortIsNotSniffed(self):
        """
        A port declared TCP takes the TCP route at connect, before any byte, and HTTP
        bytes then go to it unexamined; a port declared HTTP goes to HTTP/1 at once.
        """
        detector, _ = self.connect(declared={12345: TCP}, tlsRoute=False)
        [proto] = self.built
        self.assertEqual((proto.kind, detector.how), (TCP, "declared"))
        detector.dataReceived(b"GET / HTTP/1.1\r\n")
        self.assertEqual(proto.received, [b"GET / HTTP/1.1\r\n"])
        self.built.clear()
        detector, _ = self.connect(declared={12345: HTTP1}, tlsRoute=False)
        self.assertEqual([p.kind for p in self.built], [HTTP1])
        self.built.clear()
        detector, _ = self.connect(declared={80: TCP}, tlsRoute=False)
        self.assertEqual(self.built, [])

    def test_declaredWordsOfTheFlags(self):
        """
        The words C{--port-protocol} takes (C{http}, C{http2}, C{grpc}, C{tcp}) are the
        routes' kinds: a port declared C{http} goes to the HTTP/1 door, never to the
        TCP splice.
        """
        for word, kind in (("http", HTTP1), ("tcp", TCP)):
            self.built.clear()
            self.connect(declared={12345: word}, tlsRoute=False)
            self.assertEqual([p.kind for p in self.built], [kind], word)

    def test_declaredPortOnAPermissiveListener(self):
        """
        On a listener that also takes mutual TLS, a declared port is still told TLS
        from the rest by its first byte: a ClientHello goes to TLS, any other first
        byte to the declared protocol at once, and silence to it at the timeout.
        """
        detector, _ = self.connect(declared={12345: TCP})
        self.assertEqual(self.built, [])
        detector.dataReceived(b"G")
        self.assertEqual([(p.kind, detector.how) for p in self.built], [(TCP, "declared")])
        self.built.clear()
        detector, _ = self.connect(declared={12345: TCP})
        detector.dataReceived(CLIENT_HELLO)
        self.assertEqual([p.kind for p in self.built], [TLS])
        self.built.clear()
        detector, _ = self.connect(declared={12345: HTTP1})
        self.clock.advance(1.0)
        self.assertEqual([(p.kind, detector.how) for p in self.built], [(HTTP1, "timeout")])

    def test_originalWithoutRedirectIsRefused(self):
        """
        With C{--upstream original}, a connection that no REDIRECT brought (a
        transport without an original destination) goes to the refusal route.
        """
        detector, _ = self.connect(original=True)
        [proto] = self.built
        self.assertEqual((proto.kind, detector.destination.port, detector.destination.redirected),
                         (NO_ROUTE, 12345, False))

    def test_halfCloseBeforeDecidingIsTcp(self):
        """
        A client that sends a few bytes and half-closes is decided as TCP with what
        came, and the half-close is passed on.
        """
        detector, _ = self.connect(half=True)
        detector.dataReceived(b"GE")
        detector.readConnectionLost()
        [proto] = self.built
        self.assertEqual((proto.kind, detector.how, proto.received, proto.finished),
                         (TCP, "closed", [b"GE"], True))

    def test_halfCloseToAProtocolWithoutIt(self):
        """
        A FIN for a chosen protocol that does not take half-closes closes the
        transport once its bytes are written.
        """
        detector, transport = self.connect()
        detector.dataReceived(b"*1\r\n")
        detector.readConnectionLost()
        self.assertTrue(transport.disconnecting)

    def test_swapTakesTheDetectorsPlace(self):
        """
        A kind allowed to swap replaces the detector as the transport's protocol.
        """
        detector, transport = self.connect(swap=frozenset([HTTP1]))
        detector.dataReceived(b"GET / HTTP/1.1\r\n")
        [proto] = self.built
        self.assertIs(transport.protocol, proto)
        self.assertIsNone(detector.inner)

    def test_lossCancelsTheTimer(self):
        """
        A connection lost before deciding leaves no timer and builds nothing.
        """
        detector, _ = self.connect()
        detector.connectionLost(None)
        self.assertEqual((self.clock.getDelayedCalls(), self.built), ([], []))

    def test_lossReachesTheChosenProtocol(self):
        """
        The chosen protocol is told when the connection is lost.
        """
        detector, _ = self.connect()
        detector.dataReceived(b"\x00")
        detector.connectionLost("gone")
        self.assertEqual(self.built[0].lost, ["gone"])


class Counters:
    handshakeTimeout = 10.0

    def __init__(self) -> None:
        self.handshakes = self.handshakeFailures = self.handshakeTimeouts = 0


class UnderTLSTests(Harness, SynchronousTestCase):
    """
    Behind the TLS layer the detector owns the handshake: its timeout and counters;
    detection (and its timeout) starts when the handshake completes.
    """

    def test_detectionStartsAfterTheHandshake(self):
        """
        Before the handshake only the handshake timer runs; after it, the detection
        timer, and a silent client goes to TCP when it passes.
        """
        tls = Counters()
        detector, transport = self.connect(tls=tls, timeout=1.0)
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [10.0])
        detector.handshakeCompleted()
        self.assertEqual((tls.handshakes, [c.getTime() for c in self.clock.getDelayedCalls()]), (1, [1.0]))
        self.clock.advance(1.0)
        self.assertEqual([p.kind for p in self.built], [TCP])
        detector.connectionLost(None)
        self.assertEqual(tls.handshakeFailures, 0)

    def test_handshakeTimeout(self):
        """
        A client that never finishes its handshake is cut off and counted.
        """
        tls = Counters()
        detector, transport = self.connect(tls=tls)
        self.clock.advance(10.0)
        self.assertEqual(tls.handshakeTimeouts, 1)
        self.assertTrue(transport.disconnecting)
        detector.connectionLost(None)
        self.assertEqual(tls.handshakeFailures, 1)

    def test_tlsInsideTlsIsTcp(self):
        """
        A ClientHello on the decrypted stream (no TLS route there) goes to TCP.
        """
        detector, _ = self.connect(tls=Counters())
        detector.handshakeCompleted()
        detector.dataReceived(CLIENT_HELLO)
        self.assertEqual([p.kind for p in self.built], [TCP])

    def test_declaredPortAfterTheHandshake(self):
        """
        Under TLS a declared port is taken when the handshake completes (when the
        client's certificate can be read), not at connect.
        """
        detector, _ = self.connect(tls=Counters(), declared={12345: TCP})
        self.assertEqual(self.built, [])
        detector.handshakeCompleted()
        self.assertEqual([(p.kind, detector.how) for p in self.built], [(TCP, "declared")])
