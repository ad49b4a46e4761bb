# -*- test-case-name: tests.test_exchange -*-
"""
The exchange and the upstream pool driven by hand: a fast door over a
L{StringTransport}, upstream connections made from L{MemoryReactorClock.tcpClients}.
No network, no real time.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionRefusedError, UserError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from sidecar.config import UpstreamConfig
from sidecar.downstream import DownstreamProtocol
from sidecar.exchange import Engine, Exchange
from sidecar.record import Record
from sidecar.stats import Recorder
from sidecar.upstream import IDLE, UpstreamPool


class Harness:
    """
    One engine on a memory reactor, and helpers to play client and service.
    """

    def __init__(self, responseTimeout: float = 10.0, idleTimeout: float = 4.0) -> None:
        self.reactor = MemoryReactorClock()
        self.records = []
        self.recorder = Recorder([self.records.append])
        self.pool = UpstreamPool(self.reactor, self.reactor,
                                 UpstreamConfig(port=8080, responseTimeout=responseTimeout,
                                                idleTimeout=idleTimeout))
        self.engine = Engine(self.reactor, self.pool, self.recorder, b"amazing-proxy", responseTimeout)

    def client(self) -> tuple:
        door = DownstreamProtocol(self.engine)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.1.2.3", 4444))
        door.makeConnection(transport)
        return door, transport

    def connectUpstream(self, index: int = -1) -> tuple:
        host, port, factory, timeout, bind = self.reactor.tcpClients[index]
        conn = factory.buildProtocol(None)
        transport = StringTransport()
        conn.makeConnection(transport)
        return conn, transport


GET = b"GET /x HTTP/1.1\r\nHost: svc\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class ExchangeTests(unittest.SynchronousTestCase):
    """
    Exchanges end in exactly one record, however they end.
    """

    def test_roundTrip(self):
        """
        A request goes upstream with the forwarding headers; the response comes back
        with our Server header; the connection returns to the pool; one record.
        """
        h = Harness()
        door, client = h.client()
        door.dataReceived(GET)
        self.assertEqual(len(h.reactor.tcpClients), 1)
        conn, upstream = h.connectUpstream()
        sent = upstream.value()
        self.assertTrue(sent.startswith(b"GET /x HTTP/1.1\r\nHost: svc\r\n"))
        self.assertIn(b"X-Forwarded-For: 10.1.2.3\r\n", sent)
        h.reactor.advance(0.25)
        conn.dataReceived(OK)
        self.assertEqual(client.value(), b"HTTP/1.1 200 OK\r\nServer: amazing-proxy\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(h.pool.idle, [conn])
        [rec] = h.records
        self.assertEqual((rec.status, rec.flags, rec.bytesSent, rec.upstreamServiceTime, rec.duration),
                         (200, "-", 2, 0.25, 0.25))
        # Made from a plain tuple (no check of its size there): every field is given.
        self.assertIs(type(rec), Record)
        self.assertEqual(len(rec), len(Record._fields))
        self.assertEqual(rec.peer, None)
        self.assertEqual(h.recorder.requestsActive, 0)

    def test_timeout(self):
        """
        No response head within the timeout: 504, flag UT (from the once-a-second
        deadline sweep: between the timeout and a second after it), the upstream
        connection is aborted and not pooled; no timer is left.
        """
        h = Harness(responseTimeout=3)
        door, client = h.client()
        door.dataReceived(GET)
        conn, upstream = h.connectUpstream()
        h.reactor.pump([0.1] * 29)
        self.assertEqual(client.value(), b"")
        h.reactor.pump([0.1] * 11)
        self.assertIn(b"HTTP/1.1 504 Gateway Timeout\r\n", client.value())
        self.assertEqual(h.reactor.getDelayedCalls(), [])
        self.assertIn(b"Server: amazing-proxy\r\n", client.value())
        self.assertTrue(upstream.disconnecting)
        self.assertEqual(h.pool.idle, [])
        self.assertEqual([r.flags for r in h.records], ["UT"])

    def test_timeoutStartsWhenRequestComplete(self):
        """
        A slow upload is not cut short: the timeout counts from the end of the request.
        """
        h = Harness(responseTimeout=3)
        door, client = h.client()
        door.dataReceived(b"POST /up HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\n12345")
        conn, upstream = h.connectUpstream()
        h.reactor.advance(10)
        self.assertEqual(client.value(), b"")
        door.dataReceived(b"67890")
        h.reactor.pump([0.1] * 29)
        self.assertEqual(client.value(), b"")
        h.reactor.pump([0.1] * 11)
        self.assertIn(b"HTTP/1.1 504 Gateway Timeout\r\n", client.value())

    def test_connectFailure(self):
        """
        A refused connect: 502, flag UF.
        """
        h = Harness()
        door, client = h.client()
        door.dataReceived(GET)
        factory = h.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertIn(b"HTTP/1.1 502 Bad Gateway\r\n", client.value())
        self.assertEqual([r.flags for r in h.records], ["UF"])
        self.assertEqual(h.pool.connectFailures, 1)
        self.flushLoggedErrors()

    def test_malformedBodyWhileConnecting(self):
        """
        A chunked body that turns out malformed while the upstream connect is under way
        is the client's fault: 400 C{DPE}, once.  The connect the exchange cancels, which
        Twisted reports at once as failed, is no upstream failure (no 502 C{UF}).
        """
        h = Harness()
        door, client = h.client()
        door.dataReceived(b"POST /x HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n")
        factory = h.reactor.tcpClients[0][2]
        [connector] = h.reactor.connectors
        # What a real connector's disconnect() does while connecting: report at once.
        connector.disconnect = lambda: factory.clientConnectionFailed(connector, Failure(UserError()))
        door.dataReceived(b"+3\r\nabc\r\n")
        self.assertIn(b"HTTP/1.1 400 Bad Request\r\n", client.value())
        self.assertNotIn(b"502", client.value())
        self.assertEqual([(r.status, r.flags) for r in h.records], [(400, "DPE")])

    def test_clientLeavesWhileConnecting(self):
        """
        A client that leaves while the upstream connect is under way is recorded C{DC}
        only: the cancelled connect, reported at once by Twisted, adds no C{UF} and no
        502.
        """
        h = Harness()
        door, client = h.client()
        door.dataReceived(GET)
        factory = h.reactor.tcpClients[0][2]
        [connector] = h.reactor.connectors
        connector.disconnect = lambda: factory.clientConnectionFailed(connector, Failure(UserError()))
        door.connectionLost(Failure(ConnectionDone()))
        self.assertEqual([(r.status, r.flags) for r in h.records], [(0, "DC")])
        self.assertEqual(client.value(), b"")

    def test_staleConnectionRetried(self):
        """
        A pooled connection that turns out closed before any response byte makes the
        proxy send an idempotent request again on a new connection, once.
        """
        h = Harness()
        door, client = h.client()
        door.dataReceived(GET)
        conn, upstream = h.connectUpstream()
        conn.dataReceived(OK)
        door.dataReceived(GET)
        self.assertEqual(len(h.reactor.tcpClients), 1, "the pooled connection is reused")
        conn.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(h.reactor.tcpClients), 2, "a new connection for the retry")
        conn2, upstream2 = h.connectUpstream()
        self.assertTrue(upstream2.value().startswith(b"GET /x HTTP/1.1\r\n"))
        conn2.dataReceived(OK)
        self.assertEqual(client.value().count(b"HTTP/1.1 200 OK"), 2)
        self.assertEqual([r.flags for r in h.records], ["-", "-"])

    def test_postNotRetried(self):
        """
        A POST on a pooled connection that closes gets a 502, not a second try.
        """
        h = Harness()
        door, client = h.client()
        door.dataReceived(GET)
        conn, upstream = h.connectUpstream()
        conn.dataReceived(OK)
        door.dataReceived(b"POST /x HTTP/1.1\r\nHost: svc\r\nContent-Length: 1\r\n\r\nz")
        conn.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(h.reactor.tcpClients), 1)
        self.assertIn(b"HTTP/1.1 502 Bad Gateway", client.value())
        self.assertEqual([r.flags for r in h.records], ["-", "UC"])

    def test_clientGone(self):
        """
        A client that disconnects aborts the upstream connection; one record, DC.
        """
        h = Harness()
        door, client = h.client()
        door.dataReceived(GET)
        conn, upstream = h.connectUpstream()
        door.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(upstream.disconnecting)
        self.assertEqual([(r.status, r.flags) for r in h.records], [(0, "DC")])
        self.assertEqual(h.pool.active, 0)

    def test_clientGoneWhileConnecting(self):
        """
        A client that disconnects while the upstream connect is under way cancels it.
        """
        h = Harness()
        door, client = h.client()
        door.dataReceived(GET)
        connector = h.reactor.connectors[0]
        door.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(connector._disconnected)
        self.assertEqual([r.flags for r in h.records], ["DC"])

    def test_pausedConnectionResumedWhenPooled(self):
        """
        A connection paused by a slow client when its response completed is resumed as
        it goes back to the pool (else it could never see the service close it).
        """
        h = Harness()
        door, client = h.client()
        door.dataReceived(GET)
        conn, upstream = h.connectUpstream()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        conn.pauseProducing()  # what the client's full transport does
        self.assertEqual(upstream.producerState, "paused")
        conn.dataReceived(b"cd")
        self.assertEqual(conn.state, IDLE)
        self.assertEqual(upstream.producerState, "producing")

    def test_idleConnectionsExpire(self):
        """
        An idle connection older than the idle timeout is closed by the sweep and not
        reused.
        """
        h = Harness(idleTimeout=4)
        door, client = h.client()
        door.dataReceived(GET)
        conn, upstream = h.connectUpstream()
        conn.dataReceived(OK)
        h.reactor.advance(5)
        h.pool.sweep()
        self.assertEqual(h.pool.idle, [])
        self.assertTrue(upstream.disconnecting)

    def test_upstreamMalformed(self):
        """
        A service that answers with garbage: 502, flag UPE.
        """
        h = Harness()
        door, client = h.client()
        door.dataReceived(GET)
        conn, upstream = h.connectUpstream()
        conn.dataReceived(b"SPAM SPAM SPAM\r\n\r\n")
        self.assertIn(b"HTTP/1.1 502 Bad Gateway", client.value())
        self.assertEqual([r.flags for r in h.records], ["UPE"])

    def test_switchingProtocolsUnasked(self):
        """
        A 101 to a request that did not ask to upgrade (here while its body is still
        arriving) is an upstream protocol error: 502, flag UPE, nothing spliced.
        """
        h = Harness()
        door, client = h.client()
        door.dataReceived(b"POST /x HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\n12345")
        conn, upstream = h.connectUpstream()
        conn.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n")
        self.assertIn(b"HTTP/1.1 502 Bad Gateway", client.value())
        self.assertTrue(upstream.disconnecting)
        self.assertEqual([r.flags for r in h.records], ["UPE"])

    def test_oversizedHead(self):
        """
        A request head over the limit: 431 and close, nothing sent upstream.
        """
        h = Harness()
        door, client = h.client()
        door.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
        self.assertIn(b"HTTP/1.1 431 ", client.value())
        self.assertTrue(client.disconnecting)
        self.assertEqual(h.reactor.tcpClients, [])
        self.assertEqual([(r.status, r.flags) for r in h.records], [(431, "DPE")])


class ClientTimeoutTests(unittest.SynchronousTestCase):
    """
    The doors registry's sweep protects the proxy from clients that hold connections.
    """

    def test_slowHead(self):
        """
        A client that started a request head and stalled gets a 408 and is closed once
        the head timeout has passed.
        """
        h = Harness()
        door, client = h.client()
        door.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow")
        for now in (0, 10, 20, 29):
            h.engine.doors.sweep(now, 300, 30)
        self.assertEqual(client.value(), b"")
        h.engine.doors.sweep(31, 300, 30)
        self.assertIn(b"HTTP/1.1 408 Request Timeout\r\n", client.value())
        self.assertTrue(client.disconnecting)
        self.assertEqual([(r.status, r.flags) for r in h.records], [(408, "DPE")])

    def test_idleClient(self):
        """
        A keep-alive client idle past the idle timeout is closed; one that keeps
        talking, or waits for its response, is not.
        """
        h = Harness()
        idle, idleTransport = h.client()
        waiting, waitingTransport = h.client()
        waiting.dataReceived(GET)
        h.engine.doors.sweep(0, 10, 30)
        h.engine.doors.sweep(9, 10, 30)
        self.assertFalse(idleTransport.disconnecting)
        h.engine.doors.sweep(10, 10, 30)
        self.assertTrue(idleTransport.disconnecting)
        self.assertFalse(waitingTransport.disconnecting, "a request in flight is not idleness")


class PipelinedErrorTests(unittest.SynchronousTestCase):
    """
    A malformed request behind one in flight is answered in its turn, never forwarded.
    """

    def test_malformedBodyBehindRequestInFlight(self):
        """
        The first request is answered; the second, whose chunked body is malformed, gets
        a 400 after it and the connection closes; the service sees only the first.
        """
        h = Harness()
        door, client = h.client()
        door.dataReceived(GET + b"POST /y HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\n")
        conn, upstream = h.connectUpstream()
        conn.dataReceived(OK)
        self.assertEqual(len(h.reactor.tcpClients), 1)
        self.assertNotIn(b"POST /y", upstream.value())
        replies = client.value()
        self.assertIn(b"HTTP/1.1 200 OK", replies)
        self.assertIn(b"HTTP/1.1 400 Bad Request", replies)
        self.assertLess(replies.index(b"200 OK"), replies.index(b"400 Bad Request"))
        self.assertTrue(client.disconnecting)
        self.assertEqual([(r.path, r.status) for r in h.records], [("/x", 200), ("/y", 400)])
        self.assertEqual(h.recorder.requestsActive, 0)


class EndOfConnectionBodyTests(unittest.SynchronousTestCase):
    """
    A response without Content-Length or chunking ends with the upstream's connection.
    """

    def start(self):
        h = Harness()
        door, client = h.client()
        door.dataReceived(GET)
        conn, upstream = h.connectUpstream()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\n\r\npart")
        return h, client, conn

    def test_cleanClose(self):
        """
        A clean close completes the body: the client gets it chunked, then the last
        chunk, and the connection stays open.
        """
        h, client, conn = self.start()
        conn.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(client.value().endswith(b"4\r\npart\r\n0\r\n\r\n"))
        self.assertFalse(client.disconnecting)
        self.assertEqual([(r.status, r.flags, r.bytesSent) for r in h.records], [(200, "-", 4)])

    def test_reset(self):
        """
        A reset is a truncation: no last chunk, the client's connection is closed, flag
        UC.
        """
        from twisted.internet.error import ConnectionLost

        h, client, conn = self.start()
        conn.connectionLost(Failure(ConnectionLost()))
        self.assertNotIn(b"0\r\n\r\n", client.value())
        self.assertTrue(client.disconnecting)
        self.assertEqual([r.flags for r in h.records], ["UC"])


class CircuitBreakerTests(unittest.SynchronousTestCase):
    """
    The pool's limits, as Envoy's circuit breakers: at most C{maxConnections}, at most
    C{maxPending} waiting, then 503 UO.
    """

    def harness(self) -> Harness:
        h = Harness()
        h.pool.config = UpstreamConfig(port=8080, maxConnections=1, maxPending=1)
        return h

    def test_waitThenOverflow(self):
        """
        With one connection allowed and one wait: the first request connects, the
        second waits (no new connect), the third gets 503 UO at once; when the first
        response ends, the second goes out on the same connection.
        """
        h = self.harness()
        first, firstClient = h.client()
        second, secondClient = h.client()
        third, thirdClient = h.client()
        first.dataReceived(GET)
        second.dataReceived(GET)
        third.dataReceived(GET)
        self.assertEqual(len(h.reactor.tcpClients), 1)
        self.assertEqual(len(h.pool.pending), 1)
        self.assertIn(b"HTTP/1.1 503 Service Unavailable", thirdClient.value())
        self.assertEqual([r.flags for r in h.records], ["UO"])
        conn, upstream = h.connectUpstream()
        conn.dataReceived(OK)
        self.assertEqual(upstream.value().count(b"GET /x HTTP/1.1"), 2)
        conn.dataReceived(OK)
        self.assertIn(b"200 OK", firstClient.value())
        self.assertIn(b"200 OK", secondClient.value())
        self.assertEqual(len(h.reactor.tcpClients), 1)
        self.assertEqual((h.pool.active, len(h.pool.idle), len(h.pool.pending), h.pool.overflows), (0, 1, 0, 1))

    def test_waitingClientLeaves(self):
        """
        A client that leaves while waiting frees its place in the queue.
        """
        h = self.harness()
        first, _ = h.client()
        second, _ = h.client()
        first.dataReceived(GET)
        second.dataReceived(GET)
        second.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(h.pool.pending), 0)
        self.assertEqual([r.flags for r in h.records], ["DC"])

    def test_closedConnectionFreesSlot(self):
        """
        When the connection in use closes, a waiting request gets a new connect.
        """
        h = self.harness()
        first, firstClient = h.client()
        second, _ = h.client()
        first.dataReceived(GET)
        second.dataReceived(GET)
        conn, upstream = h.connectUpstream()
        conn.connectionLost(Failure(ConnectionDone()))
        self.assertIn(b"502", firstClient.value())
        self.assertEqual(len(h.reactor.tcpClients), 2)
        self.assertEqual(len(h.pool.pending), 0)


class RawBodyTests(unittest.SynchronousTestCase):
    """
    After the read that holds a response head, the rest of a Content-Length body goes
    to the client without the parser; the response still ends at its last byte.
    """

    def setUp(self):
        self.h = Harness()
        self.door, self.client = self.h.client()
        self.door.dataReceived(GET)
        self.conn, self.upstream = self.h.connectUpstream()
        self.body = bytes(range(256)) * 1000

    def test_splitBody(self):
        """
        A body in many reads reaches the client byte for byte; the connection is
        pooled; the record counts every byte.
        """
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(self.body)
        data = head + self.body
        self.conn.dataReceived(data[:1000])
        for offset in range(1000, len(data), 7001):
            self.conn.dataReceived(data[offset:offset + 7001])
        self.assertTrue(self.client.value().endswith(b"\r\n\r\n" + self.body))
        self.assertEqual(self.h.pool.idle, [self.conn])
        [rec] = self.h.records
        self.assertEqual((rec.status, rec.bytesSent, rec.flags), (200, len(self.body), "-"))
        # The connection serves the next request, parsed from its head again.
        self.door.dataReceived(GET)
        self.conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
        self.conn.dataReceived(b"o")
        self.conn.dataReceived(b"k")
        self.assertTrue(self.client.value().endswith(b"\r\n\r\nok"))
        self.assertEqual(len(self.h.records), 2)

    def test_bytesBeyondBody(self):
        """
        Bytes after the body's last (a service talking out of turn) are not sent: the
        response is complete and the connection is closed, not pooled.
        """
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
        self.conn.dataReceived(head + b"01234")
        self.conn.dataReceived(b"56789HTTP/1.1 200 OK\r\n")
        self.assertTrue(self.client.value().endswith(b"\r\n\r\n0123456789"))
        self.assertTrue(self.upstream.disconnecting)
        self.assertEqual(self.h.pool.idle, [])
        self.assertEqual([r.flags for r in self.h.records], ["-"])

    def test_closedMidBody(self):
        """
        The service closing in the middle of the raw body cuts the client off (UC): a
        truncated body is never presented as complete.
        """
        self.conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
        self.conn.dataReceived(b"567")
        self.conn.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.client.disconnecting)
        self.assertEqual([r.flags for r in self.h.records], ["UC"])


class RawRequestBodyTests(unittest.SynchronousTestCase):
    """
    The fast door passes the rest of a Content-Length request body on as it reads it,
    past llhttp, and a fresh parser reads what follows it.
    """

    def setUp(self):
        self.h = Harness()
        self.door, self.client = self.h.client()
        self.body = bytes(range(256)) * 300

    def post(self, path: bytes = b"/up") -> bytes:
        return b"POST %s HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n" % (path, len(self.body))

    def test_bodyInReadsThenPipelined(self):
        """
        A body cut into reads of every size from one byte up, followed in the body's
        last read by a pipelined GET: the service gets the body byte for byte, then the
        GET on the same connection once the POST is answered; both answered in order.
        """
        for size in (1, 2, 7, 100, 4096, 20000):
            h = Harness()
            door, client = h.client()
            data = self.post() + self.body + GET
            head = data.index(b"\r\n\r\n") + 4
            door.dataReceived(data[:head + 3])
            conn, upstream = h.connectUpstream()
            for offset in range(head + 3, len(data), size):
                door.dataReceived(data[offset:offset + size])
            sent = upstream.value()
            self.assertTrue(sent.endswith(b"Content-Length: %d\r\n\r\n" % len(self.body) + self.body), size)
            upstream.clear()
            conn.dataReceived(OK)
            self.assertTrue(upstream.value().startswith(b"GET /x HTTP/1.1\r\n"), size)
            conn.dataReceived(OK)
            self.assertEqual(client.value().count(b"HTTP/1.1 200 OK\r\n"), 2, size)
            self.assertEqual([(r.method, r.bytesReceived) for r in h.records],
                             [("POST", len(self.body)), ("GET", 0)], size)

    def test_headAndBodyInOneSend(self):
        """
        A request whose head and body arrive in one read goes to a pooled upstream
        connection in one write (one send), not the head and then the body.
        """
        door, client = self.door, self.client
        door.dataReceived(GET)
        conn, upstream = self.h.connectUpstream()
        conn.dataReceived(OK)
        writes = []
        upstream.write = lambda data: writes.append([data])
        upstream.writeSequence = lambda seq: writes.append(list(seq))
        conn.write, conn.writeSequence = upstream.write, upstream.writeSequence
        door.dataReceived(self.post() + self.body)
        self.assertEqual(len(writes), 1)
        self.assertTrue(b"".join(writes[0]).startswith(b"POST /up HTTP/1.1\r\n"))
        self.assertTrue(b"".join(writes[0]).endswith(b"\r\n\r\n" + self.body))

    def test_headAndBodyLater(self):
        """
        The head alone in one read, the whole body in the next: the body goes on as it
        is, and the next request on the connection is parsed as a request again.
        """
        self.door.dataReceived(self.post())
        conn, upstream = self.h.connectUpstream()
        self.door.dataReceived(self.body)
        self.assertTrue(upstream.value().endswith(b"\r\n\r\n" + self.body))
        conn.dataReceived(OK)
        self.door.dataReceived(b"GET /next HTTP/1.1\r\nHost: svc\r\nContent-Length: 0\r\n\r\n")
        self.assertIn(b"GET /next HTTP/1.1\r\n", upstream.value())
        conn.dataReceived(OK)
        self.assertEqual([r.path for r in self.h.records], ["/up", "/next"])

    def test_smugglingAfterBody(self):
        """
        Bytes after the declared length are a new request to the proxy's own parse,
        held to the same rules: a malformed one is refused with 400, never sent on.
        """
        self.door.dataReceived(self.post())
        conn, upstream = self.h.connectUpstream()
        self.door.dataReceived(self.body + b"GET /bad HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n"
                                           b"Content-Length: 3\r\n\r\n")
        conn.dataReceived(OK)
        self.assertNotIn(b"/bad", upstream.value())
        self.assertIn(b"HTTP/1.1 400 Bad Request\r\n", self.client.value())
        self.assertTrue(self.client.disconnecting)

    def test_clientGoneMidBody(self):
        """
        The client closing in the middle of a raw body: one record with DC, the upstream
        connection is not reused.
        """
        self.door.dataReceived(self.post() + self.body[:100])
        conn, upstream = self.h.connectUpstream()
        self.door.dataReceived(self.body[100:5000])
        self.door.connectionLost(Failure(ConnectionDone()))
        self.assertEqual([r.flags for r in self.h.records], ["DC"])
        self.assertTrue(upstream.disconnecting)
        self.assertEqual(self.h.pool.idle, [])


class UpstreamParserReuseTests(unittest.SynchronousTestCase):
    """
    A pooled upstream connection keeps its response parser while each response ends by
    the parser's own reading, and takes a fresh one after a response it stopped or
    bypassed.
    """

    def test_reusedAfterWholeResponse(self):
        """
        Responses read whole by llhttp: the same parser serves the next request.
        """
        h = Harness()
        door, client = h.client()
        door.dataReceived(GET)
        conn, upstream = h.connectUpstream()
        conn.dataReceived(OK)
        parser = conn.parser
        door.dataReceived(GET)
        self.assertIs(conn.parser, parser)
        conn.dataReceived(OK)
        self.assertEqual(client.value().count(b"\r\n\r\nok"), 2)

    def test_freshAfterRawBodyAndHead(self):
        """
        After a body passed past the parser, and after a HEAD response (whose parse is
        stopped at its head), the next response is read by a fresh parser, correctly.
        """
        h = Harness()
        door, client = h.client()
        door.dataReceived(GET)
        conn, upstream = h.connectUpstream()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
        parser = conn.parser
        conn.dataReceived(b"56789")
        door.dataReceived(b"HEAD /x HTTP/1.1\r\nHost: svc\r\n\r\n")
        self.assertIsNot(conn.parser, parser)
        parser = conn.parser
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        door.dataReceived(GET)
        self.assertIsNot(conn.parser, parser)
        conn.dataReceived(OK)
        self.assertTrue(client.value().endswith(b"Content-Length: 2\r\n\r\nok"))
        self.assertEqual([(r.method, r.status, r.flags) for r in h.records],
                         [("GET", 200, "-"), ("HEAD", 200, "-"), ("GET", 200, "-")])


class DeadlineSweepTests(unittest.SynchronousTestCase):
    """
    The response timeout is checked by one sweep a second over the exchanges awaiting a
    head, not by a timer per request.
    """

    def test_oneTimerForManyRequests(self):
        """
        However many requests await their response heads, one call is scheduled; it
        is gone once none awaits; answered requests never time out later.
        """
        h = Harness(responseTimeout=3)
        clients = [h.client() for _ in range(50)]
        for door, _ in clients:
            door.dataReceived(GET)
        conns = [h.connectUpstream(i)[0] for i in range(50)]
        self.assertEqual(len(h.engine.awaiting), 50)
        self.assertEqual(len(h.reactor.getDelayedCalls()), 1)
        for conn in conns[:49]:
            conn.dataReceived(OK)
        self.assertEqual(len(h.reactor.getDelayedCalls()), 1)
        conns[49].dataReceived(OK)
        self.assertEqual((len(h.engine.awaiting), h.reactor.getDelayedCalls()), (0, []))
        h.reactor.pump([0.5] * 10)
        self.assertEqual([r.flags for r in h.records], ["-"] * 50)


class IdleReuseTests(unittest.SynchronousTestCase):
    """
    Upstream reuse follows the circuit breaker: every connection it lets open may wait
    idle for the next request, unless C{maxIdle} says fewer.
    """

    def burst(self, h: Harness, count: int) -> list:
        """
        C{count} clients each send one GET at once; the service answers all of them.
        """
        clients = [h.client() for _ in range(count)]
        before = len(h.reactor.tcpClients)
        for door, _ in clients:
            door.dataReceived(GET)
        for index in range(before, len(h.reactor.tcpClients)):
            h.connectUpstream(index)
        conns = [door._current.stream for door, _ in clients]
        for conn in conns:
            conn.dataReceived(OK)
        for _, transport in clients:
            self.assertTrue(transport.value().endswith(b"\r\n\r\nok"))
        return conns

    def test_burstAboveOldCapReused(self):
        """
        With the default limits, 300 requests in flight at once leave 300 idle
        connections, and a second burst of 300 opens no new connection.
        """
        h = Harness()
        self.burst(h, 300)
        self.assertEqual((len(h.reactor.tcpClients), len(h.pool.idle)), (300, 300))
        self.burst(h, 300)
        self.assertEqual((len(h.reactor.tcpClients), len(h.pool.idle)), (300, 300))

    def test_explicitCap(self):
        """
        C{maxIdle} set below C{maxConnections} closes the connections released past it.
        """
        h = Harness()
        h.pool.config = UpstreamConfig(port=8080, maxIdle=2)
        conns = self.burst(h, 5)
        self.assertEqual(len(h.pool.idle), 2)
        self.assertEqual(sum(conn.transport.disconnecting for conn in conns), 3)


class BodyWithHeadTests(unittest.SynchronousTestCase):
    """
    A Content-Length body that arrives in the same read as its head goes on as a view
    of that read (llhttp's body callback would copy it), and the service gets exactly
    the body, whatever its bytes and whatever follows it.
    """

    def setUp(self):
        self.h = Harness()
        self.door, self.client = self.h.client()
        self.door.dataReceived(GET)
        self.conn, self.upstream = self.h.connectUpstream()
        self.conn.dataReceived(OK)
        self.seen = []
        original = Exchange.requestBody

        def spy(exchange, data):
            self.seen.append(type(data))
            return original(exchange, data)

        self.patch(Exchange, "requestBody", spy)
        self.upstream.clear()
        self.client.clear()

    def answer(self, count: int = 1) -> None:
        for _ in range(count):
            self.conn.dataReceived(OK)

    def test_viewOfTheRead(self):
        """
        Head and whole body in one read: one view goes on, head and body reach the
        service in one write, the record counts the body.
        """
        body = b"a\r\n\r\nPOST /p HTTP/1.1\r\n\r\n" * 3
        self.door.dataReceived(b"POST /p HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        sent = self.upstream.value()
        self.assertTrue(sent.startswith(b"POST /p HTTP/1.1\r\nHost: svc\r\n"))
        self.assertTrue(sent.endswith(b"\r\n\r\n" + body), sent)
        self.assertEqual(sent.count(b"POST /p HTTP/1.1\r\nHost"), 1)
        self.assertEqual(self.seen, [memoryview])
        self.answer()
        self.assertEqual(self.h.records[-1].bytesReceived, len(body))
        self.assertEqual(self.client.value(), b"HTTP/1.1 200 OK\r\nServer: amazing-proxy\r\nContent-Length: 2\r\n\r\nok")

    def test_restInLaterReads(self):
        """
        Part of the body with the head, the rest later: the rest goes on as read.
        """
        self.door.dataReceived(b"POST /p HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\n123")
        self.door.dataReceived(b"4567")
        self.door.dataReceived(b"890")
        self.assertTrue(self.upstream.value().endswith(b"\r\n\r\n1234567890"))
        self.assertEqual(self.seen, [memoryview, bytes, bytes])
        self.answer()
        self.assertEqual(self.h.records[-1].bytesReceived, 10)

    def test_pipelinedAfterTheBody(self):
        """
        Requests after the body in the same read are parsed by a fresh parser and
        forwarded in turn; a second body in the read goes through llhttp.
        """
        self.door.dataReceived(b"POST /1 HTTP/1.1\r\nHost: svc\r\nContent-Length: 4\r\n\r\nGET "
                               b"GET /2 HTTP/1.1\r\nHost: svc\r\n\r\n"
                               b"POST /3 HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\n\r\nzz")
        self.assertTrue(self.upstream.value().endswith(b"\r\n\r\nGET "))
        self.answer()
        self.assertIn(b"GET /2 HTTP/1.1\r\n", self.upstream.value())
        self.answer()
        self.assertTrue(self.upstream.value().endswith(b"\r\n\r\nzz"))
        self.answer()
        self.assertEqual([r.path for r in self.h.records[-3:]], ["/1", "/2", "/3"])
        self.assertEqual([r.bytesReceived for r in self.h.records[-3:]], [4, 0, 2])
        self.assertEqual(self.seen, [memoryview, bytes])
        self.assertEqual(self.client.value().count(b"HTTP/1.1 200 OK"), 3)

    def test_secondInTheRead(self):
        """
        A body request that is not the first to begin in its read goes through llhttp.
        """
        self.door.dataReceived(GET + b"POST /p HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\n\r\nok")
        self.answer()
        self.assertTrue(self.upstream.value().endswith(b"\r\n\r\nok"))
        self.assertEqual(self.seen, [bytes])

    def test_leadingEmptyLines(self):
        """
        A read that starts with empty lines before the request line goes through
        llhttp (the head's end is not searched for).
        """
        self.door.dataReceived(b"\r\n\r\nPOST /p HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(self.upstream.value().endswith(b"\r\n\r\nok"))
        self.assertEqual(self.seen, [bytes])

    def test_headAcrossReads(self):
        """
        A head that began in an earlier read goes through llhttp.
        """
        self.door.dataReceived(b"POST /p HTTP/1.1\r\nHost: svc\r\n")
        self.door.dataReceived(b"Content-Length: 2\r\n\r\nok")
        self.assertTrue(self.upstream.value().endswith(b"\r\n\r\nok"))
        self.assertEqual(self.seen, [bytes])

    def test_filtersGetBytes(self):
        """
        A request body filter gets bytes, not the view.
        """
        from sidecar.filters import Filter, FilterChain

        got = []

        class Upper(Filter):
            wantsRequestBody = True

            def requestBody(self, call, data):
                got.append(type(data))
                return data.upper()

        self.h.engine.filters = FilterChain([Upper()])
        self.door.dataReceived(b"POST /p HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(got, [bytes])
        self.assertTrue(self.upstream.value().endswith(b"2\r\nOK\r\n0\r\n\r\n"), self.upstream.value())

    def test_nothingKept(self):
        """
        Stopping llhttp at each such head keeps nothing alive: no frame, traceback or
        exchange of an earlier request (an exception instance raised again adds to
        the traceback it had).
        """
        import gc
        import types

        def alive():
            return sum(1 for o in gc.get_objects() if type(o) in (types.FrameType, types.TracebackType, Exchange))

        request = b"POST /p HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\n\r\nok"
        self.addCleanup(gc.enable)
        gc.disable()
        for _ in range(5):
            self.door.dataReceived(request)
            self.answer()
        before = alive()
        for _ in range(20):
            self.door.dataReceived(request)
            self.answer()
        self.assertEqual(alive(), before)
        self.assertEqual(self.seen, [memoryview] * 25)
