# -*- test-case-name: tests.test_fuzz -*-
"""
Hostile input, in memory: mutated, generated and random request streams, cut at random
places, fed to the fast door over a L{StringTransport}, with a service (the upstream
connections of a L{MemoryReactorClock}) that parses what it gets strictly and answers;
and hostile service responses fed to the upstream response parser.

Properties, whatever the bytes:
  - nothing escapes as an exception and nothing is logged as an unhandled error;
  - every exchange the door started ends in exactly one record, and nothing stays in
    flight (requests, client connections, upstream connections);
  - what the service receives is valid HTTP/1.1 to a strict parser, each request on a
    connection only after the previous one was answered, never more requests than the
    door started, and each forwarded body is exactly the bytes the door counted from the
    client;
  - the client gets whole responses, in the order of its requests.

Deterministic: a fixed seed for the mutation fuzz, and hypothesis derandomized with a
bounded number of examples (C{HYPOTHESIS_EXAMPLES} raises it for a longer local run).
"""

from __future__ import annotations

import os
import random
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from sidecar.config import UpstreamConfig
from sidecar.downstream import DownstreamProtocol
from sidecar.exchange import Engine
from sidecar.stats import Recorder
from sidecar.upstream import UpstreamPool
from tests.differential.wire import Invalid, Incomplete, Message, parseRequest, parseResponses

SEEDS = [
    b"GET /a?b=c HTTP/1.1\r\nHost: svc\r\nUser-Agent: x\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /c HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nT: 1\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"HEAD /h HTTP/1.0\r\n\r\n",
    b"PUT /e HTTP/1.1\r\nHost: svc\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
]
RESPONSES = [
    b"HTTP/1.1 200 OK\r\nX-Seq: %d\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nX-Seq: %d\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\nX-Seq: %d\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nX-Seq: %d\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nxyz",
    b"HTTP/1.1 200 OK\r\nX-Seq: %d\r\n\r\nuntil-close",
    b"garbage %d\r\n\r\n",
]
EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def mutate(rng: random.Random, data: bytes) -> bytes:
    """
    Flip, delete, insert or duplicate a few bytes, or splice in CR/LF/NUL/colons.
    """
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        at = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif op == 1 and data:
            del data[at:at + rng.randint(1, 8)]
        elif op == 2:
            data[at:at] = rng.choice([b"\r\n", b"\n", b"\x00", b":", b" ", b"\r\n\r\n", b"0\r\n"])
        elif op == 3:
            data[at:at] = data[at:at + rng.randint(1, 40)]
        else:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(data)


def cuts(rng: random.Random, data: bytes) -> list:
    """
    C{data} in pieces of 1 to 64 bytes.
    """
    pieces, at = [], 0
    while at < len(data):
        n = rng.randint(1, 64)
        pieces.append(data[at:at + n])
        at += n
    return pieces


class _TracingEngine(Engine):
    """
    The engine, keeping every exchange it started.
    """

    def exchange(self, door: Any, method: bytes, target: bytes, version: str, req: Any) -> Any:
        exchange = Engine.exchange(self, door, method, target, version, req)
        self.started.append(exchange)
        return exchange


class Service:
    """
    The far side of every upstream connection the pool opened: parses what it received
    strictly and answers each whole request.

    @ivar forwarded: C{(exchange, request)} for every whole request, in arrival order.
    @ivar invalid: the reasons some connection's bytes were not valid HTTP/1.1.
    @ivar early: requests sent on a connection before the previous one was answered.
    """

    def __init__(self, reactor: MemoryReactorClock, answer: Any) -> None:
        self.reactor = reactor
        self.answer = answer
        self.conns: list = []
        self.forwarded: list = []
        self.invalid: list = []
        self.early: list = []
        self.seq = 0

    def poll(self) -> None:
        """
        Accept new connections, parse what arrived, answer whole requests.
        """
        progress = True
        while progress:
            progress = False
            while len(self.conns) < len(self.reactor.tcpClients):
                factory = self.reactor.tcpClients[len(self.conns)][2]
                conn = factory.buildProtocol(None)
                transport = StringTransport()
                conn.makeConnection(transport)
                self.conns.append({"conn": conn, "transport": transport, "at": 0, "answered": 0,
                                   "closed": False, "upgraded": False})
                progress = True
            for state in self.conns:
                if state["closed"] or state["upgraded"]:
                    continue
                data = state["transport"].value()
                try:
                    request, end = parseRequest(data, state["at"])
                except Incomplete:
                    continue
                except Invalid as e:
                    self.invalid.append(f"{e}: {data[state['at']:][:120]!r}")
                    state["closed"] = True
                    state["conn"].connectionLost(Failure(ConnectionDone()))
                    continue
                state["at"] = end
                conn = state["conn"]
                self.forwarded.append((conn.exchange, request))
                self.seq += 1
                progress = True
                closed = self.answer(conn, request, self.seq)
                state["answered"] += 1
                if closed:
                    state["closed"] = True
                elif getattr(conn, "tunnel", None):
                    state["upgraded"] = True

    def closeAll(self) -> None:
        for state in self.conns:
            if not state["closed"]:
                state["closed"] = True
                state["conn"].connectionLost(Failure(ConnectionDone()))


