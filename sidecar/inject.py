# -*- test-case-name: tests.test_inject -*-
"""
C{sidecar-inject}: add the sidecar to Kubernetes workloads, like
C{istioctl kube-inject}.

It reads a YAML stream of Kubernetes objects and writes it back with, in the
pod template of every Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job
and CronJob (and of those inside a C{List}):

  - an init container, C{sidecar-init}, that runs C{sidecar-iptables} with
    C{NET_ADMIN} to redirect the service port to the proxy;
  - the proxy, C{sidecar-proxy}, as a Kubernetes native sidecar (an init
    container with C{restartPolicy: Always}, Kubernetes 1.29+), so that it is
    ready before the service starts, outlives it while the pod stops, and does
    not keep a Job from completing. Its probes ask the health port (15021,
    as Istio's): the startup and readiness probes C{/healthz/ready}; the
    liveness probe C{/stats/prometheus}, which stays 200 while the process
    runs, so a proxy draining (when C{/healthz/ready} is 503) is not killed.
    The admin port listens on loopback only and is reached with
    C{kubectl exec ... sidecar-request}. The downward API gives it the pod's
    name, namespace, service account and C{app} and C{version} labels
    (L{DOWNWARD_ENV}), which fill the C{destination_*} labels of its Istio
    metrics. It gets CPU and memory requests and limits (Istio's defaults,
    L{InjectionSettings}), which Istio's annotations
    C{sidecar.istio.io/proxyCPU}, C{proxyMemory}, C{proxyCPULimit} and
    C{proxyMemoryLimit} on the pod template override; and it logs each
    request as one C{text} line.

The pod template gets Prometheus' scrape annotations
(C{prometheus.io/scrape}, C{port} and C{path}) for the proxy's metrics on the
health port, unless it already has its own.

Other objects pass through untouched, and injecting twice gives the same output
as injecting once: the two containers are replaced, not added again. Comments
in the input are kept (the YAML is read and written with C{ruamel.yaml}'s
round trip), except those inside the two containers it replaces.

The service port the proxy forwards to is the pod's first TCP container port,
or the C{sidecar/service-port} annotation of the pod template. The captured
ports default to the service port alone (C{sidecar/inbound-ports} may list
others, or C{*}), C{sidecar/exclude-inbound-ports} are never captured, and
C{sidecar/inject: "false"} leaves a pod template alone. Pods on the host's
network, and pods with no port to proxy, are left alone with a note on stderr.

The Services of the stream tell what each port speaks, by Istio's protocol
selection (L{portProtocols}: a Service port's C{appProtocol} or name, the
container port's name, a well-known non-HTTP port); the captured ports that
are not left to the proxy's detection get C{--port-protocol PORT=http2|grpc}
or C{--opaque-ports} (L{protocolArgs}). The app containers' probes that the
kubelet could not answer through the proxy (C{httpGet} under mutual TLS,
C{tcpSocket} and C{grpc} of a captured port) ask the health port's
C{/app-health/<container>/...} instead, and the proxy gets the originals in
C{ISTIO_KUBE_APP_PROBERS} (L{rewriteProbes}; L{sidecar.probes} performs
them). Outbound capture (C{-o}, C{--outbound-listen}) is off unless asked for
(L{outboundArgs}).

The transformation is plain data in, plain data out (L{injectObject}); L{main}
is the thin command-line edge around it.
"""

from __future__ import annotations

import argparse
import copy
import io
import ipaddress
import json
import re
import sys
from typing import Any, Iterable, Sequence, TextIO

import attrs
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedSeq
from ruamel.yaml.scalarstring import DoubleQuotedScalarString
from ruamel.yaml.error import YAMLError

from sidecar.cli import OneSentenceParser

INIT_NAME = "sidecar-init"
PROXY_NAME = "sidecar-proxy"
CERTS_VOLUME = "sidecar-certs"
CERTS_DIR = "/etc/sidecar/certs"

ANNOTATION_PREFIX = "sidecar/"
INJECT_ANNOTATION = ANNOTATION_PREFIX + "inject"
SERVICE_PORT_ANNOTATION = ANNOTATION_PREFIX + "service-port"
INBOUND_PORTS_ANNOTATION = ANNOTATION_PREFIX + "inbound-ports"
EXCLUDE_PORTS_ANNOTATION = ANNOTATION_PREFIX + "exclude-inbound-ports"
OUTBOUND_ANNOTATION = ANNOTATION_PREFIX + "outbound"

# Istio's annotations for the proxy's resources, with the settings they
# override: requests (proxyCPU, proxyMemory) and limits.
ISTIO_PREFIX = "sidecar.istio.io/"
RESOURCE_ANNOTATIONS: tuple[tuple[str, str, str], ...] = (
    (ISTIO_PREFIX + "proxyCPU", "requests", "cpu"),
    (ISTIO_PREFIX + "proxyMemory", "requests", "memory"),
    (ISTIO_PREFIX + "proxyCPULimit", "limits", "cpu"),
    (ISTIO_PREFIX + "proxyMemoryLimit", "limits", "memory"),
)

# Istio's annotations for the probe rewrite and the outbound capture's
# exclusions (the init script's -i, -x and -q).
REWRITE_PROBES_ANNOTATION = ISTIO_PREFIX + "rewriteAppHTTPProbers"
TRAFFIC_PREFIX = "traffic.sidecar.istio.io/"
OUTBOUND_CAPTURE_ANNOTATIONS: tuple[tuple[str, str, str], ...] = (
    (TRAFFIC_PREFIX + "includeOutboundIPRanges", "-i", "cidrs"),
    (TRAFFIC_PREFIX + "excludeOutboundIPRanges", "-x", "cidrs"),
    (TRAFFIC_PREFIX + "excludeOutboundPorts", "-q", "ports"),
)

# Istio's protocol selection (Service port names "<protocol>[-<suffix>]" and
# appProtocol), and what the proxy makes of each: "tcp" is an opaque port
# (--opaque-ports, never sniffed), "http2" and "grpc" a --port-protocol, and
# None means the proxy's detection decides. A declared "http" port is left to
# detection too: HTTP/1.x is recognised from its first bytes without waiting,
# and detection still passes a client that speaks h2c or TLS there (a
# --port-protocol PORT=http would refuse it). grpc-web is HTTP/1.1 or HTTP/2
# from one client to the next, so it is detected. "https" and "tls" are TLS
# that the service terminates itself: opaque to the proxy. "udp" is never
# captured (the redirect is TCP only).
PROTOCOLS: dict[str, str | None] = {
    "http": None,
    "http2": "http2",
    "grpc": "grpc",
    "grpc-web": None,
    "https": "tcp",
    "tls": "tcp",
    "tcp": "tcp",
    "mongo": "tcp",
    "mysql": "tcp",
    "redis": "tcp",
}
# appProtocol values Kubernetes defines (KEP-3726), as Istio reads them.
KUBERNETES_APP_PROTOCOLS: dict[str, str] = {
    "kubernetes.io/h2c": "http2",
    "kubernetes.io/ws": "http",
    "kubernetes.io/wss": "tls",
}
# Ports whose protocol is not HTTP even when nothing declares it: server-first
# protocols (the client waits for a greeting, so detection would wait for its
# timeout) and binary ones. Linkerd's default opaque ports (25, 587, 3306, 4444,
# 5432, 6379, 9300, 11211), Istio's well-known ports (3306, 27017 and the
# like), and a few more of the same kind.
WELL_KNOWN_PORTS: dict[int, str] = {
    25: "SMTP",
    53: "DNS over TCP",
    587: "SMTP submission",
    1433: "SQL Server",
    1521: "Oracle",
    2181: "ZooKeeper",
    3306: "MySQL",
    4222: "NATS",
    4444: "Galera",
    5432: "PostgreSQL",
    5672: "AMQP",
    6379: "Redis",
    9042: "Cassandra",
    9092: "Kafka",
    9300: "Elasticsearch transport",
    11211: "memcached",
    27017: "MongoDB",
}

