# -*- test-case-name: tests.test_behaviour -*-
"""
What the integration tests share: a real upstream on 127.0.0.1 (a twisted.web site with
scripted behaviours), the proxy under test built in-process on port 0 with either front
door, and a raw-bytes client.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any, Dict, List, Optional

import httptools
from twisted.internet import defer, reactor
from twisted.internet.protocol import ClientFactory, Factory, ProcessProtocol, Protocol
from twisted.web import resource, server

from sidecar.config import UpstreamConfig
from sidecar.downstream import DownstreamFactory
from sidecar.exchange import Engine
from sidecar.record import Record
from sidecar.resource import proxySite
from sidecar.stats import Recorder
from sidecar.upstream import UpstreamPool

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def subprocessEnv(**extra: str) -> Dict[str, str]:
    """
    The environment for a child process that must import this working tree.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


class _Seen:
    """
    One request as the upstream saw it.
    """

    def __init__(self, request: server.Request, body: bytes) -> None:
        self.method = request.method
        self.uri = request.uri
        self.headers = [(k, v) for k, vs in request.requestHeaders.getAllRawHeaders() for v in vs]
        self.body = body
        self.peerPort = request.getClientAddress().port

    def header(self, name: bytes) -> List[bytes]:
        """
        The values of header C{name} (case-insensitive).
        """
        return [v for k, v in self.headers if k.lower() == name.lower()]


class _Zeros:
    """
    A pull producer of C{size} zero bytes, 64 KiB at a time.
    """

    def __init__(self, request: server.Request, size: int) -> None:
        self.request = request
        self.left = size

    def resumeProducing(self) -> None:
        n = min(self.left, 65536)
        self.left -= n
        if n:
            self.request.write(b"\0" * n)
        if not self.left:
            self.request.unregisterProducer()
            self.request.finish()

    def stopProducing(self) -> None:
        self.left = 0


class UpstreamResource(resource.Resource):
    """
    The scripted upstream service.  Paths:
      - C{/echo}: JSON of method, uri, headers, body length and sha256;
      - C{/bytes/N}: N bytes with Content-Length; C{/chunked/N}: N bytes chunked;
        C{/eof/N}: N bytes delimited by closing the connection (raw);
      - C{/status/N}: an empty response with status N;
      - C{/cookies}: three C{Set-Cookie} headers; C{/hop}: hop-by-hop headers;
      - C{/never}: never answers; C{/close}: closes without answering;
      - C{/die}: promises 100 bytes, sends 10, closes;
      - C{/head-cl}: Content-Length 1000 (for HEAD).
    """

    isLeaf = True

    def __init__(self) -> None:
        resource.Resource.__init__(self)
        self.seen: List[_Seen] = []
        self.pending: List[server.Request] = []
        self.timers: List[Any] = []

    def render(self, request: server.Request) -> Any:
        if request.path.startswith(b"/sink"):
            request.content.seek(0, 2)
            body = b"\0" * 0
            size = request.content.tell()
            self.seen.append(_Seen(request, b""))
            request.setHeader(b"content-type", b"text/plain")
            return b"%d" % size
        body = request.content.read()
        self.seen.append(_Seen(request, body))
        parts = request.path.split(b"/")
        name = parts[1] if len(parts) > 1 else b""
        arg = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 0
        request.setHeader(b"server", b"upstream-server")
        if name == b"echo":
            request.setHeader(b"content-type", b"application/json")
            out = json.dumps({
                "method": request.method.decode(),
                "uri": request.uri.decode(),
                "headers": [[k.decode(), v.decode()] for k, vs in request.requestHeaders.getAllRawHeaders() for v in vs],
                "length": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
            }).encode()
            request.setHeader(b"content-length", b"%d" % len(out))
            return out
        if name == b"bytes":
            request.setHeader(b"content-length", b"%d" % arg)
            return b"x" * arg
        if name == b"chunked":
            for i in range(0, arg, 4096):
                request.write(b"y" * min(4096, arg - i))
            request.finish()
            return server.NOT_DONE_YET
        if name == b"eof":
            request.channel.transport.write(b"HTTP/1.1 200 OK\r\nServer: raw\r\n\r\n" + b"z" * arg)
            request.channel.transport.loseConnection()
            return server.NOT_DONE_YET
        if name == b"status":
            request.setResponseCode(arg)
            return b""
        if name == b"cookies":
            request.responseHeaders.setRawHeaders(b"Set-Cookie", [b"a=1; Path=/", b"b=2", b"A=3"])
            request.setHeader(b"content-length", b"0")
            return b""
        if name == b"hop":
            request.channel.transport.write(
                b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Private\r\nX-Private: secret\r\n"
                b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nX-Public: yes\r\n"
                b"Content-Length: 2\r\n\r\nok")
            return server.NOT_DONE_YET
        if name == b"late":
            # The head now, the body a while later (server-sent events, long polls).
            transport = request.channel.transport
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
            self.timers.append(reactor.callLater(0.5, lambda: transport.connected and transport.write(b"late")))
            return server.NOT_DONE_YET
        if name == b"never":
            self.pending.append(request)
            return server.NOT_DONE_YET
        if name == b"close":
            request.channel.transport.abortConnection()
            return server.NOT_DONE_YET
        if name == b"die":
            request.channel.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"d" * 10)
            reactor.callLater(0.05, request.channel.transport.abortConnection)
            return server.NOT_DONE_YET
        if name == b"stream":
            request.setHeader(b"content-length", b"%d" % arg)
            request.registerProducer(_Zeros(request, arg), False)
            return server.NOT_DONE_YET
        if name == b"sink":
            request.setHeader(b"content-type", b"text/plain")
            return b"%d" % len(body)
        if name == b"head-cl":
            request.setHeader(b"content-length", b"1000")
            return b"h" * 1000
        request.setResponseCode(404)
        return b"no such path\n"


