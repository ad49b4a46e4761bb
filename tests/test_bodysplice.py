# -*- test-case-name: tests.test_bodysplice -*-
"""
The rest of a Content-Length response body moved by the kernel (C{splice(2)} from the
service's socket through a pipe into the client's): what the client receives, byte
for byte, around the threshold and at 100 MiB; keep-alive and pipelining after it; a
client that leaves, a service that stops short, a reader that stalls and the stream
idle timeout; where the kernel must not be used (a body filter, HEAD, chunked); and
the memory of a real sidecar process serving a slow reader.

The proxy under test is built in-process on the real reactor (L{tests.support.Proxy}),
between a scripted service that sends a head and the first bytes of a body, waits to be
told, then sends the rest, and a client that hashes what it receives.
"""

from __future__ import annotations

import fcntl
import os
import hashlib
import random
import shutil
import struct
import termios
from typing import Any, Callable, List, Optional

import httptools
from twisted.internet import defer, reactor
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest
from zope.interface import implementer

from sidecar.downstream import DownstreamProtocol
from sidecar.filters import Filter, FilterChain
from sidecar.tcp import PIPE_BYTES
from sidecar.upstream import SPLICE_MIN, UpstreamConnection
from tests.support import Proxy, Upstream, startSidecar, waitUntil

#: The body's bytes: a block of a prime length repeated, so that a byte lost,
#: duplicated or moved changes the digest.
_PERIOD = 65521
_BLOCK = random.Random(12).randbytes(_PERIOD)
_CHUNK = 1 << 20


def pattern(offset: int, length: int) -> bytes:
    """
    C{length} bytes of the body from C{offset}.
    """
    start = offset % _PERIOD
    return (_BLOCK * ((start + length) // _PERIOD + 1))[start:start + length]


def digest(size: int) -> str:
    """
    The sha256 of a body of C{size} bytes.
    """
    h = hashlib.sha256()
    for offset in range(0, size, _CHUNK):
        h.update(pattern(offset, min(_CHUNK, size - offset)))
    return h.hexdigest()


@implementer(IPullProducer)
class _Rest:
    """
    Writes bytes C{offset} to C{end} of the body, a MiB at a time as the transport
    drains, then runs C{after}.
    """

    def __init__(self, transport: Any, offset: int, end: int, after: Callable[[], None],
                 extra: bytes = b"") -> None:
        self.transport = transport
        self.offset = offset
        self.end = end
        self.after = after
        self.extra = extra

    def resumeProducing(self) -> None:
        size = min(_CHUNK, self.end - self.offset)
        last = self.offset + size >= self.end
        # Bytes past the body go in the same write as its last bytes.
        self.transport.write(pattern(self.offset, size) + (self.extra if last else b""))
        self.offset += size
        if self.offset >= self.end:
            self.transport.unregisterProducer()
            self.after()

    def stopProducing(self) -> None:
        self.offset = self.end


class _ServiceConnection(Protocol):
    """
    Answers each request for C{/SIZE/FIRST[/CUT/END]}: a head with C{Content-Length:
    SIZE} and the body's first C{FIRST} bytes (all of it for C{FIRST} C{all}) in one
    write; the rest once the test calls L{Service.proceed}.  With C{CUT}, only that
    many bytes of the rest are sent and the connection ends (C{END}: C{fin} or
    C{rst}).  C{/chunked/SIZE} answers with a chunked body.
    """

    def __init__(self, owner: Service) -> None:
        self.owner = owner
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.method = b""
        self.lost = defer.Deferred()

    def connectionMade(self) -> None:
        self.owner.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)

    def on_message_begin(self) -> None:
        self.url = b""
        self.bodySize = 0
        self.bodyHash = hashlib.sha256()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_headers_complete(self) -> None:
        if self.url == b"/slow":
            # Read nothing of the body for a while.
            self.transport.pauseProducing()
            self.owner.paused.append(self.transport)
        elif self.url == b"/early":
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly")

    def on_body(self, body: bytes) -> None:
        self.bodySize += len(body)
        self.bodyHash.update(body)
        if self.url == b"/die" and self.bodySize > 1 << 20 and self.transport.connected:
            self.transport.abortConnection()

    def on_message_complete(self) -> None:
        self.owner.targets.append(self.url)
        if self.url in (b"/sink", b"/slow"):
            answer = b"%d %s" % (self.bodySize, self.bodyHash.hexdigest().encode())
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
            return
        if self.url == b"/early":
            return
        parts = self.url.decode().strip("/").split("/")
        transport = self.transport
        if parts[0] == "chunked":
            size = int(parts[1])
            transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                            % (size, pattern(0, size)))
            return
        size = int(parts[0])
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
        if self.parser.get_method() == b"HEAD":
            transport.write(head)
            return
        first = size if parts[1] == "all" else int(parts[1])
        transport.write(head + pattern(0, first))
        if first >= size:
            return
        end, after, extra = size, (lambda: None), b""
        if len(parts) > 2 and parts[2] == "extra":
            # Bytes past the body: a response smuggled after it.
            extra = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nsmugl"
        elif len(parts) > 2:
            end = first + int(parts[2])
            after = transport.loseConnection if parts[3] == "fin" else transport.abortConnection

        def rest() -> None:
            if transport.connected:
                transport.registerProducer(_Rest(transport, first, end, after, extra), False)

        self.owner.waiting.append(rest)


