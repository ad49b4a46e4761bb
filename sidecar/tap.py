# -*- test-case-name: tests.test_tap -*-
"""
The command line of C{twistd sidecar}: every flag, validated at start-up, and
L{makeService}, which hands the configuration to L{sidecar.service}.

This is the only module that imports the global reactor, inside L{makeService} and the
endpoint check.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import attrs
from twisted.python import usage

from sidecar.config import ENGINES, LOG_FORMATS, ProxyConfig, UpstreamConfig
from sidecar.config import TLS_MODES, TLSConfig
from sidecar.headers import UNDERSCORE_ACTIONS


def _endpoint(flag: str, value: str, allowNone: bool = True, interface: str = "") -> Optional[str]:
    """
    A bare port becomes C{tcp:PORT} (every interface, or C{interface} when given);
    anything else must be a Twisted server endpoint string.
    """
    value = value.strip()
    if allowNone and value.lower() == "none":
        return None
    if value.isdigit():
        port = int(value)
        if not 0 <= port <= 65535:
            raise usage.UsageError(f"{flag}: port {value} is out of range (0-65535).")
        return f"tcp:{port}:interface={interface}" if interface else f"tcp:{port}"
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(reactor, value)
    except (ValueError, TypeError, KeyError) as e:
        raise usage.UsageError(
            f"{flag}: {value!r} is neither a port number nor a server endpoint "
            f"such as tcp:8000:interface=127.0.0.1 ({e})."
        )
    return value


def parseUpstream(value: str) -> Tuple[str, int]:
    """
    C{PORT}, C{HOST:PORT} or C{[V6]:PORT} to C{(host, port)}; the host defaults to
    C{127.0.0.1}.
    """
    value = value.strip()
    host = "127.0.0.1"
    port = value
    if value.startswith("["):
        close = value.find("]")
        if close < 0 or value[close + 1:close + 2] != ":":
            raise usage.UsageError(f"--upstream: {value!r} is not [IPv6]:PORT.")
        host, port = value[1:close], value[close + 2:]
    elif ":" in value:
        host, _, port = value.rpartition(":")
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise usage.UsageError(f"--upstream: {value!r} is not PORT or HOST:PORT with a port from 1 to 65535.")
    if not host:
        raise usage.UsageError(f"--upstream: {value!r} has an empty host.")
    return host, int(port)


def _seconds(flag: str, value: str, allowZero: bool) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise usage.UsageError(f"{flag}: {value!r} is not a number of seconds.")
    if seconds != seconds or seconds < 0 or (seconds == 0 and not allowZero) or seconds == float("inf"):
        raise usage.UsageError(
            f"{flag}: {value!r} must be a {'non-negative' if allowZero else 'positive'} number of seconds."
        )
    return seconds


def _count(flag: str, value: str, least: int) -> int:
    try:
        count = int(value)
    except ValueError:
        count = least - 1
    if count < least:
        raise usage.UsageError(f"{flag}: {value!r} must be a whole number of at least {least}.")
    return count


def _accessLog(value: str) -> Optional[str]:
    if value == "-":
        return "-"
    if value.lower() == "none":
        return None
    try:
        with open(value, "a"):
            pass
    except OSError as e:
        raise usage.UsageError(f"--access-log: cannot write to {value!r}: {e.strerror}.")
    return os.path.abspath(value)


def _tlsConfig(options: usage.Options, listen: Optional[str]) -> Optional[TLSConfig]:
    """
    The mutual-TLS flags as a L{TLSConfig}, or C{None} without C{--tls-listen} or
    permissive mode.  The files are read and checked here, so that a missing,
    unreadable or mismatched one stops the start with a sentence naming it.
    """
    from sidecar.spiffe import AllowPolicy, InvalidSpiffeId
    from sidecar.tls import TLSFileError, TLSFiles, loadMaterial

    mode = (options["tls-mode"] or "").strip().lower()
    originates = bool(options.get("mesh-networks") or options.get("mesh-peer"))
    if mode not in TLS_MODES:
        raise usage.UsageError(f"--tls-mode: {options['tls-mode']!r} is not one of {', '.join(TLS_MODES)}.")
    tlsListen = None
    if options["tls-listen"] is not None:
        if options["tls-listen"].strip().lower().startswith("ssl:"):
            raise usage.UsageError("--tls-listen: give a port or a tcp: endpoint; the sidecar adds the TLS layer itself.")
        tlsListen = _endpoint("--tls-listen", options["tls-listen"])
    allow = tuple(options.get("tls-allow", ()))
    given = [flag for flag in ("tls-cert", "tls-key", "tls-ca") if options[flag]]
    if tlsListen is None and mode == "strict" and not (originates and given):
        if given or allow:
            raise usage.UsageError(f"--{(given or ['tls-allow'])[0]}: mutual TLS needs --tls-listen (or --tls-mode permissive).")
        return None
    if tlsListen is None and mode == "strict" and allow:
        raise usage.UsageError("--tls-allow: mutual TLS needs --tls-listen (or --tls-mode permissive).")
    if mode == "permissive" and listen is None:
        raise usage.UsageError("--tls-mode permissive: needs the plain --listen port, which accepts both there.")
    for flag in ("tls-cert", "tls-key", "tls-ca"):
        if not options[flag]:
            raise usage.UsageError(f"--{flag}: mutual TLS needs --tls-cert, --tls-key and --tls-ca.")
    try:
        AllowPolicy.fromStrings(allow)
    except InvalidSpiffeId as e:
        raise usage.UsageError(f"--tls-allow: {e}.")
    given = [options[flag] for flag in ("tls-cert", "tls-key", "tls-ca")]
    try:
        loadMaterial(TLSFiles(*given))
    except TLSFileError as e:
        raise usage.UsageError(str(e))
    paths = [os.path.abspath(path) for path in given]  # twistd may change directory later
    return TLSConfig(listen=tlsListen, cert=paths[0], key=paths[1], ca=paths[2], allow=allow, mode=mode)


def _outboundConfig(options: usage.Options) -> Optional[Any]:
    """
    C{--outbound-listen}, C{--mesh-networks} and C{--mesh-peer} as an
    L{OutboundConfig}, or C{None} without an outbound listener.
    """
    import ipaddress

    from sidecar.config import OutboundConfig
    from sidecar.spiffe import InvalidSpiffeId, parseAllowRule

    networks = []
    for value in (options["mesh-networks"] or "").split(","):
        value = value.strip()
        if not value:
            continue
        try:
            networks.append(str(ipaddress.ip_network(value, strict=False)))
        except ValueError:
            raise usage.UsageError(f"--mesh-networks: {value!r} is not an IPv4 or IPv6 CIDR.")
    peers = []
    for value in options.get("mesh-peer", ()):
        cidr, sep, identity = value.partition("=")
        try:
            network = str(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            network = ""
        if not sep or not network:
            raise usage.UsageError(f"--mesh-peer: {value!r} is not CIDR=SPIFFE-ID.")
        try:
            parseAllowRule(identity)
        except InvalidSpiffeId as e:
            raise usage.UsageError(f"--mesh-peer: {e}.")
        peers.append((network, identity.strip()))
    if options["outbound-listen"] is None:
        if networks or peers:
            raise usage.UsageError(
                f"--{'mesh-networks' if networks else 'mesh-peer'}: the mesh is reached through the outbound "
                f"listener; give --outbound-listen too.")
        return None
    if (networks or peers) and not options["tls-cert"]:
        raise usage.UsageError(
            f"--{'mesh-networks' if networks else 'mesh-peer'}: mutual TLS to the mesh needs this workload's "
            f"--tls-cert, --tls-key and --tls-ca.")
    return OutboundConfig(_endpoint("--outbound-listen", options["outbound-listen"], allowNone=False),
                          tuple(networks), tuple(peers))


def _port(flag: str, value: str) -> int:
    value = value.strip()
    if not value.isdigit() or not 0 < int(value) <= 65535:
        raise usage.UsageError(f"{flag}: {value!r} is not a port from 1 to 65535.")
    return int(value)


def _portProtocols(declared: Tuple[str, ...], opaque: Optional[str]) -> Tuple[Tuple[int, str], ...]:
    """
    C{--port-protocol PORT=PROTOCOL} (repeatable) and C{--opaque-ports P,Q,...} as
    sorted C{(port, protocol)} pairs; a port declared twice differently is refused.
    """
    from sidecar.detect import DECLARED

    found: dict = {}

    def declare(flag: str, port: int, protocol: str) -> None:
        if found.get(port, protocol) != protocol:
            raise usage.UsageError(f"{flag}: port {port} is declared both {found[port]} and {protocol}.")
        found[port] = protocol

    for value in declared:
        port, sep, protocol = value.partition("=")
        protocol = protocol.strip().lower()
        if not sep or protocol not in DECLARED:
            raise usage.UsageError(
                f"--port-protocol: {value!r} is not PORT=PROTOCOL with PROTOCOL one of {', '.join(DECLARED)}.")
        declare("--port-protocol", _port("--port-protocol", port), protocol)
    if opaque is not None:
        for value in opaque.split(","):
            if value.strip():
                declare("--opaque-ports", _port("--opaque-ports", value), "tcp")
    return tuple(sorted(found.items()))


class Options(usage.Options):
    """
    C{twistd sidecar} flags.  Each bad value is refused with one sentence naming it.
    """

    synopsis = "[options]"
    longdesc = (
        "A sidecar proxy: forwards every request to the service on the loopback "
        "interface, adds a Server header, and records the duration, sizes and status "
        "of each request."
    )

    optParameters = [
        ["listen", None, "8000", "Plain HTTP listener: a port (all interfaces), a Twisted endpoint, or none."],
        ["upstream", None, "80", "The service: PORT or HOST:PORT (host defaults to 127.0.0.1), or original: "
                                 "the port each client dialled (after an iptables REDIRECT)."],
        ["server-header", None, "amazing-proxy", "The Server header set on every response."],
        ["access-log", None, "-", "Access log: a file path, - for stdout, or none."],
        ["log-format", None, "text", "Access log format: seed, text or json."],
        ["upstream-timeout", None, "60", "Seconds from the end of the request to the service's response head (0: no limit)."],
        ["connect-timeout", None, "5", "Seconds allowed to connect to the service."],
        ["upstream-idle-timeout", None, "4", "Seconds an idle pooled upstream connection is kept."],
        ["upstream-max-connections", None, "1024", "Connections to the service at most (Envoy's circuit breaker)."],
        ["upstream-max-idle", None, None, "Idle connections to the service kept for reuse at most "
                                          "(default: --upstream-max-connections)."],
        ["upstream-max-pending", None, "1024", "Requests waiting for a connection at most; past it, 503 (UO)."],
        ["workers", None, "1", "Worker processes sharing the listeners: a number, or auto (one per CPU)."],
        ["engine", None, "fast", "Front door: fast (llhttp protocol) or web (twisted.web Site)."],
        ["admin", None, "15000", "Admin server: a port (on 127.0.0.1), a Twisted endpoint, or none."],
        ["health", None, "15021", "Health and metrics port (/ready, /healthz/ready, /stats/prometheus only): "
                                  "a port (all interfaces), a Twisted endpoint, or none."],
        ["access-log-buffer", None, "1048576", "Bytes of access log records held while the log is not read; "
                                               "beyond, records are dropped and counted."],
        ["max-header-bytes", None, "65536", "Largest request head accepted, in bytes."],
        ["headers-with-underscores", None, "allow",
         "Request headers with an underscore in their name: allow, drop or reject (400)."],
        ["max-request-bytes", None, None, "Largest request body accepted, in bytes; past it, 413 (default: no limit)."],
        ["max-response-header-bytes", None, "81920", "Largest response head accepted from the service, in bytes (502 past it)."],
        ["stream-idle-timeout", None, "300", "Seconds a request/response may see no byte either way before it ends (0: never)."],
        ["client-idle-timeout", None, "300", "Seconds an idle client connection is kept open (0: forever)."],
        ["request-head-timeout", None, "30", "Seconds a client may take to send a request head; then 408 (0: forever)."],
        ["drain-timeout", None, "5", "Seconds the listeners stay open once draining, answering with Connection: close."],
        ["shutdown-grace", None, "20", "Seconds after the drain period that in-flight requests may take before exit."],
        ["wait-for-upstream", None, None, "Seconds at start-up that readiness waits for the service to accept a connection."],
        ["workload", None, None, "destination_workload label (default: ISTIO_META_WORKLOAD_NAME, or POD_NAME less its suffix)."],
        ["namespace", None, None, "destination_workload_namespace label (default: POD_NAMESPACE)."],
        ["app", None, None, "destination_app label (default: APP)."],
        ["app-version", None, None, "destination_version label (default: APP_VERSION)."],
        ["service-host", None, None, "destination_service label (default: APP.NAMESPACE.svc.cluster.local)."],
        ["principal", None, None, "This workload's SPIFFE id for destination_principal (default: from the certificate, "
                                  "or spiffe://TRUST_DOMAIN/ns/POD_NAMESPACE/sa/SERVICE_ACCOUNT)."],
        ["tls-listen", None, None, "Mutual-TLS listener: a port (all interfaces) or a Twisted TCP endpoint."],
        ["tls-cert", None, None, "Mutual TLS: PEM certificate of this workload (the file may hold the chain)."],
        ["tls-key", None, None, "Mutual TLS: PEM private key of --tls-cert."],
        ["tls-ca", None, None, "Mutual TLS: PEM bundle of the CAs that client certificates must chain to."],
        ["tls-mode", None, "strict", "strict, or permissive: the plain --listen port also accepts mutual TLS."],
        ["upstream-protocol", None, "auto", "HTTP version to the service: auto (HTTP/2 for HTTP/2 clients), http1 or http2."],
        ["h2-max-concurrent-streams", None, "100", "HTTP/2 streams per connection at most, both sides."],
        ["h2-stream-idle-timeout", None, "300", "Seconds an HTTP/2 stream may make no progress before a reset (0: forever)."],
        ["h2-codec", None, "auto", "HTTP/2 codec: auto (libnghttp2 if it loads, else h2), nghttp2 or h2."],
        ["protocol-detect-timeout", None, "1", "Seconds to wait for a client's first bytes before passing the "
                                               "connection through as opaque TCP (0: wait for ever)."],
        ["opaque-ports", None, None, "Ports (as dialled) passed through as opaque TCP without detection: 6379,25,..."],
        ["app-probers", None, None, "JSON of the app's probes the health port performs at /app-health/... "
         "(default: ISTIO_KUBE_APP_PROBERS; sidecar-inject writes it)."],
        ["outbound-listen", None, None, "Listener for the workload's outgoing connections (the init script's -o): "
                                        "a port (all interfaces) or a Twisted endpoint."],
        ["mesh-networks", None, None, "CIDRs inside the mesh (comma list): outbound connections there get mutual "
                                      "TLS with this workload's certificate, the server in our trust domain."],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        #: The flags given on the command line (a file's key may not contradict one).
        self.given: set = set()
        for name in list(self._dispatch):
            handler = self._dispatch[name]
            if isinstance(handler, usage.CoerceParameter):
                def record(flag: str, value: str, handler: usage.CoerceParameter = handler) -> None:
                    self.given.add(flag)
                    handler.dispatch(flag, value)
                self._dispatch[name] = record
        self["config-file"] = None

    def opt_config(self, path: str) -> None:
        """
        YAML configuration file: start-up keys as the flags, and upstreams, filters and routes, reloaded when it changes (docs/filters.md).
        """
        self["config-file"] = path

    def opt_filter(self, value: str) -> None:
        """
        A filter every request runs, NAME or NAME:JSON-OBJECT of its config (repeatable, in order; docs/filters.md).
        """
        name, _, args = value.partition(":")
        self.setdefault("filter", []).append((name.strip(), args.strip()))

    def opt_mesh_peer(self, value: str) -> None:
        """
        CIDR=SPIFFE-ID: outbound connections to CIDR get mutual TLS and the server must be that id (repeatable).
        """
        self.setdefault("mesh-peer", []).append(value)

    def opt_port_protocol(self, value: str) -> None:
        """
        PORT=tcp|http|http2|grpc: the protocol of a port (as dialled), not sniffed (repeatable).
        """
        self.setdefault("port-protocol", []).append(value)

    def opt_tls_allow(self, value: str) -> None:
        """
        Mutual TLS: a client SPIFFE id allowed to call, exact or spiffe://TD/* (repeatable; default: any from the CA).
        """
        self.setdefault("tls-allow", []).append(value)

    optFlags = [
        ["ready-requires-upstream", None, "/ready answers 503 while the service refuses a TCP connect."],
    ]

    def _lifecycleAndLabels(self) -> None:
        """
        The drain, readiness and metrics-label flags, into C{self["config"]}.
        """
        import attrs

        from sidecar.config import LifecycleConfig
        from sidecar.metrics import workloadLabels

        wait = None
        if self["wait-for-upstream"] is not None:
            wait = _seconds("--wait-for-upstream", self["wait-for-upstream"], allowZero=True) or None
        lifecycle = LifecycleConfig(
            drainTimeout=_seconds("--drain-timeout", self["drain-timeout"], allowZero=True),
            shutdownGrace=_seconds("--shutdown-grace", self["shutdown-grace"], allowZero=True),
            readyRequiresUpstream=bool(self["ready-requires-upstream"]),
            waitForUpstream=wait,
        )
        labels = {}
        for flag, name in (("workload", "workload"), ("namespace", "namespace"), ("app", "app"),
                           ("app-version", "version"), ("service-host", "service"), ("principal", "principal")):
            value = self[flag]
            if value is None:
                continue
            value = value.strip()
            if not value or not value.isprintable():
                raise usage.UsageError(f"--{flag}: the value must be non-empty printable text on one line.")
            labels[name] = value
        if "principal" in labels and not labels["principal"].startswith("spiffe://"):
            raise usage.UsageError(f"--principal: {labels['principal']!r} is not a SPIFFE id (spiffe://...).")
        mesh = workloadLabels(os.environ, **labels)
        from sidecar.probes import ProberError, appProbers

        try:
            probers = tuple(appProbers(self["app-probers"], os.environ).values())
        except ProberError as e:
            raise usage.UsageError(str(e)) from None
        self["config"] = attrs.evolve(self["config"], lifecycle=lifecycle, mesh=mesh, appProbers=probers)

    def _h2(self) -> None:
        """
        The HTTP/2 flags, into C{self["config"]}.
        """
        from sidecar.config import UPSTREAM_PROTOCOLS, H2Config
        from sidecar.h2wire import H2_CODECS

        protocol = self["upstream-protocol"].strip().lower()
        if protocol not in UPSTREAM_PROTOCOLS:
            raise usage.UsageError(f"--upstream-protocol: {self['upstream-protocol']!r} is not one of "
                                   f"{', '.join(UPSTREAM_PROTOCOLS)}.")
        streams = _count("--h2-max-concurrent-streams", self["h2-max-concurrent-streams"], 1)
        idle = _seconds("--h2-stream-idle-timeout", self["h2-stream-idle-timeout"], allowZero=True) or None
        codec = self["h2-codec"].strip().lower()
        if codec not in H2_CODECS:
            raise usage.UsageError(f"--h2-codec: {self['h2-codec']!r} is not one of {', '.join(H2_CODECS)}.")
        if codec == "nghttp2":
            from sidecar.nghttp2 import loadBinding

            if loadBinding() is None:
                raise usage.UsageError("--h2-codec nghttp2: libnghttp2 (Debian's libnghttp2-14) cannot be loaded "
                                       "with cffi.")
        h2 = H2Config(maxConcurrentStreams=streams, streamIdleTimeout=idle, codec=codec,
                      maxHeaderListSize=self["config"].maxHeaderBytes,
                      connectionWindow=max(H2Config().connectionWindow, streams * H2Config().streamWindow))
        self["config"] = attrs.evolve(self["config"], upstreamProtocol=protocol, h2=h2)

    def postOptions(self) -> None:
        """
        Check every flag and build L{ProxyConfig} into C{self["config"]}.

        First, unless a reactor is installed already (C{--reactor} of twistd or twist),
        install the sidecar's (L{sidecar.reactor}): the endpoint checks below import the
        global reactor, which would otherwise install Twisted's default.
        """
        from sidecar.reactor import installIfNone

        installIfNone()
        import json

        for name, args in self.get("filter", ()):
            if not name:
                raise usage.UsageError("--filter: give NAME or NAME:JSON-OBJECT.")
            try:
                parsed = json.loads(args) if args else {}
            except ValueError as e:
                raise usage.UsageError(f"--filter {name}: the arguments are not JSON ({e}).")
            if not isinstance(parsed, dict):
                raise usage.UsageError(f"--filter {name}: the arguments must be a JSON object.")
        fromFile = self._readConfigFile()
        try:
            self._build()
        except usage.UsageError as e:
            message = str(e)
            for key, flag in fromFile.items():
                if message.startswith(f"--{flag}:"):
                    raise usage.UsageError(f"{self['config-file']}: {key}:{message[len(flag) + 3:]}")
            raise
        self._filters()

    def _readConfigFile(self) -> dict:
        """
        With C{--config}, read and check the file, and take its start-up keys as the
        flags' values; a flag given that says otherwise is an error naming both.

        @return: the file's start-up keys and their flags.
        """
        path = self["config-file"]
        if path is None:
            return {}
        from sidecar.configfile import FLAG_KEYS, ConfigError, check

        try:
            spec = check(path, tuple(self.get("filter", ())))
        except ConfigError as e:
            raise usage.UsageError(str(e))
        fromFile = {}
        for key, value in spec.flagValues().items():
            flag = FLAG_KEYS[key]
            if flag in self.given and str(self[flag]).strip() != value.strip():
                raise usage.UsageError(
                    f"--{flag} {self[flag]!r} and {key}: {value!r} in {path} disagree; give only one of them.")
            self[flag] = value
            fromFile[key] = flag
        if spec.filters and self.get("filter"):
            raise usage.UsageError(f"--filter and filters: in {path} both give the filter chain; use one of them.")
        self["config-path"] = os.path.abspath(path)  # twistd may change directory later
        return fromFile

    def _filters(self) -> None:
        """
        C{--filter} flags (without a file: checked here) and C{--config} into the
        configuration.
        """
        filters = tuple(self.get("filter", ()))
        if filters and self["config-file"] is None:
            from sidecar.configfile import ConfigError, filtersOnly, inertContext

            try:
                filtersOnly(filters, inertContext())
            except ConfigError as e:
                raise usage.UsageError(f"{e}.")
        self["config"] = attrs.evolve(self["config"], filters=filters, configFile=self.get("config-path"))

    def _build(self) -> None:
        """
        Build L{ProxyConfig} from the flags' values into C{self["config"]}.
        """
        listen = _endpoint("--listen", self["listen"])
        original = self["upstream"].strip().lower() == "original"
        host, port = ("127.0.0.1", 80) if original else parseUpstream(self["upstream"])
        logFormat = self["log-format"].strip().lower()
        if logFormat not in LOG_FORMATS:
            raise usage.UsageError(f"--log-format: {self['log-format']!r} is not one of {', '.join(LOG_FORMATS)}.")
        engine = self["engine"].strip().lower()
        if engine not in ENGINES:
            raise usage.UsageError(f"--engine: {self['engine']!r} is not one of {', '.join(ENGINES)}.")
        server = self["server-header"]
        if not server or any(c in server for c in "\r\n\0") or not server.isascii():
            raise usage.UsageError("--server-header: the value must be non-empty printable ASCII on one line.")
        responseTimeout = _seconds("--upstream-timeout", self["upstream-timeout"], allowZero=True)
        try:
            maxHeaderBytes = int(self["max-header-bytes"])
        except ValueError:
            maxHeaderBytes = -1
        if maxHeaderBytes < 1024:
            raise usage.UsageError("--max-header-bytes: must be a whole number of at least 1024.")
        underscores = self["headers-with-underscores"].strip().lower()
        if underscores not in UNDERSCORE_ACTIONS:
            raise usage.UsageError(f"--headers-with-underscores: {self['headers-with-underscores']!r} "
                                   f"is not one of {', '.join(UNDERSCORE_ACTIONS)}.")
        maxRequestBytes = None
        if self["max-request-bytes"] is not None:
            maxRequestBytes = _count("--max-request-bytes", self["max-request-bytes"], 0)
        maxResponseHeaderBytes = _count("--max-response-header-bytes", self["max-response-header-bytes"], 1024)
        self["config"] = ProxyConfig(
            listen=listen,
            upstream=UpstreamConfig(
                host=host,
                port=port,
                connectTimeout=_seconds("--connect-timeout", self["connect-timeout"], allowZero=False),
                responseTimeout=responseTimeout or None,
                idleTimeout=_seconds("--upstream-idle-timeout", self["upstream-idle-timeout"], allowZero=False),
                maxConnections=_count("--upstream-max-connections", self["upstream-max-connections"], 1),
                maxPending=_count("--upstream-max-pending", self["upstream-max-pending"], 0),
                maxIdle=(None if self["upstream-max-idle"] is None
                         else _count("--upstream-max-idle", self["upstream-max-idle"], 0)),
                original=original,
            ),
            serverHeader=server,
            accessLog=_accessLog(self["access-log"]),
            logFormat=logFormat,
            engine=engine,
            admin=_endpoint("--admin", self["admin"], interface="127.0.0.1"),
            health=_endpoint("--health", self["health"]),
            accessLogBuffer=_count("--access-log-buffer", self["access-log-buffer"], 4096),
            maxHeaderBytes=maxHeaderBytes,
            headersWithUnderscores=underscores,
            maxRequestBytes=maxRequestBytes,
            clientIdleTimeout=_seconds("--client-idle-timeout", self["client-idle-timeout"], allowZero=True) or None,
            requestHeadTimeout=_seconds("--request-head-timeout", self["request-head-timeout"], allowZero=True) or None,
            streamIdleTimeout=_seconds("--stream-idle-timeout", self["stream-idle-timeout"], allowZero=True) or None,
            maxResponseHeaderBytes=maxResponseHeaderBytes,
        )
        self._lifecycleAndLabels()
        self._h2()
        self["config"] = attrs.evolve(
            self["config"],
            protocolDetectTimeout=_seconds("--protocol-detect-timeout", self["protocol-detect-timeout"],
                                           allowZero=True) or None,
            portProtocols=_portProtocols(self.get("port-protocol", ()), self["opaque-ports"]),
        )
        config = self["config"]
        if original and (config.lifecycle.readyRequiresUpstream or config.lifecycle.waitForUpstream is not None):
            raise usage.UsageError(
                "--upstream original: readiness cannot check one service port; drop --ready-requires-upstream "
                "and --wait-for-upstream, or give a fixed --upstream.")
        tls = _tlsConfig(self, listen)
        if original and tls is not None and tls.listen is not None and listen is not None:
            raise usage.UsageError(
                "--upstream original: connections to --tls-listen are not redirected while --listen takes them, so "
                "they have no port to go to; use --tls-mode permissive, which takes mutual TLS on the redirected "
                "ports, or --listen none to redirect to --tls-listen (STRICT).")
        if tls is not None:
            self["config"] = attrs.evolve(self["config"], tls=tls)
        _workersOption(self, listen, tls)
        outbound = _outboundConfig(self)
        if outbound is not None:
            self["config"] = attrs.evolve(self["config"], outbound=outbound)
        if listen is None and (tls is None or tls.listen is None) and outbound is None:
            raise usage.UsageError("--listen: none leaves the proxy with no listener (add --tls-listen for a mutual-TLS one).")
        _noForegroundPidfile(getattr(self, "parent", None))


def _workersOption(options: usage.Options, listen: Optional[str], tls: Optional[TLSConfig]) -> None:
    """
    C{--workers}: a count or C{auto}; more than one needs TCP listeners (the parent
    binds them and its workers share them).
    """
    from sidecar.workers import workerCount

    try:
        workers = workerCount(options["workers"])
    except ValueError:
        raise usage.UsageError(f"--workers: {options['workers']!r} must be a whole number of at least 1, or auto.")
    if workers > 1:
        for flag, value in (("--listen", listen), ("--tls-listen", tls.listen if tls is not None else None)):
            if value is not None and value.split(":", 1)[0].strip().lower() not in ("tcp", "tcp6"):
                raise usage.UsageError(f"{flag}: {value!r}: with --workers, listeners must be tcp: or tcp6: endpoints.")
    options["config"] = attrs.evolve(options["config"], workers=workers)


def _noForegroundPidfile(twistdOptions: Optional[usage.Options]) -> None:
    """
    In the foreground (C{twistd -n sidecar}, as in containers and the README), write
    no pid file unless another one is named: twistd's default, C{twistd.pid} in the
    current folder, would stop a second proxy started in the same folder, and cannot
    be written on a read-only root filesystem. A daemon keeps it: the pid file is
    how it is found and stopped.

    @param twistdOptions: twistd's own options, the parent of the plugin's, or
        L{None} when the plugin's options are parsed alone.
    """
    if twistdOptions is None:
        return
    try:
        if twistdOptions["nodaemon"] and twistdOptions["pidfile"] == "twistd.pid":
            twistdOptions["pidfile"] = ""
    except KeyError:
        pass


def makeService(options: Options):
    """
    Build the sidecar's service from parsed options.
    """
    from twisted.internet import reactor

    from sidecar.logs import takeOverRunnerLog
    from sidecar.reactor import tuneCollector
    from sidecar.service import makeService as assemble

    config = options["config"]
    if config.workers > 1:
        from sidecar.workers import WorkersService

        service = WorkersService(config, reactor, config.workers)
        service.lifecycle.handleSignals = True
        stream = takeOverRunnerLog(getattr(options, "parent", None), service, reactor)
        if stream is not None:
            # The workers write their access logs to the same output: whole lines only.
            stream.writer.wholeLines = True
        return service
    service = assemble(config, reactor)
    # A process of its own: tune the garbage collector once start-up is over.
    reactor.callWhenRunning(tuneCollector)
    # A real run: SIGTERM drains (replacing twistd's handler once the reactor runs).
    service.lifecycle.handleSignals = True
    # twistd's own log on a pipe must not block the reactor either.
    takeOverRunnerLog(getattr(options, "parent", None), service, reactor)
    return service