# Prometheus' scrape annotations, as Istio sets them on injected pods.
PROMETHEUS_SCRAPE = "prometheus.io/scrape"
PROMETHEUS_PORT = "prometheus.io/port"
PROMETHEUS_PATH = "prometheus.io/path"
METRICS_PATH = "/stats/prometheus"

# The proxy's own defaults (sidecar.tap): flags equal to them are not written.
DEFAULT_ADMIN_PORT = 15000
DEFAULT_HEALTH_PORT = 15021
DEFAULT_OUTBOUND_PORT = 15001

# The proxy's environment variable for the application's own probes (Istio's
# name): JSON, each /app-health path to the probe it stands for. The same as
# sidecar.probes.PROBERS_ENV (tests/test_probes.py checks), which this command
# does not import: it needs no Twisted.
PROBERS_ENV = "ISTIO_KUBE_APP_PROBERS"
APP_HEALTH = "/app-health"
# Each kind of probe and the last part of its /app-health path, as Istio's.
PROBE_KINDS: tuple[tuple[str, str], ...] = (
    ("startupProbe", "startupz"),
    ("livenessProbe", "livez"),
    ("readinessProbe", "readyz"),
)

# The proxy's environment, from the downward API: each variable and the pod
# field it holds. sidecar.metrics reads them for Istio's destination_* labels
# (workload from POD_NAME, principal from POD_NAMESPACE and SERVICE_ACCOUNT). A
# label the pod lacks gives an empty value, which the metrics report as
# "unknown".
DOWNWARD_ENV: tuple[tuple[str, str], ...] = (
    ("POD_NAME", "metadata.name"),
    ("POD_NAMESPACE", "metadata.namespace"),
    ("SERVICE_ACCOUNT", "spec.serviceAccountName"),
    ("APP", "metadata.labels['app']"),
    ("APP_VERSION", "metadata.labels['version']"),
)

# The health port's paths the probes ask: /healthz/ready turns 503 while the
# proxy drains (or is not serving yet), /stats/prometheus answers 200 as long
# as the process runs (the admin port, with /server_info, is loopback only).
READY_PATH = "/healthz/ready"
LIVE_PATH = METRICS_PATH

# Where each kind keeps its pod template: the path to the object holding
# "metadata" and "spec" of the pods. A Pod is its own template.
TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


class InjectionError(Exception):
    """
    The input cannot be injected; the message is one sentence for the user.
    """


@attrs.frozen
class InjectionSettings:
    """
    What the injected containers look like.

    @ivar proxyImage: the proxy's image (the top-level C{Dockerfile}).
    @ivar initImage: the init container's image (C{init/Dockerfile}).
    @ivar imagePullPolicy: for both images.
    @ivar proxyPort: the proxy's plain HTTP port, where captured traffic goes.
    @ivar adminPort: the proxy's admin port, on loopback only (never
        captured, and reserved in the pod).
    @ivar healthPort: the proxy's health port, serving C{/healthz/ready} and
        C{/stats/prometheus} to the kubelet's probes and to Prometheus.
    @ivar tlsPort: the proxy's TLS port, used when C{tlsSecret} is set.
    @ivar tlsSecret: the name of a Secret with C{cert.pem}, C{key.pem} and
        C{ca.pem}; when set, captured traffic goes to the TLS port and the
        proxy serves mutual TLS only.
    @ivar logFormat: the proxy's access log format.
    @ivar proxyCPU: the proxy's CPU request (Istio's default).
    @ivar proxyMemory: the proxy's memory request.
    @ivar proxyCPULimit: the proxy's CPU limit.
    @ivar proxyMemoryLimit: the proxy's memory limit.
    @ivar proxyUID: the user the proxy runs as (not root).
    @ivar nativeSidecar: put the proxy among the init containers with
        C{restartPolicy: Always}; otherwise it is an ordinary container, for
        clusters older than Kubernetes 1.29.
    @ivar outbound: capture the pods' outgoing TCP too (the init script's
        C{-o}, the proxy's C{--outbound-listen}); the C{sidecar/outbound}
        annotation decides for one pod template.
    @ivar outboundPort: the proxy's outbound listener.
    """

    proxyImage: str = "sidecar-proxy:latest"
    initImage: str = "sidecar-init:latest"
    imagePullPolicy: str = "IfNotPresent"
    proxyPort: int = 8000
    adminPort: int = DEFAULT_ADMIN_PORT
    healthPort: int = DEFAULT_HEALTH_PORT
    tlsPort: int = 8443
    tlsSecret: str | None = None
    logFormat: str = "text"
    proxyCPU: str = "100m"
    proxyMemory: str = "128Mi"
    proxyCPULimit: str = "2000m"
    proxyMemoryLimit: str = "1Gi"
    proxyUID: int = 1337
    nativeSidecar: bool = True
    outbound: bool = False
    outboundPort: int = DEFAULT_OUTBOUND_PORT

    @property
    def captureTo(self) -> int:
        """
        The port captured traffic is redirected to.
        """
        return self.tlsPort if self.tlsSecret else self.proxyPort

    @property
    def ownPorts(self) -> tuple[int, ...]:
        """
        The ports the proxy itself listens on.
        """
        own = (self.tlsPort if self.tlsSecret else self.proxyPort, self.adminPort, self.healthPort)
        if self.outbound:
            return (*own, self.outboundPort)
        return own


def objectName(obj: dict[str, Any]) -> str:
    """
    @param obj: a Kubernetes object.
    @return: C{Kind/name}, as messages name it.
    """
    metadata = obj.get("metadata") or {}
    name = metadata.get("name") or metadata.get("generateName") or "(unnamed)"
    return f"{obj.get('kind')}/{name}"


def _portNumber(value: object, what: str) -> int:
    """
    Read one port number.

    @param value: an integer or a decimal string.
    @param what: where it came from, for the error.
    @return: the port.
    @raise InjectionError: if it is not a port from 1 to 65535.
    """
    text = str(value).strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise InjectionError(f"{what} must be a port number from 1 to 65535, not {value!r}.")
    return int(text)


def _portList(value: object, what: str, wildcard: bool) -> list[str]:
    """
    Read a comma-separated port list from an annotation.

    @param value: the annotation's value.
    @param what: where it came from, for the error.
    @param wildcard: whether C{*} (every port) is allowed.
    @return: the ports as strings, C{["*"]} for the wildcard.
    """
    text = str(value).strip()
    if wildcard and text == "*":
        return ["*"]
    return [str(_portNumber(part, what)) for part in text.split(",") if part.strip()]


