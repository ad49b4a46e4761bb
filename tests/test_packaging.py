# -*- test-case-name: tests.test_packaging -*-
"""
Packaging: C{pip install .} in a fresh virtualenv gives a C{twistd} that lists and runs
the sidecar plugin, and the console scripts.
"""

from __future__ import annotations

import os
import sys

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from tests.support import ROOT


class FreshVirtualenvTests(unittest.TestCase):
    """
    The package as a user installs it.
    """

    timeout = 600

    @defer.inlineCallbacks
    def test_twistdListsSidecar(self):
        """
        After C{pip install .} in a new virtualenv, C{twistd --help} lists C{sidecar},
        C{twistd sidecar --help} shows its flags, a bad flag fails with one sentence, and
        C{sidecar-certs} and C{sidecar-inject} are on the path.
        """
        venv = os.path.abspath(self.mktemp())
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        out, err, code = yield getProcessOutputAndValue(sys.executable, ["-m", "venv", venv], env=env)
        self.assertEqual(code, 0, err)
        pip = os.path.join(venv, "bin", "pip")
        out, err, code = yield getProcessOutputAndValue(pip, ["install", "-q", ROOT], env=env, path="/")
        self.assertEqual(code, 0, err)
        twistd = os.path.join(venv, "bin", "twistd")
        out, err, code = yield getProcessOutputAndValue(twistd, ["--help"], env=env, path="/")
        self.assertEqual(code, 0, err)
        self.assertRegex(out.decode(), r"\n\s+sidecar\s+A service-mesh sidecar proxy")
        out, err, code = yield getProcessOutputAndValue(twistd, ["sidecar", "--help"], env=env, path="/")
        self.assertEqual(code, 0, err)
        for flag in ("--listen", "--upstream", "--server-header", "--access-log", "--log-format",
                     "--upstream-timeout", "--connect-timeout", "--engine"):
            self.assertIn(flag, out.decode())
        out, err, code = yield getProcessOutputAndValue(
            twistd, ["-n", "sidecar", "--upstream", "nope"], env=env, path="/")
        self.assertNotEqual(code, 0)
        self.assertIn(b"--upstream: 'nope' is not PORT or HOST:PORT", out + err)
        for script in ("sidecar-certs", "sidecar-inject"):
            self.assertTrue(os.access(os.path.join(venv, "bin", script), os.X_OK), script)
