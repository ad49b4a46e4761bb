# -*- test-case-name: bench.test_bench -*-
"""
What one filter adds to a request, measured in memory: the fast door and the engine on
a memory reactor (the Harness of C{tests/test_exchange.py}), a kept-alive client and
a pooled upstream connection, no access log, no sockets.  Each round sends the same
GET and answers it; the rounds run with no filter, then with one trivial filter (a
request-head hook that returns C{None}), then with a trivial filter in both head
phases; the best of several repeats is reported, in microseconds of this process's CPU time per
request (CPU time, not wall time: the figure holds on a busy machine).

    python bench/filter_cost.py [ROUNDS] [REPEATS]
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from sidecar.config import UpstreamConfig
from sidecar.downstream import DownstreamProtocol
from sidecar.exchange import Engine
from sidecar.filters import Filter, FilterChain
from sidecar.stats import Recorder
from sidecar.upstream import UpstreamPool

GET = b"GET /x HTTP/1.1\r\nHost: svc\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class RequestOnly(Filter):
    name = "request-only"

    def requestHead(self, call: Any) -> None:
        return None


class BothHeads(Filter):
    name = "both-heads"

    def requestHead(self, call: Any) -> None:
        return None

    def responseHead(self, call: Any) -> None:
        return None


def perRequest(chain: Optional[FilterChain], rounds: int) -> float:
    """
    Microseconds per request over C{rounds} requests on one connection.
    """
    reactor = MemoryReactorClock()
    pool = UpstreamPool(reactor, reactor, UpstreamConfig(port=8080, idleTimeout=1e9))
    engine = Engine(reactor, pool, Recorder([]), b"amazing-proxy", 10.0)
    engine.filters = chain
    door = DownstreamProtocol(engine)
    client = StringTransport(peerAddress=IPv4Address("TCP", "10.1.2.3", 4444))
    door.makeConnection(client)
    door.dataReceived(GET)
    host, port, factory, timeout, bind = reactor.tcpClients[0]
    conn = factory.buildProtocol(None)
    upstream = StringTransport()
    conn.makeConnection(upstream)
    conn.dataReceived(OK)
    start = time.process_time()
    for _ in range(rounds):
        client.clear()
        upstream.clear()
        door.dataReceived(GET)
        conn.dataReceived(OK)
    elapsed = time.process_time() - start
    assert client.value().endswith(b"ok") and len(reactor.tcpClients) == 1
    return elapsed / rounds * 1e6


def main(argv: list) -> None:
    rounds = int(argv[1]) if len(argv) > 1 else 20000
    repeats = int(argv[2]) if len(argv) > 2 else 7
    variants = [("no filter", lambda: None), ("one trivial filter (request head)", lambda: FilterChain([RequestOnly()])),
                ("one trivial filter (both heads)", lambda: FilterChain([BothHeads()]))]
    best = {}
    for _ in range(repeats):
        for name, make in variants:
            figure = perRequest(make(), rounds)
            best[name] = min(best.get(name, figure), figure)
    base = best["no filter"]
    for name, _ in variants:
        print(f"{name:36s} {best[name]:7.2f} us/request  (+{best[name] - base:5.2f})")


if __name__ == "__main__":
    main(sys.argv)
