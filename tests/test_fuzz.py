# -*- test-case-name: tests.test_fuzz -*-
"""
Hostile input, in memory: mutated and random request streams, cut at random places,
fed to the fast door with a service that answers.  Whatever the bytes, nothing escapes
as an exception, every exchange ends in exactly one record, and nothing stays counted
as in flight.  Deterministic (a fixed seed) and bounded (a fixed number of cases).
"""

from __future__ import annotations

import random

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests.test_exchange import Harness

SEEDS = [
    b"GET /a?b=c HTTP/1.1\r\nHost: svc\r\nUser-Agent: x\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /c HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nT: 1\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"HEAD /h HTTP/1.0\r\n\r\n",
    b"PUT /e HTTP/1.1\r\nHost: svc\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
]
RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nxyz",
    b"HTTP/1.1 200 OK\r\n\r\nuntil-close",
    b"garbage\r\n\r\n",
]


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
    pieces, at = [], 0
    while at < len(data):
        n = rng.randint(1, 64)
        pieces.append(data[at:at + n])
        at += n
    return pieces


class FuzzTests(unittest.SynchronousTestCase):
    """
    The fast door under hostile bytes.
    """

    def test_hostileStreams(self):
        """
        1500 streams of mutated and pipelined requests, cut at random, with random
        service answers and random endings: no exception, one record per exchange,
        nothing left in flight, the connection accounting back to zero.
        """
        rng = random.Random(20261123)
        for case in range(1500):
            h = Harness()
            door, client = h.client()
            stream = b"".join(
                mutate(rng, rng.choice(SEEDS)) if rng.random() < 0.8 else rng.choice(SEEDS)
                for _ in range(rng.randint(1, 3)))
            if rng.random() < 0.1:
                stream = bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
            for piece in cuts(rng, stream):
                door.dataReceived(piece)
                while len(h.reactor.tcpClients) > getattr(h, "answered", 0):
                    index = getattr(h, "answered", 0)
                    h.answered = index + 1
                    conn, upstream = h.connectUpstream(index)
                    if rng.random() < 0.2:
                        conn.connectionLost(Failure(ConnectionDone()))
                        continue
                    for part in cuts(rng, rng.choice(RESPONSES)):
                        if conn.exchange is None and not conn.tunnel:
                            break
                        conn.dataReceived(part)
                    if rng.random() < 0.5:
                        conn.connectionLost(Failure(ConnectionDone()))
            h.reactor.advance(120)
            door.connectionLost(Failure(ConnectionDone()))
            self.assertEqual(h.recorder.requestsActive, 0, f"case {case}: {stream!r}")
            self.assertEqual(h.recorder.downstreamConnectionsActive, 0)
            self.assertEqual(len(h.records), len({id(r) for r in h.records}))
        self.flushLoggedErrors()
