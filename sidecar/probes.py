# -*- test-case-name: tests.test_probes -*-
"""
The application's probes, performed by the sidecar for the kubelet, as Istio's
pilot-agent does (C{/app-health/<container>/livez|readyz|startupz}).

With mutual TLS only, the kubelet's plain C{httpGet} probe of the service port
would land on the mTLS listener and fail; and a C{tcpSocket} probe of a
captured port connects to the proxy, which accepts whatever the application's
state. So C{sidecar-inject} points those probes at the proxy's health port
(15021) and hands the proxy the originals, as JSON, in C{--app-probers} or the
environment variable C{ISTIO_KUBE_APP_PROBERS} (Istio's name and format)::

    {"/app-health/web/readyz": {"httpGet": {"path": "/", "port": 8080, "scheme": "HTTP"},
                                "timeoutSeconds": 1},
     "/app-health/redis/livez": {"tcpSocket": {"port": 6379}, "timeoutSeconds": 1},
     "/app-health/cart/livez": {"grpc": {"port": 7070, "service": ""}, "timeoutSeconds": 1}}

L{AppHealthResource} answers C{GET} of each path by probing the application
over loopback (the proxy's own connections to 127.0.0.1 are never captured),
the way the kubelet would have:

  - C{httpGet}: a C{GET} of the path with the probe's headers (C{https}
    without checking the certificate, as the kubelet); 2xx and 3xx pass
    (redirects are not followed).
  - C{tcpSocket}: a TCP connect.
  - C{grpc}: the gRPC health protocol (C{grpc.health.v1.Health/Check}) over
    HTTP/2 without TLS; C{SERVING} passes.

It answers 200 when the probe passes, 503 when it fails or takes longer than
the probe's C{timeoutSeconds} (default 1, as Kubernetes'), with the reason in
the body, and 404 for a path it does not know. The probe is abandoned if the
kubelet goes away first.

L{parseProbers} is plain data; the rest takes the reactor as an argument.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Mapping

import attrs
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.exceptions import H2Error
from OpenSSL import SSL
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTCP, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

#: The environment variable that carries the probers (Istio's name).
PROBERS_ENV = "ISTIO_KUBE_APP_PROBERS"
#: Kubernetes' default probe timeout, in seconds.
DEFAULT_TIMEOUT = 1
#: At most this much of an application's probe answer is read (as the kubelet).
MAX_BODY = 10 * 1024
#: The gRPC health service's method, and its SERVING status.
GRPC_HEALTH_PATH = b"/grpc.health.v1.Health/Check"
GRPC_SERVING = 1
_KINDS = ("httpGet", "tcpSocket", "grpc")


class ProberError(ValueError):
    """
    The probers cannot be read; the message is one sentence for the user.
    """


@attrs.frozen
class Prober:
    """
    One probe of the application, as the kubelet would have performed it.

    @ivar path: the health port's path that stands for it.
    @ivar kind: C{httpGet}, C{tcpSocket} or C{grpc}.
    @ivar port: the application's port.
    @ivar host: where to connect (C{127.0.0.1} unless the probe names a host).
    @ivar timeout: seconds allowed for an answer.
    @ivar httpPath: C{httpGet}: the path asked.
    @ivar scheme: C{httpGet}: C{HTTP} or C{HTTPS}.
    @ivar headers: C{httpGet}: the probe's headers, in order.
    @ivar service: C{grpc}: the service name asked about (C{""}: the server).
    """

    path: str
    kind: str
    port: int
    host: str = "127.0.0.1"
    timeout: float = DEFAULT_TIMEOUT
    httpPath: str = "/"
    scheme: str = "HTTP"
    headers: tuple[tuple[str, str], ...] = ()
    service: str = ""

    def url(self) -> bytes:
        """
        @return: the C{httpGet} probe's URL.
        """
        host = f"[{self.host}]" if ":" in self.host else self.host
        path = self.httpPath if self.httpPath.startswith("/") else "/" + self.httpPath
        return f"{self.scheme.lower()}://{host}:{self.port}{path}".encode("utf-8")


def _port(value: object, where: str) -> int:
    """
    @param value: a port number.
    @param where: what it belongs to, for the error.
    @return: it.
    @raise ProberError: unless it is a number from 1 to 65535.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ProberError(f"{where}: the port must be a number from 1 to 65535, not {value!r}.")
    return value


