# -*- test-case-name: tests.test_accesslog -*-
"""
The access log formats and the batching writer.
"""

from __future__ import annotations

import io
import json

from twisted.internet.task import Clock
from twisted.trial import unittest

from sidecar.accesslog import AccessLog, formatJSON, formatSeed, formatText
from sidecar.record import Record

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
            "downstream_remote_address", "downstream_peer_principal"]))
        self.assertEqual((fields["response_code"], fields["bytes_received"], fields["bytes_sent"],
                          fields["duration_ms"], fields["upstream_service_time_ms"]), (200, 15, 317, 2, 2))
        self.assertIsNone(fields["downstream_peer_principal"])

    def test_noUpstreamTime(self):
        """
        A request the upstream never answered shows C{-} (text) or null (json).
        """
        import attrs

        rec = attrs.evolve(REC, upstreamServiceTime=None, status=0, flags="DC")
        self.assertIn(' 0 DC 15 317 2 - "', formatText(rec))
        self.assertIsNone(json.loads(formatJSON(rec))["upstream_service_time_ms"])


class AccessLogTests(unittest.SynchronousTestCase):
    """
    L{AccessLog} batches the lines of one reactor turn into one flush.
    """

    def test_flushOncePerTurn(self):
        """
        Two records in one turn are written at once and flushed once, on the next turn.
        """
        flushes = []

        class Stream(io.StringIO):
            def flush(self):
                flushes.append(self.getvalue().count("\n"))

        clock = Clock()
        stream = Stream()
        log = AccessLog(stream, formatText, clock)
        log(REC)
        log(REC)
        self.assertEqual(flushes, [])
        clock.advance(0)
        self.assertEqual(flushes, [2])
