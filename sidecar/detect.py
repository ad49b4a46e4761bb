# -*- test-case-name: tests.test_detect -*-
"""
Protocol detection on an inbound listener, in the manner of Envoy's C{tls_inspector}
and C{http_inspector} and of Linkerd's detection: look at a new connection's first
bytes without consuming them, or at the protocol declared for the port the client
dialled, and hand the connection to the path for that protocol.

  - a TLS ClientHello (C{16 03 0x .. .. 01}) is L{TLS};
  - an HTTP/1.x request line (a token method, a space, a target, a space,
    C{HTTP/1.}) is L{HTTP1};
  - the HTTP/2 client preface C{PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n} is L{HTTP2};
  - anything else, and a client that says nothing for the detection timeout (a
    server-first protocol: SMTP, MySQL, FTP wait for the server's greeting), is L{TCP}.

L{classify} is a pure function of the bytes seen so far.  L{Detector} is the thin
protocol around it: it buffers, asks, and then builds the chosen protocol on the same
transport (C{makeConnection}) and replays the buffered bytes into it.  Which protocol
serves which kind is the listener's table of routes (kind to a callable), so that a
later codec (HTTP/2) is one more entry.
"""

from __future__ import annotations

import re
from typing import Any, Callable, FrozenSet, List, Mapping, Optional

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sidecar.listen import SERVERS
from sidecar.origdst import Destination, dialled

log = Logger()

TLS = "tls"
HTTP1 = "http1"
HTTP2 = "http2"
TCP = "tcp"
#: A connection refused before detection: C{--upstream original} without a redirect.
NO_ROUTE = "nr"

#: What C{--port-protocol} values mean.
DECLARED = {"tcp": TCP, "http": HTTP1, "http2": HTTP2, "grpc": HTTP2}

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_VERSION = b"HTTP/1."
#: Longest method token accepted (llhttp's longest known method is 11 bytes).
MAX_METHOD = 32
#: The bytes of a TLS ClientHello looked at: the record header and the handshake type.
_TLS_HEAD = 6
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
#: A request line L{_requestLine} says is HTTP, in its commonest shape: a method token of
#: at most L{MAX_METHOD} bytes, a space, a target without spaces, and C{" HTTP/"}.
_HTTP1_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1," + str(MAX_METHOD).encode() + rb"} [^ \n]* HTTP/")
_TARGET = frozenset(range(0x21, 0x7F)) | frozenset(range(0x80, 0x100))


def _tls(data: bytes) -> Optional[bool]:
    """
    Whether C{data} starts a TLS handshake record holding a ClientHello (record type
    22, version 3.x, handshake type 1); C{None} while too short to tell.
    """
    head = data[:_TLS_HEAD]
    if head[0] != 0x16:
        return False
    if len(head) > 1 and head[1] != 0x03:
        return False
    if len(head) > 2 and head[2] > 0x04:
        return False
    if len(head) < _TLS_HEAD:
        return None
    return head[5] == 0x01


def _requestLine(data: bytes) -> Optional[bool]:
    """
    Whether C{data} starts an HTTP/1.x request: a token method and a space, then a line
    that names C{HTTP/} as its protocol; C{None} while the line has not said.  A line
    that claims HTTP but is malformed (two spaces, a control byte in the target,
    C{HTTP/2.0} as the version) is HTTP: the HTTP door refuses it with 400 or 505, and
    its bytes never reach the service unparsed.  A line that ends without naming HTTP
    (a Redis inline C{GET key}, RTSP) is not.
    """
    n = len(data)
    i = 0
    while i < n and data[i] in _TCHAR:
        i += 1
    if i > MAX_METHOD:
        return False
    if i == n:
        return None
    if i == 0 or data[i] != 0x20:
        return False
    end = data.find(b"\n", i)
    line = data[i:end] if end >= 0 else data[i:]
    if b" HTTP/" in line:
        return True
    return False if end >= 0 else None


def classify(data: bytes, limit: int = 64 * 1024) -> Optional[str]:
    """
    The protocol of a connection whose client sent C{data} first, or C{None} when more
    bytes are needed to tell.  Past C{limit} bytes without an answer (a request line
    longer than any head the HTTP door accepts), it is L{TCP}.
    """
    if not data:
        return None
    first = data[0]
    if first == 0x16:
        tls = _tls(data)
        if tls is None:
            return None
        return TLS if tls else TCP
    if first == 0x50 and HTTP2_PREFACE.startswith(data[:len(HTTP2_PREFACE)]):  # "P"
        if len(data) >= len(HTTP2_PREFACE):
            return HTTP2
        return None
    if _HTTP1_LINE.match(data) is not None:
        # The common case, told by one regular expression: a method token, a space,
        # and " HTTP/" before the line ends (what _requestLine says True to).
        return HTTP1
    size = len(data)
    if first == 0x0D or first == 0x0A:
        # RFC 9112 2.2: a server SHOULD ignore at least one empty line before the
        # request line; both HTTP doors do (llhttp any number, twisted.web one).
        data = data.lstrip(b"\r\n")
    line = _requestLine(data) if data else None
    if line is None:
        return None if size < limit else TCP
    return HTTP1 if line else TCP


