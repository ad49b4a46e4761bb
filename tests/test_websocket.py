# -*- test-case-name: tests.test_websocket -*-
"""
WebSocket through both front doors, with a real WebSocket server upstream and a real
WebSocket client (the C{websockets} library), each in its own process.
"""

from __future__ import annotations

import os
import signal

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from tests.support import HERE, PYTHON, ChildProcess, Proxy, subprocessEnv, waitUntil

PEER = os.path.join(HERE, "peers", "ws_peer.py")

try:
    import websockets  # noqa: F401
except ImportError:  # pragma: no cover
    skipWebsockets = "needs the websockets package (requirements-test.txt)"
else:
    skipWebsockets = None


class WebSocketMixin:
    """
    Subclasses set C{engine}.
    """

    engine = "fast"
    skip = skipWebsockets

    @defer.inlineCallbacks
    def test_echoThroughProxy(self):
        """
        After the service answers 101, frames flow both ways untouched (text, binary
        and a 1 MiB message come back equal), and when the client closes, the exchange
        ends with one record of status 101 counting the tunnelled bytes.
        """
        server = ChildProcess(self, [PYTHON, PEER, "server"], stopSignal=signal.SIGTERM)
        yield waitUntil(lambda: server.out.strip().isdigit())
        proxy = Proxy(int(server.out), engine=self.engine)
        port = proxy.start(self)
        out, err, code = yield getProcessOutputAndValue(
            PYTHON, [PEER, "client", str(port)], env=subprocessEnv())
        self.assertEqual((code, out.strip()), (0, b"ok 4"), err)
        yield waitUntil(lambda: proxy.records)
        [rec] = proxy.records
        self.assertEqual(rec.status, 101)
        self.assertGreater(rec.bytesReceived, 1 << 20)
        self.assertGreater(rec.bytesSent, 1 << 20)


    @defer.inlineCallbacks
    def closeTime(self, mode: str) -> defer.Deferred:
        server = ChildProcess(self, [PYTHON, PEER, "server"], stopSignal=signal.SIGTERM)
        yield waitUntil(lambda: server.out.strip().isdigit())
        proxy = Proxy(int(server.out), engine=self.engine)
        port = proxy.start(self)
        out, err, code = yield getProcessOutputAndValue(PYTHON, [PEER, mode, str(port)], env=subprocessEnv())
        self.assertEqual(code, 0, err)
        word, seconds = out.split()
        self.assertEqual(word, b"closed")
        yield waitUntil(lambda: proxy.records)
        [rec] = proxy.records
        self.assertEqual((rec.status, rec.flags), (101, "-"))
        return float(seconds)

    @defer.inlineCallbacks
    def test_clientCloses(self):
        """
        The client closes: the service's answer and its end of the connection reach the
        client at once, so the library's close takes well under its 5 s close timeout.
        """
        seconds = yield self.closeTime("client-close")
        self.assertLess(seconds, 1.0)

    @defer.inlineCallbacks
    def test_serverCloses(self):
        """
        The service closes: the client learns of it at once (its close completes well
        under the library's 5 s close timeout).
        """
        seconds = yield self.closeTime("server-close")
        self.assertLess(seconds, 1.0)


class FastDoorWebSocketTests(WebSocketMixin, unittest.TestCase):
    """
    WebSocket through the fast door.
    """

    engine = "fast"


class WebDoorWebSocketTests(WebSocketMixin, unittest.TestCase):
    """
    WebSocket through the twisted.web door.
    """

    engine = "web"