class Upstream:
    """
    A real twisted.web upstream on 127.0.0.1, port 0.
    """

    def __init__(self) -> None:
        self.resource = UpstreamResource()
        self.site = server.Site(self.resource)
        self.site.noisy = False
        self.port: Any = None
        self.connections = 0
        orig = self.site.buildProtocol

        def count(addr: Any) -> Any:
            self.connections += 1
            return orig(addr)

        self.site.buildProtocol = count  # type: ignore[method-assign]

    def start(self, case: Any) -> int:
        """
        Listen, and stop listening when C{case} ends.
        """
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        case.addCleanup(self.stop)
        return self.port.getHost().port

    def stop(self) -> Any:
        for timer in self.resource.timers:
            if timer.active():
                timer.cancel()
        for request in self.resource.pending:
            if request.channel is not None and request.channel.transport is not None:
                request.channel.transport.abortConnection()
        return self.port.stopListening()

    @property
    def seen(self) -> List[_Seen]:
        return self.resource.seen


class Proxy:
    """
    The proxy under test, built in-process with the real reactor.

    @ivar records: every record it produced.
    """

    def __init__(self, upstreamPort: int, engine: str = "fast", responseTimeout: Optional[float] = 5.0,
                 connectTimeout: float = 2.0, idleTimeout: float = 4.0) -> None:
        self.records: List[Record] = []
        self.recorder = Recorder([self.records.append])
        config = UpstreamConfig(port=upstreamPort, connectTimeout=connectTimeout,
                                responseTimeout=responseTimeout, idleTimeout=idleTimeout)
        self.pool = UpstreamPool(reactor, reactor, config)
        self.engine = Engine(reactor, self.pool, self.recorder, b"amazing-proxy", responseTimeout)
        self.factory = DownstreamFactory(self.engine) if engine == "fast" else proxySite(self.engine)
        self.port: Any = None

    def start(self, case: Any) -> int:
        """
        Listen on 127.0.0.1 port 0; close everything when C{case} ends.
        """
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        case.addCleanup(self.stop)
        return self.port.getHost().port

    def stop(self) -> Any:
        self.pool.closeAll()
        return self.port.stopListening()


