# -*- test-case-name: tests.test_differential -*-
"""
Build the differential corpus (C{requests.jsonl}, C{responses.jsonl}) from public sources.

    python tests/differential/build_corpus.py LLHTTP_GIT_DIR GARDEN_GIT_DIR

C{LLHTTP_GIT_DIR} is a clone of nodejs/llhttp (its C{test/request/*.md} and
C{test/response/*.md}); C{GARDEN_GIT_DIR} a clone of narfindustries/http-garden (its
C{TROPHIES.md} payloads).  Only the raw HTTP messages are extracted, each with the file and
heading it came from; no code is copied.  To them are added the PortSwigger request-smuggling
classes and deterministic mutations of a few plain messages (the C{generated:*} sources).

Each output line is JSON: C{id}, C{source}, C{tags}, and C{data}, the bytes as a latin-1
string.
"""

from __future__ import annotations

import codecs
import json
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
LLHTTP_COMMIT = "01e105a"
GARDEN_COMMIT = "ffb9164"
PORTSWIGGER = "https://portswigger.net/web-security/request-smuggling"


def gitShow(repo: Path, commit: str, path: str) -> str:
    return subprocess.run(["git", "--git-dir", str(repo), "show", f"{commit}:{path}"],
                          check=True, capture_output=True).stdout.decode("utf-8")


def llhttpInput(text: str) -> bytes | None:
    """
    Turn an C{```http} block into bytes the way llhttp's md-test.ts does.
    """
    if "${" in text:
        return None
    text = re.sub(r"\n\Z", "", text, count=1)
    text = re.sub(r"\\(\r\n|\r|\n)", "", text)
    text = re.sub(r"\r\n|\r|\n", "\r\n", text)
    text = text.replace("\\r", "\r").replace("\\n", "\n").replace("\\t", "\t").replace("\\f", "\f")
    text = re.sub(r"\\x([0-9a-fA-F]+)", lambda m: chr(int(m.group(1), 16)), text)
    text = re.sub(r"\\([0-7]{1,3})", lambda m: chr(int(m.group(1), 8)), text)
    return text.encode("latin-1", "replace")


def llhttpCases(repo: Path, kind: str) -> list[dict]:
    files = subprocess.run(["git", "--git-dir", str(repo), "ls-tree", "--name-only",
                            LLHTTP_COMMIT, f"test/{kind}/"], check=True, capture_output=True
                           ).stdout.decode().split()
    cases = []
    for path in sorted(files):
        if not path.endswith(".md"):
            continue
        md = gitShow(repo, LLHTTP_COMMIT, path)
        heading = ""
        lines = md.split("\n")
        i = 0
        meta = ""
        while i < len(lines):
            line = lines[i]
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            elif line.startswith("<!-- meta="):
                meta = line
            elif line.startswith("```http"):
                j = i + 1
                while not lines[j].startswith("```"):
                    j += 1
                if kind in meta:
                    data = llhttpInput("\n".join(lines[i + 1:j]) + "\n")
                    if data:
                        stem = Path(path).stem
                        cases.append({"source": f"nodejs/llhttp@{LLHTTP_COMMIT}:{path}#{heading}",
                                      "tags": ["llhttp", stem], "data": data})
                i = j
            i += 1
    return cases


def withHost(data: bytes) -> bytes | None:
    """
    The same request with C{Host: h} after the request line, when it has none.
    """
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    if b"\nhost:" in head or b"\r\n" not in data:
        return None
    line, rest = data.split(b"\r\n", 1)
    return line + b"\r\nHost: h\r\n" + rest


