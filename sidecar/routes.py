# -*- test-case-name: tests.test_routes -*-
"""
Routes: which upstream, timeout, retry policy and filters a request gets, picked by
its path prefix, method and headers (Envoy's route table, Istio's VirtualService
C{http} routes).

The L{Router} is a step of the engine, run before any filter when a request's head
arrives (L{sidecar.exchange.Exchange.begin}): the first route whose match fits wins;
no match is a 404 with flag C{NR}, as in Envoy.  It costs nothing when no route is
configured (the engine has no router then, or no filters at all).

Retries (L{RetryRule}) follow Envoy's C{retry_policy} with one limit: the proxy does not
keep a copy of a request body once sent, so only requests without a body are tried
again (Envoy buffers bodies up to its buffer limit).  A try is repeated after a connect
failure (C{connect-failure}), a connection closed before the response head
(C{reset}), a response status (C{5xx}, C{gateway-error}: 502, 503, 504,
C{retriable-status-codes}) or a per-try timeout (under C{5xx} and C{gateway-error}),
with Envoy's jittered exponential back-off (25 ms base, 250 ms cap), while the route's
overall timeout has time left and its retry budget allows: at most C{budgetPercent} of
the requests in flight may be retries, and always at least C{minRetryConcurrency}.
When the last allowed try fails, the record says C{URX}.
"""

from __future__ import annotations

import random as _random
from typing import TYPE_CHECKING, Callable, FrozenSet, Optional, Sequence, Tuple

import attrs

from sidecar.filters import Call, FilterChain
from sidecar.record import UPSTREAM_RETRY_LIMIT_EXCEEDED

if TYPE_CHECKING:  # pragma: no cover
    from twisted.internet.interfaces import IReactorTime

    from sidecar.exchange import Exchange

#: The retry-on conditions understood (Envoy's names).
RETRY_ON = frozenset(["connect-failure", "reset", "5xx", "gateway-error", "retriable-status-codes"])

#: Envoy's back-off: a random wait below C{base * 2**n}, at most C{cap}.
BACKOFF_BASE = 0.025
BACKOFF_CAP = 0.25

_GATEWAY_ERRORS = frozenset([502, 503, 504])


@attrs.frozen
class RouteMatch:
    """
    What a request must have to take a route; every part given must fit.

    @ivar prefix: the path starts with it (C{"/"}: every path).
    @ivar methods: the method is one of them (empty: any).
    @ivar headers: C{(name, value)} pairs, names lower-case bytes: the request has the
        header with exactly that value, or, when the value is C{None}, at all.
    """

    prefix: bytes = b"/"
    methods: FrozenSet[bytes] = frozenset()
    headers: Tuple[Tuple[bytes, Optional[bytes]], ...] = ()

    def matches(self, call: Call) -> bool:
        """
        Whether C{call}'s request fits.
        """
        if not call.path.startswith(self.prefix):
            return False
        if self.methods and call.method not in self.methods:
            return False
        for name, value in self.headers:
            found = [v for (n, v) in call.headers if n.lower() == name]
            if not found or (value is not None and value not in found):
                return False
        return True


@attrs.frozen
class RetryPolicy:
    """
    A route's retry policy, as configured.

    @ivar attempts: tries after the first, at most (Envoy's C{num_retries}).
    @ivar retryOn: the conditions (L{RETRY_ON}).
    @ivar perTryTimeout: seconds each try may take to answer, or C{None}: the route's
        timeout for all tries together.
    @ivar retriableStatusCodes: statuses retried under C{retriable-status-codes}.
    @ivar budgetPercent: retries in flight at most, as a percentage of the requests
        in flight (Envoy's C{retry_budget}); C{None}: no budget.
    @ivar minRetryConcurrency: retries always allowed in flight, whatever the budget.
    """

    attempts: int = 1
    retryOn: FrozenSet[str] = frozenset(["connect-failure"])
    perTryTimeout: Optional[float] = None
    retriableStatusCodes: FrozenSet[int] = frozenset()
    budgetPercent: Optional[float] = None
    minRetryConcurrency: int = 3

    def wants(self, kind: str, status: int) -> bool:
        """
        Whether a failure of C{kind} (C{connect-failure}, C{reset}, C{timeout},
        C{status}) with C{status} is one this policy retries.
        """
        on = self.retryOn
        if kind == "status":
            return (("5xx" in on and status >= 500) or ("gateway-error" in on and status in _GATEWAY_ERRORS)
                    or ("retriable-status-codes" in on and status in self.retriableStatusCodes))
        if kind == "connect-failure":
            return bool(on & {"connect-failure", "5xx", "gateway-error"})
        if kind == "reset":
            return bool(on & {"reset", "5xx"})
        if kind == "timeout":
            return bool(on & {"5xx", "gateway-error"})
        return False