class _Response:
    def __init__(self) -> None:
        self.status = 0
        self.headers: List[tuple] = []
        self.body = b""
        self.complete = False

    def header(self, name: bytes) -> List[bytes]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class RawClient(Protocol):
    """
    Sends raw bytes, collects every byte back, and parses the responses with llhttp
    (C{heads} tells it which requests were HEAD, whose responses have no body).
    """

    def __init__(self, data: bytes, expect: int, heads: int = 0) -> None:
        self.data = data
        self.expect = expect
        self.received = b""
        self.responses: List[_Response] = []
        self.closed = defer.Deferred()
        self.done = defer.Deferred()
        self.headOnly = heads
        self._parser = httptools.HttpResponseParser(self)
        self._current: Optional[_Response] = None
        self.parseError: Optional[str] = None
        self._lastDone: Optional[_Response] = None

    def connectionMade(self) -> None:
        if self.data:
            self.transport.write(self.data)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            self._parser = httptools.HttpResponseParser(self)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError as e:
            self.parseError = str(e)

    def connectionLost(self, reason: Any = None) -> None:
        current = self._current
        framed = current is not None and (current.header(b"content-length") or current.header(b"transfer-encoding"))
        if current is not None and current.status > 0 and not current.complete and not framed:
            # A body delimited by the end of the connection ends here.
            self._finish()
        if not self.done.called:
            self.done.callback(self)
        self.closed.callback(self)

    def on_message_begin(self) -> None:
        self._current = _Response()
        self._current.status = -1

    def on_header(self, name: bytes, value: bytes) -> None:
        self._current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._current.status = self._parser.get_status_code()
        if self._current.status == 100:
            return
        if self.headOnly:
            self.headOnly -= 1
            self._finish()
            raise ValueError("head")

    def on_body(self, body: bytes) -> None:
        self._current.body += body

    def on_message_complete(self) -> None:
        if self._current.status != 100:
            self._finish()

    def _finish(self) -> None:
        self._lastDone = self._current
        self._current.complete = True
        self.responses.append(self._current)
        if len(self.responses) >= self.expect and not self.done.called:
            self.done.callback(self)


