# -*- test-case-name: tests.test_builtins -*-
"""
The built-in filters an Istio user reaches for, each an ordinary L{Filter} on the
public API, enabled by name in the configuration file (L{sidecar.configfile}):

  - C{local_ratelimit} (L{LocalRateLimit}): a token bucket per route; past it, 429 with
    flag C{RL} (Envoy's C{local_ratelimit});
  - C{fault} (L{FaultInjection}): delay (flag C{DI}) or abort (flag C{FI}) a
    percentage of requests (Istio's VirtualService C{fault});
  - C{headers} (L{HeaderRules}): add, set or remove request and response headers
    (Istio's VirtualService C{headers});
  - C{authorization} (L{Authorization}): allow or deny by source principal, method,
    path and header; denied is 403 with flag C{RBAC} (a subset of Istio's
    C{AuthorizationPolicy});
  - C{jwt} (L{JwtAuthentication}): verify a bearer token against a JWKS file or URL
    (Istio's C{RequestAuthentication}) with PyJWT; a bad token is 401 with
    C{WWW-Authenticate} and flag C{UAEX}.

Each filter has a frozen C{Config} (its schema: the configuration file's C{config:}
mapping, checked by cattrs) and is built with C{fromConfig(config, context)}, the
L{FilterContext} bringing the clock, the reactor, the random source and the JWKS
fetcher, so that tests drive them all on a memory reactor.
"""

from __future__ import annotations

import base64
import json
import random as _random
import re
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import attrs
import jwt
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from sidecar.filters import Call, Filter, removeHeader
from sidecar.record import UNAUTHORIZED

if TYPE_CHECKING:  # pragma: no cover
    from twisted.internet.interfaces import IReactorTime

#: Response flags of the built-in filters (Envoy's names).
RATE_LIMITED = "RL"
DELAY_INJECTED = "DI"
FAULT_INJECTED = "FI"
#: A request refused by authentication: Envoy's jwt_authn sets no flag (only the
#: response code details, C{jwt_authn_access_denied}), and records here have no details
#: field, so the flag is C{UAEX}, Envoy's for a request an authentication service denied.
UNAUTHENTICATED = "UAEX"


@attrs.define(eq=False)
class FilterContext:
    """
    What filters may need from the sidecar that builds them.

    @ivar clock: for token buckets, delays, token expiry, JWKS refresh.
    @ivar reactor: for outgoing connections (the JWKS fetcher's default).
    @ivar random: a source of floats in [0, 1) (fault injection, retry back-off).
    @ivar fetch: C{fetch(url)} returns a L{Deferred} firing with the body of a
        successful C{GET}; C{None}: treq on C{reactor}.
    @ivar log: where filters log.
    """

    clock: IReactorTime
    reactor: Any = None
    random: Callable[[], float] = _random.random
    fetch: Optional[Callable[[str], Deferred[bytes]]] = None
    log: Logger = attrs.field(factory=Logger)

    def fetcher(self) -> Callable[[str], Deferred[bytes]]:
        """
        C{fetch}, or a treq C{GET} on C{reactor} (10 s timeout, 200 only, 1 MiB at most).
        """
        if self.fetch is not None:
            return self.fetch
        reactor = self.reactor

        def fetch(url: str) -> Deferred[bytes]:
            from treq.client import HTTPClient
            from twisted.web.client import Agent

            client = HTTPClient(Agent(reactor, connectTimeout=10))

            def read(response: Any) -> Any:
                if response.code != 200:
                    raise ValueError(f"{url} answered {response.code}")
                return response.content().addCallback(limited)

            def limited(body: bytes) -> bytes:
                if len(body) > 1 << 20:
                    raise ValueError(f"{url} sent more than 1 MiB")
                return body

            return client.get(url, timeout=10).addCallback(read)

        return fetch