def _text(value: object, where: str, what: str) -> str:
    """
    @param value: a string from the JSON.
    @param where: what it belongs to, for the error.
    @param what: the field's name, for the error.
    @return: it.
    @raise ProberError: unless it is printable text.
    """
    if not isinstance(value, str) or not value.isprintable():
        raise ProberError(f"{where}: {what} must be printable text, not {value!r}.")
    return value


def prober(path: str, spec: object) -> Prober:
    """
    Read one prober.

    @param path: its health path.
    @param spec: its JSON value: one of C{httpGet}, C{tcpSocket} or C{grpc},
        and an optional C{timeoutSeconds}.
    @return: the prober.
    @raise ProberError: when it is not a prober.
    """
    if not path.startswith("/") or not path.isprintable() or "?" in path:
        raise ProberError(f"{path!r} is not a path.")
    if not isinstance(spec, dict):
        raise ProberError(f"{path}: the probe must be a JSON object.")
    kinds = [k for k in _KINDS if k in spec]
    if len(kinds) != 1:
        raise ProberError(f"{path}: the probe must have exactly one of httpGet, tcpSocket or grpc.")
    kind = kinds[0]
    timeout = spec.get("timeoutSeconds", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
        raise ProberError(f"{path}: timeoutSeconds must be a number of seconds above 0, not {timeout!r}.")
    action = spec[kind]
    if not isinstance(action, dict):
        raise ProberError(f"{path}: {kind} must be a JSON object.")
    fields: dict[str, Any] = {"port": _port(action.get("port"), path), "timeout": float(timeout)}
    if action.get("host"):
        fields["host"] = _text(action["host"], path, "host")
    if kind == "httpGet":
        fields["httpPath"] = _text(action.get("path") or "/", path, "path")
        scheme = _text(action.get("scheme") or "HTTP", path, "scheme").upper()
        if scheme not in ("HTTP", "HTTPS"):
            raise ProberError(f"{path}: scheme must be HTTP or HTTPS, not {scheme!r}.")
        fields["scheme"] = scheme
        headers = action.get("httpHeaders") or []
        if not isinstance(headers, list) or not all(isinstance(h, dict) and "name" in h for h in headers):
            raise ProberError(f"{path}: httpHeaders must be a list of objects with a name and a value.")
        fields["headers"] = tuple(
            (_text(h["name"], path, "a header name"), _text(h.get("value", ""), path, "a header value"))
            for h in headers
        )
    elif kind == "grpc":
        fields["service"] = _text(action.get("service") or "", path, "service")
    return Prober(path=path, kind=kind, **fields)


def parseProbers(text: str) -> dict[bytes, Prober]:
    """
    Read the probers' JSON (C{--app-probers}, C{ISTIO_KUBE_APP_PROBERS}).

    @param text: the JSON object; empty text means none.
    @return: each health path, as bytes, to its prober.
    @raise ProberError: when it is not such an object.
    """
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ProberError(f"the probers are not JSON ({e}).") from None
    if not isinstance(data, dict):
        raise ProberError("the probers must be a JSON object of paths to probes.")
    return {path.encode("utf-8"): prober(path, spec) for path, spec in data.items()}


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """
    A TLS client connection that does not check the server's certificate:
    the kubelet's C{https} probes do not.
    """

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_verify(SSL.VERIFY_NONE, lambda *args: True)
        connection = SSL.Connection(context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_connect_state()
        return connection


@implementer(IPolicyForHTTPS)
class _NoVerification:
    """
    The HTTPS policy of the kubelet's probes: no certificate check.
    """

    def creatorForNetloc(self, hostname: bytes, port: int) -> _Unverified:
        return _Unverified()


class _Discard(Protocol):
    """
    Read at most L{MAX_BODY} of a probe answer's body, then stop.
    """

    def __init__(self) -> None:
        self.seen = 0

    def dataReceived(self, data: bytes) -> None:
        self.seen += len(data)
        if self.seen > MAX_BODY:
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        pass


def _endpoint(reactor: IReactorTCP, host: str, port: int, timeout: float) -> Any:
    """
    @return: a TCP client endpoint for an address (IPv6 when it has a colon).
    """
    kind = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
    return kind(reactor, host, port, timeout=max(1, int(timeout + 0.999)))


def _varint(value: int) -> bytes:
    """
    @return: a protobuf varint.
    """
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def healthCheckRequest(service: str) -> bytes:
    """
    @param service: the service asked about.
    @return: a gRPC message (length-prefixed) holding a
        C{grpc.health.v1.HealthCheckRequest}.
    """
    body = service.encode("utf-8")
    message = (b"\x0a" + _varint(len(body)) + body) if body else b""
    return b"\x00" + struct.pack(">I", len(message)) + message


def healthCheckStatus(data: bytes) -> int | None:
    """
    @param data: the response's DATA bytes: one length-prefixed gRPC message
        holding a C{grpc.health.v1.HealthCheckResponse}.
    @return: its C{status} (1 is C{SERVING}; 0, the default, when absent), or
        L{None} when it is not such a message.
    """
    if len(data) < 5 or data[0] != 0:
        return None
    (length,) = struct.unpack(">I", data[1:5])
    message = data[5:5 + length]
    if len(message) != length:
        return None
    status, i = 0, 0
    while i < len(message):
        key, i = _readVarint(message, i)
        if key is None:
            return None
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _readVarint(message, i)
            if value is None:
                return None
            if field == 1:
                status = value
        elif wire == 2:
            size, i = _readVarint(message, i)
            if size is None or i + size > len(message):
                return None
            i += size
        else:
            return None
    return status


def _readVarint(data: bytes, i: int) -> tuple[int | None, int]:
    """
    @return: the protobuf varint at C{data[i:]} and the index after it, or
        L{None} when it is cut short.
    """
    value, shift = 0, 0
    while i < len(data) and shift < 64:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
    return None, i


class GRPCHealthCheck(Protocol):
    """
    One C{grpc.health.v1.Health/Check} call over HTTP/2 without TLS, as the
    kubelet's C{grpc} probe makes it.

    @ivar done: fires with C{(passed, reason)}; cancelling it aborts the
        connection.
    """

    def __init__(self, authority: str, service: str, userAgent: str) -> None:
        self.authority = authority
        self.service = service
        self.userAgent = userAgent
        self.done: Deferred[tuple[bool, str]] = Deferred(lambda d: self._abort())
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        self.body = b""
        self.grpcStatus: str | None = None
        self.httpStatus: str | None = None
        self.head: bytes | None = b""

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionMade(self) -> None:
        self.h2.initiate_connection()
        stream = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream, [
            (":method", "POST"), (":scheme", "http"), (":path", GRPC_HEALTH_PATH.decode()),
            (":authority", self.authority), ("content-type", "application/grpc"),
            ("te", "trailers"), ("user-agent", self.userAgent),
        ])
        self.h2.send_data(stream, healthCheckRequest(self.service), end_stream=True)
        self.transport.write(self.h2.data_to_send())

    def _finish(self, passed: bool, reason: str) -> None:
        if not self.done.called:
            self.done.callback((passed, reason))
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.head is not None:
            # A server's first frame is SETTINGS (type 4); h2 would wait for
            # the rest of a "frame" as long as an HTTP/1.1 answer says.
            self.head += data
            if len(self.head) < 9:
                return
            data, self.head = self.head, None
            if data[3] != 4:
                self._finish(False, "the service did not speak HTTP/2 (no SETTINGS frame first)")
                return
        try:
            events = self.h2.receive_data(data)
        except H2Error as e:
            self._finish(False, f"the service did not speak HTTP/2 ({e.__class__.__name__})")
            return
        for event in events:
            if isinstance(event, (ResponseReceived, TrailersReceived)):
                for name, value in event.headers:
                    if name == ":status":
                        self.httpStatus = value
                    elif name == "grpc-status":
                        self.grpcStatus = value
            elif isinstance(event, DataReceived):
                self.body += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if len(self.body) > MAX_BODY:
                    self._finish(False, "the health answer is too long")
                    return
            elif isinstance(event, StreamEnded):
                self._finish(*self._verdict())
                return
            elif isinstance(event, (StreamReset, ConnectionTerminated)):
                self._finish(False, "the service reset the health check")
                return
        pending = self.h2.data_to_send()
        if pending:
            self.transport.write(pending)

    def _verdict(self) -> tuple[bool, str]:
        """
        @return: whether the finished call said C{SERVING}, and why not.
        """
        if self.httpStatus != "200":
            return False, f"HTTP status {self.httpStatus}"
        if self.grpcStatus != "0":
            return False, f"grpc-status {self.grpcStatus}"
        status = healthCheckStatus(self.body)
        if status != GRPC_SERVING:
            return False, f"health status {status}"
        return True, "SERVING"

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.done.called:
            self.done.callback((False, "the service closed the connection"))


def runProbe(prober: Prober, reactor: Any, userAgent: str = "kube-probe/1.29") -> Deferred[tuple[bool, str]]:
    """
    Probe the application once.

    @param prober: the probe.
    @param reactor: an L{IReactorTCP} and L{IReactorTime}.
    @param userAgent: the C{User-Agent} to send (the kubelet's, passed on).
    @return: a Deferred firing with C{(passed, reason)} within the probe's
        timeout; cancelling it abandons the probe.
    """
    if prober.kind == "httpGet":
        agent = Agent(reactor, contextFactory=_NoVerification(), connectTimeout=prober.timeout,
                      pool=HTTPConnectionPool(reactor, persistent=False))
        headers = Headers({b"user-agent": [userAgent.encode("latin-1", "replace")]})
        for name, value in prober.headers:
            if name.lower() == "user-agent":
                headers.removeHeader(b"user-agent")
            headers.addRawHeader(name.encode("latin-1", "replace"), value.encode("latin-1", "replace"))
        d = agent.request(b"GET", prober.url(), headers)

        def answered(response: Any) -> tuple[bool, str]:
            response.deliverBody(_Discard())
            passed = 200 <= response.code < 400
            return passed, f"HTTP status {response.code}"

        d.addCallback(answered)
    elif prober.kind == "tcpSocket":
        d = _endpoint(reactor, prober.host, prober.port, prober.timeout).connect(Factory.forProtocol(Protocol))

        def connected(protocol: Protocol) -> tuple[bool, str]:
            protocol.transport.loseConnection()
            return True, "connected"

        d.addCallback(connected)
    else:
        host = f"[{prober.host}]" if ":" in prober.host else prober.host
        check = GRPCHealthCheck(f"{host}:{prober.port}", prober.service, userAgent)
        d = _endpoint(reactor, prober.host, prober.port, prober.timeout).connect(
            Factory.forProtocol(lambda: check))
        d.addCallback(lambda _: check.done)
    return _bounded(d, reactor, prober.timeout)


def _bounded(d: Deferred[tuple[bool, str]], clock: IReactorTime, timeout: float) -> Deferred[tuple[bool, str]]:
    """
    @param d: a probe in flight.
    @param clock: the clock.
    @param timeout: seconds it may take.
    @return: a Deferred firing with C{d}'s verdict, its failures turned into
        C{(False, reason)}, or with C{(False, reason)} when the time is up
        (then C{d} is cancelled); cancelling it cancels C{d} and fails it with
        L{CancelledError}.
    """
    timedOut: list[bool] = []
    abandoned: list[bool] = []

    def abandon(outer: Deferred[tuple[bool, str]]) -> None:
        abandoned.append(True)
        d.cancel()

    outer: Deferred[tuple[bool, str]] = Deferred(abandon)

    def expire() -> None:
        timedOut.append(True)
        d.cancel()

    timer = clock.callLater(timeout, expire)

    def settle(result: Any) -> None:
        if timer.active():
            timer.cancel()
        if abandoned or outer.called:
            return None
        if not isinstance(result, Failure):
            verdict = result
        elif timedOut:
            verdict = (False, f"no answer within {timeout:g} s")
        elif result.check(ResponseFailed, ResponseNeverReceived):
            verdict = (False, "the service closed the connection without a complete answer")
        else:
            verdict = (False, result.getErrorMessage() or result.type.__name__)
        outer.callback(verdict)
        return None

    d.addBoth(settle)
    return outer


class AppHealthResource(Resource):
    """
    C{/app-health/...}: each known path runs its probe and answers 200 when
    it passes, 503 when it fails (the reason in the body); other paths are
    404. It reads C{request.path} whole, so it works mounted at any depth or
    as a leaf of an exact-path table.

    @ivar probers: each path to its prober.
    """

    isLeaf = True

    def __init__(self, probers: Mapping[bytes, Prober], reactor: Any) -> None:
        Resource.__init__(self)
        self.probers = dict(probers)
        self.reactor = reactor

    def render_GET(self, request: Any) -> Any:
        """
        Probe the application for the kubelet.
        """
        found = self.probers.get(request.path)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if found is None:
            request.setResponseCode(404)
            return b"no probe at this path\n"
        userAgent = request.getHeader(b"user-agent")
        d = runProbe(found, self.reactor, (userAgent or b"kube-probe").decode("latin-1"))
        gone = []

        def lost(reason: Failure) -> None:
            gone.append(True)
            d.cancel()

        request.notifyFinish().addErrback(lost)

        def answer(result: tuple[bool, str]) -> None:
            if gone:
                return
            passed, reason = result
            request.setResponseCode(200 if passed else 503)
            request.write(f"{'ok' if passed else 'failed'}: {reason}\n".encode("utf-8", "replace"))
            request.finish()

        def cancelled(failure: Failure) -> None:
            failure.trap(CancelledError)

        d.addCallbacks(answer, cancelled)
        return NOT_DONE_YET


def probeResource(probers: Mapping[bytes, Prober], reactor: Any) -> AppHealthResource:
    """
    The resource the health site mounts for the probers: as a child
    C{b"app-health"} of a tree, or under each of L{probePaths} in an
    exact-path table.

    @param probers: L{parseProbers}' answer.
    @param reactor: an L{IReactorTCP} and L{IReactorTime}.
    @return: the resource.
    """
    return AppHealthResource(probers, reactor)


def probePaths(resource: AppHealthResource) -> dict[bytes, Resource]:
    """
    @param resource: L{probeResource}'s answer.
    @return: each of its paths to it, for a table of exact paths such as the
        health site's.
    """
    return dict.fromkeys(resource.probers, resource)


def appProbers(flag: str | None, environ: Mapping[str, str]) -> dict[bytes, Prober]:
    """
    The probers the proxy was given: C{--app-probers}, else
    C{ISTIO_KUBE_APP_PROBERS} from the environment.

    @param flag: C{--app-probers}' value, or L{None}.
    @param environ: the process environment.
    @return: the probers.
    @raise ProberError: when the chosen one cannot be read; the message
        names it.
    """
    source, text = ("--app-probers", flag) if flag is not None else (PROBERS_ENV, environ.get(PROBERS_ENV, ""))
    try:
        return parseProbers(text)
    except ProberError as e:
        raise ProberError(f"{source}: {e}") from None