class RetryRule:
    """
    A route's retry policy at work: the budget its retries share, the clock, the
    random source of the back-off.

    @ivar active: retries in flight now (the budget counts them).
    @ivar retries: tries made again, in all.
    @ivar overflows: retries the budget refused.
    """

    def __init__(self, policy: RetryPolicy, clock: IReactorTime, requestsActive: Callable[[], int],
                 random: Callable[[], float] = _random.random) -> None:
        self.policy = policy
        self.clock = clock
        self.requestsActive = requestsActive
        self.random = random
        self.active = 0
        self.retries = 0
        self.overflows = 0

    def start(self, exchange: Exchange) -> Retry:
        """
        The retry state of a new exchange on this route.
        """
        return Retry(self, exchange)

    def budgetAllows(self) -> bool:
        """
        Whether one more retry fits in the budget now.
        """
        percent = self.policy.budgetPercent
        if percent is None:
            return True
        limit = max(self.policy.minRetryConcurrency, percent / 100.0 * self.requestsActive())
        return self.active < limit


class Retry:
    """
    One exchange's tries.

    @ivar tries: tries made after the first.
    @ivar deadline: when the route's overall timeout runs out (set when the request was
        first sent whole), or C{None}.
    """

    __slots__ = ("rule", "exchange", "tries", "deadline", "counted")

    def __init__(self, rule: RetryRule, exchange: Exchange) -> None:
        self.rule = rule
        self.exchange = exchange
        self.tries = 0
        self.deadline: Optional[float] = None
        self.counted = False

    def tryTimeout(self, overall: Optional[float]) -> Optional[float]:
        """
        Seconds the current try may wait for its response head: the per-try timeout,
        cut to what is left of C{overall} (counted from the first try).
        """
        now = self.rule.clock.seconds()
        if self.deadline is None and overall:
            self.deadline = now + overall
        perTry = self.rule.policy.perTryTimeout
        if self.deadline is None:
            return perTry
        left = max(self.deadline - now, 0.001)
        return left if perTry is None else min(perTry, left)

    def again(self, kind: str, status: int) -> bool:
        """
        A try failed with C{kind} (and C{status}): when the policy, the attempts left,
        the deadline, the budget and the request allow, start another and return
        C{True}.
        """
        rule = self.rule
        policy = rule.policy
        exchange = self.exchange
        if not policy.wants(kind, status):
            return False
        req = exchange.req
        if not exchange.requestDone or req.chunked or req.contentLength or req.upgrade:
            return False
        if kind == "timeout" and self.deadline is not None and rule.clock.seconds() >= self.deadline - 1e-6:
            return False
        if self.tries >= policy.attempts:
            if self.tries:
                exchange.flags.append(UPSTREAM_RETRY_LIMIT_EXCEEDED)
            return False
        if not rule.budgetAllows():
            rule.overflows += 1
            return False
        self.tries += 1
        rule.retries += 1
        if not self.counted:
            self.counted = True
            rule.active += 1
        delay = rule.random() * min(BACKOFF_CAP, BACKOFF_BASE * (2 ** (self.tries - 1)))
        exchange.retryUpstream(delay, fresh=kind != "status")
        return True

    def ended(self) -> None:
        """
        The exchange is over: its retry leaves the budget.
        """
        if self.counted:
            self.counted = False
            self.rule.active -= 1


@attrs.define(eq=False)
class Route:
    """
    One route at work.

    @ivar name: for logs, metrics and C{call.route}.
    @ivar match: which requests take it.
    @ivar upstream: the name of its upstream (C{None}: the default one).
    @ivar timeout: seconds for the response head (C{None}: the engine's; C{0}: none).
    @ivar retry: its retry rule, or C{None}.
    @ivar chain: the filters its requests run (the global ones, then its own).
    """

    name: str
    match: RouteMatch
    upstream: Optional[str]
    timeout: Optional[float]
    retry: Optional[RetryRule]
    chain: FilterChain


class Router:
    """
    Picks a request's route: the first that matches, in order.
    """

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = list(routes)

    def select(self, call: Call) -> Optional[Route]:
        """
        The route C{call}'s request takes, or C{None}.
        """
        for route in self.routes:
            if route.match.matches(call):
                return route
        return None
