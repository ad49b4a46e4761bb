# -*- test-case-name: tests.test_service -*-
"""
Assembly: what L{sidecar.service} adds to every listener.
"""

from __future__ import annotations

import shutil
import subprocess

from twisted.internet import defer, reactor
from twisted.trial import unittest

from sidecar.compat import listeningPort
from sidecar.config import ProxyConfig
from sidecar.service import LISTEN_BACKLOG, SidecarService, withBacklog


class BacklogTests(unittest.TestCase):
    """
    Every listener asks for a backlog of 1024 (Envoy's), not Twisted's 50, unless its
    endpoint string names one.
    """

    def test_added(self):
        """
        TCP, TCP6, UNIX and SSL endpoint strings get C{backlog=1024}.
        """
        self.assertEqual(withBacklog("tcp:8000"), "tcp:8000:backlog=1024")
        self.assertEqual(withBacklog("TCP:8000:interface=127.0.0.1"), "TCP:8000:interface=127.0.0.1:backlog=1024")
        self.assertEqual(withBacklog("tcp6:8000:interface=\\:\\:1"), "tcp6:8000:interface=\\:\\:1:backlog=1024")
        self.assertEqual(withBacklog("unix:/tmp/s.sock"), "unix:/tmp/s.sock:backlog=1024")
        self.assertEqual(LISTEN_BACKLOG, 1024)

    def test_userChoiceKept(self):
        """
        A backlog the user set, and endpoint types that take none, are left alone.
        """
        self.assertEqual(withBacklog("tcp:8000:backlog=10"), "tcp:8000:backlog=10")
        self.assertEqual(withBacklog("tcp:port=8000:backlog=10:interface=127.0.0.1"),
                         "tcp:port=8000:backlog=10:interface=127.0.0.1")
        self.assertEqual(withBacklog("systemd:domain=INET:index=0"), "systemd:domain=INET:index=0")

    @defer.inlineCallbacks
    def test_realListeners(self):
        """
        The proxy and admin sockets the service opens listen with a backlog of 1024, as
        the kernel reports it (C{ss}'s Send-Q of a listening socket).
        """
        if shutil.which("ss") is None:
            raise unittest.SkipTest("needs ss (iproute2)")
        config = ProxyConfig(listen="tcp:0:interface=127.0.0.1", admin="tcp:0:interface=127.0.0.1",
                             accessLog=None)
        service = SidecarService(config, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        for listener in service.listeners + service.adminListeners:
            # Read the port without consuming the listener's Deferred (stopService needs it).
            got: defer.Deferred = defer.Deferred()

            def seen(port, got=got):
                got.callback(port)
                return port

            listeningPort(listener).addCallback(seen)
            port = yield got
            number = port.getHost().port
            out = subprocess.run(["ss", "-ltnH", f"sport = :{number}"], capture_output=True, text=True,
                                 timeout=10).stdout.split()
            self.assertEqual(out[2], "1024", out)
