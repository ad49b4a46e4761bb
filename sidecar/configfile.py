# -*- test-case-name: tests.test_configfile -*-
"""
The configuration file (C{--config FILE}, YAML): its schema, its loading, and its hot
reload.

The file holds two kinds of keys:

  - start-up keys, the flags' own (L{FLAG_KEYS}: C{listen}, C{upstream}, C{engine},
    ...): they become the same frozen L{sidecar.config.ProxyConfig} the flags build,
    through the flags' own checks (L{sidecar.tap}); a flag given on the command line
    that says otherwise is a start-up error naming both.  They cannot change without a
    restart: a reload that changes one is refused;
  - the request path: named C{upstreams}, the global C{filters} and the C{routes}
    (each with its match, upstream, timeout, retry policy and filters).  These reload.

Every part is checked by a schema (frozen C{attrs} classes structured by cattrs, no
unknown keys), then built (filters made, upstream names resolved); the first problem
is one sentence naming the key, e.g. C{sidecar.yaml: routes[1].retry.attempts: invalid
value for type, expected int.}

L{ConfigWatcher} is the reload, on the template of
L{sidecar.tls.RotatingServerContext.check}: poll the file on the clock, and when it
changed, read, validate, build and swap; keep the old configuration on any failure
(logged once per version, counted).  An exchange keeps the chain and route it started
with (L{sidecar.exchange.Exchange.chain}), so in-flight requests finish on the old
configuration.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import entry_points
from typing import Any, Callable, Dict, List, Optional, Tuple

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError
from cattrs.v import format_exception
from twisted.logger import Logger

from sidecar.builtins import BUILTINS, FilterContext, Seconds, seconds
from sidecar.config import UpstreamConfig
from sidecar.filters import FilterChain, IFilter
from sidecar.routes import RETRY_ON, Route, RouteMatch, Router, RetryPolicy, RetryRule

#: The entry point group of installed filters (C{pip install}ed packages).
ENTRY_POINT_GROUP = "sidecar.filters"

#: Start-up keys of the file, and the flag each one is.
FLAG_KEYS: Dict[str, str] = {
    "listen": "listen",
    "upstream": "upstream",
    "engine": "engine",
    "admin": "admin",
    "health": "health",
    "serverHeader": "server-header",
    "accessLog": "access-log",
    "logFormat": "log-format",
    "upstreamTimeout": "upstream-timeout",
    "connectTimeout": "connect-timeout",
    "maxRequestBytes": "max-request-bytes",
    "tlsListen": "tls-listen",
}


class ConfigError(Exception):
    """
    The file cannot be used; the message is one sentence naming the file and the key.
    """


# -- the schema ----------------------------------------------------------------------


class FlagValue(str):
    """
    A start-up key's value, as the flag would be written (a port may be a number).
    """


@attrs.frozen
class FilterSpec:
    """
    One filter: its C{name} (built in, or an installed entry point) and C{config}.
    """

    name: str
    config: Dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class MatchSpec:
    """
    A route's match: path C{prefix}, C{methods}, C{headers} (a value of C{null}: the
    header is present).
    """

    prefix: str = "/"
    methods: List[str] = attrs.field(factory=list)
    headers: Dict[str, Optional[str]] = attrs.field(factory=dict)


def _retryOn(instance: Any, attribute: Any, value: List[str]) -> None:
    unknown = [v for v in value if v not in RETRY_ON]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not one of {', '.join(sorted(RETRY_ON))}")


@attrs.frozen
class RetrySpec:
    """
    A route's retry policy (L{sidecar.routes.RetryPolicy}); C{retryOn} is a list or
    Istio's comma-separated text.
    """

    attempts: int = attrs.field(default=1, validator=attrs.validators.ge(0))
    retryOn: List[str] = attrs.field(factory=lambda: ["connect-failure"], validator=_retryOn)
    perTryTimeout: Optional[Seconds] = None
    retriableStatusCodes: List[int] = attrs.field(factory=list)
    budgetPercent: Optional[float] = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.and_(
            attrs.validators.ge(0), attrs.validators.le(100))))
    minRetryConcurrency: int = attrs.field(default=3, validator=attrs.validators.ge(0))


@attrs.frozen
class RouteSpec:
    """
    One route.
    """

    name: str
    match: MatchSpec = MatchSpec()
    upstream: Optional[str] = None
    timeout: Optional[Seconds] = None
    retry: Optional[RetrySpec] = None
    filters: List[FilterSpec] = attrs.field(factory=list)


@attrs.frozen
class UpstreamSpec:
    """
    A named upstream: C{address} is C{PORT}, C{HOST:PORT} or C{[V6]:PORT}.
    """

    address: FlagValue
    connectTimeout: Seconds = Seconds(5.0)
    idleTimeout: Seconds = Seconds(4.0)
    maxConnections: int = attrs.field(default=1024, validator=attrs.validators.ge(1))
    maxPending: int = attrs.field(default=1024, validator=attrs.validators.ge(0))


@attrs.frozen
class FileConfig:
    """
    The whole file.  C{version} is shown by C{/config_dump} (default: the start of the
    file's SHA-256).
    """

    version: Optional[FlagValue] = None
    listen: Optional[FlagValue] = None
    upstream: Optional[FlagValue] = None
    engine: Optional[FlagValue] = None
    admin: Optional[FlagValue] = None
    health: Optional[FlagValue] = None
    serverHeader: Optional[FlagValue] = None
    accessLog: Optional[FlagValue] = None
    logFormat: Optional[FlagValue] = None
    upstreamTimeout: Optional[FlagValue] = None
    connectTimeout: Optional[FlagValue] = None
    maxRequestBytes: Optional[FlagValue] = None
    tlsListen: Optional[FlagValue] = None
    upstreams: Dict[str, UpstreamSpec] = attrs.field(factory=dict)
    filters: List[FilterSpec] = attrs.field(factory=list)
    routes: List[RouteSpec] = attrs.field(factory=list)

    def flagValues(self) -> Dict[str, str]:
        """
        The start-up keys the file sets, by key.
        """
        return {key: str(getattr(self, key)) for key in FLAG_KEYS if getattr(self, key) is not None}


def _strict(kind: type, names: str) -> Callable[[Any, Any], Any]:
    def structure(value: Any, _: Any) -> Any:
        if isinstance(value, bool) and kind is not bool:
            raise ValueError(f"expected {names}")
        if kind is float and isinstance(value, int):
            return float(value)
        if not isinstance(value, kind):
            raise ValueError(f"expected {names}")
        return value
    return structure


def _flagValue(value: Any, _: Any) -> FlagValue:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("expected text or a number")
    return FlagValue(value)


def _seconds(value: Any, _: Any) -> Seconds:
    return Seconds(seconds(value))


def _retryOnText(value: Any, _: Any) -> List[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of conditions, or them separated by commas")
    return list(value)


def converter() -> cattrs.Converter:
    """
    The file's cattrs converter: unknown keys refused, no silent coercion (C{"1"} is
    not a number, C{1} is not text, except where a flag's value may be a port).
    """
    c = cattrs.Converter(forbid_extra_keys=True)
    c.register_structure_hook(str, _strict(str, "text"))
    c.register_structure_hook(int, _strict(int, "a whole number"))
    c.register_structure_hook(float, _strict(float, "a number"))
    c.register_structure_hook(bool, _strict(bool, "true or false"))
    c.register_structure_hook(FlagValue, _flagValue)
    c.register_structure_hook(Seconds, _seconds)
    c.register_structure_hook(Any, lambda v, _: v)
    retryOn = c.get_structure_hook(RetrySpec)

    def retrySpec(value: Any, cls: Any) -> RetrySpec:
        if isinstance(value, dict) and "retryOn" in value:
            value = dict(value, retryOn=_retryOnText(value["retryOn"], None))
        return retryOn(value, cls)

    c.register_structure_hook(RetrySpec, retrySpec)
    return c


def _explain(error: BaseException, where: str) -> str:
    """
    The first problem cattrs found, as C{KEY: what}, the key in the file's notation.
    """
    def formatted(exc: BaseException, type: Any) -> str:
        if isinstance(exc, ValueError) and exc.args and isinstance(exc.args[0], str):
            return exc.args[0]
        return format_exception(exc, type)

    try:
        messages = cattrs.transform_error(error, path="$", format_exception=formatted)
    except Exception:  # pragma: no cover - a cattrs change
        messages = [str(error)]
    message = messages[0] if messages else str(error)
    what, _, path = message.rpartition(" @ ")
    if not _:
        what, path = message, "$"
    key = path[1:].lstrip(".")
    if where:
        key = where + ("." + key if key and not key.startswith("[") else key)
    what = what.replace("invalid value for type, ", "")
    return f"{key or 'the file'}: {what}"


def structure(data: Any, cls: type, where: str = "") -> Any:
    """
    C{data} as C{cls}, checked.

    @raise ConfigError: C{KEY: what is wrong}, the key under C{where}.
    """
    try:
        return converter().structure(data, cls)
    except (ClassValidationError, IterableValidationError, ForbiddenExtraKeysError, ValueError, TypeError,
            KeyError) as e:
        raise ConfigError(_explain(e, where))


def parse(text: bytes, path: str) -> Tuple[FileConfig, Dict[str, Any]]:
    """
    The file's bytes as a L{FileConfig} (and the plain data, for C{/config_dump}).

    @raise ConfigError: one sentence naming C{path} and the key.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        data = YAML(typ="safe", pure=True).load(text)
    except YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}.")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the file must be a mapping of keys (listen, upstreams, filters, routes...).")
    try:
        config = structure(data, FileConfig)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}.")
    return config, json.loads(json.dumps(data, default=str))