def openClient(port: int, data: bytes, expect: int = 1, heads: int = 0, timeout: float = 10.0) -> RawClient:
    """
    Connect a L{RawClient} to C{port} that sends C{data}; its C{done} fires once
    C{expect} responses have arrived or the connection closed, at most after C{timeout}.
    """
    client = RawClient(data, expect, heads)
    factory = ClientFactory.forProtocol(lambda: client)
    connector = reactor.connectTCP("127.0.0.1", port, factory)
    timer = reactor.callLater(timeout, connector.disconnect)

    def finished(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        return result

    client.done.addBoth(finished)
    client.connector = connector
    return client


def rawRequest(port: int, data: bytes, expect: int = 1, heads: int = 0, timeout: float = 10.0) -> defer.Deferred:
    """
    Send C{data} to C{port} and fire with the L{RawClient} once C{expect} responses
    have arrived or the connection closed.
    """
    return openClient(port, data, expect, heads, timeout).done


def closeClient(client: RawClient) -> defer.Deferred:
    """
    Close C{client}'s connection and wait for it to be closed.
    """
    if client.transport is not None and client.transport.connected:
        client.transport.loseConnection()
        return client.closed
    return defer.succeed(None)


def waitUntil(predicate: Any, timeout: float = 10.0, interval: float = 0.01) -> defer.Deferred:
    """
    Fire once C{predicate()} is true; fail after C{timeout} seconds.
    """
    d: defer.Deferred = defer.Deferred()
    deadline = reactor.seconds() + timeout

    def check() -> None:
        if predicate():
            d.callback(None)
        elif reactor.seconds() > deadline:
            d.errback(AssertionError(f"condition not met within {timeout} s"))
        else:
            reactor.callLater(interval, check)

    check()
    return d


PYTHON = sys.executable


def freePort() -> int:
    """
    A TCP port on 127.0.0.1 that was free a moment ago (for child processes that must be
    told their port).
    """
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Child(ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended = defer.Deferred()
        self.status: Any = None

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        self.status = reason.value
        self.ended.callback(None)


class ChildProcess:
    """
    A child process started by a test, ended by its PID when the test ends.
    """

    def __init__(self, case: Any, argv: List[str], env: Optional[Dict[str, str]] = None,
                 stopSignal: int = 9) -> None:
        import signal

        self.protocol = _Child()
        self.process = reactor.spawnProcess(self.protocol, argv[0], argv, env=env or subprocessEnv())
        self.pid = self.process.pid

        def stop() -> Any:
            if not self.protocol.ended.called:
                try:
                    os.kill(self.pid, stopSignal)
                except ProcessLookupError:
                    pass
                # Whatever the signal, the child is gone within 10 s.
                later = reactor.callLater(10, lambda: self.protocol.ended.called or os.kill(self.pid, signal.SIGKILL))
                self.protocol.ended.addBoth(lambda r: later.active() and later.cancel())
            return self.protocol.ended

        case.addCleanup(stop)

    @property
    def out(self) -> bytes:
        return self.protocol.out

    @property
    def err(self) -> bytes:
        return self.protocol.err

    def rssKiB(self, field: str = "VmRSS") -> int:
        """
        A memory figure of the child from C{/proc/PID/status}, in KiB.
        """
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise ValueError(field)


def portAnswers(port: int) -> defer.Deferred:
    """
    Fire with C{True} once something accepts TCP connections on 127.0.0.1:C{port}.
    """
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    answered = []

    def attempt() -> None:
        d = connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=1), Protocol())

        def ok(p: Any) -> None:
            answered.append(True)
            p.transport.loseConnection()

        d.addCallbacks(ok, lambda f: None)

    def check() -> bool:
        if not answered:
            attempt()
        return bool(answered)

    return waitUntil(check, timeout=15, interval=0.1)


def startSidecar(case: Any, *args: str) -> defer.Deferred:
    """
    Start C{twistd -n sidecar ARGS} from this working tree on a free port (and
    C{--health none} unless C{ARGS} name one); fire with C{(child, port)} once it
    accepts connections.
    """
    port = freePort()
    # No fixed health port (15021, every interface) unless the test asks for one.
    health = () if "--health" in args else ("--health", "none")
    argv = [PYTHON, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "sidecar",
            "--listen", f"tcp:{port}:interface=127.0.0.1", *health, *args]
    child = ChildProcess(case, argv)
    return portAnswers(port).addCallback(lambda _: (child, port))


def startHttpbin(case: Any) -> defer.Deferred:
    """
    Start httpbin under gunicorn on a free loopback port; fire with C{(child, port)}.
    """
    port = freePort()
    # SIGTERM: gunicorn's master then stops its worker (a SIGKILL would orphan it).
    child = ChildProcess(case, [PYTHON, "-m", "gunicorn", "-w", "1", "--graceful-timeout", "1",
                                "-b", f"127.0.0.1:{port}", "httpbin:app"], stopSignal=15)
    return portAnswers(port).addCallback(lambda _: (child, port))


class _RawUpstreamConnection(Protocol):
    """
    One connection to a L{RawUpstream}: every byte received is logged as it came, the
    requests are parsed strictly with llhttp, and each is answered C{200} with its own
    target as the body (so a smuggled request shows up in the answer of the next).
    """

    def __init__(self, owner: "RawUpstream") -> None:
        self.owner = owner
        self.received = bytearray()
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""

    def connectionMade(self) -> None:
        self.owner.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.owner.errors.append(str(e))
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.loseConnection()

    def on_message_begin(self) -> None:
        self._url = b""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_message_complete(self) -> None:
        self.owner.targets.append(self._url)
        body = b"target=" + self._url
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