class Service(Factory):
    """
    The scripted service on 127.0.0.1 port 0.

    @ivar waiting: the rest of each body not yet sent, oldest first.
    """

    noisy = False

    def __init__(self) -> None:
        self.connections: List[_ServiceConnection] = []
        self.targets: List[bytes] = []
        self.waiting: List[Callable[[], None]] = []
        #: The transports of C{/slow} requests, not read from.
        self.paused: List[Any] = []

    def buildProtocol(self, addr: Any) -> _ServiceConnection:
        return _ServiceConnection(self)

    def start(self, case: Any) -> int:
        port = reactor.listenTCP(0, self, interface="127.0.0.1")

        def stop() -> Any:
            for conn in self.connections:
                if conn.transport is not None and conn.transport.connected:
                    conn.transport.abortConnection()
            return port.stopListening()

        case.addCleanup(stop)
        return port.getHost().port

    def proceed(self) -> None:
        """
        Send the rest of the oldest body still waiting.
        """
        self.waiting.pop(0)()


class _Answer:
    def __init__(self) -> None:
        self.status = 0
        self.headers: List[tuple] = []
        self.size = 0
        self.hash = hashlib.sha256()
        self.complete = False

    @property
    def digest(self) -> str:
        return self.hash.hexdigest()


class Client(Protocol):
    """
    Sends C{data}, parses the responses with llhttp and hashes their bodies.

    @ivar onHead: called with each response head as it arrives (the test tells the
        service to go on).
    @ivar stopAfter: once this many body bytes have arrived, reading stops (a stalled
        reader) and C{stalled} fires; or, with C{leave}, the connection is closed.
    """

    def __init__(self, data: bytes, expect: int, heads: int = 0) -> None:
        self.data = data
        self.expect = expect
        self.heads = heads
        self.answers: List[_Answer] = []
        self.parser = httptools.HttpResponseParser(self)
        self.done = defer.Deferred()
        self.closed = defer.Deferred()
        self.stalled = defer.Deferred()
        self.onHead: Callable[[_Answer], None] = lambda answer: None
        self.stopAfter: Optional[int] = None
        self.leave = False
        self.received = 0

    #: Body bytes to send after C{data} (the pattern, from offset 0), then C{tail};
    #: C{bodyStop}: stop sending (and close) once that many are sent.
    bodySize = 0
    bodyStop: Optional[int] = None
    tail = b""
    bodySent = 0
    #: At C{bodyStop}, send nothing more but keep the connection open.
    hold = False

    def connectionMade(self) -> None:
        self.transport.write(self.data)
        if self.bodySize:
            self.transport.registerProducer(_Upload(self), False)

    def dataReceived(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            # The head of the answer to a HEAD: that answer is complete.
            self.parser = httptools.HttpResponseParser(self)
            if not self.done.called:
                self.done.callback(self)
        stop = self.stopAfter
        if stop is not None and self.answers and self.answers[-1].size >= stop:
            self.stopAfter = None
            if self.leave:
                self.transport.loseConnection()
            else:
                self.transport.pauseProducing()
                self.stalled.callback(self.answers[-1].size)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(self)
        self.closed.callback(self)

    def on_message_begin(self) -> None:
        self.answers.append(_Answer())

    def on_header(self, name: bytes, value: bytes) -> None:
        self.answers[-1].headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        answer = self.answers[-1]
        answer.status = self.parser.get_status_code()
        self.onHead(answer)
        if self.heads:
            self.heads -= 1
            answer.complete = True
            raise _HeadOnly()

    def on_body(self, body: bytes) -> None:
        answer = self.answers[-1]
        answer.size += len(body)
        answer.hash.update(body)

    def on_message_complete(self) -> None:
        self.answers[-1].complete = True
        if sum(a.complete for a in self.answers) >= self.expect and not self.done.called:
            self.done.callback(self)


class _HeadOnly(Exception):
    pass


@implementer(IPullProducer)
class _Upload:
    """
    Writes a client's request body, a MiB at a time as its transport drains.
    """

    def __init__(self, client: Client) -> None:
        self.client = client

    def resumeProducing(self) -> None:
        client = self.client
        end = client.bodySize if client.bodyStop is None else client.bodyStop
        size = min(_CHUNK, end - client.bodySent)
        client.transport.write(pattern(client.bodySent, size))
        client.bodySent += size
        if client.bodySent >= end:
            client.transport.unregisterProducer()
            if client.bodyStop is not None and not client.hold:
                client.transport.abortConnection()
            elif client.tail:
                client.transport.write(client.tail)

    def stopProducing(self) -> None:
        pass


def connect(port: int, data: bytes, expect: int = 1, heads: int = 0) -> Client:
    client = Client(data, expect, heads)
    reactor.connectTCP("127.0.0.1", port, ClientFactory.forProtocol(lambda: client))
    return client


def post(path: str, size: int, extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: svc\r\nContent-Length: {size}\r\n{extra}\r\n".encode()


def get(path: str, close: bool = False) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: svc\r\n" + ("Connection: close\r\n" if close else "") + "\r\n").encode()


class _KeepCounting(Filter):
    """
    A filter that sees every response body chunk (and changes none).
    """

    name = "count"
    wantsResponseBody = True

    def __init__(self) -> None:
        self.seen = 0

    def responseBody(self, call: Any, data: bytes) -> bytes:
        self.seen += len(data)
        return data


class SpliceTests(unittest.TestCase):
    """
    The fast door between a plain TCP client and a plain TCP service.
    """

    timeout = 60

    def setUp(self) -> None:
        self.service = Service()
        self.proxy = Proxy(self.service.start(self))
        self.proxy.engine.streamIdleTimeout = None
        #: Bytes moved by the kernel, over every upstream connection.
        self.spliced = [0]
        spliced = self.spliced

        class Counting(UpstreamConnection):
            def _spliced(self, size: int) -> None:
                spliced[0] += size
                UpstreamConnection._spliced(self, size)

        self.proxy.pool.connectionClass = Counting
        self.port = self.proxy.start(self)

    def client(self, data: bytes, expect: int = 1, heads: int = 0) -> Client:
        client = connect(self.port, data, expect, heads)
        self.addCleanup(lambda: client.transport is not None and client.transport.abortConnection())
        return client

    def proceedOnHead(self, client: Client) -> None:
        """
        Let the service send the rest of each body once the client has its head: the
        proxy has handled the read that ended the head by then.
        """
        client.onHead = lambda answer: self.service.proceed() if self.service.waiting else None

    @defer.inlineCallbacks
    def fetch(self, size: int, first: Any, expectSpliced: int) -> Any:
        before = self.spliced[0]
        client = self.client(get(f"/{size}/{first}"))
        self.proceedOnHead(client)
        yield client.done
        answer = client.answers[0]
        self.assertEqual((answer.status, answer.complete, answer.size), (200, True, size))
        self.assertEqual(answer.headers.count((b"content-length", b"%d" % size)), 1)
        self.assertEqual(answer.digest, digest(size))
        self.assertEqual(self.spliced[0] - before, expectSpliced)
        yield waitUntil(lambda: len(self.proxy.records) == 1)
        record = self.proxy.records.pop()
        self.assertEqual((record.status, record.bytesSent, record.flags), (200, size, "-"))
        # The service's connection went back to the pool, and the client's stays open.
        self.assertEqual((len(self.proxy.pool.idle), self.proxy.pool.active), (1, 0))
        self.assertIsNone(self.proxy.pool.idle[0].kernelPath)
        if expectSpliced:
            # Its pipe, empty, is kept for the next body.
            self.assertGreaterEqual(len(self.proxy.pool.pipes.pipes), 1)
        self.assertPipesEmpty()
        self.assertTrue(client.transport.connected)
        client.transport.loseConnection()
        yield client.closed

    def assertPipesEmpty(self) -> None:
        """
        The pipes kept for the next body hold nothing.
        """
        for read, write in self.proxy.pool.pipes.pipes:
            self.assertEqual(struct.unpack("i", fcntl.ioctl(read, termios.FIONREAD, b"\0" * 4))[0], 0)

    def test_aroundTheThreshold(self):
        """
        A body of which more than L{SPLICE_MIN} bytes remain after the read that
        ended its head is moved by the kernel, exactly those bytes, and arrives whole,
        byte for byte; with at most L{SPLICE_MIN} left (one read), or all of it in
        the head's read, Python moves it as before.  Either way the record counts
        every byte and the connections are kept.
        """
        cases = [
            (SPLICE_MIN + 1, 0, SPLICE_MIN + 1),  # nothing after the head: all of it remains
            (SPLICE_MIN, 0, 0),  # exactly one read remains
            (SPLICE_MIN + 1000, 999, SPLICE_MIN + 1),
            (SPLICE_MIN + 1000, 1000, 0),
            (SPLICE_MIN + 1000, 1001, 0),
            (60000, "all", 0),  # the whole body in the head's read: nothing remains
            (0, "all", 0),
            (5 * PIPE_BYTES + 12345, 100, 5 * PIPE_BYTES + 12245),  # several pipes' worth
        ]

        @defer.inlineCallbacks
        def run() -> Any:
            for size, first, spliced in cases:
                yield self.fetch(size, first, spliced)

        return run()

    @defer.inlineCallbacks
    def test_hundredMebibytes(self):
        """
        100 MiB arrive whole, byte for byte, all but the head's read moved by the
        kernel, and the record counts all of it.
        """
        size = 100 << 20
        yield self.fetch(size, 4096, size - 4096)

    @defer.inlineCallbacks
    def test_pipelinedAfterSplicedResponse(self):
        """
        Three requests in one write: a spliced 1 MiB body, a small one, another
        spliced body.  The answers come in order, whole, on the same client
        connection, over one reused service connection.
        """
        size = 1 << 20
        client = self.client(get(f"/{size}/10") + get("/50/all") + get(f"/{size + 7}/0"), expect=3)
        self.proceedOnHead(client)
        yield client.done
        self.assertEqual([(a.status, a.size, a.digest) for a in client.answers],
                         [(200, size, digest(size)), (200, 50, digest(50)), (200, size + 7, digest(size + 7))])
        self.assertEqual(self.spliced[0], (size - 10) + (size + 7))
        self.assertEqual(self.service.targets, [f"/{size}/10".encode(), b"/50/all", f"/{size + 7}/0".encode()])
        self.assertEqual(len(self.service.connections), 1)
        yield waitUntil(lambda: len(self.proxy.records) == 3)
        self.assertEqual([(r.bytesSent, r.flags) for r in self.proxy.records],
                         [(size, "-"), (50, "-"), (size + 7, "-")])
        self.assertTrue(client.transport.connected)

    @defer.inlineCallbacks
    def test_connectionCloseAfterSplicedBody(self):
        """
        A request with C{Connection: close}: the whole spliced body, then the proxy
        closes the client's connection.
        """
        size = 3 << 20
        client = self.client(get(f"/{size}/0", close=True))
        self.proceedOnHead(client)
        yield client.closed
        answer = client.answers[0]
        self.assertEqual((answer.complete, answer.size, answer.digest), (True, size, digest(size)))
        self.assertIn((b"connection", b"close"), answer.headers)
        self.assertEqual(self.spliced[0], size)

    @defer.inlineCallbacks
    def test_clientLeavesMidBody(self):
        """
        The client closes its connection in the middle of a spliced body: the record
        says C{DC} and counts what was moved, the service's connection is closed and
        not reused (the next request gets a new one), and the pipe is gone.
        """
        size = 64 << 20
        client = self.client(get(f"/{size}/0"))
        client.stopAfter = 2 << 20
        client.leave = True
        self.proceedOnHead(client)
        yield client.closed
        yield waitUntil(lambda: len(self.proxy.records) == 1)
        record = self.proxy.records.pop()
        self.assertEqual(record.flags, "DC")
        self.assertGreaterEqual(record.bytesSent, 2 << 20)
        self.assertLess(record.bytesSent, size)
        yield self.service.connections[0].lost
        self.assertEqual((self.proxy.pool.idle, self.proxy.pool.active), ([], 0))
        self.assertPipesEmpty()
        yield self.fetch(SPLICE_MIN * 4, 0, SPLICE_MIN * 4)
        self.assertEqual(len(self.service.connections), 2)

    def test_bytesPastTheBody(self):
        """
        A service that sends more than its Content-Length (a second response after
        the spliced body): the client gets the body and nothing more, and the
        connection is not reused, so those bytes never answer the next request.
        """
        return self.bytesPastTheBody(True)

    def test_bytesPastTheBodyThroughPython(self):
        """
        The same through Python (a body filter sees the bytes).
        """
        self.proxy.engine.filters = FilterChain([_KeepCounting()])
        return self.bytesPastTheBody(False)

    @defer.inlineCallbacks
    def bytesPastTheBody(self, spliced: bool) -> Any:
        # The service sends the extra bytes in the same write as the body's last
        # 1000 (bytes sent later, after the proxy has reused the connection, are a
        # race every proxy loses: they are found when the idle connection reads them).
        size = (2 << 20) + 1000
        client = self.client(get(f"/{size}/0/extra") + get("/10/all"), expect=2)
        self.proceedOnHead(client)
        yield client.done
        self.assertEqual([(a.status, a.size, a.digest) for a in client.answers],
                         [(200, size, digest(size)), (200, 10, digest(10))])
        self.assertEqual(self.spliced[0], size if spliced else 0)
        self.assertEqual(len(self.service.connections), 2)
        yield self.service.connections[0].lost

    def serviceStopsShort(self, end: str) -> Any:
        """
        The service promises 8 MiB, sends 3 MiB and ends its connection (C{end}).
        """
        size, cut = 8 << 20, 3 << 20

        @defer.inlineCallbacks
        def run() -> Any:
            client = self.client(get(f"/{size}/100/{cut}/{end}"))
            self.proceedOnHead(client)
            yield client.closed
            answer = client.answers[0]
            self.assertFalse(answer.complete)
            if end == "fin":
                self.assertEqual(answer.size, cut + 100)
            else:
                # A reset drops what the service had not sent yet.
                self.assertLessEqual(answer.size, cut + 100)
            self.assertEqual(answer.digest, digest(answer.size))
            yield waitUntil(lambda: len(self.proxy.records) == 1)
            record = self.proxy.records[0]
            self.assertEqual((record.status, record.bytesSent, record.flags), (200, answer.size, "UC"))
            self.assertEqual((self.proxy.pool.idle, self.proxy.pool.active), ([], 0))
            self.assertEqual(self.spliced[0], answer.size - 100)

        return run()

    def test_serviceClosesEarly(self):
        """
        The service closes cleanly (FIN) before the end of a spliced body: what it
        sent reaches the client, then the client's connection is closed (a
        truncated body is never presented as complete); the record says C{UC}.
        """
        return self.serviceStopsShort("fin")

    def test_serviceResetsEarly(self):
        """
        The service resets its connection before the end of a spliced body: the same.
        """
        return self.serviceStopsShort("rst")

    @defer.inlineCallbacks
    def test_stalledReader(self):
        """
        A client that stops reading: the proxy holds at most one pipe of the body
        (Twisted buffers nothing for the client) and has stopped reading the service;
        once the client reads again, everything arrives, byte for byte.
        """
        size = 48 << 20
        client = self.client(get(f"/{size}/0"))
        client.stopAfter = 1 << 20
        self.proceedOnHead(client)
        yield client.stalled
        self.assertTrue(self.service.connections[0].transport.connected)
        # Let the socket buffers fill.
        yield waitUntil(lambda: self.heldByProxy() is not None, timeout=10)
        held = None
        for _ in range(3):
            d = defer.Deferred()
            reactor.callLater(0.2, d.callback, None)
            yield d
            held = self.heldByProxy()
        pending, twisted, reading = held
        self.assertGreater(pending, 0)
        self.assertLessEqual(pending, PIPE_BYTES)
        self.assertEqual(twisted, 0)
        self.assertFalse(reading)
        self.assertLess(self.spliced[0], size)
        client.transport.resumeProducing()
        yield client.done
        answer = client.answers[0]
        self.assertEqual((answer.complete, answer.size, answer.digest), (True, size, digest(size)))
        yield waitUntil(lambda: len(self.proxy.records) == 1)
        self.assertEqual((self.proxy.records[0].bytesSent, self.proxy.records[0].flags), (size, "-"))

    def heldByProxy(self) -> Any:
        """
        What the proxy holds of a stalled body: the pipe's bytes, Twisted's buffer
        for the client, whether it reads the service; C{None} while the pipe is empty.
        """
        conns = [door for door in self.proxy.engine.doors]
        if len(conns) != 1 or conns[0]._current is None:
            return None
        stream = conns[0]._current.stream
        path = stream.kernelPath if stream is not None else None
        if path is None or not path.pending:
            return None
        transport = conns[0].transport
        return (path.pending, len(transport.dataBuffer) + transport._tempDataLen,
                stream.transport in reactor.getReaders())

    @defer.inlineCallbacks
    def test_streamIdleTimeout(self):
        """
        A spliced body that stops moving (the client reads nothing) for the stream
        idle timeout: the exchange ends with C{SI}, the client's connection is cut
        and the service's is closed, not reused.
        """
        engine = self.proxy.engine
        engine.streamIdleTimeout = 0.3
        size = 48 << 20
        client = self.client(get(f"/{size}/0"))
        client.stopAfter = 1 << 20
        self.proceedOnHead(client)
        yield client.stalled
        yield waitUntil(lambda: self.heldByProxy() is not None, timeout=10)
        moved = -1
        while moved != self.spliced[0]:
            moved = self.spliced[0]
            engine.sweepStreams(reactor.seconds())
            d = defer.Deferred()
            reactor.callLater(0.4, d.callback, None)
            yield d
        engine.sweepStreams(reactor.seconds())
        yield waitUntil(lambda: len(self.proxy.records) == 1)
        self.assertPipesEmpty()
        record = self.proxy.records[0]
        self.assertEqual(record.flags, "SI")
        self.assertLess(record.bytesSent, size)
        yield self.service.connections[0].lost
        self.assertEqual((self.proxy.pool.idle, self.proxy.pool.active), ([], 0))
        client.transport.resumeProducing()
        yield client.closed
        self.assertFalse(client.answers[0].complete)

    @defer.inlineCallbacks
    def test_bodyFilterSeesEveryByte(self):
        """
        With a filter that wants response bodies, the bytes go through Python (the
        filter sees all of them) and the kernel moves none.
        """
        counting = _KeepCounting()
        self.proxy.engine.filters = FilterChain([counting])
        size = 2 << 20
        client = self.client(get(f"/{size}/0"))
        self.proceedOnHead(client)
        yield client.done
        answer = client.answers[0]
        self.assertEqual((answer.size, answer.digest), (size, digest(size)))
        self.assertEqual((counting.seen, self.spliced[0]), (size, 0))

    @defer.inlineCallbacks
    def test_noFullSizePipe(self):
        """
        When the kernel won't make a pipe of L{PIPE_BYTES} (a user over
        C{pipe-user-pages-soft} gets 8 KiB ones), bodies go through Python, whole,
        and the proxy asks for a pipe once per body, not once per read.
        """
        from sidecar import tcp

        self.patch(tcp, "_SETPIPE_SZ", -1)  # every F_SETPIPE_SZ fails (EINVAL)
        made = []
        original = tcp._pipe

        def counting(full: bool = False) -> Any:
            made.append(full)
            return original(full)

        self.patch(tcp, "_pipe", counting)
        size = 8 << 20
        yield self.fetch(size, 0, 0)
        yield self.fetch(size, 0, 0)
        self.assertEqual(made, [True, True])
        self.assertEqual(self.proxy.pool.pipes.pipes, [])

    @defer.inlineCallbacks
    def test_headAndChunkedNotSpliced(self):
        """
        The answer to a HEAD (whatever its Content-Length) and a chunked body are
        never moved by the kernel: the HEAD's answer has no body, the chunked body
        arrives whole, and the connection serves the next request.
        """
        size = 1 << 20
        client = self.client(f"HEAD /{size}/0 HTTP/1.1\r\nHost: svc\r\n\r\n".encode(), heads=1)
        yield client.done
        self.assertEqual([(a.status, a.size) for a in client.answers], [(200, 0)])
        self.assertIn((b"content-length", b"%d" % size), client.answers[0].headers)
        client = self.client(get(f"/chunked/{size}") + get("/10/all"), expect=2)
        yield client.done
        self.assertEqual([(a.status, a.size) for a in client.answers], [(200, size), (200, 10)])
        self.assertEqual(client.answers[0].digest, digest(size))
        self.assertEqual(self.spliced[0], 0)
        self.assertEqual(len(self.service.connections), 1)


class SinkTests(unittest.TestCase):
    """
    Which client connections the door offers the kernel.
    """

    def test_notPlainTcp(self):
        """
        A transport that is not a plain TCP connection (a TLS layer, a test
        transport) is not offered: the body goes through Python.
        """
        proto = DownstreamProtocol.__new__(DownstreamProtocol)
        DownstreamProtocol.__init__(proto, engine=None)  # type: ignore[arg-type]
        proto.transport = StringTransport()
        exchange = object()
        proto._current = exchange  # type: ignore[assignment]
        self.assertIsNone(proto.bodySink(exchange))  # type: ignore[arg-type]


class PipeStockTests(unittest.TestCase):
    """
    The empty pipes a pool keeps for its next bodies.
    """

    def closed(self, pipe: Any) -> bool:
        try:
            os.fstat(pipe[0])
        except OSError:
            return True
        return False

    def test_keptWhileUsed(self):
        """
        Pipes given back are taken again; a sweep closes those no path took since the
        sweep before, so an idle pool ends up holding none.
        """
        from sidecar.tcp import PipeStock

        stock = PipeStock()
        self.addCleanup(stock.close)
        a, b = stock.take(), stock.take()
        stock.give(a)
        stock.give(b)
        stock.trim()
        self.assertEqual(stock.pipes, [a, b])
        # One of the two is used between two sweeps: the other is closed.
        stock.give(stock.take())
        stock.trim()
        self.assertEqual(len(stock.pipes), 1)
        self.assertEqual(sum(self.closed(p) for p in (a, b)), 1)
        stock.trim()
        self.assertEqual(stock.pipes, [])
        self.assertTrue(self.closed(a) and self.closed(b))

    def test_bounded(self):
        """
        At most L{PIPE_STOCK} pipes are kept; one more given back is closed, and so
        are all of them when the pool closes.
        """
        from sidecar.tcp import PIPE_STOCK, PipeStock

        stock = PipeStock()
        pipes = [stock.take() for _ in range(PIPE_STOCK + 1)]
        for pipe in pipes:
            stock.give(pipe)
        self.assertEqual(len(stock.pipes), PIPE_STOCK)
        self.assertTrue(self.closed(pipes[-1]))
        stock.close()
        self.assertTrue(all(self.closed(p) for p in pipes))


class SlowReaderMemoryTests(unittest.TestCase):
    """
    A real C{twistd sidecar} process serving large bodies to a fast and a slow reader.
    """

    skip = None if shutil.which("curl") else "needs curl (apt-get install curl)"
    timeout = 120

    @defer.inlineCallbacks
    def test_memoryStaysFlat(self):
        """
        A 256 MiB download and a 32 MiB one read at 16 MB/s arrive whole, and the
        proxy's peak RSS grows by less than 4 MiB over its idle size (the bytes never
        enter Python).
        """
        upstream = Upstream()
        upstreamPort = upstream.start(self)
        child, port = yield startSidecar(self, "--upstream", str(upstreamPort), "--access-log", "none",
                                         "--admin", "none")
        base = f"http://127.0.0.1:{port}"
        for _ in range(3):
            out, err, code = yield getProcessOutputAndValue("curl", ["-s", f"{base}/bytes/300000"])
            self.assertEqual(len(out), 300000)
        idle = child.rssKiB("VmRSS")
        for size, rate in ((256 << 20, []), (32 << 20, ["--limit-rate", "16M"])):
            out, err, code = yield getProcessOutputAndValue(
                "curl", ["-s", "--max-time", "60", *rate, "-o", "/dev/null", "-w", "%{size_download}",
                         f"{base}/stream/{size}"])
            self.assertEqual((code, out), (0, b"%d" % size), err)
        peak = child.rssKiB("VmHWM")
        self.assertLess(peak - idle, 4 * 1024, f"idle {idle} KiB, peak {peak} KiB")


class UploadSpliceTests(unittest.TestCase):
    """
    The rest of a Content-Length request body moved by the kernel, from a plain TCP
    client to a plain TCP service.
    """

    timeout = 60

    def setUp(self) -> None:
        self.service = Service()
        self.proxy = Proxy(self.service.start(self))
        self.proxy.engine.streamIdleTimeout = None
        self.spliced = [0]
        spliced = self.spliced
        original = DownstreamProtocol._splicedUp

        def counting(door: DownstreamProtocol, size: int) -> None:
            spliced[0] += size
            original(door, size)

        self.patch(DownstreamProtocol, "_splicedUp", counting)
        self.port = self.proxy.start(self)

    def client(self, data: bytes, size: int, expect: int = 1, tail: bytes = b"",
               stop: Optional[int] = None) -> Client:
        client = Client(data, expect)
        client.bodySize = size
        client.tail = tail
        client.bodyStop = stop
        reactor.connectTCP("127.0.0.1", self.port, ClientFactory.forProtocol(lambda: client))
        self.addCleanup(lambda: client.transport is not None and client.transport.abortConnection())
        return client

    @defer.inlineCallbacks
    def warm(self) -> Any:
        """
        Leave one idle connection to the service in the pool (a request's head then
        finds it at once).
        """
        client = connect(self.port, get("/10/all", close=True))
        yield client.closed
        yield waitUntil(lambda: len(self.proxy.pool.idle) == 1)
        self.proxy.records.clear()

    def assertSinkAnswer(self, answer: _Answer, size: int) -> None:
        expected = b"%d %s" % (size, digest(size).encode())
        self.assertEqual((answer.status, answer.size, answer.digest),
                         (200, len(expected), hashlib.sha256(expected).hexdigest()))

    @defer.inlineCallbacks
    def test_uploadsAroundTheThreshold(self):
        """
        Request bodies of up to L{SPLICE_MIN} bytes go through llhttp; larger ones
        are (all but what arrived with the head) moved by the kernel.  The service
        receives every body whole, byte for byte; the record counts every byte; the
        connections are kept.
        """
        yield self.warm()
        # (Just past the threshold, the read that ends the head may take most of the
        # body with it: either way is right.)
        for size, spliced in ((64 * 1024, False), (SPLICE_MIN, False), (SPLICE_MIN + 1, None),
                              (3 * PIPE_BYTES + 17, True), (100 << 20, True)):
            before = self.spliced[0]
            client = self.client(post("/sink", size), size)
            yield client.done
            self.assertSinkAnswer(client.answers[0], size)
            moved = self.spliced[0] - before
            if spliced:
                self.assertGreaterEqual(moved, size - 2 * SPLICE_MIN)
            elif spliced is not None:
                self.assertEqual(moved, 0)
            yield waitUntil(lambda: len(self.proxy.records) == 1)
            record = self.proxy.records.pop()
            self.assertEqual((record.bytesReceived, record.flags), (size, "-"))
            self.assertEqual(self.proxy.pool.active, 0)
            self.assertTrue(client.transport.connected)
            client.transport.loseConnection()
            yield client.closed
        self.assertEqual(len(self.service.connections), 1)

    @defer.inlineCallbacks
    def test_pipelinedAfterSplicedUpload(self):
        """
        A large upload and a GET sent right after its last byte: the kernel stops at
        the body's end, the GET is read as the next request, both answers come in
        order, over one connection to the service.
        """
        yield self.warm()
        size = 5 << 20
        client = self.client(post("/sink", size), size, expect=2, tail=get("/7/all"))
        yield client.done
        self.assertSinkAnswer(client.answers[0], size)
        self.assertEqual((client.answers[1].size, client.answers[1].digest), (7, digest(7)))
        self.assertGreater(self.spliced[0], 0)
        self.assertEqual(self.service.targets[1:], [b"/sink", b"/7/all"])
        self.assertEqual(len(self.service.connections), 1)

    @defer.inlineCallbacks
    def test_expectContinue(self):
        """
        C{Expect: 100-continue}: the body sent after the proxy's 100 is moved by the
        kernel whole.
        """
        yield self.warm()
        size = 2 << 20
        client = Client(post("/sink", size, "Expect: 100-continue\r\n"), 2)
        client.bodySize = size
        started = []

        def onHead(answer: _Answer) -> None:
            if answer.status == 100 and not started:
                started.append(True)
                client.transport.registerProducer(_Upload(client), False)

        client.onHead = onHead
        client.connectionMade = lambda: client.transport.write(client.data)  # type: ignore[method-assign]
        reactor.connectTCP("127.0.0.1", self.port, ClientFactory.forProtocol(lambda: client))
        self.addCleanup(lambda: client.transport is not None and client.transport.abortConnection())
        yield client.done
        self.assertEqual(client.answers[0].status, 100)
        self.assertSinkAnswer(client.answers[-1], size)
        self.assertEqual(self.spliced[0], size)

    @defer.inlineCallbacks
    def test_slowService(self):
        """
        A service that reads nothing of the body for a while: the proxy holds at most
        one pipe of it, Twisted buffers nothing, and the client is not read; then
        everything arrives in order.
        """
        yield self.warm()
        size = 48 << 20
        client = self.client(post("/slow", size), size)
        yield waitUntil(lambda: self.service.paused, timeout=10)
        door = []

        def held() -> Any:
            doors = list(self.proxy.engine.doors)
            if len(doors) != 1 or doors[0].kernelPath is None or not doors[0].kernelPath.pending:
                return None
            door[:] = doors
            stream = doors[0]._current.stream
            return (doors[0].kernelPath.pending, len(stream.transport.dataBuffer) + stream.transport._tempDataLen,
                    doors[0].transport in reactor.getReaders())

        yield waitUntil(lambda: held() is not None, timeout=10)
        for _ in range(3):
            d = defer.Deferred()
            reactor.callLater(0.2, d.callback, None)
            yield d
        pending, twisted, reading = held()
        self.assertLessEqual(pending, PIPE_BYTES)
        self.assertEqual(twisted, 0)
        self.assertFalse(reading)
        self.assertLess(client.bodySent, size)
        self.service.paused[0].resumeProducing()
        yield client.done
        self.assertSinkAnswer(client.answers[0], size)

    @defer.inlineCallbacks
    def test_clientLeavesMidUpload(self):
        """
        The client closes its connection in the middle of a spliced upload: the record
        says C{DC}, the service's connection is closed, not reused.
        """
        yield self.warm()
        size = 64 << 20
        client = self.client(post("/sink", size), size, stop=4 << 20)
        yield client.closed
        yield waitUntil(lambda: len(self.proxy.records) == 1)
        record = self.proxy.records[0]
        self.assertEqual(record.flags, "DC")
        self.assertLess(record.bytesReceived, size)
        yield self.service.connections[0].lost
        self.assertEqual((self.proxy.pool.idle, self.proxy.pool.active), ([], 0))
        self.assertEqual(list(self.proxy.engine.doors), [])
        self.assertGreater(self.spliced[0], 0)

    @defer.inlineCallbacks
    def test_serviceAnswersEarly(self):
        """
        The service answers before the body has all arrived: the client gets the
        answer, then its connection is closed (the rest of the body can't be read as
        HTTP); the service's connection is not reused.
        """
        yield self.warm()
        size = 64 << 20
        client = self.client(post("/early", size), size)
        yield client.closed
        self.assertEqual([(a.status, a.size, a.complete) for a in client.answers], [(200, 5, True)])
        yield waitUntil(lambda: len(self.proxy.records) == 1)
        self.assertEqual(self.proxy.records[0].status, 200)
        self.assertEqual((self.proxy.pool.idle, self.proxy.pool.active), ([], 0))

    @defer.inlineCallbacks
    def test_serviceDiesMidUpload(self):
        """
        The service resets its connection in the middle of a spliced upload: the
        client gets 502 C{UC} and its connection is closed (the rest of the body can't
        be read as HTTP).
        """
        yield self.warm()
        size = 64 << 20
        client = self.client(post("/die", size), size)
        yield client.closed
        self.assertEqual([(a.status, a.complete) for a in client.answers], [(502, True)])
        yield waitUntil(lambda: len(self.proxy.records) == 1)
        self.assertEqual((self.proxy.records[0].status, self.proxy.records[0].flags), (502, "UC"))
        self.assertGreater(self.spliced[0], 0)
        self.assertEqual((self.proxy.pool.idle, self.proxy.pool.active), ([], 0))

    @defer.inlineCallbacks
    def test_streamIdleTimeoutMidUpload(self):
        """
        A client that stops sending in the middle of a spliced upload, for the stream
        idle timeout: 408 C{SI}, its connection closed, the service's closed too.
        """
        yield self.warm()
        engine = self.proxy.engine
        engine.streamIdleTimeout = 0.3
        size = 64 << 20
        client = self.client(post("/sink", size), size, stop=3 << 20)
        client.hold = True
        yield waitUntil(lambda: client.bodySent >= 3 << 20 and self.spliced[0] >= 2 << 20, timeout=10)
        moved = -1
        while moved != self.spliced[0]:
            moved = self.spliced[0]
            engine.sweepStreams(reactor.seconds())
            d = defer.Deferred()
            reactor.callLater(0.4, d.callback, None)
            yield d
        engine.sweepStreams(reactor.seconds())
        yield client.closed
        self.assertEqual([a.status for a in client.answers], [408])
        yield waitUntil(lambda: len(self.proxy.records) == 1)
        self.assertEqual(self.proxy.records[0].flags, "SI")
        yield self.service.connections[0].lost
        self.assertEqual((self.proxy.pool.idle, self.proxy.pool.active), ([], 0))


class MutualTLSTests(unittest.TestCase):
    """
    Behind the mutual-TLS door, large bodies keep the copying path (a TLS layer has
    to see every byte) and arrive whole.
    """

    skip = None if shutil.which("curl") else "needs curl (apt-get install curl)"
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        from sidecar.config import ProxyConfig, TLSConfig, UpstreamConfig
        from sidecar.service import SidecarService
        from tests.tlsfixtures import FRONTEND_ID, KubernetesSecret, writeMesh

        self.mesh = writeMesh(self.mktemp())
        self.ca = os.path.join(self.mesh.directory, "ca.crt")
        secret = KubernetesSecret(os.path.join(self.mesh.directory, "secret"))
        with open(self.mesh.crt("backend"), "rb") as f:
            cert = f.read()
        with open(self.mesh.key("backend"), "rb") as f:
            key = f.read()
        secret.update(cert, key, self.mesh.ca.certificatePEM())
        self.serviceUpstream = Service()
        config = ProxyConfig(
            listen=None, upstream=UpstreamConfig(port=self.serviceUpstream.start(self)), accessLog=None, admin=None,
            tls=TLSConfig(listen="tcp:0:interface=127.0.0.1", cert=secret.path("tls.crt"),
                          key=secret.path("tls.key"), ca=secret.path("ca.crt"), allow=(FRONTEND_ID,),
                          mode="strict", reloadInterval=0),
        )
        self.sidecar = SidecarService(config, reactor)
        self.sidecar.startService()
        self.addCleanup(self.sidecar.stopService)
        got: defer.Deferred = defer.Deferred()

        def seen(port: Any) -> Any:
            got.callback(port)
            return port

        self.sidecar.listeners[0]._waitingForPort.addCallback(seen)
        self.port = (yield got).getHost().port
        self.spliced = [0]
        for cls, name in ((UpstreamConnection, "_spliced"), (DownstreamProtocol, "_splicedUp")):
            original = getattr(cls, name)

            def counting(self_: Any, size: int, original: Any = original) -> None:
                self.spliced[0] += size
                original(self_, size)

            self.patch(cls, name, counting)

    def curl(self, path: str, *extra: str) -> defer.Deferred:
        argv = ["-sS", "--max-time", "30", "--cacert", self.ca, "--cert", self.mesh.crt("frontend"),
                "--key", self.mesh.key("frontend"), "-o", "-", *extra, f"https://127.0.0.1:{self.port}{path}"]
        return getProcessOutputAndValue("curl", argv)

    @defer.inlineCallbacks
    def test_largeBodiesBothWays(self):
        """
        A 3 MiB download and a 3 MiB upload through the mutual-TLS door arrive whole,
        byte for byte, and the kernel moves none of it.
        """
        size = 3 << 20
        self.serviceUpstream.waiting = _Eager()
        out, err, code = yield self.curl(f"/{size}/0")
        self.assertEqual((code, len(out), hashlib.sha256(out).hexdigest()), (0, size, digest(size)), err)
        upload = self.mktemp()
        with open(upload, "wb") as f:
            for offset in range(0, size, _CHUNK):
                f.write(pattern(offset, min(_CHUNK, size - offset)))
        out, err, code = yield self.curl("/sink", "--data-binary", f"@{upload}")
        self.assertEqual((code, out), (0, b"%d %s" % (size, digest(size).encode())), err)
        self.assertEqual(self.spliced[0], 0)


class _Eager(list):
    """
    A service's list of bodies waiting that sends each at once.
    """

    def append(self, rest: Callable[[], None]) -> None:  # type: ignore[override]
        rest()