def seconds(value: Any) -> float:
    """
    A duration: a number of seconds, or text as Istio writes it (C{"1.5s"}, C{"200ms"}).

    @raise ValueError: when it is neither, or negative.
    """
    if isinstance(value, bool):
        raise ValueError("expected seconds")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?(ms|s|m|h)", value.strip()):
        text = value.strip()
        unit = re.search(r"(ms|s|m|h)$", text).group(1)  # type: ignore[union-attr]
        number = float(text[:-len(unit)]) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
    else:
        raise ValueError(f"{value!r} is not a duration (seconds, or like 1.5s or 200ms)")
    if number != number or number < 0 or number == float("inf"):
        raise ValueError(f"{value!r} is not a non-negative duration")
    return number


class Seconds(float):
    """
    A duration in the configuration: seconds, or C{"1.5s"}, C{"200ms"} (L{seconds}).
    """


def _positive(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{attribute.name} must be positive")


def _percentage(instance: Any, attribute: Any, value: float) -> None:
    if not 0 <= value <= 100:
        raise ValueError(f"{attribute.name} must be from 0 to 100")


# -- local rate limit ----------------------------------------------------------------


@attrs.frozen
class RateLimitConfig:
    """
    Envoy's C{token_bucket}: the bucket holds C{maxTokens}; every C{fillInterval}
    seconds C{tokensPerFill} are added back; each request takes one.
    """

    maxTokens: int = attrs.field(validator=_positive)
    fillInterval: Seconds = attrs.field(validator=_positive)
    tokensPerFill: int = attrs.field(default=1, validator=_positive)
    statusCode: int = 429


class LocalRateLimit(Filter):
    """
    A token bucket per route (one for requests that took no route); an empty bucket
    answers 429 (C{local_rate_limited}) with flag C{RL}.  The bucket fills in whole
    intervals, worked out when a request comes (no timer).  A reload of the
    configuration starts with full buckets.
    """

    name = "local_ratelimit"
    Config = RateLimitConfig

    def __init__(self, config: RateLimitConfig, clock: IReactorTime) -> None:
        self.config = config
        self.clock = clock
        #: route name -> [tokens, time of the last fill]
        self.buckets: Dict[Optional[str], List[float]] = {}

    @classmethod
    def fromConfig(cls, config: RateLimitConfig, context: FilterContext) -> LocalRateLimit:
        return cls(config, context.clock)

    def requestHead(self, call: Call) -> None:
        config = self.config
        now = self.clock.seconds()
        bucket = self.buckets.get(call.route)
        if bucket is None:
            bucket = self.buckets[call.route] = [float(config.maxTokens), now]
        elapsed = now - bucket[1]
        if elapsed >= config.fillInterval:
            fills = int(elapsed // config.fillInterval)
            bucket[0] = min(float(config.maxTokens), bucket[0] + fills * config.tokensPerFill)
            bucket[1] += fills * config.fillInterval
        if bucket[0] >= 1:
            bucket[0] -= 1
            return None
        return call.respond(config.statusCode, b"local_rate_limited", flag=RATE_LIMITED)


# -- fault injection -----------------------------------------------------------------


@attrs.frozen
class DelayConfig:
    """
    Delay C{percentage} of requests by C{fixedDelay} seconds.
    """

    fixedDelay: Seconds
    percentage: float = attrs.field(default=100.0, validator=_percentage)


@attrs.frozen
class AbortConfig:
    """
    Answer C{percentage} of requests with C{httpStatus} instead of the service.
    """

    httpStatus: int = attrs.field(validator=attrs.validators.and_(attrs.validators.ge(200),
                                                                   attrs.validators.le(599)))
    percentage: float = attrs.field(default=100.0, validator=_percentage)


@attrs.frozen
class FaultConfig:
    """
    Istio's C{fault}: a delay, an abort, or both (the delay first).
    """

    delay: Optional[DelayConfig] = None
    abort: Optional[AbortConfig] = None


class FaultInjection(Filter):
    """
    Delays (flag C{DI}, a timer: the reactor goes on) or aborts (flag C{FI}, body
    C{fault filter abort}) a percentage of requests, drawn from an injected random
    source.
    """

    name = "fault"
    Config = FaultConfig

    def __init__(self, config: FaultConfig, clock: IReactorTime, random: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        self.random = random

    @classmethod
    def fromConfig(cls, config: FaultConfig, context: FilterContext) -> FaultInjection:
        return cls(config, context.clock, context.random)

    def requestHead(self, call: Call) -> Optional[Deferred[None]]:
        delay = self.config.delay
        if delay is not None and self.random() * 100 < delay.percentage:
            call.flags.append(DELAY_INJECTED)
            d: Deferred[None] = Deferred()
            self.clock.callLater(delay.fixedDelay, d.callback, None)
            return d.addCallback(lambda _: self._abort(call))
        return self._abort(call)

    def _abort(self, call: Call) -> None:
        abort = self.config.abort
        if abort is not None and self.random() * 100 < abort.percentage:
            call.respond(abort.httpStatus, b"fault filter abort", flag=FAULT_INJECTED)
        return None


# -- header rules --------------------------------------------------------------------

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
#: Headers the proxy computes itself (framing, connection management): not for rules.
_RESERVED = frozenset(["content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te",
                       "trailer", "proxy-connection"])


def _headerName(name: str) -> bytes:
    if not _TOKEN.match(name):
        raise ValueError(f"{name!r} is not a header name")
    if name.lower() in _RESERVED:
        raise ValueError(f"{name} is a framing header the proxy computes itself")
    return name.encode("ascii")


def _headerValue(name: str, value: str) -> bytes:
    if any(c in value for c in "\r\n\0") or not value.isascii():
        raise ValueError(f"the value of {name} must be printable ASCII on one line")
    return value.encode("ascii")


@attrs.frozen
class HeaderOperations:
    """
    Istio's C{HeaderOperations}: C{set} replaces, C{add} appends, C{remove} drops.
    """

    set: Dict[str, str] = attrs.field(factory=dict)
    add: Dict[str, str] = attrs.field(factory=dict)
    remove: List[str] = attrs.field(factory=list)

    def compiled(self) -> Tuple[List[Tuple[bytes, bytes]], List[Tuple[bytes, bytes]], List[bytes]]:
        """
        The operations as bytes, checked.

        @raise ValueError: a bad name or value.
        """
        return ([(_headerName(n), _headerValue(n, v)) for n, v in self.set.items()],
                [(_headerName(n), _headerValue(n, v)) for n, v in self.add.items()],
                [_headerName(n) for n in self.remove])


@attrs.frozen
class HeadersConfig:
    """
    Operations on the request going up and the response coming back.
    """

    request: HeaderOperations = HeaderOperations()
    response: HeaderOperations = HeaderOperations()


def _apply(headers: List[Tuple[bytes, bytes]], ops: Tuple[Any, Any, Any]) -> None:
    sets, adds, removes = ops
    for name in removes:
        removeHeader(headers, name)
    for name, value in sets:
        removeHeader(headers, name)
        headers.append((name, value))
    headers.extend(adds)


class HeaderRules(Filter):
    """
    Adds, sets and removes request and response headers.  Framing and connection
    headers are refused in the configuration: the proxy frames from its own parse.
    """

    name = "headers"
    Config = HeadersConfig

    def __init__(self, config: HeadersConfig) -> None:
        self.request = config.request.compiled()
        self.response = config.response.compiled()

    @classmethod
    def fromConfig(cls, config: HeadersConfig, context: FilterContext) -> HeaderRules:
        return cls(config)

    def requestHead(self, call: Call) -> None:
        _apply(call.headers, self.request)

    def responseHead(self, call: Call) -> None:
        _apply(call.responseHeaders, self.response)


# -- authorization -------------------------------------------------------------------


def normalizePath(path: bytes) -> bytes:
    """
    The path part of a request target as authorization sees it (Istio's
    C{DECODE_AND_MERGE_SLASHES}, less the decoding of C{%2F}): no query, percent
    escapes of unreserved characters decoded, slashes merged, dot segments resolved.
    """
    path = path.split(b"?", 1)[0].split(b"#", 1)[0]

    def decode(m: Any) -> bytes:
        c = int(m.group(1), 16)
        ch = bytes([c])
        return ch if (ch.isalnum() and c < 128) or ch in b"-._~" else m.group(0).upper()

    path = re.sub(rb"%([0-9A-Fa-f]{2})", decode, path)
    out: List[bytes] = []
    for segment in path.split(b"/"):
        if segment in (b"", b"."):
            continue
        if segment == b"..":
            if out:
                out.pop()
            continue
        out.append(segment)
    normal = b"/" + b"/".join(out)
    if path.endswith(b"/") and out:
        normal += b"/"
    return normal


def _pattern(value: str) -> Callable[[str], bool]:
    """
    Istio's string match: exact, C{prefix*}, C{*suffix} or C{*}.
    """
    if value == "*":
        return lambda s: True
    if value.endswith("*"):
        prefix = value[:-1]
        return lambda s: s.startswith(prefix)
    if value.startswith("*"):
        suffix = value[1:]
        return lambda s: s.endswith(suffix)
    return lambda s: s == value


def _anyOf(values: List[str]) -> Optional[Callable[[str], bool]]:
    if not values:
        return None
    tests = [_pattern(v) for v in values]
    return lambda s: any(t(s) for t in tests)


@attrs.frozen
class AuthorizationRule:
    """
    One rule: every part given must match (Istio's C{from.source}, C{to.operation} and
    C{when}, flattened).  Principals are SPIFFE ids with or without C{spiffe://};
    paths match the normalized path (L{normalizePath}); each value may be exact,
    C{prefix*}, C{*suffix} or C{*}.
    """

    principals: List[str] = attrs.field(factory=list)
    notPrincipals: List[str] = attrs.field(factory=list)
    methods: List[str] = attrs.field(factory=list)
    paths: List[str] = attrs.field(factory=list)
    notPaths: List[str] = attrs.field(factory=list)
    headers: Dict[str, List[str]] = attrs.field(factory=dict)


def _principal(value: str) -> str:
    return value[len("spiffe://"):] if value.startswith("spiffe://") else value


class _Rule:
    def __init__(self, rule: AuthorizationRule) -> None:
        self.principals = _anyOf([_principal(p) for p in rule.principals])
        self.notPrincipals = _anyOf([_principal(p) for p in rule.notPrincipals])
        self.methods = frozenset(m.upper().encode("ascii") for m in rule.methods)
        self.paths = _anyOf(rule.paths)
        self.notPaths = _anyOf(rule.notPaths)
        self.headers = [(_headerName(n).lower(), _anyOf(vs) or (lambda s: True)) for n, vs in rule.headers.items()]

    def matches(self, call: Call, path: str) -> bool:
        principal = _principal(call.peerPrincipal)
        if self.principals is not None and not (principal and self.principals(principal)):
            return False
        if self.notPrincipals is not None and principal and self.notPrincipals(principal):
            return False
        if self.methods and call.method not in self.methods:
            return False
        if self.paths is not None and not self.paths(path):
            return False
        if self.notPaths is not None and self.notPaths(path):
            return False
        for name, test in self.headers:
            values = [v.decode("latin-1") for (n, v) in call.headers if n.lower() == name]
            if not any(test(v) for v in values):
                return False
        return True


@attrs.frozen
class AuthorizationConfig:
    """
    Istio's C{AuthorizationPolicy} on one workload: with C{ALLOW}, a request that
    matches no rule is denied; with C{DENY}, one that matches any rule is.
    """

    rules: List[AuthorizationRule]
    action: str = attrs.field(default="ALLOW", validator=attrs.validators.in_(["ALLOW", "DENY"]))


class Authorization(Filter):
    """
    Allows or denies on HTTP attributes; denied is 403 C{RBAC: access denied} with
    flag C{RBAC}, as Envoy's RBAC filter answers.
    """

    name = "authorization"
    Config = AuthorizationConfig

    def __init__(self, config: AuthorizationConfig) -> None:
        self.allow = config.action == "ALLOW"
        self.rules = [_Rule(r) for r in config.rules]

    @classmethod
    def fromConfig(cls, config: AuthorizationConfig, context: FilterContext) -> Authorization:
        return cls(config)

    def requestHead(self, call: Call) -> None:
        path = normalizePath(call.path).decode("latin-1")
        matched = any(rule.matches(call, path) for rule in self.rules)
        if matched != self.allow:
            call.respond(403, b"RBAC: access denied", flag=UNAUTHORIZED)
        return None


# -- JWT -----------------------------------------------------------------------------

#: Signature algorithms accepted (asymmetric only: a JWKS holds public keys; never
#: C{none}, never HMAC with a public key as the secret).
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


@attrs.frozen
class ClaimToHeader:
    """
    Send the claim C{claim} upstream in the header C{header}.
    """

    header: str
    claim: str


def _oneJwksSource(instance: Any, attribute: Any, value: Any) -> None:
    given = [n for n in ("jwks", "jwksFile", "jwksUri") if getattr(instance, n) is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of jwks, jwksFile and jwksUri")


@attrs.frozen
class JwtConfig:
    """
    Istio's C{RequestAuthentication} C{jwtRules} entry (one issuer).

    @ivar issuer: the C{iss} a token must have.
    @ivar audiences: one of them must be in C{aud} (empty: C{aud} is not checked).
    @ivar jwks: the JWKS inline (JSON text), or
    @ivar jwksFile: a file holding it (read when the configuration loads), or
    @ivar jwksUri: an C{http(s)} URL it is fetched from, cached C{jwksCacheDuration}
        seconds, refreshed in the background.
    @ivar forwardOriginalToken: keep C{Authorization} on the request going up.
    @ivar outputPayloadToHeader: send the verified payload up, base64url JSON, in this
        header.
    @ivar outputClaimToHeaders: send single claims up in headers.
    @ivar requireToken: a request without a token is refused too (Istio leaves that to
        an C{AuthorizationPolicy}; Envoy's C{requires}).
    @ivar clockSkew: seconds of leeway on C{exp} and C{nbf}.
    """

    issuer: str
    audiences: List[str] = attrs.field(factory=list)
    jwks: Optional[str] = attrs.field(default=None)
    jwksFile: Optional[str] = None
    jwksUri: Optional[str] = attrs.field(default=None, validator=_oneJwksSource)
    jwksCacheDuration: Seconds = attrs.field(default=Seconds(600.0), validator=_positive)
    forwardOriginalToken: bool = False
    outputPayloadToHeader: Optional[str] = None
    outputClaimToHeaders: List[ClaimToHeader] = attrs.field(factory=list)
    requireToken: bool = False
    clockSkew: Seconds = Seconds(60.0)


def parseJwks(data: bytes, where: str) -> jwt.PyJWKSet:
    """
    A JWKS document's usable keys.

    @raise ValueError: naming C{where}, when it is not a JWKS with a usable key.
    """
    try:
        return jwt.PyJWKSet.from_dict(json.loads(data))
    except (ValueError, TypeError, AttributeError, jwt.PyJWTError) as e:
        raise ValueError(f"{where} is not a usable JWKS ({e})")


class RemoteJwks:
    """
    A JWKS fetched from a URL: cached C{cacheDuration} seconds, then fetched again in
    the background while the old keys serve; a failed fetch keeps the old keys and is
    tried again a second later (Envoy's C{failed_refetch_duration}).  Requests that
    come before the first keys wait for them.
    """

    retryAfter = 1.0

    def __init__(self, url: str, fetch: Callable[[str], Deferred[bytes]], clock: IReactorTime,
                 cacheDuration: float, log: Logger) -> None:
        self.url = url
        self.fetch = fetch
        self.clock = clock
        self.cacheDuration = cacheDuration
        self.log = log
        self.keys: Optional[jwt.PyJWKSet] = None
        self.expires = 0.0
        self.fetching: Optional[Deferred[None]] = None
        self.fetches = 0
        self.failures = 0

    def current(self) -> Deferred[Optional[jwt.PyJWKSet]]:
        """
        The keys: at once when cached, else when the fetch under way ends (C{None} if
        it failed).  A stale cache starts a refresh and answers with the old keys.
        """
        now = self.clock.seconds()
        if self.keys is not None:
            if now >= self.expires and self.fetching is None:
                self.refresh()
            return succeed(self.keys)
        if self.fetching is None:
            if now < self.expires:
                return succeed(None)
            self.refresh()
            if self.fetching is None:
                return succeed(self.keys)
        waiter: Deferred[Optional[jwt.PyJWKSet]] = Deferred()
        self.fetching.addBoth(lambda _: waiter.callback(self.keys))  # type: ignore[union-attr]
        return waiter

    def refresh(self) -> None:
        """
        Fetch the JWKS now (unless a fetch is under way).
        """
        if self.fetching is not None:
            return
        self.fetches += 1

        fetching: Deferred[None] = Deferred()
        self.fetching = fetching

        def got(body: bytes) -> None:
            self.keys = parseJwks(body, self.url)
            self.expires = self.clock.seconds() + self.cacheDuration

        def failed(failure: Any) -> None:
            self.failures += 1
            self.expires = self.clock.seconds() + self.retryAfter
            self.log.warn("JWKS fetch from {url} failed: {reason}", url=self.url, reason=failure.getErrorMessage())

        def done(_: Any) -> None:
            self.fetching = None
            fetching.callback(None)

        self.fetch(self.url).addCallback(got).addErrback(failed).addBoth(done)


class JwtAuthentication(Filter):
    """
    Verifies C{Authorization: Bearer TOKEN} with PyJWT against the JWKS: signature
    (asymmetric algorithms only), C{iss}, C{aud}, C{exp} and C{nbf} against the
    injected clock.  A request without a token passes (unless C{requireToken}); one
    with a bad token gets 401, C{WWW-Authenticate: Bearer realm=..., error="invalid_token"}
    and flag C{UAEX}.  The output headers are removed from every request first, so a
    client can never forge them.
    """

    name = "jwt"
    Config = JwtConfig

    def __init__(self, config: JwtConfig, clock: IReactorTime, keys: Any, log: Logger) -> None:
        self.config = config
        self.clock = clock
        #: a PyJWKSet, or a L{RemoteJwks}
        self.keys = keys
        self.log = log
        self.outputs = [_headerName(h) for h in
                        ([config.outputPayloadToHeader] if config.outputPayloadToHeader else [])
                        + [c.header for c in config.outputClaimToHeaders]]

    @classmethod
    def fromConfig(cls, config: JwtConfig, context: FilterContext) -> JwtAuthentication:
        keys: Any
        if config.jwks is not None:
            keys = parseJwks(config.jwks.encode("utf-8"), "jwks")
        elif config.jwksFile is not None:
            try:
                with open(config.jwksFile, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise ValueError(f"jwksFile: cannot read {config.jwksFile!r}: {e.strerror}")
            keys = parseJwks(data, f"jwksFile {config.jwksFile!r}")
        else:
            uri = config.jwksUri or ""
            if not uri.startswith(("http://", "https://")):
                raise ValueError(f"jwksUri: {uri!r} is not an http or https URL")
            keys = RemoteJwks(uri, context.fetcher(), context.clock, config.jwksCacheDuration, context.log)
            keys.refresh()
        return cls(config, context.clock, keys, context.log)

    def requestHead(self, call: Call) -> Optional[Deferred[None]]:
        for name in self.outputs:
            removeHeader(call.headers, name)
        tokens = [v for (n, v) in call.headers if n.lower() == b"authorization"]
        bearer = [v[7:].strip() for v in tokens if v[:7].lower() == b"bearer "]
        if not bearer:
            if self.config.requireToken:
                self._deny(call, b"Jwt is missing", None)
            return None
        if len(bearer) > 1 or len(tokens) > 1:
            self._deny(call, b"Jwt verification fails", "more than one token")
            return None
        token = bearer[0]
        keys = self.keys
        if isinstance(keys, RemoteJwks):
            return keys.current().addCallback(self._verify, call, token)
        self._verify(keys, call, token)
        return None

    def _verify(self, keys: Optional[jwt.PyJWKSet], call: Call, token: bytes) -> None:
        if keys is None:
            self._deny(call, b"Jwks remote fetch is failed", "no JWKS")
            return
        config = self.config
        try:
            header = jwt.get_unverified_header(token)
            alg = header.get("alg")
            if alg not in ALGORITHMS:
                raise jwt.InvalidAlgorithmError(f"algorithm {alg!r} is not accepted")
            kid = header.get("kid")
            candidates = [k for k in keys.keys if kid is None or k.key_id == kid]
            if not candidates:
                raise jwt.InvalidKeyError(f"no key {kid!r} in the JWKS")
            payload = None
            error: Exception = jwt.InvalidSignatureError("no key verifies it")
            for key in candidates:
                try:
                    payload = jwt.decode(
                        token, key, algorithms=[alg], issuer=config.issuer,
                        audience=config.audiences or None,
                        options={"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                                 "verify_aud": bool(config.audiences), "require": ["iss"]})
                    break
                except (jwt.InvalidSignatureError, jwt.InvalidKeyError, jwt.InvalidAlgorithmError,
                        jwt.PyJWKError) as e:
                    error = e
            if payload is None:
                raise error
            now = self.clock.seconds()
            exp = payload.get("exp")
            if exp is not None and (not isinstance(exp, (int, float)) or now > exp + config.clockSkew):
                raise jwt.ExpiredSignatureError("Jwt is expired")
            nbf = payload.get("nbf")
            if nbf is not None and (not isinstance(nbf, (int, float)) or now + config.clockSkew < nbf):
                raise jwt.ImmatureSignatureError("Jwt is not yet valid")
        except (jwt.PyJWTError, ValueError, TypeError) as e:
            self._deny(call, b"Jwt verification fails", str(e))
            return
        if not config.forwardOriginalToken:
            removeHeader(call.headers, b"authorization")
        if config.outputPayloadToHeader:
            encoded = base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).rstrip(b"=")
            call.headers.append((config.outputPayloadToHeader.encode("ascii"), encoded))
        for rule in config.outputClaimToHeaders:
            value = payload.get(rule.claim)
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, (str, int, float)):
                text = str(value)
            else:
                continue
            if text.isprintable() and text.isascii():
                call.headers.append((rule.header.encode("ascii"), text.encode("ascii")))
        call.metadata["jwt"] = payload

    def _deny(self, call: Call, body: bytes, why: Optional[str]) -> None:
        realm = f"http://{call.authority}{normalizePath(call.path).decode('latin-1')}".replace('"', "")
        value = f'Bearer realm="{realm}"' + (', error="invalid_token"' if why is not None else "")
        if why is not None:
            self.log.info("jwt: token refused for {method} {path}: {why}",
                          method=call.method.decode("latin-1"), path=call.path.decode("latin-1"), why=why)
        call.respond(401, body, [(b"WWW-Authenticate", value.encode("latin-1"))], flag=UNAUTHENTICATED)


#: The built-in filters by name, as the configuration file names them.
BUILTINS: Dict[str, Any] = {
    "local_ratelimit": LocalRateLimit,
    "fault": FaultInjection,
    "headers": HeaderRules,
    "authorization": Authorization,
    "jwt": JwtAuthentication,
}
