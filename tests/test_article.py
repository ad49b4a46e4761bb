# -*- test-case-name: tests.test_article -*-
"""
The article's demo, through the real C{twistd sidecar} plugin: httpbin behind the
sidecar, the article's three curl requests, and the seed-format statistics.
"""

from __future__ import annotations

import re
import shutil

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from tests.support import startHttpbin, startSidecar, waitUntil

try:
    import httpbin  # noqa: F401
    import gunicorn  # noqa: F401
except ImportError:  # pragma: no cover
    skipPeers = "needs httpbin and gunicorn (requirements-test.txt)"
else:
    skipPeers = None if shutil.which("curl") else "needs curl (apt-get install curl)"


def curl(*args: str) -> defer.Deferred:
    """
    Run curl with C{-s -i}; fire with C{(status, headers, body)}.
    """

    def split(result):
        out, err, code = result
        if code != 0:
            raise AssertionError(f"curl exited {code}: {err!r}")
        head, _, body = out.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        return status, headers, body

    return getProcessOutputAndValue("curl", ["-s", "-i", "--max-time", "10", *args]).addCallback(split)


class ArticleMixin:
    """
    Subclasses set C{engine}.
    """

    engine = "fast"
    skip = skipPeers

    @defer.inlineCallbacks
    def test_articleDemo(self):
        """
        GET /get?query=param, POST /post with body=parameters and GET /status/429 are
        answered by httpbin with C{Server: amazing-proxy}, and the seed log shows one
        block per request with the article's fields and the real body sizes.
        """
        _, upstreamPort = yield startHttpbin(self)
        logPath = self.mktemp()
        child, port = yield startSidecar(
            self, "--upstream", str(upstreamPort), "--log-format", "seed", "--access-log", logPath,
            "--admin", "none", "--engine", self.engine)
        base = f"http://127.0.0.1:{port}"
        get = yield curl(f"{base}/get?query=param")
        post = yield curl("-X", "POST", "-d", "body=parameters", f"{base}/post")
        teapot = yield curl(f"{base}/status/429")
        for status, headers, _ in (get, post, teapot):
            self.assertEqual(headers[b"server"], [b"amazing-proxy"])
        self.assertEqual([get[0], post[0], teapot[0]], [200, 200, 429])
        self.assertIn(b'"query": "param"', get[2])
        self.assertIn(b'"body": "parameters"', post[2])

        def blocks():
            with open(logPath) as f:
                return [b for b in f.read().split("\n\n") if b.strip()]

        yield waitUntil(lambda: len(blocks()) == 3)
        expected = [
            ("/get?query=param", 0, len(get[2]), 200),
            ("/post", 15, len(post[2]), 200),
            ("/status/429", 0, 0, 429),
        ]
        for block, (path, reqSize, respSize, status) in zip(blocks(), expected):
            fields = dict(line.split(": ", 1) for line in block.strip().split("\n"))
            self.assertEqual(fields["Original URL"], f"http://127.0.0.1:{port}{path}")
            self.assertEqual(fields["Proxy URL"], f"http://127.0.0.1:{upstreamPort}{path}")
            self.assertRegex(fields["Request Duration"], r"^[0-9.]+(µs|ms|s)$")
            self.assertEqual(
                (int(fields["Request Size"]), int(fields["Response Size"]), int(fields["Response Status"])),
                (reqSize, respSize, status))
        self.assertFalse(re.search(rb"Traceback", child.err + child.out), child.err)


class FastDoorArticleTests(ArticleMixin, unittest.TestCase):
    """
    The article's demo through the fast door.
    """

    engine = "fast"


class WebDoorArticleTests(ArticleMixin, unittest.TestCase):
    """
    The article's demo through the twisted.web door.
    """

    engine = "web"
