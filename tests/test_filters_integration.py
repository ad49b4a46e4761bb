# -*- test-case-name: tests.test_filters_integration -*-
"""
Filters, routes and the configuration file with real sockets, through both front doors:
a filter that waits on a slow service keeps other requests flowing, a rate limit
holds its rate under wrk, JWT verification against a JWKS served over HTTP, a hot
reload under load loses no request, a broken file is refused while the old one
serves, and a filter package installed with pip is enabled by name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, List

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from treq.client import HTTPClient
from twisted.internet import defer, reactor, task
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest
from twisted.web import resource, server, static
from twisted.web.client import Agent

from sidecar.builtins import FilterContext
from sidecar.configfile import ConfigWatcher, FilterSpec, build, makeFilter, parse
from sidecar.filters import Filter, FilterChain
from sidecar.upstream import UpstreamPool
from tests.support import (
    PYTHON, ROOT, ChildProcess, Proxy, Upstream, freePort, portAnswers, rawRequest, subprocessEnv, waitUntil,
)

WRK = shutil.which("wrk")


class SlowService(resource.Resource):
    """
    An HTTP service that answers after C{delay} seconds: 200, or 403 for C{/deny}.
    """

    isLeaf = True

    def __init__(self, delay: float) -> None:
        resource.Resource.__init__(self)
        self.delay = delay
        self.timers: List[Any] = []
        self.asked = 0

    def render_GET(self, request: server.Request) -> Any:
        self.asked += 1

        def answer() -> None:
            if request.path == b"/deny":
                request.setResponseCode(403)
            request.write(b"decided")
            request.finish()

        self.timers.append(reactor.callLater(self.delay, answer))
        return server.NOT_DONE_YET


def listen(case: unittest.TestCase, root: resource.Resource) -> int:
    site = server.Site(root)
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    case.addCleanup(port.stopListening)
    return port.getHost().port


class AskService(Filter):
    """
    Asks an authorization service over HTTP (treq) for requests with C{slow=1}.
    """

    name = "ask-service"

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = HTTPClient(Agent(reactor))

    def requestHead(self, call: Any) -> Any:
        if not call.path.endswith(b"?slow=1"):
            return None

        def decided(response: Any) -> Any:
            if response.code != 200:
                call.respond(403, b"denied\n", flag="UAEX")
            return response.content()

        return self.client.get(self.url).addCallback(decided)


def get(port: int, path: str, headers: bytes = b"") -> defer.Deferred:
    return rawRequest(port, f"GET {path} HTTP/1.1\r\nHost: svc\r\n".encode() + headers +
                      b"Connection: close\r\n\r\n")


class DoorMixin:
    """
    The integration suite, run against one front door (C{engine}).
    """

    engine = "fast"

    def setUp(self) -> None:
        self.upstream = Upstream()
        self.upstreamPort = self.upstream.start(self)
        self.proxy = Proxy(self.upstreamPort, engine=self.engine)
        self.port = self.proxy.start(self)

    @defer.inlineCallbacks
    def test_slowFilterKeepsOthersFlowing(self):
        """
        A request whose filter waits on a slow service (a real HTTP server answering
        after 1 s) does not hold up the others: ten requests finish meanwhile; then it
        gets its answer, and a denial from the service is a 403.
        """
        slow = SlowService(1.0)
        authPort = listen(self, slow)
        self.addCleanup(lambda: [t.cancel() for t in slow.timers if t.active()])
        self.proxy.engine.filters = FilterChain([AskService(f"http://127.0.0.1:{authPort}/allow")])
        start = reactor.seconds()
        waiting = get(self.port, "/echo?slow=1")
        for _ in range(10):
            client = yield get(self.port, "/echo")
            self.assertEqual(client.responses[0].status, 200)
        self.assertFalse(waiting.called)
        self.assertLess(reactor.seconds() - start, 0.9)
        client = yield waiting
        self.assertEqual(client.responses[0].status, 200)
        self.assertGreaterEqual(reactor.seconds() - start, 1.0)
        self.assertEqual([s.uri for s in self.upstream.seen].count(b"/echo?slow=1"), 1)
        self.proxy.engine.filters = FilterChain([AskService(f"http://127.0.0.1:{authPort}/deny")])
        client = yield get(self.port, "/echo?slow=1")
        self.assertEqual(client.responses[0].status, 403)
        self.assertEqual([s.uri for s in self.upstream.seen].count(b"/echo?slow=1"), 1)
        self.assertEqual(self.proxy.records[-1].flags, "UAEX")

    @defer.inlineCallbacks
    def test_jwt(self):
        """
        The jwt filter fetches the JWKS from a real HTTP server (treq); a token made
        with PyJWT and the matching key passes, with its subject sent up; a token
        signed by another key is 401 with C{WWW-Authenticate}, the service not asked.
        """
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        public["kid"] = "k1"
        root = resource.Resource()
        root.putChild(b"jwks.json", static.Data(json.dumps({"keys": [public]}).encode(), "application/json"))
        jwksPort = listen(self, root)
        chain = FilterChain([makeFilter(FilterSpec("jwt", {
            "issuer": "https://issuer.example", "audiences": ["shop"],
            "jwksUri": f"http://127.0.0.1:{jwksPort}/jwks.json",
            "outputClaimToHeaders": [{"header": "x-jwt-sub", "claim": "sub"}],
        }), FilterContext(clock=reactor, reactor=reactor), "filters[0]")])
        self.proxy.engine.filters = chain
        claims = {"iss": "https://issuer.example", "aud": "shop", "sub": "alice", "exp": reactor.seconds() + 60}
        good = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})
        bad = jwt.encode(claims, other, algorithm="RS256", headers={"kid": "k1"})
        client = yield get(self.port, "/echo", f"Authorization: Bearer {good}\r\nX-Jwt-Sub: mallory\r\n".encode())
        response = client.responses[0]
        self.assertEqual(response.status, 200)
        seen = self.upstream.seen[-1]
        self.assertEqual(seen.header(b"x-jwt-sub"), [b"alice"])
        self.assertEqual(seen.header(b"authorization"), [])
        before = len(self.upstream.seen)
        client = yield get(self.port, "/echo", f"Authorization: Bearer {bad}\r\n".encode())
        response = client.responses[0]
        self.assertEqual(response.status, 401)
        self.assertEqual(response.header(b"www-authenticate"),
                         [b'Bearer realm="http://svc/echo", error="invalid_token"'])
        self.assertEqual(len(self.upstream.seen), before)
        self.assertEqual(self.proxy.records[-1].flags, "UAEX")

    @defer.inlineCallbacks
    def test_rateLimitUnderWrk(self):
        """
        Under wrk (3 s, as fast as it can), the local rate limit lets through what its
        bucket allows, within 5 %: C{maxTokens} plus C{tokensPerFill} per interval
        elapsed; the rest are 429 C{RL}.
        """
        if WRK is None:
            raise unittest.SkipTest("needs wrk")
        # 100 requests a second, and a bucket of half a second's worth, so that a
        # stall of this busy test machine does not waste tokens.
        config = {"maxTokens": 50, "tokensPerFill": 10, "fillInterval": 0.1}
        self.proxy.engine.filters = FilterChain([
            makeFilter(FilterSpec("local_ratelimit", config), FilterContext(clock=reactor), "f")])
        out, err, code = yield getProcessOutputAndValue(
            WRK, ["-t1", "-c4", "-d3s", f"http://127.0.0.1:{self.port}/bytes/10"], env=os.environ)
        self.assertEqual(code, 0, err)
        # wrk closes its connections at the end with requests in flight (status 0, DC).
        records = [r for r in self.proxy.records if (r.status, r.flags) != (0, "DC")]
        passed = [r for r in records if r.status == 200]
        limited = [r for r in records if r.status == 429]
        self.assertEqual(len(passed) + len(limited), len(records))
        self.assertTrue(all(r.flags == "RL" for r in limited))
        self.assertGreater(len(limited), len(passed))  # the limit was actually reached
        span = records[-1].startTime - records[0].startTime
        expected = config["maxTokens"] + int(span / config["fillInterval"]) * config["tokensPerFill"]
        # Never more than the bucket allows, and not 5 % less.
        self.assertLessEqual(len(passed), expected)
        self.assertGreaterEqual(len(passed), 0.95 * expected, f"{len(passed)} passed in {span:.2f} s, expected {expected}")

    @defer.inlineCallbacks
    def test_reloadUnderLoad(self):
        """
        The configuration file changes five times while wrk sends requests: every
        request gets a 200 (no error, no reset), and the responses end up carrying the
        last version's header.
        """
        if WRK is None:
            raise unittest.SkipTest("needs wrk")
        path = os.path.abspath(self.mktemp())

        def write(version: int) -> None:
            with open(path, "w") as f:
                f.write(f"version: v{version}\nfilters:\n  - name: headers\n"
                        f"    config: {{response: {{set: {{x-version: v{version}}}}}}}\n"
                        f"routes:\n  - name: all\n    retry: {{attempts: 1}}\n")
            stat = os.stat(path)
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + version * 1_000_000_000))

        write(0)
        engine = self.proxy.engine

        def apply(active: Any) -> None:
            engine.filters = active.chain

        watcher = ConfigWatcher(path, FilterContext(clock=reactor, reactor=reactor),
                                lambda settings: UpstreamPool(reactor, reactor, settings), apply)
        versions = iter(range(1, 6))

        def change() -> None:
            version = next(versions, None)
            if version is not None:
                write(version)
            watcher.check()

        loop = task.LoopingCall(change)
        loop.clock = reactor
        loop.start(0.4, now=False)
        self.addCleanup(lambda: loop.running and loop.stop())
        out, err, code = yield getProcessOutputAndValue(
            WRK, ["-t1", "-c8", "-d3s", f"http://127.0.0.1:{self.port}/bytes/100"], env=os.environ)
        loop.stop()
        text = out.decode()
        self.assertEqual(code, 0, err)
        self.assertNotIn("Non-2xx", text)
        self.assertNotIn("Socket errors", text)
        total = int(re.search(r"(\d+) requests in", text).group(1))
        self.assertGreater(total, 100)
        self.assertEqual(watcher.reloads, 5)
        self.assertEqual(watcher.rejections, 0)
        # Every answered request got a 200; wrk closes its connections at the end with
        # requests in flight (status 0, DC).
        self.assertEqual({(r.status, r.flags) for r in self.proxy.records} - {(0, "DC")}, {(200, "-")})
        client = yield get(self.port, "/bytes/1")
        self.assertEqual(client.responses[0].header(b"x-version"), [b"v5"])


    @defer.inlineCallbacks
    def test_routes(self):
        """
        Routes over real sockets: a prefix goes to a named upstream (a second real
        service) with its own filter, an unmatched path is a 404 C{NR}, and a refused
        connect to a named upstream is retried, then a 502 C{UF,URX}.
        """
        other = Upstream()
        otherPort = other.start(self)
        spec, data = parse(f"""