def gardenCases(repo: Path) -> list[dict]:
    md = gitShow(repo, GARDEN_COMMIT, "TROPHIES.md")
    cases = []
    for n, line in enumerate(md.split("\n")):
        m = re.match(r"\s*- Payload: (`.*`)\s*$", line)
        if not m:
            continue
        parts = re.findall(r"`([^`]*)`", m.group(1))
        data = b"".join(codecs.escape_decode(p.encode("latin-1"))[0] for p in parts)
        if data.startswith(b"PRI * HTTP/2.0"):
            continue
        cases.append({"source": f"narfindustries/http-garden@{GARDEN_COMMIT}:TROPHIES.md#L{n + 1}",
                      "tags": ["garden"], "data": data})
    return cases


GET = b"GET /g HTTP/1.1\r\nHost: h\r\n\r\n"
POST = b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"


def portswiggerCases() -> list[dict]:
    """
    The request-smuggling classes PortSwigger's Web Security Academy teaches (CL.TE,
    TE.CL, TE.TE obfuscations, CL.0, H2-less variants), as raw HTTP/1.1.
    """
    smuggled = b"GET /admin HTTP/1.1\r\nHost: h\r\n\r\n"
    out = []

    def add(name: str, data: bytes) -> None:
        out.append({"source": f"{PORTSWIGGER} ({name})", "tags": ["portswigger", name], "data": data})

    body = b"0\r\n\r\n" + smuggled
    add("cl.te", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(body) + body)
    add("cl.te-short", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG")
    inner = b"5c\r\nGPOST / HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 15\r\n\r\nx=1\r\n0\r\n\r\n"
    add("te.cl", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n" + inner)
    for i, te in enumerate([b"Transfer-Encoding: xchunked", b"Transfer-Encoding : chunked",
                            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x",
                            b"Transfer-Encoding:[tab]chunked".replace(b"[tab]", b"\t"),
                            b" Transfer-Encoding: chunked", b"X: X\nTransfer-Encoding: chunked",
                            b"Transfer-Encoding\n: chunked", b"Transfer-encoding: identity\r\nTransfer-encoding: cow",
                            b"Transfer-Encoding: chunked\r\nTransfer-encoding: x",
                            b"Transfer-Encoding:\n chunked"]):
        add(f"te.te-{i}", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n" + te + b"\r\n\r\n" + inner)
        add(f"te.te-cl-{i}", b"POST / HTTP/1.1\r\nHost: h\r\n" + te + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    add("cl.0", b"POST /resources/images/blog.svg HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
    add("cl.cl", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 8\r\nContent-Length: 7\r\n\r\n12345\r\na")
    add("pipelined-two", GET + GET)
    add("pipelined-post-get", POST + GET)
    add("pipelined-three", GET + CHUNKED + GET)
    add("get-with-body", b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
    add("head-with-body", b"HEAD / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
    add("options-with-body", b"OPTIONS / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
    add("expect-100", b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello")
    add("expect-odd", b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continuez\r\nContent-Length: 5\r\n\r\nhello")
    add("h2c-upgrade", b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
    add("ws-upgrade-smuggle", b"GET /socket HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 1337\r\n\r\n" + smuggled)
    add("conn-cl", b"POST /attacker HTTP/1.1\r\nHost: a\r\nConnection: Content-Length\r\nContent-Length: 34\r\n\r\nGET /SMUGGLED HTTP/1.1\r\nX-Ignore: ")
    add("conn-te", b"POST /attacker HTTP/1.1\r\nHost: a\r\nConnection: Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(smuggled) + smuggled + b"\r\n0\r\n\r\n")
    return out


def replaceHeader(base: bytes, name: bytes, line: bytes | None) -> bytes:
    """
    C{base} with its C{name} header line replaced by C{line} (dropped when L{None}).
    """
    head, body = base.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    out = []
    for l in lines:
        if l.lower().startswith(name.lower() + b":"):
            if line is not None:
                out.append(line)
        else:
            out.append(l)
    return b"\r\n".join(out) + b"\r\n\r\n" + body


def addHeader(base: bytes, line: bytes) -> bytes:
    head, body = base.split(b"\r\n\r\n", 1)
    return head + b"\r\n" + line + b"\r\n\r\n" + body


def generatedRequests() -> list[dict]:
    out = []

    def add(family: str, name: str, data: bytes) -> None:
        out.append({"source": f"generated:{family}", "tags": ["generated", family, name], "data": data})

    # Connection nominations (issue 8, defect 1), on each kind of body.
    for i, nominee in enumerate([b"Content-Length", b"Transfer-Encoding", b"Host", b"X-Forwarded-For",
                                 b"X-Request-Id", b"X-Forwarded-Proto", b"X-Forwarded-Client-Cert",
                                 b"Upgrade", b"Keep-Alive", b"TE", b"Trailer", b"Cookie", b"Authorization",
                                 b"close", b"keep-alive", b"close, Content-Length", b"X-Private",
                                 b"content-length", b"Expect", b"Proxy-Authorization"]):
        extra = b""
        if nominee.lower() in (b"x-forwarded-for", b"x-request-id", b"x-forwarded-proto",
                               b"x-forwarded-client-cert", b"cookie", b"authorization", b"x-private",
                               b"proxy-authorization", b"keep-alive", b"te", b"trailer"):
            extra = nominee + b": v"
        for kind, base in (("get", GET), ("cl", POST), ("chunked", CHUNKED)):
            data = addHeader(base, b"Connection: " + nominee)
            if extra:
                data = addHeader(data, extra)
            add("connection", f"conn-{i}-{kind}", data)

    # Content-Length values and duplicates.
    for i, value in enumerate([b"5", b" 5", b"5 ", b"05", b"+5", b"-5", b"5,5", b"5, 5", b"5,6", b"0x5",
                               b"5.0", b"", b"99999999999999999999", b"5\t", b"1_0", b"\t5", b"5;", b"five",
                               b"00000000000000000000005", b"4294967301", b"18446744073709551621"]):
        add("content-length", f"cl-{i}", replaceHeader(POST, b"Content-Length", b"Content-Length: " + value))
    add("content-length", "cl-dup-same", addHeader(POST, b"Content-Length: 5"))
    add("content-length", "cl-dup-diff", addHeader(POST, b"Content-Length: 6"))
    add("content-length", "cl-short-body", replaceHeader(POST, b"Content-Length", b"Content-Length: 3"))

    # Transfer-Encoding values.
    for i, value in enumerate([b"chunked", b"Chunked", b"CHUNKED", b" chunked", b"chunked ", b"gzip, chunked",
                               b"deflate, chunked", b"identity, chunked", b"x, chunked", b"chunked, identity",
                               b"identity", b"x", b"xchunked", b"chunk", b"chunked, chunked", b"\tchunked",
                               b"chunked;q=1", b"gzip", b"chunked,", b",chunked", b"chu nked", b"\"chunked\""]):
        add("transfer-encoding", f"te-{i}", replaceHeader(CHUNKED, b"Transfer-Encoding", b"Transfer-Encoding: " + value))
    add("transfer-encoding", "te-split", replaceHeader(CHUNKED, b"Transfer-Encoding",
                                                        b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked"))
    add("transfer-encoding", "te-split-2", replaceHeader(CHUNKED, b"Transfer-Encoding",
                                                          b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked"))
    add("transfer-encoding", "te-and-cl", addHeader(CHUNKED, b"Content-Length: 3"))
    add("transfer-encoding", "te-http10", CHUNKED.replace(b"HTTP/1.1", b"HTTP/1.0"))

    # Chunk sizes and chunk lines (defects 8 and 13).
    def chunked(body: bytes) -> bytes:
        return b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + body

    for i, size in enumerate([b"5", b"+5", b"-5", b"0x5", b"5 ", b" 5", b"5;", b"5;ext", b"5;a=b", b"5;a=\"b c\"",
                              b"05", b"000005", b"5\t", b"5 ;a", b"5_", b"0_5", b"FFFFFFFFFFFFFFFFFFFF5",
                              b"5\x00", b"5;a=\x01", b"", b"g", b"5\r"]):
        add("chunk", f"size-{i}", chunked(size + b"\r\nhello\r\n0\r\n\r\n"))
    add("chunk", "bare-lf-size", chunked(b"5\nhello\r\n0\r\n\r\n"))
    add("chunk", "bare-lf-data", chunked(b"5\r\nhello\n0\r\n\r\n"))
    add("chunk", "bare-lf-all", chunked(b"5\nhello\n0\n\n"))
    add("chunk", "data-longer", chunked(b"3\r\nhello\r\n0\r\n\r\n"))
    add("chunk", "data-shorter", chunked(b"7\r\nhello\r\n0\r\n\r\n"))
    add("chunk", "no-crlf-after-data", chunked(b"5\r\nhello0\r\n\r\n"))
    add("chunk", "trailer", chunked(b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"))
    add("chunk", "trailer-cl", chunked(b"5\r\nhello\r\n0\r\nContent-Length: 50\r\n\r\n"))
    add("chunk", "trailer-bad", chunked(b"5\r\nhello\r\n0\r\nX T: 1\r\n\r\n"))
    add("chunk", "last-ext", chunked(b"5\r\nhello\r\n0;x=y\r\n\r\n"))
    add("chunk", "many-small", chunked(b"1\r\nh\r\n" * 40 + b"0\r\n\r\n"))
    add("chunk", "zero-then-more", chunked(b"0\r\n\r\n5\r\nhello\r\n0\r\n\r\n"))

    # Header syntax: whitespace, obs-fold, bare LF and CR, odd bytes.
    for i, line in enumerate([b"X-A : v", b"X-A\t: v", b" X-A: v", b"\tX-A: v", b"X-A: v\r\n folded",
                              b"X-A: v\r\n\tfolded", b"X-A:v", b"X-A:  v  ", b"X A: v", b"X-A\x00: v",
                              b"X-A: v\x00w", b"X-A: v\x7fw", b"X-A: v\x0bw", b"X-A: v\x0cw", b"X-A: v\rw",
                              b"X-A: v\nw", b"X-A: \x80\xff", b"X-A", b": v", b"X-A: v\r\nX-A: w",
                              b"X-\xe9: v", b"X-A: " + b"a" * 9000, b"X@A: v", b"X-A;: v", b"X-A\x85: v"]):
        add("header", f"hdr-{i}", addHeader(GET, line))
    for i, line in enumerate([b"X-A : v", b"X-A: v\r\n folded"]):
        add("header", f"hdr-post-{i}", addHeader(POST, line))
    add("header", "fold-host", replaceHeader(GET, b"Host", b"Host: h\r\n evil"))
    add("header", "fold-cl", replaceHeader(POST, b"Content-Length", b"Content-Length: 5\r\n 0"))
    add("header", "fold-te", replaceHeader(CHUNKED, b"Transfer-Encoding", b"Transfer-Encoding: x\r\n chunked"))
    add("header", "many-headers", addHeader(GET, b"\r\n".join(b"X-N%d: %d" % (n, n) for n in range(150))))
    add("header", "huge-head", addHeader(GET, b"X-Big: " + b"b" * 70000))
    add("line-ending", "lf-everywhere", GET.replace(b"\r\n", b"\n"))
    add("line-ending", "lf-post", POST.replace(b"\r\n", b"\n"))
    add("line-ending", "lf-request-line", GET.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\n", 1))
    add("line-ending", "lf-last", GET[:-2] + b"\n")
    add("line-ending", "cr-everywhere", GET.replace(b"\r\n", b"\r"))
    add("line-ending", "cr-in-header", GET.replace(b"Host: h\r\n", b"Host: h\rX-B: c\r\n"))
    add("line-ending", "leading-crlf", b"\r\n" + GET)
    add("line-ending", "leading-lf", b"\n" + GET)
    add("line-ending", "leading-space", b" " + GET)

    # Host oddities (defect 9).
    for i, value in enumerate([b"exa mple.com", b"example.com/x", b"ex\tample.com", b"\xff", b"a\x01b",
                               b"example.com:80", b"example.com:", b"example.com:99999", b"example.com:x",
                               b"[::1]", b"[::1]:80", b"user@example.com", b"example.com?x", b"example.com#x",
                               b"", b"h,h", b"h h", b"EXAMPLE.COM", b"a_b.example", b"h\x7f", b"-h", b"h."]):
        add("host", f"host-{i}", replaceHeader(GET, b"Host", b"Host: " + value))
    add("host", "no-host", replaceHeader(GET, b"Host", None))
    add("host", "two-hosts", addHeader(GET, b"Host: other"))
    add("host", "two-hosts-same", addHeader(GET, b"Host: h"))
    add("host", "abs-form-other-host", b"GET http://target.example/g HTTP/1.1\r\nHost: other\r\n\r\n")
    add("host", "abs-form-same-host", b"GET http://h/g HTTP/1.1\r\nHost: h\r\n\r\n")
    add("host", "abs-form-no-host", b"GET http://h/g HTTP/1.1\r\n\r\n")
    add("host", "abs-form-https", b"GET https://h/g HTTP/1.1\r\nHost: h\r\n\r\n")
    add("host", "abs-form-userinfo", b"GET http://u@h/g HTTP/1.1\r\nHost: h\r\n\r\n")
    add("host", "http10-no-host", b"GET /g HTTP/1.0\r\n\r\n")
    add("host", "http10-host", b"GET /g HTTP/1.0\r\nHost: h\r\n\r\n")

    # Underscores in the names of headers the proxy owns or the service believes (defect 12).
    for i, name in enumerate([b"X_Forwarded_For", b"X_Forwarded_Client_Cert", b"X_Request_Id",
                              b"Content_Length", b"Transfer_Encoding", b"X_Forwarded_Proto", b"X_Custom"]):
        add("underscore", f"us-{i}", addHeader(POST, name + b": forged"))

    # Versions (defect 12).
    for i, version in enumerate([b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.10", b"RTSP/1.0",
                                 b"http/1.1", b"HTTP/01.1", b"HTTP/1", b"HTTP/1.1 ", b"HTTP/3.0", b"HTTP/9.9",
                                 b"HTTP/1.a", b"HTTPS/1.1", b"HTTP /1.1", b"HTTP/11"]):
        add("version", f"ver-{i}", GET.replace(b"HTTP/1.1", version, 1))
    add("version", "http09", b"GET /g\r\n\r\n")

    # Methods and targets.
    for i, line in enumerate([b"OPTIONS * HTTP/1.1", b"GET * HTTP/1.1", b"POST * HTTP/1.1", b"CONNECT h:443 HTTP/1.1",
                              b"TRACE / HTTP/1.1", b"get /g HTTP/1.1", b"PROPFIND /g HTTP/1.1", b"G\x00T /g HTTP/1.1",
                              b"GET /g#frag HTTP/1.1", b"GET /a b HTTP/1.1", b"GET /\xff HTTP/1.1", b"GET g HTTP/1.1",
                              b"GET //g HTTP/1.1", b"GET /../g HTTP/1.1", b"GET /%00 HTTP/1.1", b"GET  /g HTTP/1.1",
                              b"GET /g  HTTP/1.1", b"GET\t/g HTTP/1.1", b"GET /g\tHTTP/1.1", b"GET /g?a=\x01 HTTP/1.1",
                              b"M-SEARCH * HTTP/1.1", b"PRI * HTTP/1.1", b"GET /" + b"u" * 9000 + b" HTTP/1.1",
                              b"GET /g?x=" + b"q" * 70000 + b" HTTP/1.1", b"X" * 40 + b" /g HTTP/1.1",
                              b"DELETE /g HTTP/1.1", b"PATCH /g HTTP/1.1", b"QUERY /g HTTP/1.1"]):
        add("target", f"tgt-{i}", line + GET[GET.index(b"\r\n"):])
    add("target", "connect-body", b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n\x16\x03\x01\x00\x05hello")

    # Trailer / TE / upgrade requests.
    add("misc", "trailer-header", addHeader(CHUNKED, b"Trailer: X-T"))
    add("misc", "te-trailers", addHeader(GET, b"TE: trailers"))
    add("misc", "te-gzip", addHeader(GET, b"TE: gzip"))
    add("misc", "upgrade-no-connection", addHeader(GET, b"Upgrade: websocket"))
    add("misc", "upgrade-ws", addHeader(GET, b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13"))
    add("misc", "xff-forged", addHeader(GET, b"X-Forwarded-For: 6.6.6.6"))
    add("misc", "xfcc-forged", addHeader(GET, b"X-Forwarded-Client-Cert: By=spiffe://evil;URI=spiffe://evil"))
    add("misc", "request-id-forged", addHeader(GET, b"X-Request-Id: forged"))
    add("misc", "proxy-connection", addHeader(GET, b"Proxy-Connection: keep-alive"))
    add("misc", "keep-alive-header", addHeader(GET, b"Keep-Alive: timeout=5"))
    add("misc", "conn-close-pipelined", addHeader(GET, b"Connection: close") + GET)
    add("misc", "http10-keepalive-pipelined", b"GET /g HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n" + GET)
    add("misc", "post-no-length", b"POST /p HTTP/1.1\r\nHost: h\r\n\r\nhello")
    add("misc", "post-zero", replaceHeader(POST, b"Content-Length", b"Content-Length: 0"))
    return out


RESPONSE_GET = b"GET /r HTTP/1.1\r\nHost: h\r\n\r\n"


def generatedResponses() -> list[dict]:
    out = []

    def add(family: str, name: str, data: bytes) -> None:
        out.append({"source": f"generated:{family}", "tags": ["generated", family, name], "data": data})

    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    for i, status in enumerate([b"099 Low", b"000 Zero", b"600 High", b"999 Top", b"1000 Four", b"20 Two",
                                b"2OO Letters", b"200", b"200 ", b"200  OK", b" 200 OK", b"-200 OK", b"+200 OK",
                                b"200 OK\x00", b"200 \xffK", b"599 Edge", b"100 Continue-as-final"]):
        add("status", f"st-{i}", ok.replace(b"200 OK", status, 1))
    for i, line in enumerate([b"HTTP/1.0 200 OK", b"HTTP/1.2 200 OK", b"HTTP/2.0 200 OK", b"HTTP/0.9 200 OK",
                              b"http/1.1 200 OK", b"HTTP/1.1  200 OK", b"HTTP/1.1\t200 OK", b"ICY 200 OK",
                              b"HTTP/11 200 OK", b"RTSP/1.0 200 OK"]):
        add("status-line", f"sl-{i}", ok.replace(b"HTTP/1.1 200 OK", line, 1))
    for i, nominee in enumerate([b"Content-Length", b"Transfer-Encoding", b"close, Content-Length",
                                 b"X-Private", b"Set-Cookie", b"Date", b"Server"]):
        add("connection", f"rconn-{i}-cl", addHeader(ok, b"Connection: " + nominee + b"\r\nX-Private: p\r\nSet-Cookie: a=1"))
        add("connection", f"rconn-{i}-chunked", b"HTTP/1.1 200 OK\r\nConnection: " + nominee + b"\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    for i, value in enumerate([b"gzip, chunked", b"identity, chunked", b"chunked, identity", b"xchunked",
                               b"identity", b"x", b"Chunked", b" chunked", b"chunked, chunked"]):
        add("transfer-encoding", f"rte-{i}", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + value + b"\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    for i, body in enumerate([b"2;\r\nok\r\n0\r\n\r\n", b"2;a=b\r\nok\r\n0\r\n\r\n", b"+2\r\nok\r\n0\r\n\r\n",
                              b"0x2\r\nok\r\n0\r\n\r\n", b"2 \r\nok\r\n0\r\n\r\n", b"2\nok\n0\n\n",
                              b"3\r\nok\r\n0\r\n\r\n", b"1\r\nok\r\n0\r\n\r\n", b"2\r\nok\r\n0\r\nX-T: 1\r\n\r\n",
                              b"2\r\nok\r\n", b"FFFFFFFFFFFFFFFFFF\r\nok\r\n0\r\n\r\n"]):
        add("chunk", f"rchunk-{i}", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    for i, value in enumerate([b"2, 2", b"2,3", b" 2", b"+2", b"-2", b"02", b"", b"x", b"99999999999999999999"]):
        add("content-length", f"rcl-{i}", ok.replace(b"Content-Length: 2", b"Content-Length: " + value))
    add("content-length", "rcl-dup-diff", addHeader(ok, b"Content-Length: 3"))
    add("content-length", "rcl-and-te", b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    add("content-length", "rcl-short", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok")
    add("content-length", "rcl-long", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    add("framing", "close-delimited", b"HTTP/1.1 200 OK\r\n\r\nuntil-close")
    add("framing", "close-delimited-10", b"HTTP/1.0 200 OK\r\n\r\nuntil-close")
    add("framing", "no-content-type", ok)
    add("framing", "204-body", b"HTTP/1.1 204 No Content\r\nContent-Length: 2\r\n\r\nok")
    add("framing", "304-cl", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 2\r\n\r\n")
    add("framing", "1xx-then-200", b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n" + ok)
    add("framing", "100-then-200", b"HTTP/1.1 100 Continue\r\n\r\n" + ok)
    add("framing", "101-unasked", b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nxyz")
    add("framing", "two-responses", ok + ok)
    add("framing", "lf-only", ok.replace(b"\r\n", b"\n"))
    add("framing", "cr-only", ok.replace(b"\r\n", b"\r"))
    for i, line in enumerate([b"X-A : v", b"X-A: v\r\n folded", b"X A: v", b"X-A: v\x00w", b"X-A: v\x7fw",
                              b"X_Forwarded_Client_Cert: forged", b"X-A", b": v", b"X-A: \x80\xff",
                              b"Set-Cookie: a=1\r\nSet-Cookie: b=2", b"Content-Type: text/plain",
                              b"Keep-Alive: timeout=1", b"Proxy-Connection: close", b"Upgrade: h2c",
                              b"Trailer: X-T", b"Server: upstream", b"Date: Tue, 01 Dec 2026 00:00:00 GMT",
                              b"X-Big: " + b"b" * 70000]):
        add("header", f"rhdr-{i}", addHeader(ok, line))
    add("header", "rmany", addHeader(ok, b"\r\n".join(b"X-N%d: %d" % (n, n) for n in range(150))))
    return out


def main(argv: list[str]) -> None:
    llhttp, garden = Path(argv[1]), Path(argv[2])
    requests = []
    for case in llhttpCases(llhttp, "request"):
        requests.append(case)
        hosted = withHost(case["data"])
        if hosted is not None:
            requests.append({"source": case["source"], "tags": case["tags"] + ["+host"], "data": hosted})
    requests += gardenCases(garden)
    requests += portswiggerCases()
    requests += generatedRequests()
    responses = llhttpCases(llhttp, "response") + generatedResponses()
    for name, cases, prefix in (("requests.jsonl", requests, "q"), ("responses.jsonl", responses, "r")):
        with open(HERE / name, "w") as f:
            for n, case in enumerate(cases):
                f.write(json.dumps({"id": f"{prefix}{n:04d}", "source": case["source"], "tags": case["tags"],
                                    "data": case["data"].decode("latin-1")}) + "\n")
        print(name, len(cases))


if __name__ == "__main__":
    main(sys.argv)