class RawUpstream(Factory):
    """
    A strict upstream on 127.0.0.1 port 0 that keeps the raw bytes of every connection
    (C{connections[i].received}), for byte-for-byte assertions on what the proxy sent.

    @ivar targets: the request targets it parsed, in order, over all connections.
    @ivar errors: llhttp's complaints about what it received.
    """

    noisy = False

    def __init__(self) -> None:
        self.connections: List[_RawUpstreamConnection] = []
        self.targets: List[bytes] = []
        self.errors: List[str] = []
        self.port: Any = None

    def buildProtocol(self, addr: Any) -> _RawUpstreamConnection:
        return _RawUpstreamConnection(self)

    def start(self, case: Any) -> int:
        """
        Listen, and stop listening (closing every connection) when C{case} ends.
        """
        self.port = reactor.listenTCP(0, self, interface="127.0.0.1")

        def stop() -> Any:
            for conn in self.connections:
                if conn.transport is not None:
                    conn.transport.abortConnection()
            return self.port.stopListening()

        case.addCleanup(stop)
        return self.port.getHost().port

    @property
    def received(self) -> List[bytes]:
        """
        The raw bytes of each connection, in the order the connections were made.
        """
        return [bytes(c.received) for c in self.connections]


class H2Proxy:
    """
    The proxy under test with both front doors on its plain port (HTTP/2 with prior
    knowledge told by its preface, by L{sidecar.detect}) and an HTTP/2 upstream pool for HTTP/2 clients
    (C{upstreamProtocol} C{"auto"}), for every client (C{"http2"}) or none (C{"http1"}).

    @ivar records: every record it produced.
    """

    def __init__(self, upstreamPort: int, upstreamProtocol: str = "auto", responseTimeout: Optional[float] = 5.0,
                 h2config: Any = None, connectTimeout: float = 2.0) -> None:
        from sidecar.config import H2Config
        from sidecar.detect import HTTP1, HTTP2, DetectingFactory
        from sidecar.h2door import H2ServerFactory
        from sidecar.h2upstream import H2UpstreamPool

        self.records: List[Record] = []
        self.recorder = Recorder([self.records.append])
        self.h2config = h2config or H2Config()
        config = UpstreamConfig(port=upstreamPort, connectTimeout=connectTimeout, responseTimeout=responseTimeout)
        self.pool = UpstreamPool(reactor, reactor, config)
        self.h2pool = H2UpstreamPool(reactor, reactor, config, self.h2config)
        self.engine = Engine(reactor, self.pool, self.recorder, b"amazing-proxy", responseTimeout)
        if upstreamProtocol != "http1":
            versions = ("2",) if upstreamProtocol == "auto" else ("2", "1.1", "1.0")
            self.engine.poolByVersion.update({v: self.h2pool for v in versions})
        http1, h2 = DownstreamFactory(self.engine), H2ServerFactory(self.engine, self.h2config)
        # The sidecar's detection: the preface to the HTTP/2 door, a request line to HTTP/1.1.
        self.factory = DetectingFactory({HTTP1: lambda d: http1.buildProtocol(d.addr),
                                         HTTP2: lambda d: h2.buildProtocol(d.addr)},
                                        reactor, 1.0, swap=frozenset([HTTP1, HTTP2]))
        self.port: Any = None

    def start(self, case: Any) -> int:
        """
        Listen on 127.0.0.1 port 0; close everything when C{case} ends.
        """
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        case.addCleanup(self.stop)
        return self.port.getHost().port

    def stop(self) -> Any:
        self.pool.closeAll()
        for conn in list(self.h2pool.conns):
            if conn.transport is not None:
                conn.transport.abortConnection()
        for door in list(self.engine.doors):
            if door.transport is not None:
                door.transport.abortConnection()
        return self.port.stopListening()
