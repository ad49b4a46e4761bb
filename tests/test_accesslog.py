# -*- test-case-name: tests.test_accesslog -*-
"""
The access log formats and the batching writer, which never blocks the reactor: unit
tests on a memory reactor with a scripted output, and integration tests on a real pipe
that nobody reads.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from typing import Any, List

from twisted.internet import defer, reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from sidecar.accesslog import AccessLog, LogOutput, formatJSON, formatSeed, formatText, openOutput
from sidecar.record import Record
from tests.support import Proxy, Upstream, rawRequest, waitUntil

REC = Record(
    startTime=1552246620.5, duration=0.001979348, upstreamServiceTime=0.0015, bytesReceived=15,
    bytesSent=317, status=200, method="POST", path="/post", protocol="HTTP/1.1",
    authority="172.17.0.4", upstreamHost="127.0.0.1:80", flags="-", requestId="rid",
    forwardedFor="10.0.0.9", userAgent="curl/7.88.1", downstreamRemoteAddress="10.0.0.9:5555",
)


class FormatTests(unittest.SynchronousTestCase):
    """
    Each format renders a record exactly.
    """

    def test_seed(self):
        """
        The seed format is the article's block, with Go's duration style.
        """
        self.assertEqual(formatSeed(REC), (
            "Original URL: http://172.17.0.4/post\n"
            "Proxy URL: http://127.0.0.1:80/post\n"
            "Request Duration: 1.979348ms\n"
            "Request Size: 15\n"
            "Response Size: 317\n"
            "Response Status: 200\n\n"))

    def test_text(self):
        """
        The text format is one Istio-style line.
        """
        self.assertEqual(formatText(REC), (
            '[2019-03-10T19:37:00.500Z] "POST /post HTTP/1.1" 200 - 15 317 2 2 "10.0.0.9" '
            '"curl/7.88.1" "rid" "172.17.0.4" "127.0.0.1:80" 10.0.0.9:5555\n'))

    def test_json(self):
        """
        The json format has every field in snake_case, on one line.
        """
        line = formatJSON(REC)
        self.assertTrue(line.endswith("\n"))
        self.assertEqual(line.count("\n"), 1)
        fields = json.loads(line)
        self.assertEqual(sorted(fields), sorted([
            "start_time", "method", "path", "protocol", "response_code", "response_flags",
            "bytes_received", "bytes_sent", "duration_ms", "upstream_service_time_ms",
            "x_forwarded_for", "user_agent", "request_id", "authority", "upstream_host",
            "downstream_remote_address", "downstream_peer_principal", "direction", "upstream_peer_principal"]))
        self.assertEqual((fields["direction"], fields["upstream_peer_principal"]), ("inbound", None))
        self.assertEqual((fields["response_code"], fields["bytes_received"], fields["bytes_sent"],
                          fields["duration_ms"], fields["upstream_service_time_ms"]), (200, 15, 317, 2, 2))
        self.assertIsNone(fields["downstream_peer_principal"])

    def test_noUpstreamTime(self):
        """
        A request the upstream never answered shows C{-} (text) or null (json).
        """
        rec = REC._replace(upstreamServiceTime=None, status=0, flags="DC")
        self.assertIn(' 0 DC 15 317 2 - "', formatText(rec))
        self.assertIsNone(json.loads(formatJSON(rec))["upstream_service_time_ms"])


class ScriptedOutput:
    """
    An output that takes at most C{room} more bytes (C{None}: any), then raises
    L{BlockingIOError} as a full non-blocking pipe does; or fails with C{error}.
    """

    def __init__(self, room: Any = None) -> None:
        self.room = room
        self.writes: List[bytes] = []
        self.error: Any = None

    def fileno(self) -> int:
        return 99

    def write(self, data: Any) -> int:
        if self.error is not None:
            raise OSError(self.error, os.strerror(self.error))
        data = bytes(data)
        if self.room is not None:
            if self.room == 0:
                raise BlockingIOError(errno.EAGAIN, "full")
            data = data[:self.room]
            self.room -= len(data)
        self.writes.append(data)
        return len(data)

    @property
    def taken(self) -> bytes:
        return b"".join(self.writes)


def capturedWarnings(case: unittest.SynchronousTestCase) -> List[str]:
    """
    The access log's warnings and errors logged while C{case} runs, formatted.
    """
    from twisted.logger import LogLevel, formatEvent

    seen: List[str] = []

    def observer(event: Any) -> None:
        if event.get("log_namespace") == "sidecar.accesslog" and event["log_level"] >= LogLevel.warn:
            seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    case.addCleanup(globalLogPublisher.removeObserver, observer)
    return seen


LINE = formatText(REC).encode()


class AccessLogTests(unittest.SynchronousTestCase):
    """
    L{AccessLog} batches the lines of one reactor turn into one write, holds what the
    output does not take in a bounded buffer, and drops (and counts) what does not fit.
    """

    def test_oneWritePerTurn(self):
        """
        Two records in one turn are written at once, in one write, on the next turn.
        """
        clock = MemoryReactorClock()
        output = ScriptedOutput()
        log = AccessLog(output, formatText, clock)
        log(REC)
        log(REC)
        self.assertEqual(output.writes, [])
        clock.advance(0)
        self.assertEqual(output.writes, [LINE * 2])
        self.assertEqual((log.buffered, log.dropped, log.written), (0, 0, len(LINE) * 2))

    def test_blockedOutputWaitsForWritable(self):
        """
        What a full output does not take waits; the log registers with the reactor as a
        writer (and schedules no more turn flushes) until the output takes it all, in
        order, with the records that came meanwhile.
        """
        clock = MemoryReactorClock()
        output = ScriptedOutput(room=10)
        log = AccessLog(output, formatText, clock)
        log(REC)
        clock.advance(0)
        self.assertEqual(output.taken, LINE[:10])
        self.assertIn(log, clock.getWriters())
        log(REC)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(log.buffered, 2 * len(LINE) - 10)
        log.doWrite()
        self.assertEqual(output.taken, LINE[:10])
        output.room = None
        log.doWrite()
        self.assertEqual(output.taken, LINE * 2)
        self.assertNotIn(log, clock.getWriters())
        self.assertEqual((log.buffered, log.dropped), (0, 0))

    def test_fullBufferDropsAndCounts(self):
        """
        Records that do not fit in the buffer are dropped and counted; nothing is
        logged while the output is blocked; once it takes everything, one warning tells
        the count of the episode, and later records are written again.
        """
        warnings = capturedWarnings(self)
        clock = MemoryReactorClock()
        output = ScriptedOutput(room=0)
        log = AccessLog(output, formatText, clock, limit=3 * len(LINE))
        for _ in range(10):
            log(REC)
            clock.advance(0)
        self.assertEqual((log.dropped, log.buffered), (7, 3 * len(LINE)))
        self.assertEqual(warnings, [])
        output.room = None
        log.doWrite()
        self.assertEqual(output.taken, LINE * 3)
        self.assertEqual(len(warnings), 1)
        self.assertIn("dropped 7 records", warnings[0])
        log(REC)
        clock.advance(0)
        self.assertEqual(output.taken, LINE * 4)
        self.assertEqual((log.dropped, len(warnings)), (7, 1))

    def test_brokenOutput(self):
        """
        An output that fails (the reader closed the pipe) is logged once; the bytes
        waiting and every later record are dropped and counted, and nothing is raised.
        """
        warnings = capturedWarnings(self)
        clock = MemoryReactorClock()
        output = ScriptedOutput()
        output.error = errno.EPIPE
        log = AccessLog(output, formatText, clock)
        log(REC)
        clock.advance(0)
        log(REC)
        log(REC)
        clock.advance(0)
        self.assertEqual((log.dropped, log.buffered), (2, 0))
        self.assertEqual(len(warnings), 1)
        self.assertIn("Broken pipe", warnings[0])


def shrinkPipe(fd: int, size: int = 4096) -> None:
    """
    Make the pipe of C{fd} hold C{size} bytes (Linux C{F_SETPIPE_SZ}), so that a test
    fills it quickly.
    """
    fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), size)


class _Stdout:
    """
    Standard output, as far as L{openOutput} looks at it.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