class Run:
    """
    One client connection to a fast door on a memory reactor, and its service.
    """

    def __init__(self, answer: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.records: list = []
        self.recorder = Recorder([self.records.append])
        self.pool = UpstreamPool(self.reactor, self.reactor,
                                 UpstreamConfig(port=8080, responseTimeout=10.0, idleTimeout=4.0))
        self.engine = _TracingEngine(self.reactor, self.pool, self.recorder, b"amazing-proxy", 10.0)
        self.engine.started = []
        self.door = DownstreamProtocol(self.engine)
        self.client = StringTransport(peerAddress=IPv4Address("TCP", "10.1.2.3", 4444))
        self.door.makeConnection(self.client)
        self.service = Service(self.reactor, answer)

    def feed(self, pieces: list) -> None:
        for piece in pieces:
            if self.client.disconnecting:
                break
            self.door.dataReceived(piece)
            self.service.poll()

    def finish(self) -> None:
        """
        Let every timer fire, then the client and the service go away.
        """
        for _ in range(3):
            self.reactor.advance(60)
            self.service.poll()
        self.door.connectionLost(Failure(ConnectionDone()))
        self.service.closeAll()
        self.reactor.advance(60)


class Properties:
    """
    The properties every run must have (a mixin for the test cases).
    """

    def checkRun(self, run: Run, label: str) -> None:
        case: Any = self
        records, started = run.records, run.engine.started
        case.assertEqual(len(records), len(started), f"{label}: one record per exchange started")
        case.assertTrue(all(e.finished for e in started), f"{label}: every exchange finished")
        case.assertEqual(run.recorder.requestsActive, 0, f"{label}: nothing in flight")
        case.assertEqual(run.recorder.downstreamConnectionsActive, 0, label)
        case.assertEqual(run.pool.active, 0, f"{label}: no upstream connection left active")
        case.assertEqual(run.service.invalid, [], f"{label}: the service got invalid HTTP/1.1")
        forwarded = run.service.forwarded
        case.assertLessEqual(len(forwarded), len(started), f"{label}: more requests upstream than started")
        case.assertEqual(len({id(e) for e, _ in forwarded}), len(forwarded),
                         f"{label}: an exchange sent two requests upstream")
        for exchange, request in forwarded:
            case.assertIn(exchange, started, f"{label}: a request upstream from no exchange")
            case.assertFalse({"DPE", "RBAC"} & set(exchange.flags),
                             f"{label}: the service got the whole of a request the door refused ({exchange.flags})")
            if not request.header(b"upgrade"):
                case.assertEqual(len(request.body), exchange.bytesReceived,
                                 f"{label}: forwarded body {request.body[:40]!r} vs {exchange.bytesReceived} bytes received")
        seqs = [int(n) for n in re.findall(rb"\r\nX-Seq: (\d+)\r\n", run.client.value())]
        case.assertEqual(seqs, sorted(seqs), f"{label}: responses out of order")


def _answerWith(rng: random.Random) -> Any:
    def answer(conn: Any, request: Message, seq: int) -> bool:
        if rng.random() < 0.15:
            conn.connectionLost(Failure(ConnectionDone()))
            return True
        response = rng.choice(RESPONSES) % seq
        for part in cuts(rng, response):
            if conn.exchange is None and not getattr(conn, "tunnel", None):
                break
            conn.dataReceived(part)
        if rng.random() < 0.3:
            conn.connectionLost(Failure(ConnectionDone()))
            return True
        return False

    return answer


class FuzzTests(unittest.SynchronousTestCase, Properties):
    """
    The fast door under mutated and random request streams.
    """

    def test_hostileStreams(self) -> None:
        """
        1500 streams of mutated and pipelined requests, cut at random, with random
        service answers and endings: every property of this module holds.
        """
        rng = random.Random(20261123)
        for number in range(1500):
            stream = b"".join(
                mutate(rng, rng.choice(SEEDS)) if rng.random() < 0.8 else rng.choice(SEEDS)
                for _ in range(rng.randint(1, 3)))
            if rng.random() < 0.1:
                stream = bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
            run = Run(_answerWith(rng))
            run.feed(cuts(rng, stream))
            run.finish()
            self.checkRun(run, f"stream {number}: {stream!r}")
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_propertiesCanFail(self) -> None:
        """
        The body property notices a service that got fewer bytes than the door counted.
        """
        run = Run(lambda conn, request, seq: conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
        run.feed([SEEDS[1]])
        run.finish()
        exchange, request = run.service.forwarded[0]
        run.service.forwarded[0] = (exchange, Message(request.start, request.headers, b"hell"))
        self.assertRaises(self.failureException, self.checkRun, run, "tampered")


# Generated requests and responses (hypothesis).

_token = st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH", b"get", b"G\x00T"])
_target = st.sampled_from([b"/", b"/a?b=c", b"*", b"http://h/x", b"/%00", b"/a b", b"//x", b"/\xff"])
_version = st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"RTSP/1.0", b"HTTP/1"])
_eol = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"])
_name = st.sampled_from([b"Host", b"X-A", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Upgrade",
                         b"Expect", b"Trailer", b"TE", b"X_Forwarded_For", b"X-Request-Id", b"Content-Length ",
                         b" X-B", b"X\x00"])
