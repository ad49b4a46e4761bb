# -*- test-case-name: tests.test_configfile -*-
"""
The configuration file (L{sidecar.configfile}): its schema's one-sentence errors, the
start-up keys against the flags, and the hot reload on a memory clock (swap, keep the
old version on failure, count both), as C{/config_dump} and the metrics show it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage
from twisted.trial import unittest

from sidecar.configfile import ConfigError, check, parse
from sidecar.metrics import prometheusText
from sidecar.service import SidecarService
from sidecar.tap import Options

GOOD = """\
version: v1
listen: 8001
upstream: "127.0.0.1:9000"
upstreams:
  auth: {address: "127.0.0.1:9001", connectTimeout: 2s}
filters:
  - name: headers
    config: {request: {set: {x-a: "1"}}}
routes:
  - name: api
    match: {prefix: /api, methods: [GET], headers: {x-canary: null}}
    upstream: auth
    timeout: 500ms
    retry: {attempts: 2, retryOn: "connect-failure,5xx", perTryTimeout: 1, budgetPercent: 20}
    filters:
      - name: local_ratelimit
        config: {maxTokens: 10, fillInterval: 1}
  - name: rest
"""


class SchemaTests(unittest.SynchronousTestCase):
    """
    Every mistake is one sentence naming the file and the key.
    """

    def refused(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        e = self.assertRaises(ConfigError, check, path)
        message = str(e)
        self.assertTrue(message.startswith(path + ": "), message)
        self.assertTrue(message.endswith("."), message)
        self.assertNotIn("\n", message)
        return message[len(path) + 2:]

    def test_good(self):
        """
        The example file passes, and its start-up keys are read as the flags'.
        """
        spec, data = parse(GOOD.encode(), "x.yaml")
        self.assertEqual(spec.flagValues(), {"listen": "8001", "upstream": "127.0.0.1:9000"})
        self.assertEqual(spec.routes[0].retry.retryOn, ["connect-failure", "5xx"])
        self.assertEqual(float(spec.routes[0].timeout), 0.5)

    def test_errors(self):
        """
        Wrong types, unknown keys, out-of-range values, unknown filters and upstreams,
        bad YAML: each named.
        """
        cases = {
            "routes: [{name: a, retry: {attempts: x}}]": "routes[0].retry.attempts: expected a whole number",
            "routes: [{name: a, retry: {retryOn: [sometimes]}}]": "routes[0].retry: 'sometimes' is not one of",
            "routes: [{name: a, upstream: nowhere}]": "routes[0].upstream: no upstream named 'nowhere'",
            "routes: [{name: a}, {name: a}]": "routes[1].name: 'a' names two routes",
            "routes: [{name: a, timeout: soon}]": "routes[0].timeout: 'soon' is not a duration",
            "routes: [{name: a, match: {prefix: api}}]": "routes[0].match.prefix: 'api' must start with /",
            "filters: [{name: nope}]": "filters[0].name: no filter named 'nope'",
            "filters: [{name: local_ratelimit, config: {maxTokens: 1}}]":
                "filters[0].config.fillInterval: required field missing",
            "filters: [{name: local_ratelimit, config: {maxTokens: '1', fillInterval: 1}}]":
                "filters[0].config.maxTokens: expected a whole number",
            "filters: [{name: fault, config: {abort: {httpStatus: 99}}}]": "filters[0].config.abort: 'httpStatus'",
            "filters: [{name: jwt, config: {issuer: x}}]": "filters[0].config: give exactly one of jwks",
            "upstreams: {a: {address: 'host:'}}": "upstreams.a.address:",
            "colour: blue": "the file: extra fields found (colour)",
            "routes: [": "not valid YAML at line 1",
            "- 1": "the file must be a mapping",
            "listen: true": "listen: expected text or a number",
        }
        for text, expected in cases.items():
            self.assertIn(expected, self.refused(text), text)

    def test_unreadable(self):
        """
        A missing file is named.
        """
        e = self.assertRaises(ConfigError, check, "/nonexistent/sidecar.yaml")
        self.assertEqual(str(e), "/nonexistent/sidecar.yaml: cannot read it: No such file or directory.")


class FlagTests(unittest.SynchronousTestCase):
    """
    C{--config} and the flags build one L{ProxyConfig}, and never silently disagree.
    """

    def options(self, text: str, *args: str) -> Any:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        options = Options()
        options.parseOptions(["--admin", "none", "--health", "none", "--config", path, *args])
        return options["config"]

    def test_fileKeys(self):
        """
        The file's start-up keys become the configuration the flags would build.
        """
        config = self.options(GOOD)
        self.assertEqual((config.listen, config.upstream.port), ("tcp:8001", 9000))
        self.assertEqual(config.configFile, os.path.abspath(config.configFile))

    def test_sameValueAgrees(self):
        """
        A flag that says the same as the file is fine.
        """
        config = self.options(GOOD, "--listen", "8001")
        self.assertEqual(config.listen, "tcp:8001")

    def test_conflict(self):
        """
        A flag given with another value than the file's is an error naming both.
        """
        e = self.assertRaises(usage.UsageError, self.options, GOOD, "--upstream", "9999")
        self.assertIn("--upstream '9999' and upstream: '127.0.0.1:9000'", str(e))
        self.assertIn("disagree", str(e))

    def test_badFileValue(self):
        """
        A start-up key the flag's check refuses is named as the file's key.
        """
        e = self.assertRaises(usage.UsageError, self.options, "engine: turbo\n")
        self.assertTrue(str(e).endswith("engine: 'turbo' is not one of fast, web."), str(e))

    def test_filterFlag(self):
        """
        C{--filter NAME:JSON} is checked like the file's filters, and may not be given
        with the file's C{filters:}.
        """
        options = Options()
        options.parseOptions(["--admin", "none", "--filter", 'headers:{"request": {"set": {"x-a": "1"}}}'])
        self.assertEqual(options["config"].filters, (("headers", '{"request": {"set": {"x-a": "1"}}}'),))
        for args, message in ((["--filter", "local_ratelimit"], "--filter[0].config.maxTokens"),
                              (["--filter", "headers:[1]"], "must be a JSON object"),
                              (["--filter", "headers:{"], "are not JSON")):
            e = self.assertRaises(usage.UsageError, Options().parseOptions, ["--admin", "none", *args])
            self.assertIn(message, str(e))
        e = self.assertRaises(usage.UsageError, self.options, GOOD, "--filter", "headers")
        self.assertIn("--filter and filters:", str(e))


class ReloadTests(unittest.SynchronousTestCase):
    """
    The service polls the file on its clock and swaps in good versions only.
    """

    def setUp(self):
        self.path = os.path.abspath(self.mktemp())
        self.write(GOOD)
        options = Options()
        options.parseOptions(["--admin", "tcp:15000:interface=127.0.0.1", "--health", "none",
                              "--access-log", "none", "--config", self.path])
        self.reactor = MemoryReactorClock()
        self.service = SidecarService(options["config"], self.reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def write(self, text: str) -> None:
        with open(self.path, "w") as f:
            f.write(text)
        # A new mtime for the poll even within the same clock tick.
        stat = os.stat(self.path)
        os.utime(self.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    def dump(self) -> dict:
        site = self.service.adminListeners[0].factory
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
        channel = site.buildProtocol(None)
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /config_dump HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        return json.loads(transport.value().split(b"\r\n\r\n", 1)[1])

    def metric(self) -> str:
        return "\n".join(line for line in prometheusText(self.service.collector).decode().splitlines()
                         if line.startswith("sidecar_config_reloads_total"))

    def test_reload(self):
        """
        A changed file is put in use on the next poll: the engine runs the new chain,
        C{/config_dump} shows its version, the metric counts it.
        """
        first = self.service.engine.filters
        self.assertEqual(self.dump()["config_file"]["version"], "v1")
        self.write(GOOD.replace("v1", "v2").replace("maxTokens: 10", "maxTokens: 20"))
        self.reactor.advance(1.0)
        self.assertIsNot(self.service.engine.filters, first)
        dump = self.dump()["config_file"]
        self.assertEqual((dump["version"], dump["reloads"], dump["rejections"]), ("v2", 1, 0))
        self.assertEqual(dump["config"]["routes"][0]["filters"][0]["config"]["maxTokens"], 20)
        self.assertIn('sidecar_config_reloads_total{result="ok"} 1.0', self.metric())
        # The unchanged upstream keeps its pool (and its connections).
        self.assertIs(self.service.engine.pools["auth"], first.pools["auth"])

    def test_rejected(self):
        """
        A broken file is logged, counted once, and ignored: the old chain stays; a
        fixed file is then taken.
        """
        first = self.service.engine.filters
        self.write(GOOD.replace("maxTokens: 10", "maxTokens: lots"))
        self.reactor.advance(1.0)
        self.reactor.advance(1.0)
        self.assertIs(self.service.engine.filters, first)
        dump = self.dump()["config_file"]
        self.assertEqual((dump["version"], dump["rejections"]), ("v1", 1))
        self.assertIn("routes[0].filters[0].config.maxTokens: expected a whole number", dump["last_rejection"])
        self.assertIn('sidecar_config_reloads_total{result="rejected"} 1.0', self.metric())
        errors = [e for e in self.flushLoggedErrors()]
        self.assertEqual(errors, [])
        self.write(GOOD.replace("v1", "v3"))
        self.reactor.advance(1.0)
        self.assertEqual(self.dump()["config_file"]["version"], "v3")

    def test_startupKeyChange(self):
        """
        A reload that changes a start-up key (the listener) is refused: that needs a
        restart.
        """
        self.write(GOOD.replace("listen: 8001", "listen: 8002"))
        self.reactor.advance(1.0)
        dump = self.dump()["config_file"]
        self.assertEqual(dump["version"], "v1")
        self.assertIn("listen: a start-up key cannot change without a restart", dump["last_rejection"])

    def test_removedUpstreamRetired(self):
        """
        An upstream that a new version drops has its pool closed once idle.
        """
        old = self.service.engine.pools["auth"]
        closed = []
        old.closeAll = lambda: closed.append(True)
        self.write("version: v2\nlisten: 8001\nupstream: '127.0.0.1:9000'\n")
        self.reactor.advance(1.0)
        self.assertEqual(self.service.engine.pools, {})
        self.assertIsNone(self.service.engine.filters)
        self.reactor.advance(1.0)
        self.assertEqual(closed, [True])
