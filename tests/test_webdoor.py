# -*- test-case-name: tests.test_webdoor -*-
"""
The twisted.web front door as people mount it: the README's example, the C{path} rule,
twisted.web's own C{Site} (treq as the client), IPv6 records, and the client
timeouts of the engine's sweep.  Real sockets, a raw upstream logging what it received.
"""

from __future__ import annotations

import os
import re
import socket

import treq
from twisted.internet import defer, reactor
from twisted.internet.protocol import ClientFactory
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import Site

from sidecar.config import UpstreamConfig

from sidecar.exchange import Engine
from sidecar.resource import SidecarChannel, SidecarProxyResource, SidecarSite, proxySite
from sidecar.stats import Recorder
from sidecar.upstream import UpstreamPool
from tests.support import ROOT, RawClient, closeClient, openClient, rawRequest, waitUntil
from tests.test_behaviour import RawUpstream

_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def _readmeExample() -> str:
    """
    The Python block of the README's web door section.
    """
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    [block] = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "def apiSite" in b]
    return block


class WebDoorMountingTests(unittest.TestCase):
    """
    L{SidecarProxyResource} in a site of one's own.
    """

    def engine(self, upstreamPort: int, records: list) -> Engine:
        pool = UpstreamPool(reactor, reactor, UpstreamConfig(port=upstreamPort))
        self.addCleanup(pool.closeAll)
        return Engine(reactor, pool, Recorder([records.append]))

    def listen(self, site, interface: str = "127.0.0.1") -> int:
        port = reactor.listenTCP(0, site, interface=interface)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def test_readmeExample(self):
        """
        The README's example runs as written: mounted at C{/api} with path C{b"/"}, a
        request for C{/api/x?q=1} goes upstream as C{/x?q=1}; the record keeps the
        client's path; other paths stay the site's own (404).
        """
        namespace: dict = {}
        exec(compile(_readmeExample(), "README.md", "exec"), namespace)
        upstream = RawUpstream(_OK)
        records: list = []
        site = namespace["apiSite"](reactor, upstream.start(self), records)
        self.addCleanup(site.engine.pool.closeAll)
        port = self.listen(site)
        response = yield treq.get(f"http://127.0.0.1:{port}/api/x?q=1", persistent=False)
        self.assertEqual((response.code, (yield treq.content(response))), (200, b"ok"))
        self.assertTrue(upstream.received.startswith(b"GET /x?q=1 HTTP/1.1\r\n"), upstream.received)
        self.assertEqual([r.path for r in records], ["/api/x?q=1"])
        response = yield treq.get(f"http://127.0.0.1:{port}/other", persistent=False)
        yield treq.content(response)
        self.assertEqual(response.code, 404)

    @defer.inlineCallbacks
    def test_pathPrefix(self):
        """
        Mounted at C{/api} with path C{b"/v1"}, C{/api/a%2Fb/c?z} goes upstream as
        C{/v1/a%2Fb/c?z}: the segments below the mount point, still percent-encoded.
        """
        upstream = RawUpstream(_OK)
        records: list = []
        engine = self.engine(upstream.start(self), records)
        root = Resource()
        root.putChild(b"api", SidecarProxyResource(engine, b"/v1"))
        port = self.listen(SidecarSite(root, engine))
        client = yield rawRequest(port, b"GET /api/a%2Fb/c?z HTTP/1.1\r\nHost: a\r\n\r\n")
        self.addCleanup(closeClient, client)
        self.assertEqual(client.responses[0].status, 200)
        self.assertTrue(upstream.received.startswith(b"GET /v1/a%2Fb/c?z HTTP/1.1\r\n"), upstream.received)

    @defer.inlineCallbacks
    def test_rootPassesTargetUnchanged(self):
        """
        At a site's root with the default path, the target passes byte for byte.
        """
        upstream = RawUpstream(_OK)
        port = self.listen(proxySite(self.engine(upstream.start(self), [])))
        client = yield rawRequest(port, b"GET //a/../b%20?x=%2F HTTP/1.1\r\nHost: a\r\n\r\n")
        self.addCleanup(closeClient, client)
        self.assertTrue(upstream.received.startswith(b"GET //a/../b%20?x=%2F HTTP/1.1\r\n"), upstream.received)

    @defer.inlineCallbacks
    def test_twistedWebSiteBuffered(self):
        """
        In twisted.web's own L{Site} (its own C{Request}), the body is forwarded once
        read whole, with a C{Content-Length} from the proxy's count, and a response
        without C{Content-Type} gets none.
        """
        upstream = RawUpstream(_OK)
        records: list = []
        root = Resource()
        root.putChild(b"api", SidecarProxyResource(self.engine(upstream.start(self), records)))
        port = self.listen(Site(root))
        response = yield treq.post(f"http://127.0.0.1:{port}/api/up", data=b"hello body", persistent=False)
        self.assertEqual((response.code, (yield treq.content(response))), (200, b"ok"))
        self.assertIsNone(response.headers.getRawHeaders(b"content-type"))
        head, _, sent = upstream.received.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"POST /up HTTP/1.1\r\n"), head)
        self.assertIn(b"\r\nContent-Length: 10", head)
        self.assertEqual(sent, b"hello body")

    @defer.inlineCallbacks
    def test_ipv6ClientBracketed(self):
        """
        A client on C{::1} is recorded as C{[::1]:port}.
        """
        if not socket.has_ipv6:
            raise unittest.SkipTest("needs IPv6")
        upstream = RawUpstream(_OK)
        records: list = []
        try:
            port = self.listen(proxySite(self.engine(upstream.start(self), records)), interface="::1")
        except Exception as e:
            raise unittest.SkipTest(f"needs IPv6 on loopback: {e}")
        client = RawClient(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n", 1)
        reactor.connectTCP("::1", port, ClientFactory.forProtocol(lambda: client))
        yield client.done
        self.addCleanup(closeClient, client)
        self.assertEqual(client.responses[0].status, 200)
        [record] = records
        self.assertRegex(record.downstreamRemoteAddress, r"^\[::1\]:\d+$")
        self.assertEqual(record.forwardedFor, "::1")


class WebDoorTimeoutTests(unittest.TestCase):
    """
    The web door's connections are in C{engine.doors} and obey the engine's sweep, not
    twisted.web's own timeout.
    """

    def setUp(self) -> None:
        upstream = RawUpstream(_OK)
        self.records: list = []
        pool = UpstreamPool(reactor, reactor, UpstreamConfig(port=upstream.start(self)))
        self.addCleanup(pool.closeAll)
        self.engine = Engine(reactor, pool, Recorder([self.records.append]))
        self.site = proxySite(self.engine)
        port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port

    def test_noTwistedTimeout(self):
        """
        The site has no twisted.web timeout (twisted.web's default would close at 60 s).
        """
        self.assertIsNone(self.site.timeOut)

    @defer.inlineCallbacks
    def test_requestHeadTimeout(self):
        """
        A client that sends half a head and stops gets 408 from the sweep's request-head
        timeout, with a record, and is closed.
        """
        client = openClient(self.port, b"GET /slow HTTP/1.1\r\nHo", expect=99)
        self.addCleanup(closeClient, client)
        yield waitUntil(lambda: any(isinstance(d, SidecarChannel) and d.inHead for d in self.engine.doors))
        now = reactor.seconds()
        self.engine.doors.sweep(now, None, 5.0)
        self.engine.doors.sweep(now + 4.0, None, 5.0)
        self.assertEqual(client.responses, [])
        self.engine.doors.sweep(now + 5.0, None, 5.0)
        yield client.closed
        self.assertEqual([r.status for r in client.responses], [408])
        self.assertEqual([(r.status, r.flags) for r in self.records], [(408, "DPE")])

    @defer.inlineCallbacks
    def test_clientIdleTimeout(self):
        """
        A keep-alive client idle past the client idle timeout is closed by the sweep,
        and leaves the registry; a busy one is not.
        """
        client = openClient(self.port, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n", expect=1)
        yield client.done
        self.assertEqual(client.responses[0].status, 200)
        [door] = list(self.engine.doors)
        self.assertIsInstance(door, SidecarChannel)
        self.assertFalse(door.busy())
        now = reactor.seconds()
        self.engine.doors.sweep(now, 10.0, None)
        self.engine.doors.sweep(now + 9.0, 10.0, None)
        self.assertTrue(client.transport.connected)
        self.engine.doors.sweep(now + 10.0, 10.0, None)
        yield client.closed
        yield waitUntil(lambda: not self.engine.doors)
        self.assertEqual(self.engine.recorder.downstreamConnectionsActive, 0)


class MaxRequestBytesFlagTests(unittest.TestCase):
    """
    C{--max-request-bytes} reaches the engine of either door; a bad value fails at
    start-up with one sentence naming the flag.
    """

    def test_flag(self):
        """
        The flag sets C{maxRequestBytes} in the configuration and on the engine; absent,
        there is no limit.
        """
        from sidecar.service import SidecarService
        from sidecar.tap import Options
        from twisted.internet.testing import MemoryReactorClock

        options = Options()
        options.parseOptions(["--max-request-bytes", "1048576", "--engine", "web", "--admin", "none",
                              "--access-log", "none"])
        self.assertEqual(options["config"].maxRequestBytes, 1048576)
        service = SidecarService(options["config"], MemoryReactorClock())
        self.assertEqual(service.engine.maxRequestBytes, 1048576)
        default = Options()
        default.parseOptions([])
        self.assertIsNone(default["config"].maxRequestBytes)

    def test_badValue(self):
        """
        A value that is not a whole number is refused, naming the flag.
        """
        from twisted.python import usage

        from sidecar.tap import Options

        error = self.assertRaises(usage.UsageError, Options().parseOptions, ["--max-request-bytes", "ten"])
        self.assertIn("--max-request-bytes", str(error))