_value = st.one_of(
    st.sampled_from([b"5", b"0", b"-1", b"+5", b"5, 5", b"chunked", b"gzip, chunked", b"identity", b"close",
                     b"keep-alive", b"Content-Length", b"Transfer-Encoding", b"Host", b"upgrade", b"websocket",
                     b"100-continue", b"h", b"a b", b"v\x7f", b"\x80", b""]),
    st.binary(max_size=12),
)
_chunk = st.tuples(st.sampled_from([b"%x", b"%X", b"0%x", b"%x;e=1", b"%x ", b"+%x", b"%x;"]),
                   st.binary(max_size=20))


@st.composite
def requests(draw: Any) -> bytes:
    """
    One request from a grammar of hostile parts.
    """
    eol = draw(_eol)
    line = draw(_token) + b" " + draw(_target) + b" " + draw(_version)
    headers = [(b"Host", b"svc")] if draw(st.booleans()) else []
    headers += draw(st.lists(st.tuples(_name, _value), max_size=4))
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    body = draw(st.binary(max_size=30))
    tail = b""
    if framing == "length":
        headers.append((b"Content-Length", b"%d" % len(body)))
        tail = body
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        for size, data in draw(st.lists(_chunk, max_size=3)):
            tail += size.replace(b"%x", b"%x" % len(data)).replace(b"%X", b"%X" % len(data)) + b"\r\n" + data + b"\r\n"
        tail += b"0\r\n\r\n"
    head = line + eol + b"".join(k + b": " + v + eol for k, v in headers) + eol
    return head + tail


#: Statuses a service may send.
GOOD_STATUSES = (b"200", b"204", b"304", b"404", b"500", b"100", b"103", b"101")
#: What issue 8's defect 4 is about: out of range or malformed.
BAD_STATUSES = (b"099", b"000", b"600", b"1000", b"2OO", b"20", b"")


@st.composite
def responses(draw: Any, statuses: tuple = GOOD_STATUSES) -> bytes:
    """
    One service response from a grammar of hostile parts.
    """
    eol = draw(_eol)
    status = draw(st.sampled_from(statuses))
    line = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"ICY"])) + b" " + status + b" R"
    headers = draw(st.lists(st.tuples(
        st.sampled_from([b"Content-Length", b"Transfer-Encoding", b"Connection", b"X-A", b"Content-Type",
                         b"Content-Length ", b"X\x00"]), _value), max_size=4))
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    body = draw(st.binary(max_size=30))
    tail = body
    if framing == "length":
        headers.append((b"Content-Length", b"%d" % len(body)))
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        tail = b""
        for size, data in draw(st.lists(_chunk, max_size=3)):
            tail += size.replace(b"%x", b"%x" % len(data)).replace(b"%X", b"%X" % len(data)) + b"\r\n" + data + b"\r\n"
        tail += b"0\r\n\r\n"
    return line + eol + b"".join(k + b": " + v + eol for k, v in headers) + eol + tail


def _pieces(data: bytes, sizes: list) -> list:
    out, at = [], 0
    for n in sizes or [len(data) or 1]:
        if at >= len(data):
            break
        out.append(data[at:at + n])
        at += n
    if at < len(data):
        out.append(data[at:])
    return out


