# -*- test-case-name: tests.test_http1 -*-
"""
L{sidecar.http1}: HTTP/1.1 on the wire, as pure functions.
"""

from __future__ import annotations

from twisted.trial import unittest

from sidecar import http1


class HeadTests(unittest.SynchronousTestCase):
    """
    Heads are written in order, with framing from the numbers given, never from the
    header lists.
    """

    def test_requestFramingFromParse(self):
        """
        A request head gets C{Content-Length} from the length given, C{Transfer-Encoding:
        chunked} when chunked (and then no length), and nothing for a body-less request.
        """
        headers = [(b"Host", b"h"), (b"X-A", b"1")]
        self.assertEqual(http1.requestHead(b"POST", b"/p", headers, 3, False),
                         b"POST /p HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nContent-Length: 3\r\n\r\n")
        self.assertEqual(http1.requestHead(b"POST", b"/p", headers, None, True),
                         b"POST /p HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.assertEqual(http1.requestHead(b"GET", b"/", headers, None, False),
                         b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n\r\n")

    def test_responseHead(self):
        """
        A response head is the status line and the headers as given.
        """
        self.assertEqual(http1.responseHead(404, b"Not Found", [(b"Server", b"s")]),
                         b"HTTP/1.1 404 Not Found\r\nServer: s\r\n\r\n")

    def test_switchingProtocols(self):
        """
        A 101 names the protocol in C{Upgrade} with C{Connection: Upgrade}.
        """
        self.assertEqual(http1.switchingProtocols(b"Switching Protocols", [(b"Server", b"s")], b"websocket"),
                         b"HTTP/1.1 101 Switching Protocols\r\nServer: s\r\nConnection: Upgrade\r\n"
                         b"Upgrade: websocket\r\n\r\n")

    def test_localReply(self):
        """
        The proxy's own replies are plain text with a length; C{Connection} says close
        or keep-alive (HTTP/1.0) as asked; a reply to HEAD has the length but no body.
        """
        self.assertEqual(http1.localReply(502, b"p", b"bad\n", True, False),
                         b"HTTP/1.1 502 Bad Gateway\r\nServer: p\r\nContent-Type: text/plain\r\n"
                         b"Content-Length: 4\r\nConnection: close\r\n\r\nbad\n")
        self.assertEqual(http1.localReply(404, b"p", b"x", False, True, withBody=False),
                         b"HTTP/1.1 404 Not Found\r\nServer: p\r\nContent-Type: text/plain\r\n"
                         b"Content-Length: 1\r\nConnection: keep-alive\r\n\r\n")

    def test_chunks(self):
        """
        A chunk is its hexadecimal size line, the data itself (not copied) and CRLF.
        """
        data = b"x" * 26
        parts = http1.chunk(data)
        self.assertEqual(parts, (b"1a\r\n", data, b"\r\n"))
        self.assertIs(parts[1], data)
        self.assertEqual(http1.LAST_CHUNK, b"0\r\n\r\n")

    def test_reason(self):
        """
        Registered codes have their phrase; others an empty one.
        """
        self.assertEqual(http1.reason(503), b"Service Unavailable")
        self.assertEqual(http1.reason(599), b"")
