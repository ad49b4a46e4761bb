# -*- test-case-name: tests.test_streaming -*-
"""
Bodies stream through the proxy with backpressure: a real C{twistd sidecar} process moves
256 MiB each way, and serves a slow reader, with its peak memory staying bounded.
"""

from __future__ import annotations

import shutil

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from tests.support import Upstream, startSidecar

SIZE = 256 * 1024 * 1024
#: How much the proxy's peak resident memory may grow over its idle size.
BOUND_KIB = 16 * 1024


class StreamingMixin:
    """
    Subclasses set C{engine}.
    """

    engine = "fast"
    skip = None if shutil.which("curl") else "needs curl (apt-get install curl)"

    @defer.inlineCallbacks
    def test_boundedMemory(self):
        """
        A 256 MiB chunked upload, a 256 MiB download and a 32 MiB download read at
        16 MB/s all arrive whole, and the proxy's peak RSS grows by less than 16 MiB.
        """
        upstream = Upstream()
        upstreamPort = upstream.start(self)
        child, port = yield startSidecar(
            self, "--upstream", str(upstreamPort), "--access-log", "none", "--admin", "none",
            "--engine", self.engine)
        base = f"http://127.0.0.1:{port}"
        out, err, code = yield getProcessOutputAndValue("curl", ["-s", f"{base}/bytes/10"])
        self.assertEqual(out, b"x" * 10)
        idle = child.rssKiB("VmRSS")

        out, err, code = yield getProcessOutputAndValue(
            "sh", ["-c", f"head -c {SIZE} /dev/zero | curl -s --max-time 120 -T - {base}/sink"])
        self.assertEqual((code, out), (0, b"%d" % SIZE), err)

        out, err, code = yield getProcessOutputAndValue(
            "curl", ["-s", "--max-time", "120", "-o", "/dev/null", "-w", "%{size_download}",
                     f"{base}/stream/{SIZE}"])
        self.assertEqual((code, out), (0, b"%d" % SIZE), err)

        slow = 32 * 1024 * 1024
        out, err, code = yield getProcessOutputAndValue(
            "curl", ["-s", "--max-time", "60", "--limit-rate", "16M", "-o", "/dev/null",
                     "-w", "%{size_download}", f"{base}/stream/{slow}"])
        self.assertEqual((code, out), (0, b"%d" % slow), err)

        peak = child.rssKiB("VmHWM")
        self.assertLess(peak - idle, BOUND_KIB, f"idle {idle} KiB, peak {peak} KiB")


class FastDoorStreamingTests(StreamingMixin, unittest.TestCase):
    """
    Streaming through the fast door.
    """

    engine = "fast"


class WebDoorStreamingTests(StreamingMixin, unittest.TestCase):
    """
    Streaming through the twisted.web door (uploads are spooled to a temporary file by
    twisted.web, so memory stays bounded there too).
    """

    engine = "web"
