# -*- test-case-name: tests.test_callcount -*-
"""
A regression guard that times nothing: the Python function calls one proxied request
costs on the fast door, counted with C{sys.setprofile}, stay under a recorded bound.

A small GET is served 100 times over one client connection and one pooled upstream
connection, in memory (L{StringTransport}, L{MemoryReactorClock}): parsing the request,
the forwarding rules, the exchange, the upstream's framing and parse, the response, the
record.  The bound is the count measured when it was set plus a little room; a change
that adds calls on the hot path fails here and has to say why (then raise the bound),
one that removes some should lower it.

With one client, one request awaits its response at a time, so the response timeout's
sweep (L{sidecar.exchange.Engine.sweepDeadlines}) is scheduled and cancelled for each
request (seven of the calls counted); with more requests in flight it stays scheduled
and costs nothing per request.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any, Dict

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest

from sidecar.config import UpstreamConfig
from sidecar.downstream import DownstreamProtocol
from sidecar.exchange import Engine
from sidecar.stats import Recorder
from sidecar.upstream import UpstreamPool

#: What wrk sends in the benchmark's small GET, and nginx's answer.
REQUEST = (b"GET /small HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUser-Agent: wrk\r\n"
           b"Accept: */*\r\n\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Tue, 01 Dec 2026 03:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\n"
            b"hello, world\n")

REQUESTS = 100

#: Python calls per proxied small GET, measured when the bound was last set, and the
#: bound (the count plus 5%).
MEASURED = 78
BOUND = 82


def countCalls(requests: int = REQUESTS) -> Dict[str, Any]:
    """
    Serve C{requests} small GETs in memory and count the Python function calls made
    while doing it.

    @return: C{{"perRequest": float, "byFunction": Counter}}.
    """
    reactor = MemoryReactorClock()
    pool = UpstreamPool(reactor, reactor, UpstreamConfig(port=8080))
    engine = Engine(reactor, pool, Recorder([]), b"amazing-proxy", 60.0)
    door = DownstreamProtocol(engine)
    client = StringTransport(peerAddress=IPv4Address("TCP", "10.1.2.3", 4444))
    door.makeConnection(client)
    # The first request connects; the ones counted reuse the pooled connection.
    door.dataReceived(REQUEST)
    host, port, factory, timeout, bind = reactor.tcpClients[0]
    conn = factory.buildProtocol(None)
    upstream = StringTransport()
    conn.makeConnection(upstream)
    conn.dataReceived(RESPONSE)
    assert client.value().endswith(b"hello, world\n"), client.value()

    byFunction: Counter = Counter()

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            code = frame.f_code
            byFunction[f"{code.co_filename.rsplit('/', 2)[-1]}:{code.co_name}"] += 1

    for _ in range(requests):
        client.clear()
        upstream.clear()
        sys.setprofile(profile)
        try:
            door.dataReceived(REQUEST)
            conn.dataReceived(RESPONSE)
        finally:
            sys.setprofile(None)
        if not client.value().endswith(b"hello, world\n") or not upstream.value().startswith(b"GET /small "):
            raise AssertionError("the request was not proxied")
    assert len(reactor.tcpClients) == 1
    return {"perRequest": sum(byFunction.values()) / requests, "byFunction": byFunction}


class CallCountTests(unittest.SynchronousTestCase):
    """
    The fast door's per-request Python call count.
    """

    def test_bound(self):
        """
        A proxied small GET on a pooled connection makes at most L{BOUND} Python
        function calls (the most frequent are named on failure).
        """
        counted = countCalls()
        top = ", ".join(f"{name} {count / REQUESTS:g}" for name, count in counted["byFunction"].most_common(15))
        self.assertLessEqual(counted["perRequest"], BOUND,
                             f"{counted['perRequest']:g} calls per request (bound {BOUND}); most: {top}")


if __name__ == "__main__":
    result = countCalls()
    print(f"{result['perRequest']:g} calls per request")
    for name, count in result["byFunction"].most_common():
        print(f"{count / REQUESTS:6g}  {name}")
