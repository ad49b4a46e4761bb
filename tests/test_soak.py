# -*- test-case-name: tests.test_soak -*-
"""
The short form of C{make soak}: 15 seconds of mixed traffic (small, pipelined, large,
slow, aborted, uploads, WebSocket) through a real C{twistd sidecar} in front of nginx.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

from twisted.internet import utils
from twisted.trial import unittest

from tests.support import ROOT, subprocessEnv

SOAK = os.path.join(ROOT, "bench", "soak.py")


class SoakTests(unittest.TestCase):
    """
    A bounded soak of the real proxy.
    """

    timeout = 150

    if shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"):
        skip = "needs nginx (apt-get install nginx-light)"

    def test_shortSoak(self):
        """
        Fifteen seconds of mixed traffic: every exchange goes right, the proxy holds no
        more fds at the end than before the traffic, and its RSS grows by less than
        64 MiB after the warm-up.
        """
        report = os.path.join(tempfile.mkdtemp(), "soak.json")
        d = utils.getProcessOutputAndValue(
            sys.executable, [SOAK, "--seconds", "15", "--warmup", "4", "--json", report], env=subprocessEnv())

        def check(result):
            out, err, code = result
            self.assertEqual(code, 0, out.decode() + err.decode())
            with open(report) as f:
                figures = json.load(f)
            self.assertEqual(figures["errors"], {})
            self.assertGreater(figures["counts"].get("small-request", 0), 0)
            self.assertGreater(figures["counts"].get("big", 0), 0)
            self.assertGreater(figures["counts"].get("websocket", 0), 0)
            self.assertLessEqual(figures["end"]["fds"], figures["start"]["idle_fds"] + 4)

        return d.addCallback(check)