def firstByte(data: bytes, limit: int = 0) -> Optional[str]:
    """
    The permissive port's historical switch: a first byte of 0x16 (a TLS handshake
    record; no HTTP method starts with it) is L{TLS}, any other L{HTTP1}.
    """
    if not data:
        return None
    return TLS if data[0] == 0x16 else HTTP1


#: A route: builds the protocol for a connection from its L{Detector} (C{addr}, the
#: C{destination} dialled when the listener looked, C{how} the kind was told: the
#: kind, C{"timeout"}, C{"declared"}, C{"closed"}, and C{started}); C{None} refuses
#: the connection.
Route = Callable[["Detector"], Any]


class DetectingFactory(Factory):
    """
    The factory of an inbound listener that detects protocols.

    @ivar routes: the protocol factory of each kind (L{TLS}, L{HTTP1}, L{HTTP2},
        L{TCP}, and L{NO_ROUTE} for a refused connection); a kind missing from it
        goes to L{TCP}.
    @ivar clock: the reactor's clock, for the detection timeout.
    @ivar timeout: seconds to wait for the client's first bytes before L{TCP}
        (a server-first protocol), or C{None} to wait for ever.
    @ivar declared: the protocol declared per port dialled (C{--port-protocol},
        C{--opaque-ports}); such a port is not sniffed.
    @ivar original: C{--upstream original}: a connection that was not redirected
        has nowhere to go and is refused (L{NO_ROUTE}).
    @ivar limit: most bytes buffered while telling HTTP/1.x from the rest.
    @ivar swap: kinds whose protocol may take the detector's place on a plain TCP
        transport (so that the hot path has no extra call per read).
    @ivar tls: under a TLS layer, the L{sidecar.mtls.MutualTLS} whose handshake
        timeout and counters the detector owns; detection starts when the handshake
        completes.
    @ivar classify: the classifier, L{classify} unless told otherwise (the permissive
        port's first-byte switch, L{firstByte}).
    """

    noisy = False

    def __init__(self, routes: Mapping[str, Route], clock: Any, timeout: Optional[float],
                 declared: Mapping[int, str] = {}, original: bool = False, limit: int = 64 * 1024,
                 swap: FrozenSet[str] = frozenset(), tls: Any = None,
                 classify: Callable[[bytes, int], Optional[str]] = classify) -> None:
        self.routes = dict(routes)
        self.clock = clock
        self.timeout = timeout
        # The words of the flags (C{http}, C{grpc}, ...) as the kinds of the routes.
        self.declared = {port: DECLARED.get(protocol, protocol) for port, protocol in declared.items()}
        self.original = original
        self.limit = limit
        self.swap = frozenset(swap)
        self.tls = tls
        self.classify = classify

    def buildProtocol(self, addr: Any) -> Detector:
        return Detector(self, addr)


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class Detector(Protocol):
    """
    One new connection until its protocol is known; then a pass-through to the
    protocol chosen (or replaced by it on the transport, for the kinds in
    C{factory.swap}).

    @ivar inner: the protocol chosen, once chosen.
    @ivar kind: the kind chosen.
    @ivar destination: where the client dialled, when the listener needs to know.
    @ivar how: how the kind was told (see L{Route}).
    @ivar started: when the connection was accepted (the records' start time).
    """

    factory: DetectingFactory
    addr: Any = None
    inner: Any = None
    kind: Optional[str] = None
    how: str = ""
    started: float = 0.0
    destination: Optional[Destination] = None
    _declared: Optional[str] = None
    _timer: Any = None
    _handshaken: bool = False
    _handshakeTimer: Any = None

    def __init__(self, factory: DetectingFactory, addr: Any = None) -> None:
        self.factory = factory
        self.addr = addr

    def connectionMade(self) -> None:
        factory = self.factory
        self.started = factory.clock.seconds() if factory.clock is not None else 0.0
        self._buffer: List[bytes] = []
        if factory.declared or factory.original:
            self.destination = dialled(self.transport)
            if factory.original and not self.destination.redirected:
                self._route(NO_ROUTE, NO_ROUTE)
                return
            self._declared = factory.declared.get(self.destination.port)
            if self._declared is not None and TLS not in factory.routes and factory.tls is None:
                self._route(self._declared, "declared")
                return
        if factory.tls is None:
            transport = self.transport
            if type(transport) in SERVERS:
                # The client usually speaks first, and its first bytes are often in the
                # socket already when it is accepted: read them now, and most
                # connections are decided here, with no timer and no trip through the
                # reactor.  (An end of stream or an error found here is found again by
                # the reactor's next read: the socket stays readable.)
                try:
                    transport.doRead()
                except Exception:
                    # What the reactor does with a read that raises: log it, drop the
                    # connection.
                    log.failure("reading a new connection's first bytes")
                    transport.abortConnection()
                    return
                if self.kind is not None:
                    return
            self._startTimer()
        else:
            self._handshakeTimer = factory.clock.callLater(factory.tls.handshakeTimeout, self._handshakeTimedOut)

    def _handshakeTimedOut(self) -> None:
        self._handshakeTimer = None
        self.factory.tls.handshakeTimeouts += 1
        self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        """
        Under a TLS layer: count the handshake and start detecting on the decrypted
        stream.
        """
        self._handshaken = True
        tls = self.factory.tls
        if tls is None:
            return
        tls.handshakes += 1
        timer, self._handshakeTimer = self._handshakeTimer, None
        if timer is not None and timer.active():
            timer.cancel()
        if self.inner is None and self.kind is None:
            if self._declared is not None:
                # Under TLS a declared port is taken once the client's identity is known.
                self._route(self._declared, "declared")
            else:
                self._startTimer()

    def _startTimer(self) -> None:
        if self.factory.timeout is not None:
            self._timer = self.factory.clock.callLater(self.factory.timeout, self._timedOut)

    def _timedOut(self) -> None:
        self._timer = None
        if self.inner is None:
            self._route(self._declared or TCP, "timeout")

    def dataReceived(self, data: bytes) -> None:
        inner = self.inner
        if inner is not None:
            inner.dataReceived(data)
            return
        if self.kind is not None:  # refused; its bytes go nowhere
            return
        self._buffer.append(data)
        seen = b"".join(self._buffer) if len(self._buffer) > 1 else data
        declared = self._declared
        if declared is not None and seen[0] != 0x16:
            # A declared port on a listener that also takes mutual TLS: only TLS is told.
            self._route(declared, "declared")
            return
        kind = self.factory.classify(seen, self.factory.limit)
        if kind is None:
            return
        if declared is not None and kind != TLS:
            self._route(declared, "declared")
            return
        self._route(kind, kind)

    def _route(self, kind: str, how: str) -> None:
        """
        Build the protocol for C{kind} on this transport and replay the buffered bytes.
        """
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        factory = self.factory
        routes = factory.routes
        if kind not in routes:
            kind = TCP
        self.kind = kind
        self.how = how
        route = routes.get(kind)
        inner = route(self) if route is not None else None
        if inner is None:
            self.transport.loseConnection()
            return
        transport = self.transport
        if kind in factory.swap and getattr(transport, "protocol", None) is self:
            transport.protocol = inner
        else:
            self.inner = inner
        inner.makeConnection(transport)
        buffered, self._buffer = self._buffer, []
        if buffered:
            inner.dataReceived(b"".join(buffered))

    def readConnectionLost(self) -> None:
        """
        The client sent FIN: decide with what came (a half-closed client has said all
        it will), then pass the half-close on, or close when the protocol chosen
        does not take half-closes.
        """
        if self.inner is None and self.kind is None:
            if not self._buffer:
                # Connected and closed without a byte (a TCP probe): nothing to pass
                # on, as Envoy's listener filters close such a connection.
                self.kind = "closed"
                timer, self._timer = self._timer, None
                if timer is not None and timer.active():
                    timer.cancel()
                self.transport.loseConnection()
                return
            self._route(self._declared or TCP, "closed")
        inner = self.inner
        if inner is None:
            self.transport.loseConnection()
        elif IHalfCloseableProtocol.providedBy(inner):
            inner.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        inner = self.inner
        if inner is not None and IHalfCloseableProtocol.providedBy(inner):
            inner.writeConnectionLost()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        for name in ("_timer", "_handshakeTimer"):
            timer = getattr(self, name)
            setattr(self, name, None)
            if timer is not None and timer.active():
                timer.cancel()
        tls = self.factory.tls
        if tls is not None and not self._handshaken:
            tls.handshakeFailures += 1
        inner, self.inner = self.inner, None
        if inner is not None:
            inner.connectionLost(reason)

    def loseConnection(self) -> None:
        """
        Close gracefully (drain): through the protocol chosen when it closes itself
        (a TLS layer sends C{close_notify}, a splice closes both sides), else the
        transport.
        """
        close = getattr(self.inner, "loseConnection", None)
        if close is not None:
            close()
        else:
            self.transport.loseConnection()
