# -*- test-case-name: tests.test_admin -*-
"""
The admin site: a C{twisted.web} resource tree, separate from the proxied traffic, in
the spirit of Envoy's admin interface.

  - C{GET /stats/prometheus} (or C{/stats?format=prometheus}): Prometheus text, Istio's
    metric names and labels;
  - C{GET /stats}: the same numbers as JSON;
  - C{GET /server_info}: version, uptime, state, the effective configuration;
  - C{GET /config_dump}: the effective configuration (file paths, never key material);
  - C{GET /ready}: 200 C{LIVE} while serving, 503 otherwise;
  - C{POST /drain_listeners}, C{/quitquitquit}, C{/healthcheck/fail},
    C{/healthcheck/ok}: from loopback clients only (others get 403; C{GET} gets 405).

The admin site listens on loopback by default.  L{healthSite} is the network-facing
port (15021, as Istio's): C{GET /ready}, C{/healthz/ready} and C{/stats/prometheus}, and
nothing else.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any, Callable, Dict, Tuple

import attrs
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.web.resource import NoResource, Resource
from twisted.web.server import NOT_DONE_YET, Site

from sidecar.metrics import CONTENT_TYPE, SidecarCollector, prometheusText, statsJSON

log = Logger()

REDACTED = "[redacted]"

#: Field names whose values are never shown, whatever they hold.
_SECRET_NAMES = ("password", "passphrase", "secret", "privatekeydata", "keymaterial")


def _redact(name: str, value: Any) -> Any:
    if attrs.has(type(value)):
        return {field.name: _redact(field.name, getattr(value, field.name))
                for field in attrs.fields(type(value))}
    if isinstance(value, dict):
        return {str(k): _redact(str(k), v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact(name, v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return REDACTED
    if isinstance(value, str) and ("-----BEGIN" in value or "PRIVATE KEY" in value):
        return REDACTED
    if any(secret in name.lower().replace("_", "") for secret in _SECRET_NAMES):
        return REDACTED if value is not None else None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def configDump(config: Any) -> Dict[str, Any]:
    """
    The effective configuration (an C{attrs} object) as JSON-ready data.  File paths
    are shown; bytes, PEM text and fields named like secrets never are.
    """
    return _redact("", config)


def isLoopback(address: Any) -> bool:
    """
    Whether a client at C{address} is on this host: an IPv4 address in 127.0.0.0/8,
    C{::1}, an IPv4-mapped loopback address, or a UNIX socket peer.
    """
    if isinstance(address, (IPv4Address, IPv6Address)):
        try:
            ip = ipaddress.ip_address(address.host.split("%", 1)[0])
        except ValueError:
            return False
        mapped = getattr(ip, "ipv4_mapped", None)
        return ip.is_loopback or (mapped is not None and mapped.is_loopback)
    # A UNIX socket: whoever may open it is trusted by the file system.
    return isinstance(address, UNIXAddress)


def _text(request: Any, status: int, body: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-cache, max-age=0")
    return body.encode("utf-8")


def _json(request: Any, data: Any) -> bytes:
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-cache, max-age=0")
    return json.dumps(data, indent=2, sort_keys=False).encode("utf-8") + b"\n"


#: Runs C{f(*args)} somewhere and gives its result: in the service, a thread of the
#: reactor's pool; in tests, right away.
Offload = Callable[..., "Deferred[Any]"]


def inline(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """
    The L{Offload} that runs C{f} at once, in the reactor thread.
    """
    return maybeDeferred(f, *args)


def _renderLater(request: Any, d: Deferred[bytes], contentType: bytes) -> Any:
    """
    Answer C{request} with the bytes C{d} gives, unless the client has gone.
    """
    gone: list = []
    request.notifyFinish().addErrback(gone.append)

    def done(body: bytes) -> None:
        if gone:
            return
        request.setHeader(b"Content-Type", contentType)
        request.setHeader(b"Cache-Control", b"no-cache, max-age=0")
        request.write(body)
        request.finish()

    def failed(failure: Any) -> None:
        log.failure("rendering {path} failed", failure, path=request.path.decode("latin-1"))
        if not gone:
            request.write(_text(request, 500, "rendering failed\n"))
            request.finish()

    d.addCallbacks(done, failed)
    return NOT_DONE_YET


def _jsonBytes(data: Any) -> bytes:
    return json.dumps(data, indent=2).encode("utf-8") + b"\n"


class PrometheusResource(Resource):
    """
    C{GET /stats/prometheus}: the numbers are copied in the reactor thread (cheap), the
    text is formatted by C{offload} (a thread: with many series it takes milliseconds
    that proxied requests should not wait for).
    """

    isLeaf = True

    def __init__(self, collector: SidecarCollector, offload: Offload = inline) -> None:
        Resource.__init__(self)
        self.collector = collector
        self.offload = offload

    def render_GET(self, request: Any) -> Any:
        snapshot = self.collector.snapshot()
        return _renderLater(request, self.offload(prometheusText, snapshot), CONTENT_TYPE.encode("ascii"))


class StatsResource(Resource):
    """
    C{GET /stats}: JSON, or Prometheus text with C{?format=prometheus}.
    """

    def __init__(self, collector: SidecarCollector, offload: Offload = inline) -> None:
        Resource.__init__(self)
        self.collector = collector
        self.offload = offload
        self.putChild(b"prometheus", PrometheusResource(collector, offload))

    def getChild(self, path: bytes, request: Any) -> Resource:
        if path == b"":
            return self
        return Resource.getChild(self, path, request)

    def render_GET(self, request: Any) -> bytes:
        formats = request.args.get(b"format", [b"json"])
        if formats[-1] == b"prometheus":
            return self.children[b"prometheus"].render_GET(request)
        if formats[-1] != b"json":
            return _text(request, 400, "format must be json or prometheus\n")
        snapshot = self.collector.snapshot()
        d = self.offload(lambda: _jsonBytes(statsJSON(snapshot)))
        return _renderLater(request, d, b"application/json")


class ServerInfoResource(Resource):
    """
    C{GET /server_info}.
    """

    isLeaf = True

    def __init__(self, info: Callable[[], Dict[str, Any]]) -> None:
        Resource.__init__(self)
        self.info = info

    def render_GET(self, request: Any) -> bytes:
        return _json(request, self.info())


class ConfigDumpResource(Resource):
    """
    C{GET /config_dump}.
    """

    isLeaf = True

    def __init__(self, config: Any) -> None:
        Resource.__init__(self)
        self.config = config

    def render_GET(self, request: Any) -> bytes:
        return _json(request, configDump(self.config))


class ReadyResource(Resource):
    """
    C{GET /ready}: the lifecycle's answer, which may take a TCP connect to the service.
    """

    isLeaf = True

    def __init__(self, lifecycle: Any) -> None:
        Resource.__init__(self)
        self.lifecycle = lifecycle

    def render_GET(self, request: Any) -> Any:
        gone = []
        request.notifyFinish().addErrback(gone.append)

        def answer(result: Tuple[int, str]) -> None:
            if gone:
                return
            status, state = result
            request.write(_text(request, status, state + "\n"))
            request.finish()

        def failed(failure: Any) -> None:
            log.failure("readiness check failed", failure)
            if not gone:
                request.write(_text(request, 500, "readiness check failed\n"))
                request.finish()

        self.lifecycle.ready().addCallback(answer).addErrback(failed)
        return NOT_DONE_YET


class MutationResource(Resource):
    """
    A C{POST}-only action, accepted from loopback clients only.  Without a
    C{render_GET}, twisted.web answers C{GET} with 405 and an C{Allow} header.
    """

    isLeaf = True

    def __init__(self, action: Callable[[], None], done: str = "OK") -> None:
        Resource.__init__(self)
        self.action = action
        self.done = done

    def render_POST(self, request: Any) -> bytes:
        client = request.getClientAddress()
        if not isLoopback(client):
            log.warn("refused admin {path} from {client}: not a loopback client",
                     path=request.path.decode("latin-1"), client=str(getattr(client, "host", client)))
            return _text(request, 403, "admin mutations are accepted from loopback clients only\n")
        body = _text(request, 200, self.done + "\n")
        self.action()
        return body


class IndexResource(Resource):
    """
    C{GET /}: what the admin site serves.
    """

    isLeaf = True

    ENDPOINTS = (
        ("GET", "/stats/prometheus", "Istio and sidecar metrics, Prometheus text"),
        ("GET", "/stats", "the same numbers as JSON"),
        ("GET", "/server_info", "version, uptime, state, configuration"),
        ("GET", "/config_dump", "the effective configuration"),
        ("GET", "/ready", "200 LIVE while serving, 503 otherwise"),
        ("POST", "/drain_listeners", "start draining (loopback only)"),
        ("POST", "/quitquitquit", "exit once nothing is in flight (loopback only)"),
        ("POST", "/healthcheck/fail", "make /ready answer 503 (loopback only)"),
        ("POST", "/healthcheck/ok", "undo /healthcheck/fail (loopback only)"),
    )

    def render_GET(self, request: Any) -> bytes:
        lines = ["sidecar admin\n"] + [f"  {m:<5}{p:<20}{what}\n" for m, p, what in self.ENDPOINTS]
        return _text(request, 200, "".join(lines))


class AdminRoot(Resource):
    """
    The admin tree's root.
    """

    def __init__(self, index: Resource) -> None:
        Resource.__init__(self)
        self.index = index

    def getChild(self, path: bytes, request: Any) -> Resource:
        if path == b"":
            return self.index
        return Resource.getChild(self, path, request)


class AdminSite(Site):
    """
    The admin site; its requests (probes, scrapes) are not logged.
    """

    noisy = False

    def log(self, request: Any) -> None:
        pass


def adminResource(collector: SidecarCollector, lifecycle: Any, config: Any,
                  info: Callable[[], Dict[str, Any]], offload: Offload = inline) -> Resource:
    """
    The admin resource tree.

    @param collector: the metrics.
    @param lifecycle: the L{sidecar.drain.Lifecycle} (readiness, drain, exit).
    @param config: the effective L{sidecar.config.ProxyConfig}.
    @param info: returns C{/server_info}'s content.
    @param offload: runs the formatting of the metrics.
    """
    root = AdminRoot(IndexResource())
    root.putChild(b"stats", StatsResource(collector, offload))
    root.putChild(b"server_info", ServerInfoResource(info))
    root.putChild(b"config_dump", ConfigDumpResource(config))
    root.putChild(b"ready", ReadyResource(lifecycle))
    root.putChild(b"drain_listeners", MutationResource(lifecycle.startDrain))
    root.putChild(b"quitquitquit", MutationResource(lifecycle.quit))
    healthcheck = Resource()
    healthcheck.putChild(b"fail", MutationResource(lifecycle.failHealthcheck))
    healthcheck.putChild(b"ok", MutationResource(lifecycle.passHealthcheck))
    root.putChild(b"healthcheck", healthcheck)
    return root


def serverInfo(version: str, lifecycle: Any, config: Any, clock: Any, startTime: float) -> Dict[str, Any]:
    """
    C{/server_info}'s content now.
    """
    return {
        "version": version,
        "state": lifecycle.reportedState,
        "uptime_seconds": int(max(0.0, clock.seconds() - startTime)),
        "start_time": startTime,
        "health_check_failed": lifecycle.healthcheckFailed,
        "draining": lifecycle.drainStarted is not None,
        "listeners_closed": lifecycle.listenersClosed,
        "configuration": configDump(config),
    }


def adminSite(collector: SidecarCollector, lifecycle: Any, config: Any, version: str,
              clock: Any, startTime: float, offload: Offload = inline) -> AdminSite:
    """
    The admin site of one sidecar.

    @param clock: the reactor: uptime, and the HTTP channels' timeouts.
    @param offload: runs the formatting of the metrics (the service passes a thread
        pool's).
    """
    info = lambda: serverInfo(version, lifecycle, config, clock, startTime)  # noqa: E731
    return AdminSite(adminResource(collector, lifecycle, config, info, offload), reactor=clock)


class HealthRoot(Resource):
    """
    The health port's tree: exact paths only (no trailing slash, no child path), each
    to its resource; every other path is 404.
    """

    def __init__(self, paths: Dict[bytes, Resource]) -> None:
        Resource.__init__(self)
        self.paths = paths

    def getChildWithDefault(self, path: bytes, request: Any) -> Resource:
        found = self.paths.get(request.path)
        if found is None:
            return NoResource()
        # The resources are leaves: twisted.web renders them whatever remains.
        request.postpath[:] = []
        return found

    def render(self, request: Any) -> bytes:
        return NoResource().render(request)


class HealthSite(AdminSite):
    """
    The health and metrics port; its requests (probes, scrapes) are not logged.
    """


def healthSite(collector: SidecarCollector, lifecycle: Any, clock: Any, offload: Offload = inline,
               more: Dict[bytes, Resource] | None = None) -> HealthSite:
    """
    The network-facing port of one sidecar, for the kubelet and Prometheus: C{GET
    /ready} and C{/healthz/ready} (Istio's path on its port 15021) give the admin
    site's C{/ready} answer, C{GET /stats/prometheus} the metrics; C{more} adds exact
    paths (the application's probes, C{/app-health/...}, from L{sidecar.probes});
    every other path is 404, so that the configuration and the mutations stay on the
    loopback admin site.
    """
    ready = ReadyResource(lifecycle)
    return HealthSite(HealthRoot({
        **(more or {}),
        b"/ready": ready,
        b"/healthz/ready": ready,
        b"/stats/prometheus": PrometheusResource(collector, offload),
    }), reactor=clock)