upstreams:
  other: {{address: "127.0.0.1:{otherPort}"}}
  closed: {{address: "127.0.0.1:{freePort()}"}}
routes:
  - name: other
    match: {{prefix: /other/}}
    upstream: other
    filters: [{{name: headers, config: {{request: {{set: {{x-route: other}}}}}}}}]
  - name: closed
    match: {{prefix: /closed}}
    upstream: closed
    retry: {{attempts: 2, retryOn: connect-failure}}
  - name: echo
    match: {{prefix: /echo}}
""".encode(), "routes.yaml")
        active = build(spec, data, "d", FilterContext(clock=reactor, reactor=reactor),
                       lambda settings: UpstreamPool(reactor, reactor, settings))
        self.addCleanup(lambda: [p.closeAll() for p in active.pools.values()])
        self.proxy.engine.filters = active.chain
        client = yield get(self.port, "/other/echo")
        self.assertEqual(client.responses[0].status, 404)  # the other service has no /other
        self.assertEqual(other.seen[-1].uri, b"/other/echo")
        self.assertEqual(other.seen[-1].header(b"x-route"), [b"other"])
        client = yield get(self.port, "/echo")
        self.assertEqual(client.responses[0].status, 200)
        self.assertEqual(self.upstream.seen[-1].header(b"x-route"), [])
        client = yield get(self.port, "/nowhere")
        self.assertEqual(client.responses[0].status, 404)
        self.assertEqual(self.proxy.records[-1].flags, "NR")
        client = yield get(self.port, "/closed")
        self.assertEqual(client.responses[0].status, 502)
        self.assertEqual(self.proxy.records[-1].flags, "UF,URX")


class FastDoorTests(DoorMixin, unittest.TestCase):
    """
    Through the fast (llhttp) door.
    """

    engine = "fast"


class WebDoorTests(DoorMixin, unittest.TestCase):
    """
    Through the twisted.web door.
    """

    engine = "web"


CONFIG = """\
version: good
filters:
  - name: headers
    config: {response: {set: {x-config: good}}}