#: A Kubernetes resource quantity: a decimal number and a suffix.
_QUANTITY = re.compile(r"\A(\d+(?:\.\d+)?|\.\d+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|[eE][-+]?\d+)?\Z")
_SUFFIX = {
    None: 1, "m": 10**-3, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}


def quantity(value: object, what: str) -> float:
    """
    Read a Kubernetes resource quantity (C{100m}, C{0.5}, C{128Mi}, C{1e3}).

    @param value: the quantity.
    @param what: where it came from, for the error.
    @return: its value in base units (cores, bytes).
    @raise InjectionError: if it is not a positive quantity.
    """
    match = _QUANTITY.match(str(value).strip())
    if match is None:
        raise InjectionError(
            f"{what} must be a Kubernetes quantity such as 100m, 0.5, 128Mi or 1Gi, not {value!r}.")
    number, suffix = match.groups()
    if suffix is not None and suffix[0] in "eE":
        result = float(number) * 10 ** int(suffix[1:])
    else:
        result = float(number) * _SUFFIX[suffix]
    if result <= 0:
        raise InjectionError(f"{what} must be above zero, not {value!r}.")
    return result


def proxyResources(
    settings: InjectionSettings, annotations: dict[str, Any], where: str
) -> dict[str, dict[str, str]]:
    """
    The proxy's requests and limits: the settings, or the pod template's
    C{sidecar.istio.io/proxyCPU}, C{proxyMemory}, C{proxyCPULimit} and
    C{proxyMemoryLimit} annotations.

    @param settings: the injection settings.
    @param annotations: the pod template's annotations.
    @param where: the owning object's C{Kind/name}, for errors.
    @return: the container's C{resources}.
    @raise InjectionError: for a value that is not a quantity, or a request
        above its limit (which the API server would refuse).
    """
    chosen = {
        ("requests", "cpu"): (settings.proxyCPU, "--proxy-cpu"),
        ("requests", "memory"): (settings.proxyMemory, "--proxy-memory"),
        ("limits", "cpu"): (settings.proxyCPULimit, "--proxy-cpu-limit"),
        ("limits", "memory"): (settings.proxyMemoryLimit, "--proxy-memory-limit"),
    }
    for annotation, kind, resource in RESOURCE_ANNOTATIONS:
        if annotation in annotations:
            chosen[kind, resource] = (str(annotations[annotation]).strip(), f"{where}'s {annotation} annotation")
    values = {key: quantity(value, what) for key, (value, what) in chosen.items()}
    for resource in ("cpu", "memory"):
        if values["requests", resource] > values["limits", resource]:
            raise InjectionError(
                f"{where}: the proxy's {resource} request {chosen['requests', resource][0]}"
                f" (from {chosen['requests', resource][1]}) is above its limit"
                f" {chosen['limits', resource][0]} (from {chosen['limits', resource][1]}).")
    return {
        kind: {resource: chosen[kind, resource][0] for resource in ("cpu", "memory")}
        for kind in ("requests", "limits")
    }


def _argList(args: Iterable[str]) -> list[str]:
    """
    @param args: a container's arguments.
    @return: them as a list written on one line, each in double quotes, as a
        command line reads (C{args: ["--listen", "8000"]}).
    """
    result = CommentedSeq(DoubleQuotedScalarString(arg) for arg in args)
    result.fa.set_flow_style()
    return result


def _appContainers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """
    @param spec: a pod spec.
    @return: its containers other than the proxy.
    """
    return [c for c in spec.get("containers") or [] if c.get("name") != PROXY_NAME]


def _tcpPorts(containers: Iterable[dict[str, Any]]) -> list[tuple[str, int]]:
    """
    @param containers: containers.
    @return: every TCP container port, with its container's name, in order.
    """
    ports = []
    for container in containers:
        for port in container.get("ports") or []:
            if port.get("protocol", "TCP") == "TCP" and "containerPort" in port:
                ports.append((container.get("name", "?"), int(port["containerPort"])))
    return ports


@attrs.frozen
class PortProtocol:
    """
    What a pod's port speaks, and who said so.

    @ivar port: the container port (the port as dialled, which the proxy's
        C{--port-protocol} and C{--opaque-ports} name).
    @ivar protocol: Istio's protocol name (L{PROTOCOLS}).
    @ivar source: where it was declared, for messages.
    """

    port: int
    protocol: str
    source: str

    @property
    def proxy(self) -> str | None:
        """
        @return: the proxy's protocol for the port: C{tcp} (opaque),
            C{http2}, C{grpc}, or L{None} to leave it to detection.
        """
        return PROTOCOLS[self.protocol]


def protocolName(name: object, appProtocol: object = None) -> str | None:
    """
    Istio's protocol selection for one port: its C{appProtocol}, else its
    name's prefix (C{<protocol>[-<suffix>]}, C{grpc-web} whole).

    @param name: the port's name, or L{None}.
    @param appProtocol: the Service port's C{appProtocol}, or L{None}.
    @return: a key of L{PROTOCOLS}, or L{None} when neither declares one.
    """
    if appProtocol:
        value = str(appProtocol).strip().lower()
        value = KUBERNETES_APP_PROTOCOLS.get(value, value)
        if value in PROTOCOLS:
            return value
    if name:
        lowered = str(name).strip().lower()
        if lowered.startswith("grpc-web"):
            return "grpc-web"
        prefix = lowered.split("-", 1)[0]
        if prefix in PROTOCOLS:
            return prefix
    return None


def servicesIn(documents: Iterable[object]) -> list[dict[str, Any]]:
    """
    @param documents: the objects of a YAML stream.
    @return: its Services, those inside a C{List} included, in order.
    """
    found = []
    for doc in documents:
        if not isinstance(doc, dict):
            continue
        if doc.get("kind") == "Service":
            found.append(doc)
        elif isinstance(doc.get("items"), list):
            found += servicesIn(doc["items"])
    return found


def selects(service: dict[str, Any], labels: dict[str, Any], namespace: object) -> bool:
    """
    Whether a Service sends to pods with these labels, as the endpoints
    controller decides: every key of its selector equal, in the same
    namespace (an object without one is taken to be in the same).

    @param service: a Service.
    @param labels: the pod template's labels.
    @param namespace: the workload's namespace, or L{None}.
    @return: whether it selects them; a Service without a selector selects
        nothing (its endpoints are managed by hand).
    """
    selector = (service.get("spec") or {}).get("selector") or {}
    theirs = (service.get("metadata") or {}).get("namespace")
    if theirs and namespace and theirs != namespace:
        return False
    return bool(selector) and all(str(labels.get(k)) == str(v) for k, v in selector.items())


def _namedPorts(containers: Iterable[dict[str, Any]]) -> dict[str, int]:
    """
    @param containers: containers.
    @return: their named TCP ports, name to number.
    """
    return {
        str(port["name"]): int(port["containerPort"])
        for c in containers for port in c.get("ports") or []
        if port.get("name") and port.get("protocol", "TCP") == "TCP" and "containerPort" in port
    }


