# -*- test-case-name: tests.test_newconn -*-
"""
A new connection per request, through the whole inbound path (listener, protocol
detection, the fast door, the pool): what each connection leaves behind once closed.
Real sockets on 127.0.0.1, the real reactor, a real upstream.
"""

from __future__ import annotations

import gc
from typing import Any

import httptools
from twisted.internet import defer, reactor, tcp
from twisted.trial import unittest

from sidecar.compat import listeningPort
from sidecar.config import ProxyConfig, UpstreamConfig
from sidecar.service import SidecarService
from tests.support import Upstream, rawRequest

#: The types of a client connection's objects on the proxy's side that are not sidecar's.
SERVER_SIDE = (tcp.Server, httptools.HttpRequestParser)

CLOSING_GET = b"GET /bytes/5 HTTP/1.1\r\nHost: example\r\nConnection: close\r\n\r\n"


class NewConnectionTests(unittest.TestCase):
    """
    Connections that carry one request each and close.
    """

    @defer.inlineCallbacks
    def startSidecar(self) -> Any:
        upstream = Upstream()
        upstreamPort = upstream.start(self)
        config = ProxyConfig(listen="tcp:0:interface=127.0.0.1", admin=None, health=None, accessLog=None,
                             upstream=UpstreamConfig(port=upstreamPort))
        service = SidecarService(config, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        got: defer.Deferred = defer.Deferred()

        def seen(port: Any) -> Any:
            got.callback(port)
            return port

        listeningPort(service.listeners[0]).addCallback(seen)
        port = yield got
        return service, upstream, port.getHost().port

    @defer.inlineCallbacks
    def test_noCyclesLeftBehind(self) -> None:
        """
        A closed client connection is freed by reference counting alone: none of its
        objects (the detector, the door, its parser, the transport, the socket) is left
        in a reference cycle for the garbage collector, whose collections would
        otherwise cost every new connection.  The upstream connection is pooled and
        reused for every request.
        """
        service, upstream, port = yield self.startSidecar()
        for _ in range(3):
            client = yield rawRequest(port, CLOSING_GET)
            self.assertEqual(client.responses[0].status, 200)
        gc.collect()
        wasEnabled = gc.isenabled()
        gc.disable()
        self.addCleanup(lambda: gc.enable() if wasEnabled else None)
        for _ in range(20):
            client = yield rawRequest(port, CLOSING_GET)
            self.assertEqual((client.responses[0].status, client.responses[0].body), (200, b"xxxxx"))
        # Let the proxy see every close.
        for _ in range(50):
            if service.recorder.downstreamConnectionsActive == 0:
                break
            yield deferLater(0.02)
        self.assertEqual(service.recorder.downstreamConnectionsActive, 0)
        self.assertEqual(len(service.engine.doors), 0)
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            # The proxy's side only (the test's own client lives in cycles of its own).
            left = [type(o).__name__ for o in gc.garbage
                    if type(o).__module__.startswith("sidecar.") or type(o) in SERVER_SIDE]
        finally:
            gc.set_debug(0)
            del gc.garbage[:]
        self.assertEqual(left, [])
        self.assertEqual(upstream.connections, 1)


def deferLater(seconds: float) -> defer.Deferred:
    """
    A Deferred that fires after C{seconds} on the real reactor.
    """
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)
