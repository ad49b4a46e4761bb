# -*- test-case-name: tests.test_differential -*-
"""
Strict HTTP/1.1 parsing of what a proxy sent, pure functions of bytes.

The upstream of the differential test believes only what RFC 9112 allows a sender to
send: CRLF line endings, token method and header names, no obs-fold, no control bytes in
values, one framing (C{chunked} alone, or one decimal C{Content-Length}).  Anything else
a proxy forwards is itself a finding.  The client side splits what a proxy answered into
whole responses the same way.
"""

from __future__ import annotations

import re
from typing import Optional

from attrs import frozen

TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
REQUEST_LINE = re.compile(rb"^([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) (HTTP/1\.[01])$")
STATUS_LINE = re.compile(rb"^HTTP/1\.([01]) ([0-9]{3}) ([\t \x21-\x7e\x80-\xff]*)$")
BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
CHUNK_LINE = re.compile(rb"^([0-9A-Fa-f]{1,16})(;[\x21-\x7e\t ;=]*)?$")


class Incomplete(Exception):
    """
    More bytes are needed.
    """


class Invalid(Exception):
    """
    The bytes are not a message a strict recipient accepts.
    """


@frozen
class Message:
    """
    One parsed message.

    @ivar start: the request or status line.
    @ivar headers: C{(name, value)} pairs as sent, values stripped of OWS.
    @ivar body: the body after de-chunking.
    """

    start: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    def header(self, name: bytes) -> list[bytes]:
        """
        The values of header C{name}, case-insensitively.
        """
        return [v for k, v in self.headers if k.lower() == name.lower()]

    @property
    def status(self) -> int:
        """
        The status code of a response.
        """
        return int(self.start.split(b" ")[1])


def _head(data: bytes, at: int) -> tuple[list[bytes], int]:
    end = data.find(b"\r\n\r\n", at)
    if end < 0:
        if len(data) - at > 1 << 20:
            raise Invalid("head over 1 MiB")
        raise Incomplete()
    head = data[at:end]
    if b"\n" in head.replace(b"\r\n", b"") or b"\r" in head.replace(b"\r\n", b""):
        raise Invalid("bare CR or LF in the head")
    return head.split(b"\r\n"), end + 4


def _fields(lines: list[bytes]) -> tuple[tuple[bytes, bytes], ...]:
    out = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise Invalid("obs-fold")
        name, colon, value = line.partition(b":")
        if not colon or not TOKEN.match(name):
            raise Invalid(f"bad field line {line[:60]!r}")
        value = value.strip(b" \t")
        if BAD_VALUE.search(value):
            raise Invalid(f"control byte in the value of {name!r}")
        out.append((name, value))
    return tuple(out)


def _chunked(data: bytes, at: int) -> tuple[bytes, int]:
    body = []
    while True:
        end = data.find(b"\r\n", at)
        if end < 0:
            raise Incomplete()
        line = data[at:end]
        if b"\n" in line or b"\r" in line:
            raise Invalid("bare CR or LF in a chunk line")
        match = CHUNK_LINE.match(line)
        if not match:
            raise Invalid(f"bad chunk line {line[:40]!r}")
        size = int(match.group(1), 16)
        at = end + 2
        if size == 0:
            while True:
                end = data.find(b"\r\n", at)
                if end < 0:
                    raise Incomplete()
                line = data[at:end]
                at = end + 2
                if not line:
                    return b"".join(body), at
                _fields([line])
        if len(data) < at + size + 2:
            raise Incomplete()
        body.append(data[at:at + size])
        if data[at + size:at + size + 2] != b"\r\n":
            raise Invalid("chunk data not followed by CRLF")
        at += size + 2


def _framing(headers: tuple[tuple[bytes, bytes], ...]) -> tuple[str, int]:
    te = [v for k, v in headers if k.lower() == b"transfer-encoding"]
    cl = [v for k, v in headers if k.lower() == b"content-length"]
    if te:
        if cl:
            raise Invalid("both Transfer-Encoding and Content-Length")
        if len(te) != 1 or te[0].lower() != b"chunked":
            raise Invalid(f"transfer coding {b', '.join(te)!r}")
        return "chunked", 0
    if cl:
        if len(set(cl)) != 1 or not cl[0].isdigit() or len(cl[0]) > 15:
            raise Invalid(f"Content-Length {cl!r}")
        return "length", int(cl[0])
    return "none", 0


def parseRequest(data: bytes, at: int = 0) -> tuple[Message, int]:
    """
    Parse one request from C{data[at:]}.

    @return: the request and the offset after it.
    @raise Incomplete: when more bytes are needed.
    @raise Invalid: when the bytes break RFC 9112's rules for a sender.
    """
    lines, at = _head(data, at)
    if not REQUEST_LINE.match(lines[0]):
        raise Invalid(f"bad request line {lines[0][:80]!r}")
    headers = _fields(lines[1:])
    kind, length = _framing(headers)
    if kind == "chunked":
        body, at = _chunked(data, at)
    else:
        if len(data) < at + length:
            raise Incomplete()
        body, at = data[at:at + length], at + length
    return Message(lines[0], headers, body), at


def parseRequests(data: bytes) -> tuple[list[Message], Optional[str], bytes]:
    """
    Every whole request in C{data}.

    @return: the requests, the reason the rest is invalid (or L{None}), and the bytes
        left over after the last whole request.
    """
    out: list[Message] = []
    at = 0
    while at < len(data):
        try:
            message, at = parseRequest(data, at)
        except Incomplete:
            break
        except Invalid as e:
            return out, str(e), data[at:]
        out.append(message)
    return out, None, data[at:]


def parseResponses(data: bytes, closed: bool, heads: int = 0) -> tuple[list[Message], Optional[str]]:
    """
    Split what a client received into whole responses.

    @param closed: the connection was closed after C{data} (which ends a body delimited
        by the close).
    @param heads: how many of the first responses answer HEAD (no body).
    @return: the whole responses, and L{None} when every byte belongs to one of them, or
        a sentence saying what is wrong with the rest.
    """
    out: list[Message] = []
    at = 0
    while at < len(data):
        try:
            lines, bodyAt = _head(data, at)
            if not STATUS_LINE.match(lines[0]):
                return out, f"bad status line {lines[0][:80]!r}"
            headers = _fields(lines[1:])
            status = int(lines[0].split(b" ")[1])
            if heads > len(out) or status < 200 or status in (204, 304):
                body, at = b"", bodyAt
            else:
                kind, length = _framing(headers)
                if kind == "chunked":
                    body, at = _chunked(data, bodyAt)
                elif kind == "length":
                    if len(data) < bodyAt + length:
                        raise Incomplete()
                    body, at = data[bodyAt:bodyAt + length], bodyAt + length
                else:
                    if not closed:
                        out.append(Message(lines[0], headers, data[bodyAt:]))
                        return out, "a body delimited by the close, on a connection left open"
                    body, at = data[bodyAt:], len(data)
            out.append(Message(lines[0], headers, body))
            if status == 101:
                return out, None
        except Incomplete:
            return out, f"an incomplete response ({len(data) - at} bytes)"
        except Invalid as e:
            return out, str(e)
    return out, None
