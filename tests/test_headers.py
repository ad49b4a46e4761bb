# -*- test-case-name: tests.test_headers -*-
"""
The forwarding rules of L{sidecar.headers}, as pure functions.
"""

from __future__ import annotations

from twisted.trial import unittest

from sidecar import http1
from sidecar.headers import bodyForbidden, newRequestId, requestHead, responseHead


def wire(req, method: bytes = b"GET", target: bytes = b"") -> bytes:
    """
    The request head as the HTTP/1.1 upstream codec writes it from C{req} (its target
    unless another is given).
    """
    return http1.requestHead(method, target or req.target, req.headers, req.contentLength, req.chunked)


def parse(head: bytes):
    lines = head.split(b"\r\n")
    return lines[0], [tuple(line.split(b": ", 1)) for line in lines[1:] if line]


class RequestHeadTests(unittest.SynchronousTestCase):
    """
    L{requestHead} turns a client's head into the upstream's.
    """

    def test_requestLineAndOrder(self):
        """
        The method and target pass unchanged, the version becomes HTTP/1.1, the client's
        headers keep their order and case, and the proxy's headers follow.
        """
        req = requestHead(b"GET", b"/a?b=c", "1.1", [(b"Host", b"h"), (b"X-B", b"2"), (b"x-a", b"1")],
                          "10.0.0.1")
        line, headers = parse(wire(req, b"GET", b"/a?b=c"))
        self.assertEqual(line, b"GET /a?b=c HTTP/1.1")
        self.assertEqual(headers[:3], [(b"Host", b"h"), (b"X-B", b"2"), (b"x-a", b"1")])
        self.assertEqual([n for n, v in headers[3:]], [b"X-Forwarded-For", b"X-Forwarded-Proto", b"X-Request-Id"])
        self.assertTrue(wire(req).endswith(b"\r\n\r\n"))

    def test_connectionNamedHeadersRemoved(self):
        """
        Headers named by C{Connection} are removed along with the fixed hop-by-hop set.
        """
        req = requestHead(b"GET", b"/", "1.1", [
            (b"Host", b"h"), (b"Connection", b"X-One, x-two"), (b"X-One", b"1"), (b"X-Two", b"2"),
            (b"Keep-Alive", b"1"), (b"TE", b"trailers"), (b"Proxy-Connection", b"x"), (b"Upgrade", b"h2c"),
            (b"Trailer", b"X"), (b"X-Three", b"3")], "1.2.3.4")
        _, headers = parse(wire(req))
        names = [n.lower() for n, v in headers]
        for gone in (b"connection", b"x-one", b"x-two", b"keep-alive", b"te", b"proxy-connection",
                     b"upgrade", b"trailer"):
            self.assertNotIn(gone, names)
        self.assertIn(b"x-three", names)
        self.assertFalse(req.upgrade)

    def test_forwardedFor(self):
        """
        Several client C{X-Forwarded-For} headers are joined and the client's address
        appended; C{X-Forwarded-Proto} from the client is replaced.
        """
        req = requestHead(b"GET", b"/", "1.1", [(b"Host", b"h"), (b"X-Forwarded-For", b"1.1.1.1"),
                                                (b"x-forwarded-for", b"2.2.2.2, 3.3.3.3"),
                                                (b"X-Forwarded-Proto", b"https")], "4.4.4.4", b"http")
        _, headers = parse(wire(req))
        self.assertIn((b"X-Forwarded-For", b"1.1.1.1, 2.2.2.2, 3.3.3.3, 4.4.4.4"), headers)
        self.assertEqual([v for n, v in headers if n.lower() == b"x-forwarded-proto"], [b"http"])
        self.assertEqual(req.forwardedFor, "1.1.1.1, 2.2.2.2, 3.3.3.3, 4.4.4.4")

    def test_clientCertHeaderNeverForwarded(self):
        """
        A client's C{X-Forwarded-Client-Cert} is dropped; the proxy's own (given as
        C{extra}) is sent.
        """
        req = requestHead(b"GET", b"/", "1.1", [(b"Host", b"h"), (b"X-Forwarded-Client-Cert", b"forged")],
                          "1.1.1.1", b"https", [(b"X-Forwarded-Client-Cert", b"By=real")])
        _, headers = parse(wire(req))
        self.assertEqual([v for n, v in headers if n.lower() == b"x-forwarded-client-cert"], [b"By=real"])

    def test_chunkedReframed(self):
        """
        A chunked request is marked so, and the upstream head says chunked once.
        """
        req = requestHead(b"POST", b"/", "1.1", [(b"Host", b"h"), (b"Transfer-Encoding", b"chunked")], "1.1.1.1")
        self.assertTrue(req.chunked)
        _, headers = parse(wire(req))
        self.assertEqual([v for n, v in headers if n.lower() == b"transfer-encoding"], [b"chunked"])

    def test_expectAnsweredByProxy(self):
        """
        C{Expect: 100-continue} is noted and not forwarded.
        """
        req = requestHead(b"POST", b"/", "1.1", [(b"Host", b"h"), (b"Expect", b"100-Continue"),
                                                 (b"Content-Length", b"3")], "1.1.1.1")
        self.assertTrue(req.expectContinue)
        self.assertEqual(req.contentLength, 3)
        self.assertNotIn(b"expect", wire(req).lower())

    def test_upgradeKept(self):
        """
        An upgrade request keeps C{Upgrade} and says C{Connection: Upgrade} upstream.
        """
        req = requestHead(b"GET", b"/ws", "1.1", [(b"Host", b"h"), (b"Connection", b"keep-alive, Upgrade"),
                                                  (b"Upgrade", b"websocket")], "1.1.1.1")
        self.assertTrue(req.upgrade)
        _, headers = parse(wire(req))
        self.assertIn((b"Connection", b"Upgrade"), headers)
        self.assertIn((b"Upgrade", b"websocket"), headers)

    def test_hostRules(self):
        """
        HTTP/1.1 without Host, or with two, is an error; HTTP/1.0 without Host gets the
        default Host the door gives (the service's address), and is an error when the
        door gives none.
        """
        self.assertIsNotNone(requestHead(b"GET", b"/", "1.1", [], "1.1.1.1").error)
        self.assertIsNotNone(requestHead(b"GET", b"/", "1.1", [(b"Host", b"a"), (b"host", b"b")], "1.1.1.1").error)
        req = requestHead(b"GET", b"/", "1.0", [], "1.1.1.1", defaultHost=b"svc:80")
        self.assertIsNone(req.error)
        self.assertEqual(req.authority, "svc:80")
        self.assertIn((b"Host", b"svc:80"), parse(wire(req))[1])
        self.assertIsNotNone(requestHead(b"GET", b"/", "1.0", [], "1.1.1.1").error)

    def test_connectionMayNotNominateProtectedHeaders(self):
        """
        C{Connection} naming a header the proxy frames, routes or identifies with is an
        error (400), in any case and position in the list.
        """
        for name in (b"Content-Length", b"transfer-encoding", b"HOST", b"X-Forwarded-For",
                     b"x-forwarded-proto", b"X-Request-Id", b"X-Forwarded-Client-Cert"):
            req = requestHead(b"POST", b"/", "1.1", [(b"Host", b"h"), (b"Connection", b"close, " + name),
                                                     (b"Content-Length", b"3"), (b"X-Request-Id", b"r")],
                              "1.1.1.1")
            self.assertEqual((req.error, req.status), ("Connection names a header the proxy depends on", 400))

    def test_framingGeneratedNotCopied(self):
        """
        The upstream's C{Content-Length} is written by the proxy from the parsed value,
        at the end of the head, never copied as the client spelled it.
        """
        req = requestHead(b"POST", b"/", "1.1", [(b"Content-Length", b" 003 "), (b"Host", b"h"),
                                                 (b"X-Request-Id", b"r")], "1.1.1.1")
        self.assertEqual(req.contentLength, 3)
        self.assertEqual(wire(req, b"POST"), b"POST / HTTP/1.1\r\nHost: h\r\nX-Request-Id: r\r\nX-Forwarded-For: 1.1.1.1\r\n"
                                   b"X-Forwarded-Proto: http\r\nContent-Length: 3\r\n\r\n")
        for bad in ([(b"Content-Length", b"3"), (b"Content-Length", b"3")], [(b"Content-Length", b"+3")],
                    [(b"Content-Length", b"3"), (b"Transfer-Encoding", b"chunked")]):
            self.assertIsNotNone(requestHead(b"POST", b"/", "1.1", [(b"Host", b"h")] + bad, "1.1.1.1").error)

    def test_transferCodings(self):
        """
        Only a lone C{chunked} is implemented; anything else, split over headers or not,
        is refused with 501.
        """
        for values in ([b"gzip, chunked"], [b"gzip", b"chunked"], [b"chunked", b"chunked"], [b"identity"],
                       [b"xchunked"], [b"chunked,"], [b"chunk"]):
            req = requestHead(b"POST", b"/", "1.1", [(b"Host", b"h")] + [(b"Transfer-Encoding", v) for v in values],
                              "1.1.1.1")
            self.assertEqual(req.status, 501, values)
            self.assertIsNotNone(req.error)
        self.assertTrue(requestHead(b"POST", b"/", "1.1", [(b"Host", b"h"), (b"Transfer-Encoding", b" Chunked ")],
                                    "1.1.1.1").chunked)

    def test_hostValidity(self):
        """
        Host must be a reg-name, IPv4 or IP literal with an optional port up to 65535.
        """
        for good in (b"a", b"a.b-c_d~e:0", b"10.1.2.3:65535", b"[::1]", b"", b"%41"):
            self.assertIsNone(requestHead(b"GET", b"/", "1.1", [(b"Host", good)], "1.1.1.1").error, good)
        for bad in (b"a b", b"a/b", b"a\tb", b"\xff", b"a:", b"a:65536", b"a:1:2", b"u@a", b"[::1", b"%4", b"a\x7f"):
            self.assertEqual(requestHead(b"GET", b"/", "1.1", [(b"Host", bad)], "1.1.1.1").error,
                             "invalid Host header", bad)

    def test_absoluteForm(self):
        """
        An absolute-form target becomes origin-form, and its authority replaces Host.
        """
        req = requestHead(b"GET", b"https://a.example:8443?x", "1.1", [(b"Host", b"b"), (b"X-Request-Id", b"r")],
                          "1.1.1.1")
        self.assertEqual((req.target, req.authority), (b"/?x", "a.example:8443"))
        self.assertTrue(wire(req).startswith(b"GET /?x HTTP/1.1\r\nHost: a.example:8443\r\n"))
        for bad in (b"ftp://a/x", b"http://u:p@a/x", b"http://a b/x", b"x", b"http:/a"):
            self.assertIsNotNone(requestHead(b"GET", bad, "1.1", [(b"Host", b"b")], "1.1.1.1").error, bad)

    def test_asteriskForm(self):
        """
        C{*} is for OPTIONS only.
        """
        self.assertIsNone(requestHead(b"OPTIONS", b"*", "1.1", [(b"Host", b"b")], "1.1.1.1").error)
        self.assertIsNotNone(requestHead(b"GET", b"*", "1.1", [(b"Host", b"b")], "1.1.1.1").error)

    def test_underscores(self):
        """
        The underscore spellings of the proxy's own headers are always dropped; other
        headers with underscores are kept, dropped or refused as the setting says.
        """
        headers = [(b"Host", b"h"), (b"X_Forwarded_Client_Cert", b"forged"), (b"x-forwarded_for", b"6.6.6.6"),
                   (b"X_REQUEST_ID", b"f"), (b"Content_Length", b"9"), (b"my_header", b"1")]
        allow = requestHead(b"GET", b"/", "1.1", headers, "1.1.1.1")
        names = [n for n, v in parse(wire(allow))[1]]
        self.assertEqual(names[:2], [b"Host", b"my_header"])
        self.assertEqual(allow.forwardedFor, "1.1.1.1")
        drop = requestHead(b"GET", b"/", "1.1", headers, "1.1.1.1", underscores="drop")
        self.assertNotIn(b"my_header", wire(drop))
        self.assertIsNone(drop.error)
        reject = requestHead(b"GET", b"/", "1.1", headers, "1.1.1.1", underscores="reject")
        self.assertEqual((reject.error, reject.status), ("a header name has an underscore", 400))

    def test_requestIdShape(self):
        """
        Generated request ids are distinct version-4 UUIDs.
        """
        ids = {newRequestId() for _ in range(1000)}
        self.assertEqual(len(ids), 1000)
        for rid in list(ids)[:50]:
            self.assertRegex(rid, r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


class ResponseHeadTests(unittest.SynchronousTestCase):
    """
    L{responseHead} filters the upstream's response head.
    """

    def test_serverReplacedCookiesKept(self):
        """
        C{Server} is replaced by ours; repeated headers keep order and case; the length
        is framing, kept as a number for the front door to write, not as a header.
        """
        head = responseHead([(b"Server", b"gunicorn"), (b"Set-Cookie", b"a=1"), (b"set-cookie", b"B=2"),
                             (b"Content-Length", b"10")], b"amazing-proxy")
        self.assertEqual(head.headers, [(b"Server", b"amazing-proxy"), (b"Set-Cookie", b"a=1"),
                                        (b"set-cookie", b"B=2")])
        self.assertEqual(head.contentLength, 10)

    def test_hopByHopRemoved(self):
        """
        Framing and connection headers, and those C{Connection} names, are removed.
        """
        head = responseHead([(b"Transfer-Encoding", b"chunked"), (b"Connection", b"close, X-Hop"),
                             (b"X-Hop", b"1"), (b"Keep-Alive", b"timeout=5"), (b"X-Ok", b"1")], b"p")
        self.assertEqual(head.headers, [(b"Server", b"p"), (b"X-Ok", b"1")])
        self.assertIsNone(head.contentLength)

    def test_bodyForbidden(self):
        """
        HEAD, 1xx, 204 and 304 responses never have a body.
        """
        self.assertTrue(bodyForbidden(b"HEAD", 200))
        for status in (100, 101, 204, 304):
            self.assertTrue(bodyForbidden(b"GET", status))
        for status in (200, 201, 404, 500):
            self.assertFalse(bodyForbidden(b"GET", status))
