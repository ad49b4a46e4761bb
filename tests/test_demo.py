# -*- test-case-name: tests.test_demo -*-
"""
The demo command (C{make demo} runs C{scripts/demo.py}) and its built-in service.
"""

from __future__ import annotations

import os

from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest

from sidecar.demo import DemoService
from tests.support import PYTHON, ROOT, subprocessEnv


class DemoServiceTests(unittest.SynchronousTestCase):
    """
    The built-in service answers the article's paths like httpbin.
    """

    def test_status(self):
        """
        C{/status/429} answers 429 with an empty body.
        """
        request = DummyRequest([b"status", b"429"])
        request.path = b"/status/429"
        request.uri = b"/status/429"
        self.assertEqual(DemoService().render(request), b"")
        self.assertEqual(request.responseCode, 429)


class DemoCommandTests(unittest.TestCase):
    """
    The demo runs end to end and cleans up.
    """

    def test_builtinDemo(self):
        """
        With the built-in service, the demo shows three answers carrying
        C{Server: amazing-proxy} and three seed records with the real sizes.
        """
        d = getProcessOutputAndValue(PYTHON, [os.path.join(ROOT, "scripts", "demo.py"), "--builtin"],
                                     env=subprocessEnv(), path=ROOT)

        def check(result):
            out, err, code = result
            text = out.decode()
            self.assertEqual(code, 0, err)
            self.assertEqual(text.count("Server: amazing-proxy"), 3)
            self.assertEqual(text.count("Response Status:"), 3)
            self.assertIn("Request Size: 15", text)
            self.assertIn("Response Status: 429", text)

        return d.addCallback(check)
