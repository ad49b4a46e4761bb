# -*- test-case-name: tests.test_hardening_request -*-
"""
Request-side hardening (issue 8): hostile request heads and bodies, sent as raw bytes
through both front doors to a strict upstream that logs every byte it receives, so each
test states byte for byte what the service got, or that it got nothing.
"""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from sidecar.exchange import Engine
from tests.support import Proxy, RawUpstream, closeClient, openClient, rawRequest, startSidecar, waitUntil

#: The head the proxy adds for a client on 127.0.0.1 that sent C{X-Request-Id: rid}.
_FORWARDED = b"X-Request-Id: rid\r\nX-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n"


class RequestHardeningMixin:
    """
    What both doors must do with hostile requests (the rules live in
    L{sidecar.headers.requestHead}, which both doors call).
    """

    engine = "fast"

    def setUp(self) -> None:
        self.upstream = RawUpstream()
        upstreamPort = self.upstream.start(self)
        self.proxy = Proxy(upstreamPort, engine=self.engine)
        self.port = self.proxy.start(self)

    def request(self, data: bytes, expect: int = 1) -> defer.Deferred:
        d = rawRequest(self.port, data, expect)

        def cleanup(client):
            self.addCleanup(closeClient, client)
            return client

        return d.addCallback(cleanup)

    @defer.inlineCallbacks
    def assertRefused(self, data: bytes, status: int = 400):
        """
        C{data} gets C{status}, the connection is closed, the service is never
        contacted, and the record says C{DPE}.
        """
        client = yield self.request(data, expect=99)
        yield client.closed
        self.assertTrue(client.responses, f"no response to {data!r}")
        self.assertEqual(client.responses[0].status, status, data)
        self.assertEqual(self.upstream.received, [], data)
        yield waitUntil(lambda: self.proxy.records)
        self.assertEqual([r.flags for r in self.proxy.records], ["DPE"], data)
        return client

    @defer.inlineCallbacks
    def assertRefusedEach(self, cases, status: int = 400):
        """
        Every request of C{cases} is refused as L{assertRefused} says.
        """
        for data in cases:
            del self.proxy.records[:]
            yield self.assertRefused(data, status)

    # -- 1. Connection must not nominate what the proxy depends on -------------------

    @defer.inlineCallbacks
    def test_connectionContentLengthSmuggling(self):
        """
        The smuggling case of issue 8: C{Connection: Content-Length} is refused with
        400 before the service sees a byte, so a following client's C{GET /victim} on
        another connection is answered by C{/victim}, never by C{/SMUGGLED}.
        """
        yield self.assertRefused(
            b"POST /attacker HTTP/1.1\r\nHost: a\r\nConnection: Content-Length\r\nContent-Length: 34\r\n\r\n"
            b"GET /SMUGGLED HTTP/1.1\r\nX-Ignore: ")
        victim = yield self.request(b"GET /victim HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(victim.responses[0].body, b"target=/victim")
        self.assertEqual(self.upstream.targets, [b"/victim"])
        self.assertNotIn(b"SMUGGLED", b"".join(self.upstream.received))

    def test_connectionNominatesProxyHeaders(self):
        """
        C{Connection} naming C{Host}, C{Content-Length}, C{Transfer-Encoding} or a header
        the proxy sets (C{X-Forwarded-For}, C{X-Forwarded-Proto}, C{X-Request-Id},
        C{X-Forwarded-Client-Cert}) gets 400, as Envoy answers C{Connection: Host}.
        """
        return self.assertRefusedEach([
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: %s\r\n\r\n" % name
            for name in (b"Host", b"content-length", b"Transfer-Encoding", b"close, X-Forwarded-For",
                         b"X-Forwarded-Proto", b"X-Request-Id", b"keep-alive,x-forwarded-client-cert")])

    @defer.inlineCallbacks
    def test_connectionOtherNominationsRemoved(self):
        """
        Other headers named by C{Connection} are removed, and the body framing sent
        upstream is the proxy's own: the exact bytes the service receives.
        """
        yield self.request(
            b"POST /x HTTP/1.1\r\nHost: a\r\nConnection: X-Private\r\nX-Private: 1\r\nX-Request-Id: rid\r\n"
            b"Content-Length: 3\r\n\r\nabc")
        self.assertEqual(self.upstream.received, [
            b"POST /x HTTP/1.1\r\nHost: a\r\n" + _FORWARDED + b"Content-Length: 3\r\n\r\nabc"])

    @defer.inlineCallbacks
    def test_forgedIdentityNeverReachesService(self):
        """
        A forged C{X-Forwarded-Client-Cert} (in any spelling), a forged first
        C{X-Forwarded-For} hop and a forged C{X-Forwarded-Proto} never reach the
        service as the proxy's: the client-cert header is dropped, the client's address
        is appended to C{X-Forwarded-For}, the proto is the proxy's.
        """
        yield self.request(
            b"GET /x HTTP/1.1\r\nHost: a\r\nX-Forwarded-Client-Cert: By=spiffe://evil\r\n"
            b"X_Forwarded_Client_Cert: By=spiffe://evil\r\nx-forwarded_client-cert: By=spiffe://evil\r\n"
            b"X_Forwarded_For: 10.9.9.9\r\nX-Forwarded-For: 10.0.0.1\r\nX_Request_Id: other\r\n"
            b"X_Forwarded_Proto: https\r\nContent_Length: 5\r\nX-Request-Id: rid\r\n\r\n")
        self.assertEqual(self.upstream.received, [
            b"GET /x HTTP/1.1\r\nHost: a\r\nX-Request-Id: rid\r\n"
            b"X-Forwarded-For: 10.0.0.1, 127.0.0.1\r\nX-Forwarded-Proto: http\r\n\r\n"])

    @defer.inlineCallbacks
    def test_requestInBodyStaysBody(self):
        """
        A request hidden in a body (with a forged client-cert header) reaches the service
        as body bytes under the proxy's own C{Content-Length}; the service parses two
        requests, the client's two, and never the hidden one.
        """
        hidden = b"GET /SMUGGLED HTTP/1.1\r\nHost: a\r\nX-Forwarded-Client-Cert: By=spiffe://evil\r\n\r\n"
        client = yield self.request(
            b"POST /attacker HTTP/1.1\r\nHost: a\r\nX-Request-Id: rid\r\nContent-Length: %d\r\n\r\n%s"
            b"GET /next HTTP/1.1\r\nHost: a\r\nX-Request-Id: rid\r\n\r\n" % (len(hidden), hidden), expect=2)
        self.assertEqual([r.body for r in client.responses], [b"target=/attacker", b"target=/next"])
        self.assertEqual(self.upstream.targets, [b"/attacker", b"/next"])
        self.assertEqual(b"".join(self.upstream.received),
                         b"POST /attacker HTTP/1.1\r\nHost: a\r\n" + _FORWARDED
                         + b"Content-Length: %d\r\n\r\n%s" % (len(hidden), hidden)
                         + b"GET /next HTTP/1.1\r\nHost: a\r\n" + _FORWARDED + b"\r\n")

    # -- 9. Host ---------------------------------------------------------------------

    def test_invalidHost(self):
        """
        A Host that is not an RFC 3986 reg-name, IPv4 address or IP literal with an
        optional numeric port gets 400 (RFC 9112 3.2).
        """
        return self.assertRefusedEach([
            b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host
            for host in (b"exa mple.com", b"example.com/x", b"ex\tample.com", b"\xff", b"a:", b"a:x",
                         b"a:99999", b"a@b", b"[::1", b"a\\b")])

    def test_obsFoldNeverMergedIntoHost(self):
        """
        An obs-fold continuation line is refused with 400 (RFC 9112 5.2), never merged
        into Host.
        """
        return self.assertRefused(b"GET / HTTP/1.1\r\nHost: a\r\n b.evil\r\n\r\n")

    def test_obsFoldNeverMerged(self):
        """
        An obs-fold line after any header, or a line starting with whitespace right
        after the request line, is refused with 400 (RFC 9112 5.2) on both doors, never
        merged into the header before it and forwarded (twisted.web would merge it).
        """
        return self.assertRefusedEach([
            b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n 2\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\t2\r\n\r\n",
            b"GET / HTTP/1.1\r\n X-A: 1\r\nHost: a\r\n\r\n",
        ])

    @defer.inlineCallbacks
    def test_emptyLineBeforeRequestLine(self):
        """
        An empty line (CRLF, or a bare LF) before the request line is ignored (RFC 9112
        2.2), on both doors: the request goes upstream as it would without it.
        """
        for data in (b"\r\nGET /a HTTP/1.1\r\nHost: h\r\nX-Request-Id: rid\r\n\r\n",
                     b"\nGET /b HTTP/1.1\r\nHost: h\r\nX-Request-Id: rid\r\n\r\n"):
            yield self.request(data)
        self.assertEqual(self.upstream.targets, [b"/a", b"/b"])
        received = b"".join(self.upstream.received)
        self.assertTrue(received.startswith(b"GET /a HTTP/1.1\r\nHost: h\r\n"), received)
        self.assertIn(b"\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n", received)
        self.assertEqual([r.status for r in self.proxy.records], [200, 200])

    @defer.inlineCallbacks
    def test_spacesInRequestLine(self):
        """
        Runs of spaces between the parts of the request line (RFC 9112 3 lets a
        recipient parse on them; Envoy and nginx do) go upstream as single spaces, on
        both doors.
        """
        for data in (b"GET  /a HTTP/1.1\r\nHost: h\r\nX-Request-Id: rid\r\n\r\n",
                     b"GET /b   HTTP/1.1\r\nHost: h\r\nX-Request-Id: rid\r\n\r\n"):
            yield self.request(data)
        self.assertEqual(self.upstream.targets, [b"/a", b"/b"])
        received = b"".join(self.upstream.received)
        self.assertTrue(received.startswith(b"GET /a HTTP/1.1\r\n"), received)
        self.assertIn(b"\r\n\r\nGET /b HTTP/1.1\r\n", received)
        self.assertEqual([r.path for r in self.proxy.records], ["/a", "/b"])

    @defer.inlineCallbacks
    def test_validHosts(self):
        """
        Names, IPv4 and IPv6 literals with ports, and the empty Host RFC 9112 allows,
        pass unchanged.
        """
        for host in (b"a.example:8080", b"10.0.0.1", b"[::1]:80", b"xn--bcher-kva.example", b""):
            yield self.request(b"GET / HTTP/1.1\r\nHost: %s\r\nX-Request-Id: rid\r\n\r\n" % host)
        self.assertEqual(len(self.upstream.targets), 5)
        self.assertEqual([r.status for r in self.proxy.records], [200] * 5)


class FastDoorRequestHardeningTests(RequestHardeningMixin, unittest.TestCase):
    """
    Request hardening on the fast (llhttp) door, plus what only that door parses itself
    (transfer codings, chunked bodies, the request line).
    """

    engine = "fast"

    @defer.inlineCallbacks
    def test_chunkedReframedByProxy(self):
        """
        A chunked body with extensions is de-chunked and re-chunked by the proxy: the
        service gets exactly one C{Transfer-Encoding: chunked} of the proxy's making.
        """
        yield self.request(
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nX-Request-Id: rid\r\n\r\n"
            b"2;a=b\r\nab\r\n1\r\nc\r\n0\r\n\r\n")
        self.assertEqual(self.upstream.received, [
            b"POST /x HTTP/1.1\r\nHost: a\r\n" + _FORWARDED + b"Transfer-Encoding: chunked\r\n\r\n"
            b"2\r\nab\r\n1\r\nc\r\n0\r\n\r\n"])

    @defer.inlineCallbacks
    def test_absoluteForm(self):
        """
        An absolute-form target goes upstream in origin-form with Host replaced by the
        target's authority (RFC 9112 3.2.2), which is also what the record says.
        """
        yield self.request(b"GET http://a.example:81/x?q=1 HTTP/1.1\r\nHost: b\r\nX-Request-Id: rid\r\n\r\n")
        yield self.request(b"GET HTTP://c.example HTTP/1.1\r\nHost: b\r\nX-Request-Id: rid\r\n\r\n")
        self.assertEqual(b"".join(self.upstream.received),
                         b"GET /x?q=1 HTTP/1.1\r\nHost: a.example:81\r\n" + _FORWARDED + b"\r\n"
                         b"GET / HTTP/1.1\r\nHost: c.example\r\n" + _FORWARDED + b"\r\n")
        self.assertEqual([(r.authority, r.path) for r in self.proxy.records],
                         [("a.example:81", "/x?q=1"), ("c.example", "/")])

    def test_badAbsoluteForm(self):
        """
        An absolute-form target with userinfo or an invalid authority gets 400.
        """
        return self.assertRefusedEach([
            b"GET http://u@a.example/x HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n",
        ])

    @defer.inlineCallbacks
    def test_http10WithoutHost(self):
        """
        An HTTP/1.0 request without Host goes upstream as HTTP/1.1 with the service's
        address as Host (as Envoy's C{default_host_for_http_10}).
        """
        yield self.request(b"GET /x HTTP/1.0\r\nX-Request-Id: rid\r\n\r\n", expect=99)
        address = self.proxy.pool.address.encode()
        self.assertEqual(self.upstream.received, [
            b"GET /x HTTP/1.1\r\nX-Request-Id: rid\r\nHost: " + address
            + b"\r\nX-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n\r\n"])
        self.assertEqual(self.proxy.records[0].authority, address.decode())

    def test_asteriskFormOnlyForOptions(self):
        """
        The asterisk-form target is for OPTIONS only: any other method gets 400.
        """
        return self.assertRefusedEach([
            b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", b"POST * HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"])

    @defer.inlineCallbacks
    def test_asteriskOptionsForwarded(self):
        """
        C{OPTIONS *} is forwarded as it came.
        """
        yield self.request(b"OPTIONS * HTTP/1.1\r\nHost: a\r\nX-Request-Id: rid\r\n\r\n")
        self.assertEqual(self.upstream.received, [b"OPTIONS * HTTP/1.1\r\nHost: a\r\n" + _FORWARDED + b"\r\n"])

    def test_unsupportedVersions(self):
        """
        Versions other than HTTP/1.0 and HTTP/1.1, and other protocols llhttp knows
        (RTSP, ICE), get 505 without reaching the service.
        """
        return self.assertRefusedEach([
            b"GET / RTSP/1.0\r\nHost: a\r\n\r\n", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", b"GET / HTTP/0.9\r\nHost: a\r\n\r\n",
            b"OPTIONS / RTSP/1.1\r\nHost: a\r\n\r\n",
        ], 505)

    @defer.inlineCallbacks
    def test_rtspPipelinedAfterHttp(self):
        """
        An RTSP request line behind a good request in the same packet is found too: the
        first is served, the second gets 505.
        """
        client = yield self.request(
            b"GET /one HTTP/1.1\r\nHost: a\r\n\r\nGET /one RTSP/1.0\r\nHost: a\r\n\r\n", expect=2)
        self.assertEqual([r.status for r in client.responses], [200, 505])
        self.assertEqual(self.upstream.targets, [b"/one"])

    @defer.inlineCallbacks
    def test_rtspSplitAcrossReads(self):
        """
        A request line cut anywhere after its target (inside the protocol name too) is
        still read as RTSP: 505, the service never contacted.  The same cuts of an HTTP
        request line are served.
        """
        data = b"GET /t RTSP/1.0\r\nHost: a\r\n\r\n"
        for cut in range(len(b"GET /"), len(b"GET /t RTSP/1.")):
            for line, status in ((data, 505), (data.replace(b"RTSP", b"HTTP"), 200)):
                client = openClient(self.port, line[:cut], expect=99)
                self.addCleanup(closeClient, client)
                yield waitUntil(lambda: client.transport is not None and self.proxy.factory is not None)
                yield deferLater(reactor, 0.01, lambda: None)
                client.transport.write(line[cut:])
                yield client.done
                self.assertEqual([r.status for r in client.responses], [status], (cut, line))
        self.assertEqual(len(self.upstream.targets), len(range(len(b"GET /"), len(b"GET /t RTSP/1."))))

    # -- 7. transfer codings ---------------------------------------------------------

    def test_transferCodingsNotImplemented(self):
        """
        Any Transfer-Encoding but a lone C{chunked} gets 501 at header time, as Envoy
        and nginx answer, and the service is never contacted.
        """
        body = b"3\r\nabc\r\n0\r\n\r\n"
        return self.assertRefusedEach([
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: %s\r\n\r\n%s" % (te, body)
            for te in (b"gzip, chunked", b"deflate, chunked", b"identity", b"x", b"xchunked", b"chunk",
                       b"chunked, gzip", b"gzip")
        ] + [b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n" + body,
             b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n" + body],
            501)

    def test_http10TransferEncoding(self):
        """
        Transfer-Encoding in an HTTP/1.0 request is faulty framing (RFC 9112 6.1): 400.
        """
        return self.assertRefused(
            b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")

    # -- 8. malformed chunked bodies -------------------------------------------------

    @defer.inlineCallbacks
    def test_malformedChunkedBodies(self):
        """
        A malformed chunked body is the client's fault: 400 with C{DPE}, never 502
        C{UF}, and the service never gets the bad chunk nor a complete request.
        """
        for chunk in (b"+3\r\nabc\r\n0\r\n\r\n", b"-3\r\nabc\r\n0\r\n\r\n", b"0_3\r\nabc\r\n0\r\n\r\n",
                      b"3 \r\nabc\r\n0\r\n\r\n", b"3\nabc\n0\n\n", b"3\r\nabcdef\r\n0\r\n\r\n",
                      b"3\r\nabc\n0\r\n\r\n", b"3\rabc\r\n0\r\n\r\n", b"zz\r\n", b"3\r\nabc\r\n0\r\nX: y\n\r\n"):
            del self.proxy.records[:]
            client = yield self.request(
                b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk, expect=99)
            self.assertEqual([r.status for r in client.responses], [400], chunk)
            yield waitUntil(lambda: self.proxy.records)
            self.assertEqual([(r.status, r.flags) for r in self.proxy.records], [(400, "DPE")], chunk)
        self.assertEqual(self.upstream.targets, [])

    # -- 12. underscores -------------------------------------------------------------

    @defer.inlineCallbacks
    def test_underscoresAllowedByDefault(self):
        """
        By default (as Envoy's C{ALLOW}) other headers with underscores pass.
        """
        yield self.request(b"GET / HTTP/1.1\r\nHost: a\r\nsentry_trace_id: 1\r\nX-Request-Id: rid\r\n\r\n")
        self.assertEqual(self.upstream.received, [
            b"GET / HTTP/1.1\r\nHost: a\r\nsentry_trace_id: 1\r\n" + _FORWARDED + b"\r\n"])

    @defer.inlineCallbacks
    def test_underscoresDropped(self):
        """
        With C{--headers-with-underscores drop}, headers with underscores are dropped.
        """
        self.proxy.engine.headersWithUnderscores = "drop"
        yield self.request(b"GET / HTTP/1.1\r\nHost: a\r\nsentry_trace_id: 1\r\nX-Request-Id: rid\r\n\r\n")
        self.assertEqual(self.upstream.received, [b"GET / HTTP/1.1\r\nHost: a\r\n" + _FORWARDED + b"\r\n"])

    def test_underscoresRejected(self):
        """
        With C{--headers-with-underscores reject}, a header with an underscore gets 400.
        """
        self.proxy.engine.headersWithUnderscores = "reject"
        return self.assertRefused(b"GET / HTTP/1.1\r\nHost: a\r\nsentry_trace_id: 1\r\n\r\n")

    # -- 14. what was never read -----------------------------------------------------

    @defer.inlineCallbacks
    def test_garbageRecordedAsDashes(self):
        """
        A request that never parsed is recorded with C{-} for the method, target and
        protocol, not llhttp's default C{DELETE}.
        """
        yield self.assertRefused(b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
        [rec] = self.proxy.records
        self.assertEqual((rec.method, rec.path, rec.protocol), ("-", "-", "-"))

    @defer.inlineCallbacks
    def test_badHeaderRecordsRequestLine(self):
        """
        A request refused in its headers records the method, target and protocol it did
        send.
        """
        yield self.assertRefused(b"PUT /p HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n")
        [rec] = self.proxy.records
        self.assertEqual((rec.method, rec.path, rec.protocol), ("PUT", "/p", "HTTP/1.1"))


class WebDoorRequestHardeningTests(RequestHardeningMixin, unittest.TestCase):
    """
    The same rules on the twisted.web door, which calls the same L{requestHead}.
    """

    engine = "web"

    def test_transferCodingNotImplemented(self):
        """
        A transfer coding twisted.web lets through (it reads C{identity} as no body)
        still meets the rules: 501, the service never contacted.
        """
        return self.assertRefused(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n", 501)

    @defer.inlineCallbacks
    def test_http10WithoutHost(self):
        """
        An HTTP/1.0 request without Host goes upstream with the service's address as
        Host, as on the fast door.
        """
        yield self.request(b"GET /x HTTP/1.0\r\nX-Request-Id: rid\r\n\r\n", expect=99)
        address = self.proxy.pool.address.encode()
        [received] = self.upstream.received
        self.assertTrue(received.startswith(b"GET /x HTTP/1.1\r\n"), received)
        self.assertIn(b"\r\nHost: " + address + b"\r\n", received)
        self.assertEqual(self.proxy.records[0].authority, address.decode())


class UnderscoreFlagTests(unittest.TestCase):
    """
    C{--headers-with-underscores} reaches the engine of a real C{twistd sidecar}.
    """

    @defer.inlineCallbacks
    def test_rejectFlag(self):
        """
        Started with C{--headers-with-underscores reject}, the sidecar answers 400 to a
        request with C{my_header} and forwards one without.
        """
        upstream = RawUpstream()
        upstreamPort = upstream.start(self)
        child, port = yield startSidecar(self, "--upstream", str(upstreamPort), "--admin", "none",
                                         "--access-log", "none", "--headers-with-underscores", "reject")
        refused = yield rawRequest(port, b"GET /a HTTP/1.1\r\nHost: a\r\nmy_header: 1\r\n\r\n", expect=99)
        served = yield rawRequest(port, b"GET /b HTTP/1.1\r\nHost: a\r\nmy-header: 1\r\n\r\n")
        self.addCleanup(closeClient, served)
        self.assertEqual([r.status for r in refused.responses + served.responses], [400, 200])
        self.assertEqual(upstream.targets, [b"/b"])


class EngineDefaultTests(unittest.SynchronousTestCase):
    """
    The engine's default for underscores.
    """

    def test_defaultAllow(self):
        """
        Headers with underscores are allowed by default, as Envoy and Istio do.
        """
        self.assertEqual(Engine.__attrs_attrs__.headersWithUnderscores.default, "allow")
