# -*- test-case-name: tests.test_request -*-
"""
Tests for L{sidecar.request}, the C{sidecar-request} command, against real HTTP
servers on loopback.
"""

from __future__ import annotations

import io
import sys

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import Site

from sidecar.request import request, requestURL
from tests.support import ROOT, subprocessEnv


class _Page(Resource):
    isLeaf = True

    def __init__(self, code: int, body: bytes) -> None:
        super().__init__()
        self.code, self.body, self.methods = code, body, []

    def render(self, request):
        self.methods.append((request.method, request.path))
        request.setResponseCode(self.code)
        return self.body


class _Silent(Protocol):
    """
    Reads the request and never answers.
    """


class RequestTests(unittest.TestCase):
    """
    L{request}: one request, its body on standard output, a status for the shell.
    """

    def serve(self, resource: Resource) -> int:
        port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def ask(self, argv):
        out, err = io.StringIO(), io.StringIO()
        status = yield request(reactor, argv, out, err)
        return status, out.getvalue(), err.getvalue()

    @defer.inlineCallbacks
    def test_ok(self):
        """
        A 2xx answer: its body on standard output, nothing on standard error,
        status 0; the method and path are the ones asked.
        """
        page = _Page(200, b"LIVE\n")
        port = self.serve(page)
        result = yield self.ask(["post", "/quitquitquit", "--port", str(port)])
        self.assertEqual(result, (0, "LIVE\n", ""))
        self.assertEqual(page.methods, [(b"POST", b"/quitquitquit")])

    @defer.inlineCallbacks
    def test_notReady(self):
        """
        Any other answer (a draining proxy's 503) prints the body and gives
        status 1 with one sentence naming the URL and the status.
        """
        port = self.serve(_Page(503, b"DRAINING\n"))
        status, out, err = yield self.ask(["GET", "healthz/ready", "--port", str(port)])
        self.assertEqual((status, out), (1, "DRAINING\n"))
        self.assertEqual(err, f"sidecar-request: http://127.0.0.1:{port}/healthz/ready answered 503.\n")

    @defer.inlineCallbacks
    def test_refused(self):
        """
        Nobody listening: status 1 and one sentence, no output.
        """
        port = self.serve(_Page(200, b""))
        listening = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        closed = listening.getHost().port
        yield listening.stopListening()
        status, out, err = yield self.ask(["GET", "/ready", "--port", str(closed)])
        self.assertEqual((status, out), (1, ""))
        self.assertTrue(err.startswith(f"sidecar-request: no answer from http://127.0.0.1:{closed}/ready: "), err)
        self.assertEqual(err.count("\n"), 1)
        self.assertNotEqual(port, closed)

    @defer.inlineCallbacks
    def test_timeout(self):
        """
        A server that accepts and never answers gives status 1 once
        C{--timeout} has passed, not a hang.
        """
        port = reactor.listenTCP(0, Factory.forProtocol(_Silent), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        started = reactor.seconds()
        status, out, err = yield self.ask(
            ["GET", "/ready", "--port", str(port.getHost().port), "--timeout", "0.3"])
        self.assertEqual((status, out), (1, ""))
        self.assertIn("no answer", err)
        self.assertLess(reactor.seconds() - started, 5)

    def test_badArguments(self) -> None:
        """
        An unknown method, a bad port or a bad timeout exits with status 2 and
        one sentence naming the problem, before any request.
        """
        for argv, words in ((["DELETE", "/x"], "invalid choice"), (["GET", "/", "--port", "0"], "--port"),
                            (["GET", "/", "--timeout", "never"], "--timeout")):
            err = io.StringIO()
            with self.assertRaises(SystemExit) as caught:
                request(reactor, argv, io.StringIO(), err)
            self.assertEqual(caught.exception.code, 2)
            self.assertIn(words, err.getvalue())
            self.assertEqual(err.getvalue().count("\n"), 1)

    def test_url(self) -> None:
        """
        IPv6 addresses are bracketed; the path gets one leading slash.
        """
        self.assertEqual(requestURL("::1", 15000, "stats"), "http://[::1]:15000/stats")
        self.assertEqual(requestURL("127.0.0.1", 15021, "/healthz/ready"),
                         "http://127.0.0.1:15021/healthz/ready")

    @defer.inlineCallbacks
    def test_command(self):
        """
        C{python -m sidecar.request} exits with the status: 0 for a 2xx, 1 for
        a 404.
        """
        port = self.serve(_Page(200, b"ok"))
        ok = yield getProcessOutputAndValue(
            sys.executable, ("-m", "sidecar.request", "GET", "/", "--port", str(port)),
            env=subprocessEnv(), path=ROOT)
        self.assertEqual((ok[0], ok[2]), (b"ok", 0), ok[1])
        notFound = self.serve(_Page(404, b""))
        bad = yield getProcessOutputAndValue(
            sys.executable, ("-m", "sidecar.request", "GET", "/", "--port", str(notFound)),
            env=subprocessEnv(), path=ROOT)
        self.assertEqual(bad[2], 1, bad[1])
