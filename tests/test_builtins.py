# -*- test-case-name: tests.test_builtins -*-
"""
The built-in filters (L{sidecar.builtins}) through the fast door and the engine on a
memory reactor and clock: rate limit, fault injection, header rules, authorization
and JWT verification, each checked against what the client and the service get.
"""

from __future__ import annotations

import base64
import json
from typing import Any, List

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet.defer import Deferred, fail
from twisted.trial import unittest

from sidecar.builtins import FilterContext, normalizePath
from sidecar.configfile import ConfigError, FilterSpec, makeFilter
from sidecar.filters import FilterChain
from tests.test_exchange import GET, OK, Harness


def build(h: Harness, name: str, config: dict, **context: Any) -> Any:
    """
    The built-in C{name} with C{config}, as the configuration file makes it, on C{h}'s
    clock.
    """
    return makeFilter(FilterSpec(name, config), FilterContext(clock=h.reactor, **context), "filters[0]")


def filtered(name: str, config: dict, **context: Any) -> Harness:
    h = Harness()
    h.engine.filters = FilterChain([build(h, name, config, **context)])
    return h


def request(h: Harness, data: bytes = GET) -> tuple:
    door, client = h.client()
    door.dataReceived(data)
    return door, client


def answer(h: Harness) -> bytes:
    """
    Play the service for the last upstream connection: answer 200; return what it got.
    """
    conn, upstream = h.connectUpstream()
    conn.dataReceived(OK)
    return upstream.value()


