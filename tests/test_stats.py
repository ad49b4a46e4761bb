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