def portProtocols(
    apps: Sequence[dict[str, Any]],
    labels: dict[str, Any],
    namespace: object,
    services: Sequence[dict[str, Any]],
    ports: Iterable[int] = (),
) -> tuple[dict[int, PortProtocol], list[str]]:
    """
    What each port of a pod speaks, following Istio's protocol selection: the
    C{appProtocol} or the name of a Service port that selects the pod (its
    C{targetPort} by number or by container port name), else the container
    port's name, else a well-known non-HTTP port (L{WELL_KNOWN_PORTS}, by
    the Service's port or the container's).

    @param apps: the pod's containers (the proxy's excluded).
    @param labels: the pod template's labels.
    @param namespace: the workload's namespace, or L{None}.
    @param services: every Service of the stream.
    @param ports: more ports the pod serves (the captured ones).
    @return: the ports with a known protocol, and notes about Services that
        disagree (the first in the stream wins).
    """
    named = _namedPorts(apps)
    found: dict[int, PortProtocol] = {}
    notes: list[str] = []
    candidates = [number for _, number in _tcpPorts(apps)] + list(ports)

    def declare(found_: PortProtocol) -> None:
        previous = found.get(found_.port)
        if previous is None:
            found[found_.port] = found_
        elif previous.proxy != found_.proxy:
            notes.append(
                f"port {found_.port} is {previous.protocol} for {previous.source} but"
                f" {found_.protocol} for {found_.source}; the first is used")

    for service in services:
        if not selects(service, labels, namespace):
            continue
        for servicePort in (service.get("spec") or {}).get("ports") or []:
            if servicePort.get("protocol", "TCP") != "TCP" or "port" not in servicePort:
                continue
            target = servicePort.get("targetPort", servicePort["port"])
            if str(target).isdigit():
                number = int(target)
            elif str(target) in named:
                number = named[str(target)]
            else:
                continue
            candidates.append(number)
            label = servicePort.get("name") or servicePort["port"]
            source = f"{objectName(service)} port {label}"
            protocol = protocolName(servicePort.get("name"), servicePort.get("appProtocol"))
            if protocol is None and int(servicePort["port"]) in WELL_KNOWN_PORTS:
                protocol = "tcp"
                source += f" ({WELL_KNOWN_PORTS[int(servicePort['port'])]})"
            if protocol is not None:
                declare(PortProtocol(number, protocol, source))
    for container in apps:
        for port in container.get("ports") or []:
            if port.get("protocol", "TCP") != "TCP" or "containerPort" not in port:
                continue
            number = int(port["containerPort"])
            protocol = protocolName(port.get("name"))
            if protocol is not None and number not in found:
                found[number] = PortProtocol(
                    number, protocol, f"container {container.get('name', '?')} port {port['name']}")
    for number in candidates:
        if number not in found and number in WELL_KNOWN_PORTS:
            found[number] = PortProtocol(number, "tcp", f"the well-known port of {WELL_KNOWN_PORTS[number]}")
    return found, notes


def protocolArgs(
    protocols: dict[int, PortProtocol], inbound: Sequence[str], excluded: Sequence[str]
) -> list[str]:
    """
    The proxy's arguments for the captured ports whose protocol is declared
    and not left to detection: C{--port-protocol PORT=http2|grpc} for each,
    and one C{--opaque-ports P,Q} for those passed through as opaque TCP.

    @param protocols: L{portProtocols}' answer.
    @param inbound: the captured ports, or C{["*"]}.
    @param excluded: ports never captured.
    @return: the arguments, ports in ascending order.
    """
    never = {int(p) for p in excluded}
    if list(inbound) == ["*"]:
        captured = set(protocols) - never
    else:
        captured = {int(p) for p in inbound} - never
    chosen = sorted(p for p in captured if p in protocols and protocols[p].proxy is not None)
    args: list[str] = []
    for port in chosen:
        if protocols[port].proxy != "tcp":
            args += ["--port-protocol", f"{port}={protocols[port].proxy}"]
    opaque = [str(p) for p in chosen if protocols[p].proxy == "tcp"]
    if opaque:
        args += ["--opaque-ports", ",".join(opaque)]
    return args


def _flag(value: object, what: str) -> bool:
    """
    @param value: an annotation's C{"true"} or C{"false"} (or yes/no, 1/0).
    @param what: where it came from, for the error.
    @return: it as a boolean.
    @raise InjectionError: for anything else.
    """
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise InjectionError(f"{what} must be \"true\" or \"false\", not {value!r}.")


def _cidrList(value: object, what: str) -> str:
    """
    @param value: comma-separated IPv4 and IPv6 CIDRs, or C{*}.
    @param what: where it came from, for the error.
    @return: them, checked, without spaces.
    @raise InjectionError: for something that is not a CIDR.
    """
    text = str(value).strip()
    if text == "*":
        return text
    parts = [part.strip() for part in text.split(",") if part.strip()]
    for part in parts:
        try:
            ipaddress.ip_network(part, strict=False)
        except ValueError:
            raise InjectionError(f"{what} must be comma-separated CIDRs such as 10.0.0.0/8 or *; {part!r} is not one.") from None
    return ",".join(parts)


def outboundArgs(settings: InjectionSettings, annotations: dict[str, Any], where: str) -> list[str]:
    """
    The init script's outbound capture (C{-o PORT -u UID}, and C{-i}, C{-x},
    C{-q} from Istio's C{traffic.sidecar.istio.io/includeOutboundIPRanges},
    C{excludeOutboundIPRanges} and C{excludeOutboundPorts} annotations).

    @param settings: the injection settings (with C{outbound} already
        decided for this pod).
    @param annotations: the pod template's annotations.
    @param where: the owning object's C{Kind/name}, for errors.
    @return: the arguments, none when outbound capture is off.
    """
    if not settings.outbound:
        return []
    args = ["-o", str(settings.outboundPort), "-u", str(settings.proxyUID)]
    for annotation, flag, kind in OUTBOUND_CAPTURE_ANNOTATIONS:
        if annotation in annotations:
            what = f"{where}'s {annotation} annotation"
            if kind == "ports":
                args += [flag, ",".join(_portList(annotations[annotation], what, wildcard=False))]
            else:
                args += [flag, _cidrList(annotations[annotation], what)]
    return args


def _replaceKey(mapping: dict[str, Any], old: str, new: str, value: Any) -> None:
    """
    Replace one key of a mapping with another, in its place.

    @param mapping: a probe (a plain dict or a round-trip map), changed in place.
    @param old: the key to drop.
    @param new: the key to put where it was.
    @param value: the new key's value.
    """
    keys = list(mapping)
    position = keys.index(old)
    if hasattr(mapping, "insert"):
        del mapping[old]
        mapping.insert(position, new, value)
        return
    items = [(k, v) for k, v in mapping.items()]
    items[position] = (new, value)
    mapping.clear()
    mapping.update(items)


def _probePort(port: object, container: dict[str, Any], where: str, key: str) -> int:
    """
    @param port: a probe's port: a number, or the name of a container port.
    @param container: the probed container.
    @param where: the owning object's C{Kind/name}, for errors.
    @param key: the probe's kind, for errors.
    @return: the port number.
    """
    if str(port).isdigit():
        return _portNumber(port, f"{where}: container {container.get('name')}'s {key} port")
    named = _namedPorts([container])
    if str(port) not in named:
        raise InjectionError(
            f"{where}: container {container.get('name')}'s {key} names port {port!r},"
            f" which the container does not declare.")
    return named[str(port)]