class RateLimitTests(unittest.SynchronousTestCase):
    """
    C{local_ratelimit}: a token bucket refilled on the injected clock.
    """

    def test_bucket(self):
        """
        C{maxTokens} requests pass at once, the next gets 429 C{RL} without reaching
        the service; after one fill interval C{tokensPerFill} more pass.
        """
        h = filtered("local_ratelimit", {"maxTokens": 2, "fillInterval": 1.0, "tokensPerFill": 1})
        statuses = []
        conn = None
        for _ in range(3):
            door, client = request(h)
            if not client.value():
                if conn is None:
                    conn, upstream = h.connectUpstream()
                conn.dataReceived(OK)
            statuses.append(client.value().split(b"\r\n")[0])
        self.assertEqual(statuses, [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK", b"HTTP/1.1 429 Too Many Requests"])
        self.assertEqual(len(h.reactor.tcpClients), 1)
        self.assertEqual([r.flags for r in h.records], ["-", "-", "RL"])
        self.assertTrue(h.records[-1].upstreamServiceTime is None)
        h.reactor.advance(0.9)
        door, client = request(h)
        self.assertIn(b" 429 ", client.value())
        h.reactor.advance(0.1)
        door, client = request(h)
        self.assertEqual(client.value(), b"")  # went upstream
        door, client = request(h)
        self.assertIn(b" 429 ", client.value())

    def test_bucketCapped(self):
        """
        A long quiet spell refills the bucket to C{maxTokens}, no more.
        """
        h = Harness()
        f = build(h, "local_ratelimit", {"maxTokens": 3, "fillInterval": 0.5, "tokensPerFill": 2})
        from sidecar.filters import Call
        call = Call(b"GET", b"/", "svc", [], "1.2.3.4:5", "")
        h.reactor.advance(100)
        results = []
        for _ in range(5):
            call.reply = None
            f.requestHead(call)
            results.append(call.reply is None)
        self.assertEqual(results, [True, True, True, False, False])

    def test_perRoute(self):
        """
        Each route has its own bucket.
        """
        h = Harness()
        f = build(h, "local_ratelimit", {"maxTokens": 1, "fillInterval": 60})
        from sidecar.filters import Call
        outcomes = []
        for route in ("a", "b", "a"):
            call = Call(b"GET", b"/", "svc", [], "1.2.3.4:5", "")
            call.route = route
            f.requestHead(call)
            outcomes.append(None if call.reply is None else call.reply.status)
        self.assertEqual(outcomes, [None, None, 429])

    def test_badConfig(self):
        """
        A bucket without tokens is refused with the key named.
        """
        h = Harness()
        e = self.assertRaises(ConfigError, build, h, "local_ratelimit", {"maxTokens": 0, "fillInterval": 1})
        self.assertIn("filters[0].config", str(e))
        self.assertIn("maxTokens", str(e))


class FaultTests(unittest.SynchronousTestCase):
    """
    C{fault}: delay and abort a percentage of requests, from an injected random source.
    """

    def test_abort(self):
        """
        Below the percentage, the request is answered with C{httpStatus}, flag C{FI};
        above it, it goes to the service.
        """
        draws = iter([0.05, 0.5])
        h = filtered("fault", {"abort": {"httpStatus": 503, "percentage": 10}}, random=lambda: next(draws))
        door, client = request(h)
        self.assertTrue(client.value().startswith(b"HTTP/1.1 503 "))
        self.assertTrue(client.value().endswith(b"fault filter abort"))
        self.assertEqual(h.reactor.tcpClients, [])
        door, client = request(h)
        answer(h)
        self.assertIn(b" 200 OK", client.value())
        self.assertEqual([r.flags for r in h.records], ["FI", "-"])

    def test_delay(self):
        """
        A delayed request waits on a timer of the clock (the reactor is not blocked:
        another request goes through meanwhile), then goes on, flag C{DI}.
        """
        draws = iter([0.0, 0.99])
        h = filtered("fault", {"delay": {"fixedDelay": "1.5s", "percentage": 50}}, random=lambda: next(draws))
        slow, slowClient = request(h)
        self.assertEqual(h.reactor.tcpClients, [])
        fast, fastClient = request(h)
        answer(h)
        self.assertIn(b" 200 OK", fastClient.value())
        h.reactor.advance(1.4)
        self.assertEqual(len(h.reactor.tcpClients), 1)
        self.assertEqual(slowClient.value(), b"")
        h.reactor.advance(0.1)
        # The pooled connection takes it.
        conn = h.pool.active
        self.assertEqual(conn, 1)
        self.assertEqual([r.flags for r in h.records], ["-"])

    def test_delayThenAbort(self):
        """
        Both configured: the delay first, then the abort; the record has both flags.
        """
        h = filtered("fault", {"delay": {"fixedDelay": 2}, "abort": {"httpStatus": 418}}, random=lambda: 0.0)
        door, client = request(h)
        h.reactor.advance(2)
        self.assertTrue(client.value().startswith(b"HTTP/1.1 418 "))
        self.assertEqual([r.flags for r in h.records], ["FI,DI"])
        self.assertEqual(h.records[0].duration, 2.0)


class HeaderRulesTests(unittest.SynchronousTestCase):
    """
    C{headers}: set, add and remove on both sides.
    """

    def test_requestAndResponse(self):
        """
        The service sees the request headers changed; the client the response headers.
        """
        h = filtered("headers", {
            "request": {"set": {"X-Env": "prod"}, "add": {"X-Tag": "b"}, "remove": ["X-Secret"]},
            "response": {"set": {"Cache-Control": "no-store"}, "remove": ["X-Powered-By"]},
        })
        door, client = request(h, b"GET / HTTP/1.1\r\nHost: svc\r\nX-Env: dev\r\nX-Tag: a\r\nx-secret: s\r\n\r\n")
        conn, upstream = h.connectUpstream()
        sent = upstream.value()
        self.assertIn(b"X-Env: prod\r\n", sent)
        self.assertNotIn(b"X-Env: dev", sent)
        self.assertIn(b"X-Tag: a\r\n", sent)
        self.assertIn(b"X-Tag: b\r\n", sent)
        self.assertNotIn(b"ecret", sent)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nX-Powered-By: php\r\nCache-Control: public\r\nContent-Length: 2\r\n\r\nok")
        self.assertIn(b"Cache-Control: no-store\r\n", client.value())
        self.assertNotIn(b"public", client.value())
        self.assertNotIn(b"X-Powered-By", client.value())

    def test_framingRefused(self):
        """
        Rules on framing headers, bad names or values that break lines are refused.
        """
        h = Harness()
        for config in ({"response": {"set": {"Content-Length": "5"}}},
                       {"request": {"add": {"Transfer-Encoding": "chunked"}}},
                       {"request": {"set": {"Bad Name": "x"}}},
                       {"request": {"set": {"X-A": "a\r\nX-B: b"}}}):
            self.assertRaises(ConfigError, build, h, "headers", config)


class AuthorizationTests(unittest.SynchronousTestCase):
    """
    C{authorization}: Istio's AuthorizationPolicy on HTTP attributes.
    """

    def decide(self, config: dict, data: bytes, principal: str = "") -> List[int]:
        h = filtered("authorization", config)
        door, client = h.client()
        door.peerPrincipal = principal
        door.dataReceived(data)
        if h.reactor.tcpClients:
            answer(h)
        return [(r.status, r.flags) for r in h.records]

    def test_denyPathPrefix(self):
        """
        DENY on a path prefix: 403 C{RBAC} there, even written with dot segments,
        doubled slashes or escapes; other paths pass.
        """
        policy = {"action": "DENY", "rules": [{"paths": ["/admin*"]}]}
        for path in (b"/admin", b"/admin/users", b"//admin", b"/public/../admin", b"/%61dmin", b"/admin?x=1"):
            self.assertEqual(self.decide(policy, b"GET " + path + b" HTTP/1.1\r\nHost: svc\r\n\r\n"),
                             [(403, "RBAC")], path)
        self.assertEqual(self.decide(policy, b"GET /public HTTP/1.1\r\nHost: svc\r\n\r\n"), [(200, "-")])

    def test_allowPrincipalAndMethod(self):
        """
        ALLOW: only a request matching a rule passes; principals are compared with
        or without C{spiffe://}.
        """
        policy = {"rules": [{"principals": ["cluster.local/ns/shop/sa/web"], "methods": ["GET"]}]}
        self.assertEqual(self.decide(policy, GET, "spiffe://cluster.local/ns/shop/sa/web"), [(200, "-")])
        self.assertEqual(self.decide(policy, b"DELETE /x HTTP/1.1\r\nHost: svc\r\n\r\n",
                                     "spiffe://cluster.local/ns/shop/sa/web"), [(403, "RBAC")])
        self.assertEqual(self.decide(policy, GET, "spiffe://cluster.local/ns/shop/sa/evil"), [(403, "RBAC")])
        self.assertEqual(self.decide(policy, GET, ""), [(403, "RBAC")])

    def test_header(self):
        """
        A header condition with wildcards.
        """
        policy = {"rules": [{"headers": {"x-team": ["pay*"]}, "notPaths": ["/internal*"]}]}
        self.assertEqual(self.decide(policy, b"GET / HTTP/1.1\r\nHost: svc\r\nX-Team: payments\r\n\r\n"),
                         [(200, "-")])
        self.assertEqual(self.decide(policy, b"GET / HTTP/1.1\r\nHost: svc\r\nX-Team: search\r\n\r\n"),
                         [(403, "RBAC")])
        self.assertEqual(self.decide(policy, b"GET /internal/x HTTP/1.1\r\nHost: svc\r\nX-Team: pay\r\n\r\n"),
                         [(403, "RBAC")])

    def test_normalizePath(self):
        """
        The path authorization sees.
        """
        self.assertEqual(normalizePath(b"/a//b/./c/../d?q=1"), b"/a/b/d")
        self.assertEqual(normalizePath(b"/%7euser/%2f"), b"/~user/%2F")
        self.assertEqual(normalizePath(b"/../../etc"), b"/etc")


def rsaKey() -> tuple:
    """
    A new RSA key and its JWKS (one key, C{kid} C{k1}).
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    public.update(kid="k1", use="sig", alg="RS256")
    return key, {"keys": [public]}


class JwtTests(unittest.SynchronousTestCase):
    """
    C{jwt}: tokens made here with PyJWT, verified against a JWKS, on the injected clock.
    """

    def setUp(self):
        self.key, self.jwks = rsaKey()

    def token(self, key: Any = None, kid: str = "k1", alg: str = "RS256", **claims: Any) -> bytes:
        payload = {"iss": "https://issuer.example", "sub": "alice", "aud": "shop", "exp": 2000, "nbf": 0}
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, key if key is not None else self.key, algorithm=alg,
                          headers={"kid": kid}).encode()

    def harness(self, **config: Any) -> Harness:
        settings = {"issuer": "https://issuer.example", "audiences": ["shop"], "jwks": json.dumps(self.jwks),
                    "outputPayloadToHeader": "x-jwt-payload",
                    "outputClaimToHeaders": [{"header": "x-jwt-sub", "claim": "sub"}]}
        settings.update(config)
        h = filtered("jwt", settings)
        h.reactor.advance(1000)
        return h

    def send(self, h: Harness, token: bytes = None, extra: bytes = b"") -> tuple:
        auth = b"Authorization: Bearer " + token + b"\r\n" if token is not None else b""
        return request(h, b"GET /orders HTTP/1.1\r\nHost: shop\r\n" + auth + extra + b"\r\n")

    def test_accepted(self):
        """
        A good token: the service gets the claims in headers, not the token, and no
        header the client tried to forge.
        """
        h = self.harness()
        door, client = self.send(h, self.token(), b"X-Jwt-Sub: mallory\r\nX-Jwt-Payload: e30\r\n")
        conn, upstream = h.connectUpstream()
        sent = upstream.value()
        self.assertIn(b"x-jwt-sub: alice\r\n", sent)
        self.assertNotIn(b"mallory", sent)
        self.assertNotIn(b"e30", sent)
        self.assertNotIn(b"Authorization", sent)
        [payload] = [line.split(b": ", 1)[1] for line in sent.split(b"\r\n") if line.startswith(b"x-jwt-payload: ")]
        claims = json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
        self.assertEqual((claims["sub"], claims["iss"]), ("alice", "https://issuer.example"))

    def assertRefused(self, h: Harness, client: Any, body: bytes = b"Jwt verification fails") -> None:
        value = client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 401 Unauthorized\r\n"), value)
        self.assertIn(b'WWW-Authenticate: Bearer realm="http://shop/orders"', value)
        self.assertTrue(value.endswith(body), value)
        self.assertEqual(h.reactor.tcpClients, [])
        self.assertEqual(h.records[-1].flags, "UAEX")

    def test_refused(self):
        """
        A token that is expired, not yet valid, for another audience or issuer, signed
        by another key, unsigned (C{alg: none}), HMAC-signed with the public key, or
        garbled: 401 with C{WWW-Authenticate}, flag C{UAEX}, the service never asked.
        """
        other, _ = rsaKey()
        unsigned = (base64.urlsafe_b64encode(b'{"alg":"none","kid":"k1"}').rstrip(b"=") + b"." +
                    base64.urlsafe_b64encode(b'{"iss":"https://issuer.example","aud":"shop"}').rstrip(b"=") + b".")
        hmac = (jwt.api_jws.PyJWS().encode(
            json.dumps({"iss": "https://issuer.example", "aud": "shop"}).encode(), b"k" * 32, algorithm="HS256",
            headers={"kid": "k1"})).encode()
        for token in (self.token(exp=900), self.token(exp=2000, nbf=1500), self.token(aud="bank"),
                      self.token(iss="https://evil.example"), self.token(key=other), unsigned, hmac,
                      b"not.a.token", self.token(kid="k9")):
            h = self.harness()
            door, client = self.send(h, token)
            self.assertRefused(h, client)

    def test_clockSkew(self):
        """
        C{exp} is allowed C{clockSkew} seconds of leeway, on the injected clock.
        """
        h = self.harness(clockSkew=30)
        door, client = self.send(h, self.token(exp=975))
        self.assertEqual(len(h.reactor.tcpClients), 1)
        h = self.harness(clockSkew=30)
        door, client = self.send(h, self.token(exp=965))
        self.assertRefused(h, client)

    def test_missing(self):
        """
        No token passes (Istio: authorization decides), unless C{requireToken}:
        401 C{Jwt is missing}.
        """
        h = self.harness()
        self.send(h)
        self.assertEqual(len(h.reactor.tcpClients), 1)
        h = self.harness(requireToken=True)
        door, client = self.send(h)
        self.assertRefused(h, client, b"Jwt is missing")

    def test_remoteJwks(self):
        """
        A JWKS URL: requests before the first fetch wait for it; then the cache
        serves until C{jwksCacheDuration}, when a refresh starts in the background
        while the old keys still serve; a failed refresh keeps them.
        """
        fetches: List[Deferred] = []

        def fetch(url: str) -> Deferred:
            self.assertEqual(url, "http://jwks.example/keys")
            d: Deferred = Deferred()
            fetches.append(d)
            return d

        h = Harness()
        h.reactor.advance(1000)
        f = build(h, "jwt", {"issuer": "https://issuer.example", "jwksUri": "http://jwks.example/keys",
                             "jwksCacheDuration": 300}, fetch=fetch)
        h.engine.filters = FilterChain([f])
        self.assertEqual(len(fetches), 1)
        door, client = self.send(h, self.token())
        self.assertEqual(h.reactor.tcpClients, [])
        fetches[0].callback(json.dumps(self.jwks).encode())
        self.assertEqual(len(h.reactor.tcpClients), 1)
        h.reactor.advance(299)
        self.send(h, self.token(exp=5000))
        self.assertEqual(len(fetches), 1)
        h.reactor.advance(2)
        door, client = self.send(h, self.token(exp=5000))
        self.assertEqual(len(fetches), 2)
        self.assertEqual(h.records[-1:], [])  # not refused: served from the old keys
        fetches[1].errback(RuntimeError("down"))
        door, client = self.send(h, self.token(exp=5000))
        self.assertNotIn(b"401", client.value())

    def test_remoteJwksFailed(self):
        """
        When the first fetch fails, waiting requests get 401 C{Jwks remote fetch is
        failed}.
        """
        h = Harness()
        h.reactor.advance(1000)
        f = build(h, "jwt", {"issuer": "https://issuer.example", "jwksUri": "http://jwks.example/keys"},
                  fetch=lambda url: fail(RuntimeError("refused")))
        h.engine.filters = FilterChain([f])
        door, client = self.send(h, self.token())
        self.assertRefused(h, client, b"Jwks remote fetch is failed")

    def test_ecKey(self):
        """
        An EC key (ES256) verifies too.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        public.update(kid="e1")
        h = self.harness(jwks=json.dumps({"keys": [public]}))
        self.send(h, self.token(key=key, kid="e1", alg="ES256"))
        self.assertEqual(len(h.reactor.tcpClients), 1)

    def test_badJwks(self):
        """
        A JWKS with no usable key is refused at configuration time, naming the key.
        """
        h = Harness()
        e = self.assertRaises(ConfigError, build, h, "jwt", {"issuer": "x", "jwks": '{"keys": []}'})
        self.assertIn("filters[0].config", str(e))
