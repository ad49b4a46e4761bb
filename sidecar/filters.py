# -*- test-case-name: tests.test_filters -*-
"""
Python filters on the request path, in the manner of Envoy's HTTP filters and
Pingora's phases.

A filter provides L{IFilter}; the easiest way is to subclass L{Filter} and override
the hooks you need (the chain calls only the hooks a filter overrides, so an unused
phase costs nothing)::

    from sidecar.filters import Filter

    class RequireTeamHeader(Filter):
        name = "require-team"

        def requestHead(self, call):
            if call.header(b"x-team") is None:
                return call.respond(403, b"who are you?\\n", flag="RBAC")
            call.setHeader(b"x-checked-by", b"sidecar")

        def responseHead(self, call):
            call.responseHeaders.append((b"x-served-by", b"sidecar"))

The phases, in order, for every exchange of both front doors:

  1. L{IFilter.requestHead}: may change the request's headers, choose the upstream
     (C{call.upstream}), or answer locally (C{call.respond(...)}); may return a
     L{Deferred} (an asynchronous call to an auth service, say): the exchange waits,
     without blocking the reactor, holding the client's body with backpressure;
  2. L{IFilter.requestBody} (opt in with C{wantsRequestBody = True}): each chunk of
     the request body, returning the bytes to send on (synchronous);
  3. L{IFilter.responseHead}: may change the response status and headers, or replace
     the response (C{call.respond(...)}); may return a L{Deferred}: the upstream is
     paused meanwhile;
  4. L{IFilter.responseBody} (opt in with C{wantsResponseBody = True}): each chunk of
     the response body, returning the bytes to send on (synchronous);
  5. L{IFilter.logged}: the exchange's immutable L{Record}, once, however it ended.

Filters run in the configured order for requests, and in reverse order for
responses (as Envoy's encoder filters do).  A filter that raises, or whose
L{Deferred} fails, ends the exchange with a 500 (or a cut connection once the
response has started) with flag C{FE}, a record, and a log line naming the filter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface, implementer

if TYPE_CHECKING:  # pragma: no cover
    from sidecar.record import Record

Header = Tuple[bytes, bytes]

#: The response flag of an exchange ended by a failing filter (the sidecar's own; Envoy
#: has no flag for a filter's exception).
FILTER_ERROR = "FE"


class IFilter(Interface):
    """
    A filter on the request path.  Every hook is optional for a L{Filter} subclass.
    """

    name = Attribute("A short name for logs and configuration.")
    wantsRequestBody = Attribute("Whether L{requestBody} is called (default False).")
    wantsResponseBody = Attribute("Whether L{responseBody} is called (default False).")

    def requestHead(call: Call) -> Optional[Deferred[Any]]:
        """
        The request head arrived.  Change C{call}'s headers, set C{call.upstream},
        or answer with C{call.respond}; return C{None} or a L{Deferred} to wait for.
        """

    def requestBody(call: Call, data: bytes) -> bytes:
        """
        A chunk of the request body: return what to send on (C{b""} to hold nothing).
        """

    def responseHead(call: Call) -> Optional[Deferred[Any]]:
        """
        The service's response head arrived: C{call.status} and
        C{call.responseHeaders} may be changed, or the response replaced with
        C{call.respond}; return C{None} or a L{Deferred} to wait for.
        """

    def responseBody(call: Call, data: bytes) -> bytes:
        """
        A chunk of the response body: return what to send on.
        """

    def logged(record: Record) -> None:
        """
        The exchange ended and left C{record}.
        """


@implementer(IFilter)
class Filter:
    """
    A filter that does nothing: subclass it and override the hooks you need.
    """

    name = "filter"
    wantsRequestBody = False
    wantsResponseBody = False

    def requestHead(self, call: Call) -> Optional[Deferred[Any]]:
        return None

    def requestBody(self, call: Call, data: bytes) -> bytes:
        return data

    def responseHead(self, call: Call) -> Optional[Deferred[Any]]:
        return None

    def responseBody(self, call: Call, data: bytes) -> bytes:
        return data

    def logged(self, record: Record) -> None:
        return None


class LocalReply:
    """
    A response made by a filter instead of the service's.
    """

    __slots__ = ("status", "body", "headers", "flag")

    def __init__(self, status: int, body: bytes, headers: Sequence[Header], flag: Optional[str]) -> None:
        self.status = status
        self.body = body
        self.headers = list(headers)
        self.flag = flag


class Call:
    """
    What filters see of one exchange, and what they may change.

    @ivar method: the request method (bytes).
    @ivar path: the request target as it goes upstream (bytes); may be changed (the
        record keeps the client's).
    @ivar authority: the C{Host} (text).
    @ivar headers: the request headers going upstream, a list of C{(name, value)}
        byte pairs in order (change it in place, or use L{header}/L{setHeader}).
    @ivar clientAddress: C{ip:port} of the client.
    @ivar peerPrincipal: the client's SPIFFE id under mutual TLS, else C{""}.
    @ivar upstream: the name of the upstream to use (C{None}: the default one).
    @ivar status: the response status (in the response phases).
    @ivar responseHeaders: the response headers going to the client (in the response
        phases), without framing.
    @ivar metadata: a dict for filters to share values along one exchange.
    @ivar route: the name of the route the request took, or C{None}.
    @ivar reply: the local reply asked for with L{respond}, if any.
    """

    __slots__ = ("method", "path", "authority", "headers", "clientAddress", "peerPrincipal", "upstream",
                 "status", "responseHeaders", "metadata", "reply", "flags", "route")

    def __init__(self, method: bytes, path: bytes, authority: str, headers: List[Header],
                 clientAddress: str, peerPrincipal: str) -> None:
        self.method = method
        self.path = path
        self.authority = authority
        self.headers = headers
        self.clientAddress = clientAddress
        self.peerPrincipal = peerPrincipal
        self.upstream: Optional[str] = None
        self.status = 0
        self.responseHeaders: List[Header] = []
        self.metadata: Dict[str, Any] = {}
        self.reply: Optional[LocalReply] = None
        #: Flags a filter adds to the record without answering (e.g. C{DI}, a delay).
        self.flags: List[str] = []
        #: The name of the route the request took (L{sidecar.routes}), or C{None}.
        self.route: Optional[str] = None

    def header(self, name: bytes) -> Optional[bytes]:
        """
        The first request header called C{name} (any case), or C{None}.
        """
        lower = name.lower()
        for n, v in self.headers:
            if n.lower() == lower:
                return v
        return None

    def setHeader(self, name: bytes, value: bytes) -> None:
        """
        Replace every request header called C{name} (any case) by one with C{value}.
        """
        removeHeader(self.headers, name)
        self.headers.append((name, value))

    def removeHeader(self, name: bytes) -> None:
        """
        Remove every request header called C{name} (any case).
        """
        removeHeader(self.headers, name)

    def respond(self, status: int, body: bytes = b"", headers: Sequence[Header] = (),
                flag: Optional[str] = None) -> None:
        """
        Answer locally with C{status} and C{body} (text/plain unless C{headers} say
        otherwise); C{flag} goes into the record (C{RL}, C{RBAC}, C{FI}, ...).
        Returns C{None}, so a hook can C{return call.respond(...)}.
        """
        self.reply = LocalReply(status, body, headers, flag)


def removeHeader(headers: List[Header], name: bytes) -> None:
    """
    Remove every header called C{name} (any case) from C{headers}, in place.
    """
    lower = name.lower()
    headers[:] = [(n, v) for (n, v) in headers if n.lower() != lower]


class FilterFailed(Exception):
    """
    A filter raised, or its L{Deferred} failed.

    @ivar filter: the filter's name.
    """

    def __init__(self, name: str, reason: Any) -> None:
        Exception.__init__(self, f"filter {name!r} failed: {reason}")
        self.filter = name
        self.reason = reason


def _overrides(f: Any, hook: str) -> bool:
    """
    Whether C{f}'s C{hook} does something (is not L{Filter}'s no-op).
    """
    method = getattr(type(f), hook, None)
    if method is None:
        return callable(getattr(f, hook, None))
    return method is not getattr(Filter, hook)


class FilterChain:
    """
    The configured filters, in order, with each phase's list worked out once.

    @ivar requestHeads: the filters whose L{IFilter.requestHead} runs, in order.
    @ivar responseHeads: those whose L{IFilter.responseHead} runs, in reverse order.
    @ivar requestBodies: those that opted in to request body chunks.
    @ivar responseBodies: those that opted in to response body chunks (reverse order).
    @ivar loggers: those whose L{IFilter.logged} runs.
    @ivar router: the L{sidecar.routes.Router} that picks each request's route (and
        with it the chain the request runs) before any filter, or C{None}.
    @ivar pools: the upstream pools that C{call.upstream} names, when this chain comes
        with its own (a configuration file's); C{None}: the engine's.
    """

    def __init__(self, filters: Sequence[Any], router: Any = None,
                 pools: Optional[Dict[str, Any]] = None) -> None:
        self.router = router
        self.pools = pools
        for f in filters:
            if not IFilter.providedBy(f):
                raise TypeError(f"{f!r} does not provide IFilter (subclass sidecar.filters.Filter)")
        self.filters = list(filters)
        self.requestHeads = [f for f in self.filters if _overrides(f, "requestHead")]
        self.responseHeads = [f for f in reversed(self.filters) if _overrides(f, "responseHead")]
        self.requestBodies = [f for f in self.filters if getattr(f, "wantsRequestBody", False)]
        self.responseBodies = [f for f in reversed(self.filters) if getattr(f, "wantsResponseBody", False)]
        self.loggers = [f for f in self.filters if _overrides(f, "logged")]

    def runHeads(self, filters: Sequence[Any], hook: str, call: Call, done: Callable[[], None],
                 failed: Callable[[FilterFailed], None], start: int = 0) -> Optional[Deferred[None]]:
        """
        Run C{hook} of each of C{filters} (from C{start}) on C{call}, in order,
        stopping at the first that answers locally.  Synchronous hooks run at once; at
        the first L{Deferred}, the rest run when it fires.  Calls C{done()} or
        C{failed(FilterFailed)} exactly once; returns C{None} when that already
        happened, else a L{Deferred} that fires when it has.
        """
        for index in range(start, len(filters)):
            f = filters[index]
            try:
                result = getattr(f, hook)(call)
            except Exception as e:
                failed(FilterFailed(getattr(f, "name", repr(f)), e))
                return None
            if result is not None and isinstance(result, Deferred):
                waiter: Deferred[None] = Deferred()

                def resumed(_: Any, index: int = index) -> None:
                    if call.reply is not None:
                        done()
                    else:
                        self.runHeads(filters, hook, call, done, failed, index + 1)
                    waiter.callback(None)

                def broke(failure: Any, f: Any = f) -> None:
                    failed(FilterFailed(getattr(f, "name", repr(f)), failure.getErrorMessage()))
                    waiter.callback(None)

                result.addCallbacks(resumed, broke)
                return waiter
            if call.reply is not None:
                break
        done()
        return None

    def requestBody(self, call: Call, data: bytes) -> bytes:
        """
        Pass a request body chunk through the filters that asked for it.
        """
        for f in self.requestBodies:
            data = f.requestBody(call, data)
        return data

    def responseBody(self, call: Call, data: bytes) -> bytes:
        """
        Pass a response body chunk through the filters that asked for it.
        """
        for f in self.responseBodies:
            data = f.responseBody(call, data)
        return data

    def logged(self, record: Record) -> List[FilterFailed]:
        """
        Give C{record} to the filters that log; returns the failures (a logging filter
        that raises cannot change an exchange that is over).
        """
        failures = []
        for f in self.loggers:
            try:
                f.logged(record)
            except Exception as e:
                failures.append(FilterFailed(getattr(f, "name", repr(f)), e))
        return failures