class GeneratedTests(unittest.SynchronousTestCase, Properties):
    """
    Both parsers (the door's request parser, the upstream's response parser) under
    generated hostile messages.
    """

    @FUZZ
    @given(st.lists(requests(), min_size=1, max_size=3), st.lists(st.integers(1, 40), max_size=20),
           st.randoms(use_true_random=False))
    def test_requestParser(self, stream: list, sizes: list, rng: random.Random) -> None:
        """
        Generated pipelined requests, cut anywhere: every property of this module holds.
        """
        data = b"".join(stream)
        run = Run(_answerWith(rng))
        run.feed(_pieces(data, sizes))
        run.finish()
        self.checkRun(run, repr(data))
        self.assertEqual(self.flushLoggedErrors(), [])

    @FUZZ
    @given(st.sampled_from([b"Content-Length", b"content-length", b"close, Content-Length", b"Transfer-Encoding",
                            b"Host", b"X-Request-Id", b"X-Forwarded-For", b"Keep-Alive, TE"]),
           st.sampled_from(["length", "chunked"]), st.binary(min_size=1, max_size=40),
           st.lists(st.integers(1, 40), max_size=10))
    def test_connectionNominations(self, nominee: bytes, framing: str, body: bytes, sizes: list) -> None:
        """
        A request whose Connection header nominates a header the proxy depends on, then a
        second request: whether the door refuses it (400) or forwards it, the service
        gets each body whole, framed by the proxy's own parse, and no request the door
        did not start (no smuggling).
        """
        if framing == "length":
            head = b"POST /n HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n" % len(body)
            tail = body
        else:
            head = b"POST /n HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n"
            tail = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        data = head + b"Connection: " + nominee + b"\r\n\r\n" + tail + b"GET /next HTTP/1.1\r\nHost: svc\r\n\r\n"
        run = Run(lambda conn, request, seq: conn.dataReceived(
            b"HTTP/1.1 200 OK\r\nX-Seq: %d\r\nContent-Length: 0\r\n\r\n" % seq))
        run.feed(_pieces(data, sizes))
        run.finish()
        self.checkRun(run, repr(data))
        self.assertTrue(run.records, "no record")

    @FUZZ
    @given(responses(), st.lists(st.integers(1, 40), max_size=20), st.booleans())
    def test_responseParser(self, response: bytes, sizes: list, close: bool) -> None:
        """
        A generated service response to a GET, cut anywhere, the connection closed after
        it or not: the properties of this module hold; the client gets one whole response
        (or a close after a truncated one); a response that a strict parser reads as one
        whole message reaches the client with the same status and body.
        """
        run, got = self.respond(response, sizes, close)
        finals, problem = parseResponses(got, True)
        self.assertTrue(problem is None or problem.startswith("an incomplete response"),
                        f"{response!r} reached the client as {got!r}: {problem}")
        self.assertLessEqual(sum(1 for m in finals if m.status >= 200 or m.status == 101), 1,
                             f"{response!r} -> {got!r}")
        strict, strictProblem = parseResponses(response, close)
        if strictProblem is None and len(strict) == 1 and strict[0].status >= 200 and strict[0].status != 101:
            final = [m for m in finals if m.status >= 200]
            self.assertEqual([(m.status, m.body) for m in final], [(strict[0].status, strict[0].body)],
                             f"{response!r} -> {got!r}")

    @FUZZ
    @given(responses(BAD_STATUSES), st.lists(st.integers(1, 40), max_size=20), st.booleans())
    def test_responseStatus(self, response: bytes, sizes: list, close: bool) -> None:
        """
        A service response whose status is out of range or malformed: the client gets
        whole responses only, each with a status from 100 to 599 (a 502 of the proxy's).
        """
        run, got = self.respond(response, sizes, close)
        finals, problem = parseResponses(got, True)
        self.assertTrue(problem is None or problem.startswith("an incomplete response"),
                        f"{response!r} reached the client as {got!r}: {problem}")
        self.assertTrue(all(100 <= m.status <= 599 for m in finals), f"{response!r} -> {got!r}")

    def respond(self, response: bytes, sizes: list, close: bool) -> tuple:
        """
        Send a GET through the door, have the service answer C{response} in pieces of
        C{sizes}, and close or not; check the module's properties.

        @return: the run and what the client received.
        """
        def answer(conn: Any, request: Message, seq: int) -> bool:
            for piece in _pieces(response, sizes):
                if conn.exchange is None and not getattr(conn, "tunnel", None):
                    break
                conn.dataReceived(piece)
            if close:
                conn.connectionLost(Failure(ConnectionDone()))
            return close

        run = Run(answer)
        run.feed([b"GET /r HTTP/1.1\r\nHost: svc\r\n\r\n"])
        run.finish()
        self.checkRun(run, repr(response))
        self.assertEqual(len(run.records), 1)
        self.assertEqual(self.flushLoggedErrors(), [])
        return run, run.client.value()