# -- building ------------------------------------------------------------------------


def installedFilters() -> Dict[str, Any]:
    """
    The filters installed packages declare in the C{sidecar.filters} entry point
    group, by name (not loaded yet).
    """
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def makeFilter(spec: FilterSpec, context: FilterContext, where: str,
               installed: Optional[Dict[str, Any]] = None) -> Any:
    """
    The filter C{spec} names, built with its config: a built-in one, else an installed
    one.  An installed filter class with a C{Config} attrs class gets it structured
    (and C{fromConfig(config, context)} when it has one); one with only
    C{fromConfig} gets the plain mapping; otherwise it is called with the mapping as
    keyword arguments.

    @raise ConfigError: naming C{where}.
    """
    factory = BUILTINS.get(spec.name)
    if factory is None:
        installed = installedFilters() if installed is None else installed
        ep = installed.get(spec.name)
        if ep is None:
            known = sorted(BUILTINS) + sorted(installed)
            raise ConfigError(f"{where}.name: no filter named {spec.name!r} (known: {', '.join(known)})")
        try:
            factory = ep.load()
        except Exception as e:
            raise ConfigError(f"{where}.name: the filter {spec.name!r} ({ep.value}) cannot be loaded: {e}")
    try:
        schema = getattr(factory, "Config", None)
        if schema is not None and attrs.has(schema):
            config = structure(spec.config, schema, f"{where}.config")
            made = factory.fromConfig(config, context) if hasattr(factory, "fromConfig") else factory(config)
        elif hasattr(factory, "fromConfig"):
            made = factory.fromConfig(dict(spec.config), context)
        else:
            made = factory(**spec.config)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}.config: {e}")
    if not IFilter.providedBy(made):
        raise ConfigError(f"{where}.name: {spec.name!r} made {made!r}, which does not provide IFilter")
    return made