def restoreProbes(spec: dict[str, Any], apps: Sequence[dict[str, Any]], where: str) -> None:
    """
    Undo an earlier injection's probe rewrite: each app container probe that
    asks its C{/app-health} path gets back the probe that the old proxy's
    C{ISTIO_KUBE_APP_PROBERS} holds for that path, so that injecting again
    starts from the workload's own probes.

    @param spec: the pod spec, with the old proxy if any.
    @param apps: its app containers, changed in place.
    @param where: the owning object's C{Kind/name}, for errors.
    """
    probers: dict[str, Any] = {}
    for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        if c.get("name") != PROXY_NAME:
            continue
        for var in c.get("env") or []:
            if var.get("name") == PROBERS_ENV:
                try:
                    probers = json.loads(var.get("value") or "{}")
                except ValueError:
                    raise InjectionError(f"{where}: the proxy's {PROBERS_ENV} is not JSON.") from None
    if not isinstance(probers, dict):
        raise InjectionError(f"{where}: the proxy's {PROBERS_ENV} is not a JSON object.")
    for container in apps:
        for key, suffix in PROBE_KINDS:
            probe = container.get(key)
            path = f"{APP_HEALTH}/{container.get('name')}/{suffix}"
            if not isinstance(probe, dict) or path not in probers:
                continue
            if (probe.get("httpGet") or {}).get("path") != path:
                continue
            handler = [k for k in probers[path] if k in ("httpGet", "tcpSocket", "grpc")]
            if len(handler) == 1:
                _replaceKey(probe, "httpGet", handler[0], copy.deepcopy(probers[path][handler[0]]))


def rewriteProbes(
    apps: Sequence[dict[str, Any]],
    settings: InjectionSettings,
    captured: Sequence[str],
    excluded: Sequence[str],
    rewriteHTTP: bool,
    where: str,
) -> dict[str, dict[str, Any]]:
    """
    Point the app containers' probes at the proxy's health port, as Istio
    does, where the kubelet could not reach the application itself: the
    probe becomes an C{httpGet} of C{/app-health/<container>/livez},
    C{readyz} or C{startupz} on the health port, and the proxy, given the
    original probe, probes the application over loopback.

      - C{httpGet} probes when C{rewriteHTTP} (the pod is mutual-TLS only,
        or Istio's C{sidecar.istio.io/rewriteAppHTTPProbers} says so): on
        the mTLS listener the kubelet's plain request would fail; through
        the plain proxy it reaches the application.
      - C{tcpSocket} probes of a captured port, always: the redirect sends
        the kubelet's connect to the proxy, which accepts it whatever the
        application's state, so the probe would test the proxy.
      - C{grpc} probes of a captured port, always: under mutual TLS the
        kubelet's plain HTTP/2 would fail, and in a plain pod the probe
        would depend on the proxy's own HTTP/2 path; the proxy's health
        check asks the application directly.

    Other probes (C{exec}, ports that are not captured) are left alone.

    @param apps: the app containers, changed in place.
    @param settings: the injection settings.
    @param captured: the captured ports, or C{["*"]}.
    @param excluded: ports never captured.
    @param rewriteHTTP: whether C{httpGet} probes are rewritten.
    @param where: the owning object's C{Kind/name}, for errors.
    @return: the probers for the proxy: each C{/app-health} path to the
        original probe's handler (its port a number) and C{timeoutSeconds}.
    """
    never = {int(p) for p in excluded} | {settings.healthPort}

    def isCaptured(port: int) -> bool:
        return port not in never and (list(captured) == ["*"] or str(port) in captured)

    probers: dict[str, dict[str, Any]] = {}
    for container in apps:
        for key, suffix in PROBE_KINDS:
            probe = container.get(key)
            if not isinstance(probe, dict):
                continue
            if isinstance(probe.get("httpGet"), dict) and rewriteHTTP:
                kind = "httpGet"
                get = probe["httpGet"]
                handler: dict[str, Any] = {
                    "path": str(get.get("path") or "/"),
                    "port": _probePort(get.get("port"), container, where, key),
                    "scheme": str(get.get("scheme") or "HTTP").upper(),
                }
                if get.get("host"):
                    handler["host"] = str(get["host"])
                if get.get("httpHeaders"):
                    handler["httpHeaders"] = [
                        {"name": str(h["name"]), "value": str(h.get("value", ""))} for h in get["httpHeaders"]]
            elif isinstance(probe.get("tcpSocket"), dict):
                kind = "tcpSocket"
                port = _probePort(probe["tcpSocket"].get("port"), container, where, key)
                if not isCaptured(port):
                    continue
                handler = {"port": port}
                if probe["tcpSocket"].get("host"):
                    handler["host"] = str(probe["tcpSocket"]["host"])
            elif isinstance(probe.get("grpc"), dict):
                kind = "grpc"
                port = _portNumber(probe["grpc"].get("port"), f"{where}: container {container.get('name')}'s {key} port")
                if not isCaptured(port):
                    continue
                handler = {"port": port}
                if probe["grpc"].get("service"):
                    handler["service"] = str(probe["grpc"]["service"])
            else:
                continue
            path = f"{APP_HEALTH}/{container.get('name')}/{suffix}"
            probers[path] = {kind: handler, "timeoutSeconds": int(probe.get("timeoutSeconds") or 1)}
            _replaceKey(probe, kind, "httpGet", {"path": path, "port": settings.healthPort, "scheme": "HTTP"})
    return probers


def initContainer(
    settings: InjectionSettings,
    inbound: Sequence[str],
    excluded: Sequence[str],
    outbound: Sequence[str] = (),
) -> dict[str, Any]:
    """
    The init container that installs the redirect.

    @param settings: the injection settings.
    @param inbound: the ports to capture, or C{["*"]}.
    @param excluded: more ports never to capture.
    @param outbound: the outbound capture's arguments (L{outboundArgs}).
    @return: the container.
    """
    # The health port is never captured: the kubelet and Prometheus reach it
    # from outside the pod, whatever -b says; nor is the outbound listener.
    ours = [str(settings.healthPort)]
    if outbound:
        ours.append(str(settings.outboundPort))
    never = [*ours, *(p for p in excluded if p not in ours)]
    args = [
        "-p", str(settings.captureTo),
        "-b", ",".join(inbound),
        "-a", str(settings.adminPort),
        "-t", str(settings.tlsPort),
        "-d", ",".join(never),
        *outbound,
    ]
    return {
        "name": INIT_NAME,
        "image": settings.initImage,
        "imagePullPolicy": settings.imagePullPolicy,
        "args": _argList(args),
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    }


def _healthProbe(
    settings: InjectionSettings,
    path: str,
    periodSeconds: int,
    failureThreshold: int,
    timeoutSeconds: int | None = None,
) -> dict[str, Any]:
    """
    An HTTP probe on the health port.

    @param settings: the injection settings.
    @param path: the path asked.
    @param periodSeconds: how often.
    @param failureThreshold: how many failures in a row count.
    @param timeoutSeconds: how long one answer may take; L{None} for
        Kubernetes' default (1 s).
    @return: the probe.
    """
    probe: dict[str, Any] = {
        "httpGet": {"path": path, "port": settings.healthPort},
        "periodSeconds": periodSeconds,
    }
    if timeoutSeconds is not None:
        probe["timeoutSeconds"] = timeoutSeconds
    probe["failureThreshold"] = failureThreshold
    return probe


