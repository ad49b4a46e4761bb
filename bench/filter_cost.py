# -*- test-case-name: bench.test_bench -*-
"""
What one filter adds to a request, measured in memory: the fast door and the engine on
a memory reactor (the Harness of C{tests/test_exchange.py}), a kept-alive client and
a pooled upstream connection, no access log, no sockets.  Each round sends the same
GET and answers it, with no filter, with one trivial filter (a request-head hook that
returns C{None}), and with a trivial filter in both head phases.  The variants run
interleaved, REPEATS times ROUNDS requests each; the figures are medians of this
process's CPU time per request (CPU time, not wall time, and paired differences: the
figure holds better on a busy machine).

    python bench/filter_cost.py [ROUNDS] [REPEATS]
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any, Callable, Optional

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


def harness(chain: Optional[FilterChain]) -> Callable[[int], float]:
    """
    A door and a pooled upstream connection on a memory reactor, warmed up; returns
    C{run(rounds)}, which sends C{rounds} requests and returns the CPU microseconds per
    request.
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

    def run(rounds: int) -> float:
        start = time.process_time()
        for _ in range(rounds):
            client.clear()
            upstream.clear()
            door.dataReceived(GET)
            conn.dataReceived(OK)
        elapsed = time.process_time() - start
        assert client.value().endswith(b"ok") and len(reactor.tcpClients) == 1
        return elapsed / rounds * 1e6

    run(200)
    return run


def main(argv: list) -> None:
    rounds = int(argv[1]) if len(argv) > 1 else 2000
    repeats = int(argv[2]) if len(argv) > 2 else 60
    variants = [("no filter", None), ("one trivial filter (request head)", FilterChain([RequestOnly()])),
                ("one trivial filter (both heads)", FilterChain([BothHeads()]))]
    runs = [(name, harness(chain)) for name, chain in variants]
    figures: dict = {name: [] for name, _ in variants}
    extra: dict = {name: [] for name, _ in variants}
    for _ in range(repeats):
        # Interleaved, so that the machine's drift hits every variant alike; the added
        # cost is the median of the paired differences.
        base = runs[0][1](rounds)
        figures[runs[0][0]].append(base)
        for name, run in runs[1:]:
            figure = run(rounds)
            figures[name].append(figure)
            extra[name].append(figure - base)
    for name, _ in variants:
        line = f"{name:36s} median {statistics.median(figures[name]):7.2f} us/request"
        if extra[name]:
            line += f"  (+{statistics.median(extra[name]):5.2f} median of paired differences)"
        print(line)


if __name__ == "__main__":
    main(sys.argv)
