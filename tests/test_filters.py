# -*- test-case-name: tests.test_filters -*-
"""
Python filters on the request path (L{sidecar.filters}), driven through the fast door
and the engine on a memory reactor: every phase, local replies, Deferreds, failures.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial import unittest

from sidecar.filters import Filter, FilterChain
from tests.test_exchange import GET, OK, Harness


def filtered(*filters) -> Harness:
    h = Harness()
    h.engine.filters = FilterChain(list(filters))
    return h


class Recording(Filter):
    """
    Notes every phase it sees.
    """

    name = "recording"

    def __init__(self, log: list) -> None:
        self.log = log

    def requestHead(self, call):
        self.log.append(("request", call.method, call.path))

    def responseHead(self, call):
        self.log.append(("response", call.status))

    def logged(self, record):
        self.log.append(("logged", record.status))


class RequestHeadTests(unittest.SynchronousTestCase):
    """
    The request-head phase may change the request, answer it, or wait.
    """

    def test_headersChanged(self):
        """
        A filter's header changes reach the service; the proxy's own headers stay.
        """
        class Tag(Filter):
            def requestHead(self, call):
                call.setHeader(b"X-Tag", b"1")
                call.removeHeader(b"x-drop")

        h = filtered(Tag())
        door, client = h.client()
        door.dataReceived(b"GET /x HTTP/1.1\r\nHost: svc\r\nX-Drop: a\r\n\r\n")
        conn, upstream = h.connectUpstream()
        sent = upstream.value()
        self.assertIn(b"X-Tag: 1\r\n", sent)
        self.assertNotIn(b"X-Drop", sent)
        self.assertIn(b"X-Request-Id: ", sent)

    def test_localReply(self):
        """
        A filter that answers: the service is never asked, the client gets the
        filter's status, body and headers, the record its flag.
        """
        class Deny(Filter):
            def requestHead(self, call):
                return call.respond(429, b"slow down\n", [(b"Retry-After", b"1")], flag="RL")

        h = filtered(Deny())
        door, client = h.client()
        door.dataReceived(GET)
        self.assertEqual(h.reactor.tcpClients, [])
        self.assertTrue(client.value().startswith(b"HTTP/1.1 429 Too Many Requests\r\n"))
        self.assertIn(b"Retry-After: 1\r\n", client.value())
        self.assertTrue(client.value().endswith(b"\r\n\r\nslow down\n"))
        self.assertEqual([(r.status, r.flags) for r in h.records], [(429, "RL")])

    def test_deferredWaitsWithoutBlocking(self):
        """
        A filter returning a Deferred holds its exchange (the body with it) until it
        fires; another client's request goes through meanwhile.
        """
        waiting = []

        class Slow(Filter):
            def requestHead(self, call):
                if call.path == b"/slow":
                    d = Deferred()
                    waiting.append(d)
                    return d
                return None

        h = filtered(Slow())
        slow, slowClient = h.client()
        slow.dataReceived(b"POST /slow HTTP/1.1\r\nHost: svc\r\nContent-Length: 4\r\n\r\nbody")
        self.assertEqual(h.reactor.tcpClients, [])
        fast, fastClient = h.client()
        fast.dataReceived(GET)
        conn, upstream = h.connectUpstream()
        conn.dataReceived(OK)
        self.assertTrue(fastClient.value().endswith(b"ok"))
        upstream.clear()
        waiting[0].callback(None)
        # The pooled connection serves it, head and held body in one piece.
        self.assertEqual(len(h.reactor.tcpClients), 1)
        self.assertTrue(upstream.value().startswith(b"POST /slow HTTP/1.1\r\n"))
        self.assertTrue(upstream.value().endswith(b"\r\n\r\nbody"))

    def test_raisingFilter(self):
        """
        A filter that raises: 500, flag FE, one record, the filter named in the log.
        """
        class Broken(Filter):
            name = "broken"

            def requestHead(self, call):
                raise ValueError("oops")

        h = filtered(Broken())
        door, client = h.client()
        door.dataReceived(GET)
        self.assertTrue(client.value().startswith(b"HTTP/1.1 500 Internal Server Error\r\n"))
        self.assertEqual([(r.status, r.flags) for r in h.records], [(500, "FE")])

    def test_failedDeferred(self):
        """
        A filter whose Deferred fails is a 500 with flag FE too.
        """
        d = Deferred()

        class Later(Filter):
            def requestHead(self, call):
                return d

        h = filtered(Later())
        door, client = h.client()
        door.dataReceived(GET)
        d.errback(RuntimeError("auth service down"))
        self.assertTrue(client.value().startswith(b"HTTP/1.1 500 "))
        self.assertEqual([r.flags for r in h.records], ["FE"])

    def test_clientLeavesWhileWaiting(self):
        """
        A client that leaves while a filter waits: one record (DC), and the late
        answer of the filter changes nothing.
        """
        d = Deferred()

        class Later(Filter):
            def requestHead(self, call):
                return d

        h = filtered(Later())
        door, client = h.client()
        door.dataReceived(GET)
        door.connectionLost()
        d.callback(None)
        self.assertEqual(h.reactor.tcpClients, [])
        self.assertEqual([r.flags for r in h.records], ["DC"])

    def test_orderAndStop(self):
        """
        Filters run in order; the first local reply stops the rest.
        """
        log = []

        class Stop(Filter):
            def requestHead(self, call):
                log.append("stop")
                call.respond(403, b"no\n", flag="RBAC")

        h = filtered(Recording(log), Stop(), Recording(log))
        door, client = h.client()
        door.dataReceived(GET)
        self.assertEqual(log, [("request", b"GET", b"/x"), "stop", ("logged", 403), ("logged", 403)])


class ResponseTests(unittest.SynchronousTestCase):
    """
    The response phases may change or replace the response.
    """

    def test_responseHeadChanged(self):
        """
        Response filters see the status and change the headers; they run in reverse
        order.
        """
        log = []

        class Add(Filter):
            def responseHead(self, call):
                log.append("add")
                call.responseHeaders.append((b"X-Served-By", b"sidecar"))

        h = filtered(Add(), Recording(log))
        door, client = h.client()
        door.dataReceived(GET)
        conn, upstream = h.connectUpstream()
        conn.dataReceived(OK)
        self.assertIn(b"X-Served-By: sidecar\r\n", client.value())
        self.assertTrue(client.value().endswith(b"\r\n\r\nok"))
        self.assertEqual(log[:3], [("request", b"GET", b"/x"), ("response", 200), "add"])

    def test_deferredResponseHead(self):
        """
        A response-head filter that waits holds the body; when it fires the head and
        the body go out whole, and the connection returns to the pool.
        """
        d = Deferred()

        class Later(Filter):
            def responseHead(self, call):
                return d

        h = filtered(Later())
        door, client = h.client()
        door.dataReceived(GET)
        conn, upstream = h.connectUpstream()
        conn.dataReceived(OK)
        self.assertEqual(client.value(), b"")
        self.assertEqual(h.pool.idle, [conn])
        d.callback(None)
        self.assertEqual(client.value(), b"HTTP/1.1 200 OK\r\nServer: amazing-proxy\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual([(r.status, r.bytesSent) for r in h.records], [(200, 2)])

    def test_responseReplaced(self):
        """
        A response filter may replace the service's answer.
        """
        class Hide(Filter):
            def responseHead(self, call):
                if call.status >= 500:
                    call.respond(503, b"try later\n", flag="UH")

        h = filtered(Hide())
        door, client = h.client()
        door.dataReceived(GET)
        conn, upstream = h.connectUpstream()
        conn.dataReceived(b"HTTP/1.1 500 Oops\r\nContent-Length: 5\r\n\r\nstack")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 503 Service Unavailable\r\n"))
        self.assertNotIn(b"stack", client.value())
        self.assertEqual([(r.status, r.flags) for r in h.records], [(503, "UH")])

    def test_bodyFilters(self):
        """
        Body filters opt in; a changed body is re-framed (chunked both ways), so the
        length the service or client sees is always the real one.
        """
        class Upper(Filter):
            wantsRequestBody = True
            wantsResponseBody = True

            def requestBody(self, call, data):
                return data.upper() + b"!"

            def responseBody(self, call, data):
                return data.upper()

        h = filtered(Upper())
        door, client = h.client()
        door.dataReceived(b"POST /p HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n\r\nabc")
        conn, upstream = h.connectUpstream()
        sent = upstream.value()
        self.assertIn(b"Transfer-Encoding: chunked\r\n", sent)
        self.assertNotIn(b"Content-Length", sent)
        self.assertTrue(sent.endswith(b"\r\n\r\n4\r\nABC!\r\n0\r\n\r\n"))
        conn.dataReceived(OK)
        self.assertIn(b"Transfer-Encoding: chunked\r\n", client.value())
        self.assertTrue(client.value().endswith(b"2\r\nOK\r\n0\r\n\r\n"))

    def test_bodyFilterOnBodyBeforeTurn(self):
        """
        A request whose body arrives while it waits its turn (pipelined behind another)
        has that body filtered too, when its turn comes: no byte reaches the service
        unfiltered.
        """
        class Upper(Filter):
            wantsRequestBody = True

            def requestBody(self, call, data):
                return data.upper() + b"!"

        h = filtered(Upper())
        door, client = h.client()
        door.dataReceived(b"GET /first HTTP/1.1\r\nHost: svc\r\n\r\n"
                          b"POST /p HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n\r\nabc")
        conn, upstream = h.connectUpstream()
        upstream.clear()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        sent = upstream.value()
        self.assertTrue(sent.startswith(b"POST /p HTTP/1.1\r\n"), sent)
        self.assertTrue(sent.endswith(b"\r\n\r\n4\r\nABC!\r\n0\r\n\r\n"), sent)

    def test_bodyFilterFailsOnBodyBeforeTurn(self):
        """
        A body filter that raises on a body that arrived before its request's turn:
        500 with flag FE in that turn, nothing of the body sent upstream.
        """
        class Broken(Filter):
            wantsRequestBody = True

            def requestBody(self, call, data):
                raise ValueError("no")

        h = filtered(Broken())
        door, client = h.client()
        door.dataReceived(b"GET /first HTTP/1.1\r\nHost: svc\r\n\r\n"
                          b"POST /p HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n\r\nabc")
        conn, upstream = h.connectUpstream()
        upstream.clear()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(upstream.value(), b"")
        self.assertIn(b"HTTP/1.1 500 Internal Server Error\r\n", client.value())
        self.assertEqual([(r.status, r.flags) for r in h.records], [(200, "-"), (500, "FE")])
        self.flushLoggedErrors()


class ChainTests(unittest.SynchronousTestCase):
    """
    The chain only calls what a filter overrides, and refuses what is not a filter.
    """

    def test_onlyOverriddenHooks(self):
        """
        A filter that overrides only C{logged} takes part only in that phase.
        """
        class LogOnly(Filter):
            def logged(self, record):
                pass

        chain = FilterChain([LogOnly()])
        self.assertEqual((chain.requestHeads, chain.responseHeads, chain.requestBodies, chain.responseBodies),
                         ([], [], [], []))
        self.assertEqual(len(chain.loggers), 1)

    def test_notAFilter(self):
        """
        Something that does not provide IFilter is refused when the chain is built.
        """
        self.assertRaises(TypeError, FilterChain, [object()])