def parseAddress(value: str) -> Tuple[str, int]:
    """
    C{PORT}, C{HOST:PORT} or C{[V6]:PORT}, as C{--upstream} reads it.

    @raise ValueError: otherwise.
    """
    value = value.strip()
    host, port = "127.0.0.1", value
    if value.startswith("["):
        close = value.find("]")
        if close < 0 or value[close + 1:close + 2] != ":":
            raise ValueError(f"{value!r} is not [IPv6]:PORT")
        host, port = value[1:close], value[close + 2:]
    elif ":" in value:
        host, _, port = value.rpartition(":")
    if not port.isdigit() or not 0 < int(port) <= 65535 or not host:
        raise ValueError(f"{value!r} is not PORT or HOST:PORT with a port from 1 to 65535")
    return host, int(port)


@attrs.define(eq=False)
class Active:
    """
    One built version of the file's request path.

    @ivar version: the file's C{version}, or the start of its SHA-256.
    @ivar digest: the SHA-256 of its bytes.
    @ivar data: the file as plain data.
    @ivar chain: what the engine runs (C{None}: no filters and no routes).
    @ivar pools: the named upstreams' pools.
    @ivar upstreams: their settings, by name.
    @ivar flagValues: the start-up keys it set.
    """

    version: str
    digest: str
    data: Dict[str, Any]
    chain: Optional[FilterChain]
    pools: Dict[str, Any]
    upstreams: Dict[str, UpstreamConfig]
    flagValues: Dict[str, str]


