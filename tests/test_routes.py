# -*- test-case-name: tests.test_routes -*-
"""
Routes (L{sidecar.routes}) run by the engine on a memory reactor: matching, the named
upstream, per-route timeouts and filters, and retries (conditions, attempts, per-try
timeout, budget, back-off), checked against what the client and the services get.
"""

from __future__ import annotations

from typing import Any, Dict, List

from twisted.internet.error import ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.trial import unittest

from sidecar.builtins import FilterContext
from sidecar.configfile import build, parse
from sidecar.filters import Call
from sidecar.routes import RetryPolicy, RouteMatch
from sidecar.upstream import UpstreamPool
from tests.test_exchange import GET, OK, Harness


def routed(h: Harness, yaml: str) -> Dict[str, UpstreamPool]:
    """
    Build C{yaml} (a configuration file's text) on C{h}'s reactor, as the service
    does, and put it in C{h}'s engine; return the named pools.
    """
    spec, data = parse(yaml.encode(), "test.yaml")
    active = build(spec, data, "digest", FilterContext(clock=h.reactor, random=lambda: 0.5),
                   lambda settings: UpstreamPool(h.reactor, h.reactor, settings),
                   requestsActive=lambda: h.recorder.requestsActive)
    h.engine.filters = active.chain
    h.engine.pools = dict(active.pools)
    return active.pools


def connect(h: Harness, index: int = -1) -> tuple:
    return h.connectUpstream(index)


def refuse(h: Harness, index: int = -1) -> None:
    host, port, factory, timeout, bind = h.reactor.tcpClients[index]
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))


class MatchTests(unittest.SynchronousTestCase):
    """
    What a route's match accepts.
    """

    def call(self, method: bytes, path: bytes, headers: List[Any] = ()) -> Call:
        return Call(method, path, "svc", list(headers), "1.2.3.4:5", "")

    def test_match(self):
        """
        Prefix, methods and headers must all fit; a header with no value only has to
        be there.
        """
        m = RouteMatch(prefix=b"/api", methods=frozenset([b"GET"]), headers=((b"x-canary", b"1"), (b"x-user", None)))
        headers = [(b"X-Canary", b"1"), (b"x-user", b"")]
        self.assertTrue(m.matches(self.call(b"GET", b"/api/v1", headers)))
        self.assertFalse(m.matches(self.call(b"POST", b"/api/v1", headers)))
        self.assertFalse(m.matches(self.call(b"GET", b"/ap", headers)))
        self.assertFalse(m.matches(self.call(b"GET", b"/api", headers[:1])))
        self.assertFalse(m.matches(self.call(b"GET", b"/api", [(b"X-Canary", b"2"), (b"x-user", b"a")])))

    def test_policyConditions(self):
        """
        Which failures each retry-on condition covers (Envoy's meanings).
        """
        p = RetryPolicy(retryOn=frozenset(["gateway-error"]))
        self.assertEqual([p.wants("status", s) for s in (500, 502, 503, 504)], [False, True, True, True])
        self.assertTrue(p.wants("connect-failure", 0))
        self.assertFalse(p.wants("reset", 0))
        p = RetryPolicy(retryOn=frozenset(["retriable-status-codes"]), retriableStatusCodes=frozenset([409]))
        self.assertTrue(p.wants("status", 409))
        self.assertFalse(p.wants("status", 500))


ROUTES = """
upstreams:
  orders: {address: "127.0.0.1:9001"}
routes:
  - name: orders
    match: {prefix: /orders, methods: [GET]}
    upstream: orders
    timeout: 2
    filters:
      - name: headers
        config: {request: {set: {x-route: orders}}}
  - name: canary
    match: {prefix: /, headers: {x-canary: "1"}}
    upstream: orders
  - name: api
    match: {prefix: /api}
"""


