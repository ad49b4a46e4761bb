# -*- test-case-name: tests.test_tap -*-
"""
The command line: defaults, accepted forms, and one clear sentence per bad value.
"""

from __future__ import annotations

from twisted.python import usage
from twisted.trial import unittest

from sidecar.tap import Options, parseUpstream


def parse(*argv: str):
    options = Options()
    options.parseOptions(list(argv))
    return options["config"]


class OptionsTests(unittest.TestCase):
    """
    L{Options} turns flags into a L{sidecar.config.ProxyConfig}.
    """

    def test_defaults(self):
        """
        With no flags: listen on 8000 everywhere, upstream 127.0.0.1:80, the article's
        Server header, text log to stdout with a 1 MiB buffer, 60 s / 5 s timeouts, the
        fast door.
        """
        config = parse()
        self.assertEqual(config.listen, "tcp:8000")
        self.assertEqual((config.upstream.host, config.upstream.port), ("127.0.0.1", 80))
        self.assertEqual(config.serverHeader, "amazing-proxy")
        self.assertEqual((config.accessLog, config.logFormat), ("-", "text"))
        self.assertEqual(config.accessLogBuffer, 1024 * 1024)
        self.assertEqual((config.upstream.responseTimeout, config.upstream.connectTimeout), (60.0, 5.0))
        self.assertEqual(config.engine, "fast")
        self.assertEqual((config.upstream.maxIdle, config.upstream.idleLimit), (None, 1024))

    def test_forms(self):
        """
        Endpoint strings, HOST:PORT, IPv6 and a zero timeout (no limit) are accepted.
        """
        config = parse("--listen", "tcp:9000:interface=127.0.0.1", "--upstream", "10.0.0.1:8080",
                       "--upstream-timeout", "0", "--log-format", "JSON", "--engine", "web",
                       "--access-log", "none")
        self.assertEqual(config.listen, "tcp:9000:interface=127.0.0.1")
        self.assertEqual((config.upstream.host, config.upstream.port), ("10.0.0.1", 8080))
        self.assertIsNone(config.upstream.responseTimeout)
        self.assertEqual((config.logFormat, config.engine, config.accessLog), ("json", "web", None))
        self.assertEqual(parseUpstream("[::1]:81"), ("::1", 81))
        self.assertEqual(parse("--access-log-buffer", "65536").accessLogBuffer, 65536)
        self.assertEqual(parse("--upstream-max-connections", "64").upstream.idleLimit, 64)
        self.assertEqual(parse("--upstream-max-idle", "8").upstream.idleLimit, 8)

    def test_headersWithUnderscores(self):
        """
        C{--headers-with-underscores} is C{allow} by default (as Envoy and Istio), takes
        C{drop} or C{reject} in any case, and refuses anything else in one sentence.
        """
        self.assertEqual(parse().headersWithUnderscores, "allow")
        self.assertEqual(parse("--headers-with-underscores", "REJECT").headersWithUnderscores, "reject")
        self.assertEqual(parse("--headers-with-underscores", "drop").headersWithUnderscores, "drop")
        self.assertRefused("--headers-with-underscores", "--headers-with-underscores", "strip")

    def assertRefused(self, flag: str, *argv: str) -> None:
        error = self.assertRaises(usage.UsageError, parse, *argv)
        message = str(error)
        self.assertTrue(message.startswith(flag + ":"), message)
        self.assertEqual(message.count("\n"), 0, message)

    def test_badValues(self):
        """
        Each bad value is refused with one sentence that names its flag.
        """
        self.assertRefused("--listen", "--listen", "70000")
        self.assertRefused("--listen", "--listen", "nonsense:foo")
        self.assertRefused("--upstream", "--upstream", "http")
        self.assertRefused("--upstream", "--upstream", "host:0")
        self.assertRefused("--upstream", "--upstream", ":80")
        self.assertRefused("--log-format", "--log-format", "xml")
        self.assertRefused("--engine", "--engine", "turbo")
        self.assertRefused("--upstream-timeout", "--upstream-timeout", "-1")
        self.assertRefused("--upstream-timeout", "--upstream-timeout", "soon")
        self.assertRefused("--connect-timeout", "--connect-timeout", "0")
        self.assertRefused("--server-header", "--server-header", "a\r\nX-Injected: 1")
        self.assertRefused("--max-header-bytes", "--max-header-bytes", "12")
        self.assertRefused("--upstream-max-connections", "--upstream-max-connections", "0")
        self.assertRefused("--upstream-max-pending", "--upstream-max-pending", "many")
        self.assertRefused("--upstream-max-idle", "--upstream-max-idle", "-1")
        self.assertRefused("--access-log-buffer", "--access-log-buffer", "100")
        self.assertRefused("--access-log-buffer", "--access-log-buffer", "1MiB")

    def test_unwritableLog(self):
        """
        An access log path that can't be written is refused at start-up.
        """
        self.assertRefused("--access-log", "--access-log", "/nonexistent/dir/access.log")


class PidfileTests(unittest.TestCase):
    """
    The plugin under twistd's own options: the README's commands work in any folder.
    """

    def twistd(self, *argv: str):
        from twisted.scripts.twistd import ServerOptions

        config = ServerOptions()
        config.parseOptions(list(argv))
        return config

    def test_foregroundWritesNoPidfile(self):
        """
        C{twistd -n sidecar ...} writes no C{twistd.pid}, so a second proxy in
        the same folder (or one on a read-only filesystem) starts.
        """
        self.assertEqual(self.twistd("-n", "sidecar", "--upstream", "80")["pidfile"], "")
        self.assertEqual(self.twistd("--nodaemon", "sidecar", "--upstream", "80")["pidfile"], "")

    def test_namedPidfileKept(self):
        """
        A pid file named on the command line is kept in the foreground, and a
        daemon keeps twistd's default: it is how the daemon is found and stopped.
        """
        import os

        named = self.twistd("-n", "--pidfile", "proxy.pid", "sidecar", "--upstream", "80")["pidfile"]
        self.assertEqual(named, os.path.abspath("proxy.pid"))
        daemon = self.twistd("sidecar", "--upstream", "80")["pidfile"]
        self.assertEqual(daemon, os.path.abspath("twistd.pid"))