def build(spec: FileConfig, data: Dict[str, Any], digest: str, context: FilterContext,
          makePool: Callable[[UpstreamConfig], Any], requestsActive: Callable[[], int] = lambda: 0,
          reuse: Optional[Active] = None, cliFilters: Tuple[Tuple[str, str], ...] = ()) -> Active:
    """
    Build C{spec}: pools for its upstreams (reusing C{reuse}'s where the settings are
    the same), its filters, its routes.

    @raise ConfigError: the first problem, naming its key.
    """
    upstreams: Dict[str, UpstreamConfig] = {}
    pools: Dict[str, Any] = {}
    for name, u in spec.upstreams.items():
        try:
            host, port = parseAddress(u.address)
        except ValueError as e:
            raise ConfigError(f"upstreams.{name}.address: {e}")
        settings = UpstreamConfig(host=host, port=port, connectTimeout=float(u.connectTimeout) or 5.0,
                                  idleTimeout=float(u.idleTimeout) or 4.0, maxConnections=u.maxConnections,
                                  maxPending=u.maxPending)
        upstreams[name] = settings
        if reuse is not None and reuse.upstreams.get(name) == settings:
            pools[name] = reuse.pools[name]
        else:
            pools[name] = makePool(settings)
    installed: Optional[Dict[str, Any]] = None
    if any(f.name not in BUILTINS for f in spec.filters) or any(
            f.name not in BUILTINS for r in spec.routes for f in r.filters):
        installed = installedFilters()
    filterSpecs = list(spec.filters)
    where = "filters"
    if cliFilters:
        where = "--filter"
        for name, args in cliFilters:
            filterSpecs.append(FilterSpec(name, json.loads(args) if args else {}))
    common = [makeFilter(f, context, f"{where}[{i}]", installed) for i, f in enumerate(filterSpecs)]
    routes = []
    names = set()
    for i, r in enumerate(spec.routes):
        where = f"routes[{i}]"
        if r.name in names:
            raise ConfigError(f"{where}.name: {r.name!r} names two routes")
        names.add(r.name)
        if r.upstream is not None and r.upstream not in pools:
            raise ConfigError(f"{where}.upstream: no upstream named {r.upstream!r} in upstreams")
        if not r.match.prefix.startswith("/"):
            raise ConfigError(f"{where}.match.prefix: {r.match.prefix!r} must start with /")
        match = RouteMatch(
            prefix=r.match.prefix.encode("utf-8"),
            methods=frozenset(m.upper().encode("ascii") for m in r.match.methods),
            headers=tuple((n.lower().encode("ascii"), None if v is None else v.encode("latin-1"))
                          for n, v in r.match.headers.items()))
        own = [makeFilter(f, context, f"{where}.filters[{j}]", installed) for j, f in enumerate(r.filters)]
        retry = None
        if r.retry is not None:
            policy = RetryPolicy(attempts=r.retry.attempts, retryOn=frozenset(r.retry.retryOn),
                                 perTryTimeout=None if r.retry.perTryTimeout is None else float(r.retry.perTryTimeout),
                                 retriableStatusCodes=frozenset(r.retry.retriableStatusCodes),
                                 budgetPercent=r.retry.budgetPercent,
                                 minRetryConcurrency=r.retry.minRetryConcurrency)
            retry = RetryRule(policy, context.clock, requestsActive, context.random)
        routes.append(Route(r.name, match, r.upstream, None if r.timeout is None else float(r.timeout), retry,
                            FilterChain(common + own, pools=pools)))
    chain = None
    if routes:
        chain = FilterChain(common, router=Router(routes), pools=pools)
    elif common:
        chain = FilterChain(common, pools=pools)
    version = str(spec.version) if spec.version is not None else digest[:12]
    return Active(version, digest, data, chain, pools, upstreams, spec.flagValues())


def inertContext() -> FilterContext:
    """
    A context for checking a file at start-up: a clock that never runs, a fetcher
    that never fetches.
    """
    from twisted.internet.defer import Deferred
    from twisted.internet.task import Clock

    return FilterContext(clock=Clock(), fetch=lambda url: Deferred())


def load(path: str) -> Tuple[FileConfig, Dict[str, Any], str]:
    """
    Read and parse C{path}: the L{FileConfig}, the plain data, the SHA-256.

    @raise ConfigError: one sentence naming the file and the key.
    """
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it: {e.strerror}.")
    spec, data = parse(text, path)
    return spec, data, hashlib.sha256(text).hexdigest()


def check(path: str, cliFilters: Tuple[Tuple[str, str], ...] = ()) -> FileConfig:
    """
    Load and build C{path} without side effects (start-up validation).

    @raise ConfigError: one sentence naming the file and the key.
    """
    spec, data, digest = load(path)
    try:
        build(spec, data, digest, inertContext(), lambda settings: None, cliFilters=cliFilters)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}.")
    return spec