def downwardEnv() -> list[dict[str, Any]]:
    """
    @return: the proxy's environment variables from the downward API
        (L{DOWNWARD_ENV}).
    """
    return [
        {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}
        for name, path in DOWNWARD_ENV
    ]


def proxyContainer(
    settings: InjectionSettings,
    servicePort: int,
    resources: dict[str, dict[str, str]] | None = None,
    protocols: Sequence[str] = (),
    probers: dict[str, dict[str, Any]] | None = None,
    original: bool = False,
) -> dict[str, Any]:
    """
    The proxy container.

    @param settings: the injection settings.
    @param servicePort: the port of the service the proxy forwards to.
    @param resources: its requests and limits (L{proxyResources}); L{None}
        for the settings'.
    @param protocols: the captured ports' declared protocols
        (L{protocolArgs}).
    @param probers: the app containers' probes the proxy performs for the
        kubelet (L{rewriteProbes}), given as C{ISTIO_KUBE_APP_PROBERS}.
    @param original: every inbound port is captured (C{*}): the proxy forwards
        each connection to the port it was dialled on (C{--upstream original}).
    @return: the container.
    """
    if settings.tlsSecret:
        listen = [
            "--listen", "none",
            "--tls-listen", str(settings.tlsPort),
            "--tls-cert", f"{CERTS_DIR}/cert.pem",
            "--tls-key", f"{CERTS_DIR}/key.pem",
            "--tls-ca", f"{CERTS_DIR}/ca.pem",
        ]
        ports = [{"name": "sidecar-https", "containerPort": settings.tlsPort}]
    else:
        listen = ["--listen", str(settings.proxyPort)]
        ports = [{"name": "sidecar-http", "containerPort": settings.proxyPort}]
    ports.append({"name": "sidecar-health", "containerPort": settings.healthPort})
    args = [*listen, "--upstream", "original" if original else str(servicePort), *protocols]
    if settings.outbound:
        args += ["--outbound-listen", str(settings.outboundPort)]
    # The proxy's defaults are the admin on 127.0.0.1:15000 and the health port
    # on 15021; other ports are said, the admin's still on loopback.
    if settings.adminPort != DEFAULT_ADMIN_PORT:
        args += ["--admin", f"tcp:{settings.adminPort}:interface=127.0.0.1"]
    if settings.healthPort != DEFAULT_HEALTH_PORT:
        args += ["--health", str(settings.healthPort)]
    args += ["--log-format", settings.logFormat, "--access-log", "-"]
    container: dict[str, Any] = {
        "name": PROXY_NAME,
        "image": settings.proxyImage,
        "imagePullPolicy": settings.imagePullPolicy,
        "args": _argList(args),
        "env": downwardEnv() + (
            [{"name": PROBERS_ENV, "value": json.dumps(probers, sort_keys=True, separators=(",", ":"))}]
            if probers else []),
        "ports": ports,
        "resources": resources or proxyResources(settings, {}, "the settings"),
    }
    if settings.nativeSidecar:
        container["restartPolicy"] = "Always"
    # The kubelet starts the service only once the startup probe passes (native
    # sidecars); the readiness probe keeps the pod out of its Services when the
    # proxy cannot serve. The liveness probe (which starts once the startup
    # probe passed) must not ask /healthz/ready: that is 503 while the proxy
    # drains, and a liveness failure would restart a proxy finishing its
    # requests. It asks /stats/prometheus, which fails only when the process
    # does not answer: about 30 s of that (3 misses 10 s apart, 3 s each)
    # restarts the proxy.
    container["startupProbe"] = _healthProbe(settings, READY_PATH, periodSeconds=1, failureThreshold=30)
    container["readinessProbe"] = _healthProbe(settings, READY_PATH, periodSeconds=5, failureThreshold=3)
    container["livenessProbe"] = _healthProbe(
        settings, LIVE_PATH, periodSeconds=10, failureThreshold=3, timeoutSeconds=3
    )
    container["securityContext"] = {
        "runAsUser": settings.proxyUID,
        "runAsGroup": settings.proxyUID,
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    if settings.tlsSecret:
        container["volumeMounts"] = [
            {"name": CERTS_VOLUME, "mountPath": CERTS_DIR, "readOnly": True}
        ]
    return container


def _without(containers: list[dict[str, Any]] | None, names: Iterable[str]) -> list[dict[str, Any]]:
    """
    @param containers: a container list, or L{None}.
    @param names: names to drop.
    @return: the list without containers of those names.
    """
    drop = set(names)
    return [c for c in containers or [] if c.get("name") not in drop]


def injectTemplate(
    template: dict[str, Any],
    where: str,
    settings: InjectionSettings,
    services: Sequence[dict[str, Any]] = (),
    namespace: object = None,
    notes: list[str] | None = None,
) -> str | None:
    """
    Add the init container and the proxy to one pod template, in place.

    @param template: an object with the pods' C{metadata} and C{spec}.
    @param where: the owning object's C{Kind/name}, for messages.
    @param settings: the injection settings.
    @param services: the Services of the stream, whose ports declare the
        pod's protocols.
    @param namespace: the workload's namespace, or L{None}.
    @param notes: where to add remarks about an injected template.
    @return: L{None} when injected, or why the template was left alone.
    @raise InjectionError: when the template cannot be injected as asked.
    """
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    labels = (template.get("metadata") or {}).get("labels") or {}
    spec = template.get("spec")
    if not isinstance(spec, dict):
        raise InjectionError(f"{where} has no pod spec to inject into.")
    if str(annotations.get(INJECT_ANNOTATION, "true")).lower() in ("false", "no", "0"):
        return f"left {where} alone: its {INJECT_ANNOTATION} annotation says no"
    if spec.get("hostNetwork"):
        return f"left {where} alone: it uses the host's network, which the init container must not rewrite"

    if OUTBOUND_ANNOTATION in annotations:
        settings = attrs.evolve(
            settings, outbound=_flag(annotations[OUTBOUND_ANNOTATION], f"{where}'s {OUTBOUND_ANNOTATION} annotation"))
    apps = _appContainers(spec)
    ports = _tcpPorts(apps)
    for container, port in ports:
        if port in settings.ownPorts:
            raise InjectionError(
                f"{where}: container {container} uses port {port}, which the proxy needs;"
                f" choose other ports for the proxy with --proxy-port, --admin-port, --health-port,"
                f" --tls-port or --outbound-port."
            )
    if SERVICE_PORT_ANNOTATION in annotations:
        servicePort = _portNumber(
            annotations[SERVICE_PORT_ANNOTATION], f"{where}'s {SERVICE_PORT_ANNOTATION} annotation"
        )
    elif ports:
        servicePort = ports[0][1]
    else:
        return (
            f"left {where} alone: it has no TCP container port and no"
            f" {SERVICE_PORT_ANNOTATION} annotation, so there is nothing to proxy"
        )
    if INBOUND_PORTS_ANNOTATION in annotations:
        inbound = _portList(
            annotations[INBOUND_PORTS_ANNOTATION], f"{where}'s {INBOUND_PORTS_ANNOTATION} annotation",
            wildcard=True,
        )
    else:
        inbound = [str(servicePort)]
    excluded = _portList(
        annotations.get(EXCLUDE_PORTS_ANNOTATION, ""),
        f"{where}'s {EXCLUDE_PORTS_ANNOTATION} annotation",
        wildcard=False,
    )

    resources = proxyResources(settings, annotations, where)
    protocols, disagreements = portProtocols(
        apps, labels, namespace, services, [int(p) for p in inbound if p != "*"])
    if notes is not None:
        notes += [f"{where}: {n}" for n in disagreements]
    outbound = outboundArgs(settings, annotations, where)
    if REWRITE_PROBES_ANNOTATION in annotations:
        rewrite = _flag(annotations[REWRITE_PROBES_ANNOTATION], f"{where}'s {REWRITE_PROBES_ANNOTATION} annotation")
        rewriteHTTP = rewriteTCP = rewrite
    else:
        # Only a mutual-TLS pod needs it for httpGet; tcpSocket and grpc
        # probes of a captured port always (see rewriteProbes).
        rewriteHTTP, rewriteTCP = bool(settings.tlsSecret), True

    restoreProbes(spec, apps, where)
    probers = rewriteProbes(apps, settings, inbound, excluded, rewriteHTTP, where) if rewriteTCP else {}

    ours = (INIT_NAME, PROXY_NAME)
    initContainers = [initContainer(settings, inbound, excluded, outbound)]
    containers = _without(spec.get("containers"), ours)
    proxy = proxyContainer(
        settings, servicePort, resources, protocolArgs(protocols, inbound, excluded), probers,
        original=list(inbound) == ["*"])
    if settings.nativeSidecar:
        initContainers.append(proxy)
    else:
        containers.append(proxy)
    initContainers += _without(spec.get("initContainers"), ours)
    if "initContainers" not in spec and "containers" in spec and hasattr(spec, "insert"):
        # Readers expect the init containers just before the containers; a
        # round-trip map keeps its comments when a key is inserted.
        spec.insert(list(spec).index("containers"), "initContainers", initContainers)
    elif "initContainers" not in spec:
        reordered = {}
        for key, value in spec.items():
            if key == "containers":
                reordered["initContainers"] = initContainers
            reordered[key] = value
        spec.clear()
        spec.update(reordered)
    spec["initContainers"] = initContainers
    spec["containers"] = containers

    volumes = _without(spec.get("volumes"), [CERTS_VOLUME])
    if settings.tlsSecret:
        # Readable by the pod's fsGroup only; the proxy runs with that group.
        volumes.append(
            {
                "name": CERTS_VOLUME,
                "secret": {"secretName": settings.tlsSecret, "defaultMode": 0o440},
            }
        )
        podSecurity = spec.setdefault("securityContext", {})
        podSecurity.setdefault("fsGroup", settings.proxyUID)
    if volumes:
        spec["volumes"] = volumes
    else:
        spec.pop("volumes", None)
    _scrapeAnnotations(template, settings)
    return None


def _scrapeAnnotations(template: dict[str, Any], settings: InjectionSettings) -> None:
    """
    Point Prometheus at the proxy's metrics on the health port, as Istio
    annotates injected pods, unless the pod template has scrape annotations of
    its own (an earlier injection's, on C{/stats/prometheus}, are replaced).

    @param template: the pod template, changed in place.
    @param settings: the injection settings.
    """
    metadata = template.get("metadata")
    if metadata is None:
        metadata = template["metadata"] = {}
    annotations = metadata.get("annotations")
    if annotations is None:
        annotations = metadata["annotations"] = {}
    own = PROMETHEUS_SCRAPE in annotations or PROMETHEUS_PORT in annotations
    if own and annotations.get(PROMETHEUS_PATH) != METRICS_PATH:
        return
    annotations[PROMETHEUS_SCRAPE] = "true"
    annotations[PROMETHEUS_PORT] = str(settings.healthPort)
    annotations[PROMETHEUS_PATH] = METRICS_PATH


def injectObject(
    obj: object, settings: InjectionSettings, services: Sequence[dict[str, Any]] = ()
) -> tuple[object, list[str]]:
    """
    Inject one object of a YAML stream.

    @param obj: the parsed document.
    @param settings: the injection settings.
    @param services: the Services of the stream (L{servicesIn}), whose ports
        declare the pods' protocols.
    @return: the injected copy (the same object when there is nothing to
        inject), and notes about what was left alone.
    @raise InjectionError: when a workload cannot be injected as asked.
    """
    if not isinstance(obj, dict):
        return obj, []
    kind = obj.get("kind")
    if kind == "List" or (isinstance(kind, str) and kind.endswith("List") and "items" in obj):
        result = copy.deepcopy(obj)
        notes: list[str] = []
        items = []
        inner = services or servicesIn(obj.get("items") or [])
        for item in obj.get("items") or []:
            injected, more = injectObject(item, settings, inner)
            items.append(injected)
            notes += more
        result["items"] = items
        return result, notes
    path = TEMPLATE_PATHS.get(kind)  # type: ignore[arg-type]
    if path is None:
        return obj, []
    result = copy.deepcopy(obj)
    template: Any = result
    for key in path:
        template = template.get(key) if isinstance(template, dict) else None
    if not isinstance(template, dict):
        raise InjectionError(f"{objectName(obj)} has no pod template at {'.'.join(path)}.")
    notes = []
    namespace = (obj.get("metadata") or {}).get("namespace")
    note = injectTemplate(template, objectName(obj), settings, services, namespace, notes)
    if note is not None:
        return obj, [note]
    return result, notes


def injectStream(text: str, settings: InjectionSettings) -> tuple[str, list[str]]:
    """
    Inject every object of a YAML stream.

    @param text: the YAML stream.
    @param settings: the injection settings.
    @return: the output YAML stream and the notes.
    @raise InjectionError: for unparseable YAML or a workload that cannot be
        injected.
    """
    try:
        documents = [doc for doc in _yaml().load_all(text) if doc is not None]
    except YAMLError as e:
        raise InjectionError(f"the input is not valid YAML ({_describeYAMLError(e)}).") from e
    output = []
    notes: list[str] = []
    services = servicesIn(documents)
    for document in documents:
        injected, more = injectObject(document, settings, services)
        output.append(injected)
        notes += more
    if not output:
        return "", notes
    return _leadingComments(text) + dumpStream(output), notes


def _yaml() -> YAML:
    """
    @return: a round-trip reader and writer: comments, key order and the
        input's quoting kept; block style, sequences at their key's column,
        one C{---} before each document.
    """
    rt = YAML(typ="rt")
    rt.preserve_quotes = True
    rt.width = 100
    rt.explicit_start = True
    rt.indent(mapping=2, sequence=2, offset=0)
    return rt


def dumpStream(documents: Sequence[object]) -> str:
    """
    Write documents as a readable YAML stream: block style, keys in their
    original order, comments where the input had them, one C{---} before
    each document.

    @param documents: the objects (plain or as L{_yaml} read them).
    @return: the YAML text.
    """
    out = io.StringIO()
    _yaml().dump_all(documents, out)
    return out.getvalue()


def _leadingComments(text: str) -> str:
    """
    The comment lines before the first C{---} of a stream, which the YAML
    round trip drops (those after it, it keeps).

    @param text: the input stream.
    @return: those lines, or C{""}.
    """
    prefix = []
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            prefix.append(line)
            continue
        if stripped == "---" or stripped.startswith("--- "):
            return "".join(prefix).lstrip("\n") if any(p.strip() for p in prefix) else ""
        break
    return ""


def _describeYAMLError(error: YAMLError) -> str:
    """
    @param error: a YAML error.
    @return: its problem and line, in a few words.
    """
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    if mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(problem)


def _port(text: str) -> int:
    """
    Read a port flag's value.

    @param text: the value.
    @return: the port.
    @raise argparse.ArgumentTypeError: if it is not a port.
    """
    try:
        return _portNumber(text, "the port")
    except InjectionError as e:
        raise argparse.ArgumentTypeError(str(e).rstrip(".")) from None


def _quantity(text: str) -> str:
    """
    Read a resource flag's value.

    @param text: the value.
    @return: it, checked.
    @raise argparse.ArgumentTypeError: if it is not a Kubernetes quantity.
    """
    try:
        quantity(text, "the value")
    except InjectionError as e:
        raise argparse.ArgumentTypeError(str(e).rstrip(".")) from None
    return text.strip()


def parser(errors: TextIO | None = None) -> argparse.ArgumentParser:
    """
    @param errors: where usage errors go; L{None} for C{sys.stderr}.
    @return: the command line's parser.
    """
    defaults = InjectionSettings()
    p = OneSentenceParser(
        prog="sidecar-inject",
        description=(
            "Add the sidecar's init container and proxy to the Pods, Deployments,"
            " StatefulSets, DaemonSets, ReplicaSets, Jobs and CronJobs of a YAML"
            " stream; other objects pass through unchanged."
        ),
        epilog=(
            f"Annotations on a pod template: {INJECT_ANNOTATION}: \"false\" skips it;"
            f" {SERVICE_PORT_ANNOTATION} is the port the proxy forwards to (default:"
            f" the first TCP container port); {INBOUND_PORTS_ANNOTATION} the ports"
            f" captured (default: the service port; * for all);"
            f" {EXCLUDE_PORTS_ANNOTATION} ports never captured;"
            f" {OUTBOUND_ANNOTATION}: \"true\" captures outgoing TCP, with Istio's"
            f" {', '.join(a for a, _, _ in OUTBOUND_CAPTURE_ANNOTATIONS)};"
            f" {REWRITE_PROBES_ANNOTATION}: \"false\" leaves the app's probes alone, \"true\""
            f" moves its httpGet probes to the health port in plain pods too (default: under mutual TLS);"
            f" {', '.join(a for a, _, _ in RESOURCE_ANNOTATIONS)} the proxy's requests"
            f" and limits, as in Istio."
        ),
    )
    p.add_argument("-f", "--filename", default="-", help="the YAML file to read, - for stdin (default)")
    p.add_argument("-o", "--output", default="-", help="where to write, - for stdout (default)")
    p.add_argument("--proxy-image", default=defaults.proxyImage, help="the proxy's image (default: %(default)s)")
    p.add_argument("--init-image", default=defaults.initImage, help="the init container's image (default: %(default)s)")
    p.add_argument(
        "--image-pull-policy", default=defaults.imagePullPolicy,
        choices=("Always", "IfNotPresent", "Never"), help="for both images (default: %(default)s)",
    )
    p.add_argument("--proxy-port", type=_port, default=defaults.proxyPort, help="the proxy's plain HTTP port (default: %(default)s)")
    p.add_argument("--admin-port", type=_port, default=defaults.adminPort, help="the proxy's admin port, on loopback only (default: %(default)s)")
    p.add_argument("--health-port", type=_port, default=defaults.healthPort, help="the proxy's health port, probed at /healthz/ready and scraped at /stats/prometheus (default: %(default)s)")
    p.add_argument("--tls-port", type=_port, default=defaults.tlsPort, help="the proxy's TLS port (default: %(default)s)")
    p.add_argument(
        "--tls-secret", default=None, metavar="NAME",
        help="a Secret holding cert.pem, key.pem and ca.pem: the proxy then accepts mutual TLS only",
    )
    p.add_argument(
        "--log-format", default=defaults.logFormat, choices=("seed", "text", "json"),
        help="the proxy's access log format (default: %(default)s)",
    )
    p.add_argument(
        "--native-sidecar", action=argparse.BooleanOptionalAction, default=defaults.nativeSidecar,
        help="run the proxy as a native sidecar (Kubernetes 1.29+; default) or as an ordinary container",
    )
    p.add_argument(
        "--outbound", action=argparse.BooleanOptionalAction, default=defaults.outbound,
        help=f"capture the pods' outgoing TCP too (default: off; the {OUTBOUND_ANNOTATION} annotation decides per pod)",
    )
    p.add_argument("--outbound-port", type=_port, default=defaults.outboundPort,
                   help="the proxy's outbound listener (default: %(default)s)")
    for flag, value, what in (
        ("--proxy-cpu", defaults.proxyCPU, "CPU request"),
        ("--proxy-memory", defaults.proxyMemory, "memory request"),
        ("--proxy-cpu-limit", defaults.proxyCPULimit, "CPU limit"),
        ("--proxy-memory-limit", defaults.proxyMemoryLimit, "memory limit"),
    ):
        p.add_argument(flag, type=_quantity, default=value, metavar="QUANTITY",
                       help=f"the proxy's {what} (default: %(default)s)")
    p.errors = errors
    return p


def main(
    argv: Sequence[str] | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """
    Run C{sidecar-inject}.

    @param argv: the arguments, without the program name; L{None} for C{sys.argv}.
    @param stdin: where C{-f -} reads from.
    @param stdout: where C{-o -} writes to.
    @param stderr: where notes and errors go.
    @return: the exit status: 0, or 1 when the input cannot be injected (argument
        errors exit with 2).
    """
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    options = parser(stderr).parse_args(argv)
    settings = InjectionSettings(
        proxyImage=options.proxy_image,
        initImage=options.init_image,
        imagePullPolicy=options.image_pull_policy,
        proxyPort=options.proxy_port,
        adminPort=options.admin_port,
        healthPort=options.health_port,
        tlsPort=options.tls_port,
        tlsSecret=options.tls_secret,
        logFormat=options.log_format,
        nativeSidecar=options.native_sidecar,
        outbound=options.outbound,
        outboundPort=options.outbound_port,
        proxyCPU=options.proxy_cpu,
        proxyMemory=options.proxy_memory,
        proxyCPULimit=options.proxy_cpu_limit,
        proxyMemoryLimit=options.proxy_memory_limit,
    )
    prog = "sidecar-inject"
    try:
        if options.filename == "-":
            text = stdin.read()
        else:
            with open(options.filename, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        stderr.write(f"{prog}: cannot read {options.filename}: {getattr(e, 'strerror', None) or e}.\n")
        return 1
    try:
        output, notes = injectStream(text, settings)
    except InjectionError as e:
        stderr.write(f"{prog}: {e}\n")
        return 1
    for note in notes:
        stderr.write(f"{prog}: {note}.\n")
    try:
        if options.output == "-":
            stdout.write(output)
            stdout.flush()
        else:
            with open(options.output, "w", encoding="utf-8") as f:
                f.write(output)
    except OSError as e:
        stderr.write(f"{prog}: cannot write {options.output}: {e.strerror or e}.\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