class PipeTests(unittest.TestCase):
    """
    The access log on a real pipe, opened as standard output is, in front of a real
    proxy and upstream on 127.0.0.1.
    """

    def pipe(self) -> tuple:
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        self.addCleanup(os.close, write)
        shrinkPipe(write)
        return read, write

    def test_openedAnewNonBlocking(self):
        """
        Standard output on a pipe is opened anew, non-blocking, for the access log,
        leaving the descriptor the process shares with twistd's log blocking.
        """
        read, write = self.pipe()
        output = openOutput("-", _Stdout(write))
        self.addCleanup(output.close)
        self.assertNotEqual(output.fileno(), write)
        self.assertFalse(os.get_blocking(output.fileno()))
        self.assertTrue(os.get_blocking(write))
        output.write(b"hello\n")
        self.assertEqual(os.read(read, 100), b"hello\n")

    @defer.inlineCallbacks
    def test_unreadPipeDoesNotStopTheProxy(self):
        """
        With the access log on a pipe nobody reads, the proxy keeps answering every
        request; the records that do not fit are counted; once the pipe is read, the
        records held come out whole, later records follow, and one warning gives the
        count.
        """
        warnings = capturedWarnings(self)
        read, write = self.pipe()
        output = openOutput("-", _Stdout(write))
        self.addCleanup(output.close)
        upstream = Upstream()
        upstreamPort = upstream.start(self)
        proxy = Proxy(upstreamPort)
        log = AccessLog(output, formatText, reactor, limit=16 * 1024)
        proxy.recorder.sinks.append(log)
        port = proxy.start(self)
        pad = "p" * 1000
        for i in range(60):
            client = yield rawRequest(port, f"GET /bytes/3?n={i}&pad={pad} HTTP/1.1\r\nHost: a\r\n"
                                            f"Connection: close\r\n\r\n".encode(), timeout=5)
            self.assertEqual([r.status for r in client.responses], [200], i)
        self.assertGreater(log.dropped, 0)
        self.assertLessEqual(log.buffered, 16 * 1024)
        self.assertEqual(warnings, [])
        dropped = log.dropped
        os.set_blocking(read, False)
        received = bytearray()

        def drain() -> bool:
            try:
                received.extend(os.read(read, 65536))
            except BlockingIOError:
                pass
            return log.buffered == 0

        yield waitUntil(drain, timeout=10)
        client = yield rawRequest(port, b"GET /bytes/3?marker HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        self.assertEqual(client.responses[0].status, 200)
        yield waitUntil(lambda: drain() and b"?marker" in received, timeout=10)
        lines = bytes(received).decode().splitlines()
        # The first records were kept whole, in order; those after the buffer filled
        # were dropped; the marker came after the pipe was read.
        kept = [int(line.split("?n=", 1)[1].split("&", 1)[0]) for line in lines[:-1]]
        self.assertEqual(kept, list(range(60 - dropped)))
        self.assertTrue(all(' 200 - 0 3 ' in line for line in lines), lines[0])
        self.assertIn('"GET /bytes/3?marker HTTP/1.1" 200', lines[-1])
        self.assertEqual(len(warnings), 1)
        self.assertIn(f"dropped {dropped} records", warnings[0])