def _fingerprint(path: str) -> Optional[Tuple[int, int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class ConfigWatcher:
    """
    The file's request path in use, and its hot reload.

    @ivar active: the version in use.
    @ivar reloads: versions put in use after the first.
    @ivar rejections: changed versions refused (the old one stayed).
    @ivar lastRejection: why the last refused version was refused, or C{None}.
    """

    def __init__(self, path: str, context: FilterContext, makePool: Callable[[UpstreamConfig], Any],
                 apply: Callable[[Active], None], requestsActive: Callable[[], int] = lambda: 0,
                 cliFilters: Tuple[Tuple[str, str], ...] = (), log: Optional[Logger] = None) -> None:
        self.path = path
        self.context = context
        self.makePool = makePool
        self.apply = apply
        self.requestsActive = requestsActive
        self.cliFilters = cliFilters
        self.log = log if log is not None else Logger()
        self._seen = _fingerprint(path)
        spec, data, digest = load(path)
        try:
            self.active = self._build(spec, data, digest, None)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}.")
        self.loadedAt = context.clock.seconds()
        self.reloads = 0
        self.rejections = 0
        self.lastRejection: Optional[str] = None
        self._refused: Optional[str] = None
        #: Pools of earlier versions, closed once their last request is over.
        self.retired: List[Any] = []
        apply(self.active)

    def _build(self, spec: FileConfig, data: Dict[str, Any], digest: str, reuse: Optional[Active]) -> Active:
        return build(spec, data, digest, self.context, self.makePool, self.requestsActive, reuse, self.cliFilters)

    def check(self) -> bool:
        """
        Look at the file; when it changed, load, validate, build and swap it in.  A
        version that fails is logged once, counted, and the old one stays.

        @return: whether a new version was put in use.
        """
        self.sweep()
        seen = _fingerprint(self.path)
        if seen == self._seen:
            return False
        self._seen = seen
        try:
            with open(self.path, "rb") as f:
                text = f.read()
        except OSError as e:
            return self._refuse(f"unreadable {seen}", f"{self.path}: cannot read it: {e.strerror}.")
        digest = hashlib.sha256(text).hexdigest()
        if digest == self.active.digest or digest == self._refused:
            return False
        try:
            spec, data = parse(text, self.path)
            changed = [k for k in FLAG_KEYS if spec.flagValues().get(k) != self.active.flagValues.get(k)]
            if changed:
                raise ConfigError(f"{self.path}: {changed[0]}: a start-up key cannot change without a restart.")
            try:
                active = self._build(spec, data, digest, self.active)
            except ConfigError as e:
                raise ConfigError(f"{self.path}: {e}.")
        except ConfigError as e:
            return self._refuse(digest, str(e))
        old, self.active = self.active, active
        self.retired.extend(p for name, p in old.pools.items() if active.pools.get(name) is not p)
        self._refused = None
        self.lastRejection = None
        self.reloads += 1
        self.loadedAt = self.context.clock.seconds()
        self.apply(active)
        self.log.info("configuration {path} reloaded: version {old} -> {new}; new requests use it",
                      path=self.path, old=old.version, new=active.version)
        return True

    def _refuse(self, version: str, why: str) -> bool:
        if version != self._refused:
            self._refused = version
            self.rejections += 1
            self.lastRejection = why
            self.log.error("configuration not reloaded, still serving version {version}: {why}",
                           version=self.active.version, why=why)
        return False

    def sweep(self) -> None:
        """
        Close idle connections of the named pools; close retired pools whose last
        request is over.
        """
        for pool in self.active.pools.values():
            pool.sweep()
        keep = []
        for pool in self.retired:
            if pool.active or pool.connecting:
                keep.append(pool)
            else:
                pool.closeAll()
        self.retired = keep

    def closeAll(self) -> None:
        """
        Close every pool's idle connections (at shutdown).
        """
        for pool in list(self.active.pools.values()) + self.retired:
            pool.closeAll()

    def dump(self) -> Dict[str, Any]:
        """
        C{/config_dump}'s part about the file: the active version and its content.
        """
        return {
            "path": self.path,
            "version": self.active.version,
            "sha256": self.active.digest,
            "loaded_at": self.loadedAt,
            "reloads": self.reloads,
            "rejections": self.rejections,
            "last_rejection": self.lastRejection,
            "config": self.active.data,
        }


def filtersOnly(cliFilters: Tuple[Tuple[str, str], ...], context: FilterContext) -> Optional[FilterChain]:
    """
    The chain of C{--filter} flags alone (no file).

    @raise ConfigError: naming the flag.
    """
    active = build(FileConfig(), {}, "", context, lambda settings: None, cliFilters=cliFilters)
    return active.chain