"""


class ProcessTests(unittest.TestCase):
    """
    C{twistd sidecar --config FILE} as a user runs it.
    """

    timeout = 120

    def startSidecar(self, config: str, *args: str, env: Any = None) -> defer.Deferred:
        self.path = os.path.abspath(self.mktemp())
        with open(self.path, "w") as f:
            f.write(config)
        self.listen, self.admin = freePort(), freePort()
        argv = [PYTHON, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "sidecar",
                "--listen", f"tcp:{self.listen}:interface=127.0.0.1", "--upstream", str(self.upstreamPort),
                "--admin", f"tcp:{self.admin}:interface=127.0.0.1", "--health", "none",
                "--access-log", "none", "--config", self.path, *args]
        self.child = ChildProcess(self, argv, env=env)
        return portAnswers(self.listen)

    def setUp(self) -> None:
        self.upstream = Upstream()
        self.upstreamPort = self.upstream.start(self)

    @defer.inlineCallbacks
    def adminGet(self, path: str) -> Any:
        client = yield rawRequest(self.admin, f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
        return client.responses[0].body

    @defer.inlineCallbacks
    def test_brokenConfigRejected(self):
        """
        A broken file written over a running sidecar's is refused (the metric and
        C{/config_dump} say why) and the old configuration keeps serving; a broken file
        at start-up stops the start with one sentence naming the key.
        """
        yield self.startSidecar(CONFIG)
        client = yield get(self.listen, "/echo")
        self.assertEqual(client.responses[0].header(b"x-config"), [b"good"])
        with open(self.path, "w") as f:
            f.write(CONFIG.replace("version: good", "version: broken").replace("name: headers", "name: hedaers"))

        @defer.inlineCallbacks
        def rejected() -> Any:
            metrics = yield self.adminGet("/stats/prometheus")
            return b'sidecar_config_reloads_total{result="rejected"} 1.0' in metrics

        state = {"done": False}

        def poll() -> Any:
            return rejected().addCallback(lambda ok: state.update(done=ok))

        loop = task.LoopingCall(poll)
        loop.start(0.2)
        yield waitUntil(lambda: state["done"], timeout=15)
        loop.stop()
        dump = json.loads((yield self.adminGet("/config_dump")))
        self.assertEqual(dump["config_file"]["version"], "good")
        self.assertIn("filters[0].name: no filter named 'hedaers'", dump["config_file"]["last_rejection"])
        client = yield get(self.listen, "/echo")
        self.assertEqual(client.responses[0].status, 200)
        self.assertEqual(client.responses[0].header(b"x-config"), [b"good"])

        broken = os.path.abspath(self.mktemp())
        with open(broken, "w") as f:
            f.write("routes:\n  - name: a\n    timeout: soon\n")
        out, err, code = yield getProcessOutputAndValue(
            PYTHON, ["-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "sidecar",
                     "--config", broken], env=subprocessEnv())
        self.assertNotEqual(code, 0)
        self.assertIn(f"{broken}: routes[0].timeout: 'soon' is not a duration".encode(), out + err)

    @defer.inlineCallbacks
    def test_http2(self):
        """
        Filters run for HTTP/2 clients too (nghttp, prior knowledge): the response
        header rule applies, and past the bucket the stream gets a 429.
        """
        nghttp = shutil.which("nghttp")
        if nghttp is None:
            raise unittest.SkipTest("needs nghttp (nghttp2-client)")
        yield self.startSidecar(CONFIG.replace("filters:\n", "filters:\n  - name: local_ratelimit\n"
                                               "    config: {maxTokens: 2, fillInterval: 60s}\n"),
                                "--upstream-protocol", "http1")
        statuses = []
        for _ in range(3):
            out, err, code = yield getProcessOutputAndValue(
                nghttp, ["-v", f"http://127.0.0.1:{self.listen}/echo"], env=os.environ)
            text = out.decode("latin-1")
            statuses.append(re.search(r":status: (\d+)", text).group(1))
            if statuses[-1] == "200":
                self.assertIn("x-config: good", text)
        self.assertEqual(statuses, ["200", "200", "429"])

    @defer.inlineCallbacks
    def test_installedFilter(self):
        """
        The example package in C{examples/myfilter}, installed with pip (offline:
        C{--no-deps --no-build-isolation}, into a folder on the path), is enabled by
        its entry point's name in the file: its API key check and header work.
        """
        target = os.path.abspath(self.mktemp())
        build = os.path.abspath(self.mktemp())
        shutil.copytree(os.path.join(ROOT, "examples", "myfilter"), build)
        out, err, code = yield getProcessOutputAndValue(
            PYTHON, ["-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                     "--target", target, build], env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
        self.assertEqual(code, 0, err)
        self.assertTrue(any(name.startswith("sidecar_myfilter") and name.endswith(".dist-info")
                            for name in os.listdir(target)))
        env = subprocessEnv()
        env["PYTHONPATH"] = env["PYTHONPATH"] + os.pathsep + target
        yield self.startSidecar("filters:\n  - name: myfilter\n    config: {greeting: hi, apiKeys: [k1]}\n",
                                env=env)
        client = yield get(self.listen, "/echo", b"X-Api-Key: k1\r\nX-Api-Client: 7\r\n")
        response = client.responses[0]
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header(b"x-greeting"), [b"hi"])
        seen = self.upstream.seen[-1]
        self.assertEqual((seen.header(b"x-api-key"), seen.header(b"x-api-client")), ([], [b"0"]))
        client = yield get(self.listen, "/echo")
        self.assertEqual(client.responses[0].status, 401)
