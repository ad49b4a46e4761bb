#!/usr/bin/env python3
# -*- test-case-name: tests.test_mesh -*-
"""
The mesh between two pods, without a cluster (C{make mesh-demo}, as root).

Builds a node and three pods out of network namespaces (L{tests.meshpods}): a client
pod whose sidecar captures its outgoing calls and originates mutual TLS with its own
workload certificate, a server pod (httpbin and redis-server) whose sidecar is STRICT
and allows only the client's SPIFFE id, and a pod without a sidecar.  Then shows, one
step at a time, what C{tests/test_mesh.py} checks: the plain call and the
C{X-Forwarded-Client-Cert} httpbin sees, TLS on the wire, the stranger refused, Redis
over mutual TLS, both sidecars' metrics, and the kubelet's probe.  Everything it
starts or creates is removed on exit.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.meshpods import (  # noqa: E402
    CLIENT_ID, HEALTH_PORT, PROBE_PATH, Cleanups, Mesh, missing, tcpPayloads,
)


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show(done) -> None:
    print(done.stdout.replace("\r\n", "\n").rstrip() or done.stderr.rstrip(), flush=True)


def metricLines(text: str, name: str) -> list:
    keep = ("reporter", "source_workload", "source_principal", "destination_workload", "destination_principal",
            "response_code", "connection_security_policy")
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line[:line.rindex("}")]))
            if not any(labels.values()) or line.endswith(" 0.0"):
                continue
            shown = ",".join(f'{k}="{labels[k]}"' for k in keep if k in labels)
            out.append(f"{name}{{{shown}}} {line.rsplit(' ', 1)[1]}")
    return out


def main() -> int:
    reason = missing()
    if reason is not None:
        print(f"mesh-demo: {reason}.", file=sys.stderr)
        return 1
    cleanups = Cleanups()
    work = tempfile.mkdtemp(prefix="sidecar-mesh-demo-")
    cleanups.addCleanup(__import__("shutil").rmtree, work, True)
    try:
        say("A node (bridge br0) and three pods: client, server, stranger")
        mesh = Mesh(cleanups, work)
        for name, address in mesh.addresses.items():
            print(f"{name:9} {address}   (namespace {mesh.pods[name].name})")
        say("Certificates from sidecar-certs; the init scripts; httpbin, redis-server and both sidecars")
        mesh.certificates()
        mesh.start()
        print("server sidecar:", " ".join(mesh.serverCommand()[3:]))
        print("client sidecar:", " ".join(mesh.clientCommand()[3:]))
        server = mesh.addresses["server"]

        say(f"(1) The client pod calls http://{server}/headers in plain HTTP")
        capture = mesh.capture("server", f"tcp and host {mesh.addresses['client']}")
        done = mesh.inPod("client", ["curl", "-sS", "-i", "--max-time", "10", f"http://{server}/headers"])
        show(done)
        say("(4) Redis from the client pod to the server pod")
        show(mesh.inPod("client", ["sh", "-c", f"redis-cli -h {server} SET mesh demo && redis-cli -h {server} GET mesh"]))
        segments = tcpPayloads(capture())

        say("(2) What crossed the server pod's veth (tcpdump)")
        for port in (80, 6379):
            first = [s[4] for s in segments if s[2] == server and s[3] == port]
            kinds = {0x16: "handshake", 0x17: "application data", 0x14: "change cipher spec", 0x15: "alert"}
            print(f"to port {port}: {len(first)} segments, first bytes {first[0][:6].hex()} "
                  f"(TLS {kinds.get(first[0][0], '?')}, ClientHello: {first[0][5] == 1}); "
                  f"records: {sorted({kinds.get(p[0], 'NOT TLS') for p in first})}")
        wire = b"".join(s[4] for s in segments)
        for clear in (b"GET /headers", b"HTTP/1.1", b"demo", CLIENT_ID.encode()):
            print(f"{clear.decode()!r} in the clear on the wire: {clear in wire}")

        say("(3) The stranger pod (no sidecar) calls the same URL")
        show(mesh.inPod("stranger", ["curl", "-sS", "-i", "--max-time", "5", f"http://{server}/headers"], check=False))

        say(f"(6) The kubelet's probe: GET http://{server}:{HEALTH_PORT}{PROBE_PATH} from the node")
        show(mesh.fromNode(["curl", "-sS", "-i", "--max-time", "5", f"http://{server}:{HEALTH_PORT}{PROBE_PATH}"],
                           check=False))
        say(f"   ... while the service port stays mutual TLS only: GET http://{server}/status/200 from the node")
        show(mesh.fromNode(["curl", "-sS", "-i", "--max-time", "5", f"http://{server}/status/200"], check=False))

        say("(5) Both sidecars' metrics (scraped from the node, port 15021)")
        for pod in ("client", "server"):
            text = mesh.metrics(pod)
            print(f"-- {pod} pod:")
            for name in ("istio_requests_total", "istio_tcp_connections_closed_total"):
                for line in metricLines(text, name):
                    print(line)
        say("The client sidecar's access log (outbound records)")
        for line in open(mesh.logs["client-proxy"]):
            if line.startswith('{"start_time"'):
                record = json.loads(line)
                print(f'{record["direction"]} {record["protocol"]} {record["upstream_host"]} '
                      f'{record["response_code"]} {record["response_flags"]} peer={record["upstream_peer_principal"]}')
        say("Done; removing the namespaces and the processes")
        return 0
    finally:
        cleanups.run()


if __name__ == "__main__":
    sys.exit(main())
