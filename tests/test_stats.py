# -*- test-case-name: tests.test_stats -*-
"""
The recorder's counters and histograms.
"""

from __future__ import annotations

from twisted.trial import unittest

from sidecar.stats import DEFAULT_BUCKETS, Histogram, Recorder
from tests.test_accesslog import REC


class HistogramTests(unittest.SynchronousTestCase):
    """
    L{Histogram} counts into Envoy's buckets.
    """

    def test_buckets(self):
        """
        A value on a bound counts in that bound's bucket (C{le}); past the last bound, in
        the overflow slot; C{cumulative} adds up.
        """
        h = Histogram()
        for value in (0.5, 0.6, 5, 3600000, 4000000):
            h.observe(value)
        self.assertEqual(h.count, 5)
        self.assertEqual(h.counts[0], 1)
        self.assertEqual(h.counts[1], 1)
        self.assertEqual(h.counts[2], 1)
        self.assertEqual(h.counts[len(DEFAULT_BUCKETS) - 1], 1)
        self.assertEqual(h.counts[-1], 1)
        cumulative = h.cumulative()
        self.assertEqual(cumulative[-1], (float("inf"), 5))
        self.assertEqual(cumulative[0], (0.5, 1))
        self.assertEqual(h.sum, 0.5 + 0.6 + 5 + 3600000 + 4000000)


class RecorderTests(unittest.SynchronousTestCase):
    """
    L{Recorder} aggregates records by label set and feeds the sinks.
    """

    def test_series(self):
        """
        Records with the same labels share a series; others get their own.
        """
        seen = []
        recorder = Recorder([seen.append])
        recorder.record(REC)
        recorder.record(REC)
        recorder.record(REC._replace(status=502, flags="UF"))
        self.assertEqual(recorder.totalRequests(), 3)
        ok = recorder.series[("HTTP/1.1", 200, "-", "", False, "inbound", None, "")]
        self.assertEqual(ok.requests, 2)
        self.assertEqual(ok.requestBytes.sum, 30)
        self.assertEqual(ok.responseBytes.sum, 634)
        self.assertEqual(recorder.series[("HTTP/1.1", 502, "UF", "", False, "inbound", None, "")].requests, 1)
        self.assertEqual(len(seen), 3)
        self.assertEqual(recorder.downstreamBytesReceived, 45)

    def test_batchedLikeOneByOne(self):
        """
        The counts folded in batches (past L{Recorder.FOLD_EVERY} records, and on every
        read) are those of observing each record in turn, values on the bucket bounds
        included; the last record is known before and after a fold.
        """
        recorder = Recorder()
        recorder.FOLD_EVERY = 7
        expected = {key: Histogram() for key in ("duration", "requestBytes", "responseBytes")}
        durations = [0.0, 0.0005, 0.0004, 0.001, 0.0011, 0.005, 3.6e3, 4e3, 0.25, 0.2500001]
        last = None
        for i in range(50):
            last = REC._replace(duration=durations[i % len(durations)], bytesReceived=i * 97 % 1100,
                                bytesSent=(i * 1013) % 70000, status=200 if i % 3 else 503)
            recorder.record(last)
            self.assertIs(recorder.lastRecord, last)
            expected["duration"].observe(last.duration * 1000.0)
            expected["requestBytes"].observe(last.bytesReceived)
            expected["responseBytes"].observe(last.bytesSent)
            if i == 20:
                self.assertEqual(recorder.totalRequests(), 21)
        merged = {key: Histogram() for key in expected}
        for series in recorder.series.values():
            for key, histogram in merged.items():
                part = getattr(series, key)
                histogram.counts = [a + b for a, b in zip(histogram.counts, part.counts)]
                histogram.sum += part.sum
                histogram.count += part.count
        for key, histogram in expected.items():
            self.assertEqual(merged[key].counts, histogram.counts, key)
            self.assertAlmostEqual(merged[key].sum, histogram.sum, places=6)
            self.assertEqual(merged[key].count, 50)
        self.assertEqual(recorder.totalRequests(), 50)
        self.assertIs(recorder.lastRecord, last)

    def test_grpcSeries(self):
        """
        A gRPC call is counted under protocol C{grpc}, with its message counts.
        """
        recorder = Recorder()
        recorder.record(REC._replace(grpc=True, grpcStatus="0", requestMessages=2, responseMessages=3))
        recorder.record(REC._replace(grpc=True, grpcStatus="0", requestMessages=1, responseMessages=1))
        series = recorder.series[("grpc", 200, "-", "", False, "inbound", None, "0")]
        self.assertEqual((series.requests, series.requestMessages, series.responseMessages), (2, 3, 4))