class RoutingTests(unittest.SynchronousTestCase):
    """
    The router picks the upstream, the timeout and the filters of each request.
    """

    def test_namedUpstream(self):
        """
        A request for C{/orders} goes to the C{orders} upstream with that route's
        filter applied; one for C{/api} to the default upstream without it.
        """
        h = Harness()
        routed(h, ROUTES)
        door, client = h.client()
        door.dataReceived(b"GET /orders/7 HTTP/1.1\r\nHost: svc\r\n\r\n")
        door2, client2 = h.client()
        door2.dataReceived(b"GET /api/x HTTP/1.1\r\nHost: svc\r\n\r\n")
        self.assertEqual([(c[0], c[1]) for c in h.reactor.tcpClients], [("127.0.0.1", 9001), ("127.0.0.1", 8080)])
        conn, upstream = connect(h, 0)
        self.assertIn(b"x-route: orders\r\n", upstream.value())
        conn2, upstream2 = connect(h, 1)
        self.assertNotIn(b"x-route", upstream2.value())
        conn.dataReceived(OK)
        conn2.dataReceived(OK)
        self.assertEqual(sorted(r.upstreamHost for r in h.records), ["127.0.0.1:8080", "127.0.0.1:9001"])

    def test_headerAndMethod(self):
        """
        A POST to C{/orders} does not take the GET-only route; with C{x-canary: 1} it
        takes the canary route.
        """
        h = Harness()
        routed(h, ROUTES)
        door, client = h.client()
        door.dataReceived(b"POST /orders HTTP/1.1\r\nHost: svc\r\nX-Canary: 1\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(h.reactor.tcpClients[0][1], 9001)
        conn, upstream = connect(h)
        self.assertNotIn(b"x-route", upstream.value())

    def test_noRoute(self):
        """
        No route matches: 404 with flag C{NR}; no upstream is asked.
        """
        h = Harness()
        routed(h, ROUTES)
        door, client = h.client()
        door.dataReceived(b"GET /other HTTP/1.1\r\nHost: svc\r\n\r\n")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 404 Not Found\r\n"))
        self.assertEqual(h.reactor.tcpClients, [])
        self.assertEqual([(r.status, r.flags) for r in h.records], [(404, "NR")])

    def test_routeTimeout(self):
        """
        A route's timeout replaces the engine's (10 s here).
        """
        h = Harness()
        routed(h, ROUTES)
        door, client = h.client()
        door.dataReceived(b"GET /orders HTTP/1.1\r\nHost: svc\r\n\r\n")
        connect(h)
        h.reactor.advance(1.9)
        self.assertEqual(client.value(), b"")
        h.reactor.advance(0.1)
        self.assertIn(b" 504 ", client.value())
        self.assertEqual([r.flags for r in h.records], ["UT"])

    def test_inFlightKeepsItsConfiguration(self):
        """
        A request keeps the chain and route it started with when the engine's
        configuration is swapped while it is in flight (a reload).
        """
        h = Harness()
        routed(h, ROUTES)
        door, client = h.client()
        door.dataReceived(b"GET /orders HTTP/1.1\r\nHost: svc\r\n\r\n")
        routed(h, "routes: [{name: other, filters: [{name: local_ratelimit, config: {maxTokens: 1, fillInterval: 1}}]}]")
        conn, upstream = connect(h)
        h.reactor.advance(1.5)
        conn.dataReceived(OK)
        self.assertIn(b" 200 OK", client.value())
        self.assertEqual(h.records[-1].upstreamHost, "127.0.0.1:9001")
        door, client = h.client()
        door.dataReceived(b"GET /orders HTTP/1.1\r\nHost: svc\r\n\r\n")
        self.assertEqual(h.reactor.tcpClients[-1][1], 8080)


RETRY = """
routes:
  - name: r
    retry: {attempts: 2, retryOn: "connect-failure,reset,5xx", perTryTimeout: 1}
    timeout: 2.5
"""


class RetryTests(unittest.SynchronousTestCase):
    """
    Retries of requests without a body, with back-off on the clock.
    """

    def test_connectFailure(self):
        """
        A refused connect is tried again after the back-off; the second try answers.
        """
        h = Harness()
        routed(h, RETRY)
        door, client = h.client()
        door.dataReceived(GET)
        refuse(h)
        self.assertEqual(len(h.reactor.tcpClients), 1)
        h.reactor.advance(0.0125)  # half of 25 ms: the random source says 0.5
        self.assertEqual(len(h.reactor.tcpClients), 2)
        conn, upstream = connect(h)
        conn.dataReceived(OK)
        self.assertIn(b" 200 OK", client.value())
        self.assertEqual([(r.status, r.flags) for r in h.records], [(200, "-")])

    def test_5xxThenLimit(self):
        """
        A 503 is retried (the 503 never reaches the client); after the attempts, the
        last 503 goes to the client with C{URX}.
        """
        h = Harness()
        routed(h, RETRY)
        door, client = h.client()
        door.dataReceived(GET)
        for attempt in range(3):
            conn, upstream = connect(h)
            self.assertTrue(upstream.value().startswith(b"GET /x HTTP/1.1\r\n"))
            conn.dataReceived(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy")
            h.reactor.advance(1)
        self.assertEqual(len(h.reactor.tcpClients), 3)
        self.assertTrue(client.value().startswith(b"HTTP/1.1 503 Busy\r\n"), client.value())
        self.assertEqual([(r.status, r.flags) for r in h.records], [(503, "URX")])

    def test_perTryTimeout(self):
        """
        A try that does not answer within the per-try timeout is abandoned and tried
        again; the route's timeout bounds all tries: 504 at 2.5 s.
        """
        h = Harness()
        routed(h, RETRY)
        door, client = h.client()
        door.dataReceived(GET)
        conn1, up1 = connect(h)
        h.reactor.advance(1.0)
        self.assertTrue(up1.disconnecting)
        h.reactor.advance(0.0125)
        conn2, up2 = connect(h)
        h.reactor.advance(1.0)
        h.reactor.advance(0.025)
        conn3, up3 = connect(h)
        self.assertEqual(client.value(), b"")
        h.reactor.advance(2.5 - h.reactor.seconds() + 0.001)
        self.assertIn(b" 504 ", client.value())
        self.assertEqual(len(h.reactor.tcpClients), 3)

    def test_bodyNotRetried(self):
        """
        A request with a body is not tried again (the proxy keeps no copy).
        """
        h = Harness()
        routed(h, RETRY)
        door, client = h.client()
        door.dataReceived(b"POST /x HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\n\r\nhi")
        conn, upstream = connect(h)
        conn.dataReceived(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 500 Oops"))
        self.assertEqual(len(h.reactor.tcpClients), 1)

    def test_resetRetried(self):
        """
        A connection closed before the response head is tried again on a new one.
        """
        h = Harness()
        routed(h, RETRY)
        door, client = h.client()
        door.dataReceived(GET)
        conn, upstream = connect(h)
        conn.connectionLost(Failure(ConnectionRefusedError()))
        h.reactor.advance(0.02)
        conn2, upstream2 = connect(h)
        conn2.dataReceived(OK)
        self.assertIn(b" 200 OK", client.value())

    def test_clientLeavesDuringBackoff(self):
        """
        The client leaves while a retry waits: the timer is cancelled, no new connect,
        one record.
        """
        h = Harness()
        routed(h, RETRY)
        door, client = h.client()
        door.dataReceived(GET)
        refuse(h)
        door.connectionLost(Failure(ConnectionRefusedError()))
        h.reactor.advance(1)
        self.assertEqual(len(h.reactor.tcpClients), 1)
        self.assertEqual([r.flags for r in h.records], ["DC"])
        self.assertEqual(h.reactor.getDelayedCalls(), [])

    def test_budget(self):
        """
        The budget: with 0 % and a minimum concurrency of 1, one request in flight
        retries and a second does not while the first's retry is in flight; retries
        leave the budget when their request ends.
        """
        h = Harness()
        routed(h, """
routes:
  - name: r
    retry: {attempts: 3, retryOn: connect-failure, budgetPercent: 0, minRetryConcurrency: 1}
""")
        rule = h.engine.filters.router.routes[0].retry
        door1, client1 = h.client()
        door1.dataReceived(GET)
        refuse(h)
        self.assertEqual(rule.active, 1)
        door2, client2 = h.client()
        door2.dataReceived(GET)
        refuse(h)
        self.assertIn(b" 502 ", client2.value())
        self.assertEqual(rule.overflows, 1)
        h.reactor.advance(0.02)
        conn, upstream = connect(h)
        conn.dataReceived(OK)
        self.assertIn(b" 200 OK", client1.value())
        self.assertEqual(rule.active, 0)


class ReadmeExampleTests(unittest.SynchronousTestCase):
    """
    The README's example filter and configuration do what the README says.
    """

    def test_example(self):
        """
        The 20-line filter, run in the README's configuration (with the filter given
        directly): no C{X-Team} is a 403 C{RBAC}; C{X-Team: canary} goes to the
        C{canary} upstream with C{X-Checked-By}; the response says C{x-team-seen}.
        """
        import os
        import re

        from sidecar.filters import FilterChain

        readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
        section = readme[readme.index("## Filters, routes and a configuration file that reloads"):]
        code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
        self.assertLessEqual(len(code.strip().splitlines()), 20)
        yaml = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
        namespace: Dict[str, Any] = {}
        exec(compile(code, "README.md", "exec"), namespace)
        h = Harness()
        pools = routed(h, yaml.replace("filters:\n  - name: require-team\n", ""))
        chain = h.engine.filters
        example = namespace["RequireTeam"]()
        for route in chain.router.routes:
            route.chain = FilterChain([example] + route.chain.filters, pools=pools)
        door, client = h.client()
        door.dataReceived(GET)
        self.assertTrue(client.value().startswith(b"HTTP/1.1 403 Forbidden\r\n"))
        door, client = h.client()
        door.dataReceived(b"GET /api/x HTTP/1.1\r\nHost: svc\r\nX-Team: canary\r\n\r\n")
        self.assertEqual(h.reactor.tcpClients[-1][1], 8081)
        conn, upstream = connect(h)
        self.assertIn(b"x-checked-by: sidecar\r\n", upstream.value())
        conn.dataReceived(OK)
        self.assertIn(b"x-team-seen: canary\r\n", client.value())
        self.assertEqual([(r.status, r.flags) for r in h.records], [(403, "RBAC"), (200, "-")])
