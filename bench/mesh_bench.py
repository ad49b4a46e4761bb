#!/usr/bin/env python3
# -*- test-case-name: tests.test_mesh -*-
"""
The mesh benchmark: CPU per request of the whole two-hop path, the client pod's
sidecar plus the server pod's, ours against two Envoys configured the same way, in
the pods of L{tests.meshpods} (as root), side by side in one session.

    python3 bench/mesh_bench.py [--seconds 5] [--rounds 2] [--connections 4]

The path: wrk in the client pod calls C{http://SERVER/small} (plain HTTP, keep-alive);
the client's outbound capture sends it to the client sidecar on 15001, which
originates mutual TLS (its workload certificate, the server's exact SPIFFE id checked,
ALPN http/1.1, the peer-metadata header added) to the server pod, whose capture sends
it to the server sidecar on 15006: STRICT mutual TLS, only the client's id allowed,
C{X-Forwarded-Client-Cert} set, and on to nginx on 127.0.0.1:80.

Envoy does the same with: client, an C{original_dst} listener filter and an
C{ORIGINAL_DST} cluster with an C{UpstreamTlsContext} (certificate, CA, SAN exact
match, ALPN), C{connect-failure} retries 2, the metadata header added by the route;
server, a C{DownstreamTlsContext} requiring a client certificate, XFCC
C{SANITIZE_SET} with the URI, an RBAC rule allowing the client's id.  Each runs one
worker (C{--concurrency 1}), as our proxies run one reactor thread.

The figure is (CPU of both proxies, from C{/proc/PID/stat}, all threads) / (requests
wrk completed), over C{--seconds} of load after a one-second warm-up; the median of
C{--rounds}.  Every process is ended by its PID and every namespace removed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import cpuTicksFromStat  # noqa: E402
from bench.peers import envoyCommand, envoyConfig, findEnvoy, nginxConfig, writeUpstreamFiles  # noqa: E402
from sidecar.peers import metadataOf  # noqa: E402
from sidecar.config import MeshLabels  # noqa: E402
from tests.meshpods import (  # noqa: E402
    ADMIN_PORT, CLIENT_ID, HTTP_PORT, INBOUND_PORT, OUTBOUND_PORT, SERVER_ID, Cleanups, Mesh, missing, stop, waitFor,
)

TICKS = os.sysconf("SC_CLK_TCK")


def tls(certs: str, account: str) -> Dict[str, Any]:
    return {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"},
        "alpn_protocols": ["http/1.1"],
        "tls_certificates": [{
            "certificate_chain": {"filename": f"{certs}/{account}.crt"},
            "private_key": {"filename": f"{certs}/{account}.key"},
        }],
    }


def serverEnvoy(certs: str) -> dict:
    """
    The server pod's Envoy: STRICT mutual TLS on 15006, the client's id only, XFCC.
    """
    config = envoyConfig(INBOUND_PORT, ADMIN_PORT, HTTP_PORT)
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["address"] = "0.0.0.0"
    chain = listener["filter_chains"][0]
    common = tls(certs, "httpbin")
    common["validation_context"] = {"trusted_ca": {"filename": f"{certs}/ca.crt"}}
    chain["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": common,
        },
    }
    manager = chain["filters"][0]["typed_config"]
    manager["forward_client_cert_details"] = "SANITIZE_SET"
    manager["set_current_client_cert_details"] = {"uri": True}
    manager["http_filters"].insert(0, {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "ALLOW", "policies": {"client": {
                "permissions": [{"any": True}],
                "principals": [{"authenticated": {"principal_name": {"exact": CLIENT_ID}}}],
            }}},
        },
    })
    return config


def clientEnvoy(certs: str) -> dict:
    """
    The client pod's Envoy: the outbound listener on 15001, each request to its
    original destination over mutual TLS with the server's exact id checked.
    """
    config = envoyConfig(OUTBOUND_PORT, ADMIN_PORT, HTTP_PORT)
    resources = config["static_resources"]
    listener = resources["listeners"][0]
    listener["address"]["socket_address"]["address"] = "0.0.0.0"
    listener["listener_filters"] = [{
        "name": "envoy.filters.listener.original_dst",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"},
    }]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    route = manager["route_config"]["virtual_hosts"][0]["routes"][0]
    route["route"] = {"cluster": "outbound", "retry_policy": {"retry_on": "connect-failure", "num_retries": 2}}
    route["request_headers_to_add"] = [{"header": {"key": "x-sidecar-peer-metadata", "value": metadataOf(
        MeshLabels(workload="sleep", namespace="default", app="sleep", version="v1")).decode()}}]
    common = tls(certs, "sleep")
    common["validation_context"] = {
        "trusted_ca": {"filename": f"{certs}/ca.crt"},
        "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": SERVER_ID}}],
    }
    resources["clusters"] = [{
        "name": "outbound",
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "5s",
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": common,
            },
        },
    }]
    return config


def cpu(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return cpuTicksFromStat(f.read())


def load(mesh: Mesh, seconds: float, connections: int) -> int:
    """
    wrk in the client pod for C{seconds}; the requests it completed.
    """
    url = f"http://{mesh.addresses['server']}/small"
    done = mesh.inPod("client", ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", url],
                      timeout=seconds + 30)
    match = re.search(r"(\d+) requests in", done.stdout)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", done.stdout)
    if match is None or errors is not None:
        raise RuntimeError(f"wrk failed:\n{done.stdout}\n{done.stderr}")
    return int(match.group(1))


def measure(mesh: Mesh, pids: List[int], seconds: float, connections: int) -> Dict[str, float]:
    load(mesh, 1, connections)  # warm-up: connections, pools, caches
    before = [cpu(pid) for pid in pids]
    started = time.monotonic()
    requests = load(mesh, seconds, connections)
    elapsed = time.monotonic() - started
    ticks = [cpu(pid) - was for pid, was in zip(pids, before)]
    perRequest = [t / TICKS / requests * 1e6 for t in ticks]
    return {"requests": requests, "rps": requests / elapsed, "cpuMicrosecondsPerRequest": sum(perRequest),
            "clientMicroseconds": perRequest[0], "serverMicroseconds": perRequest[1]}


def answers(mesh: Mesh) -> bool:
    done = mesh.inPod("client", ["curl", "-sf", "-o", "/dev/null", "--max-time", "2",
                                 f"http://{mesh.addresses['server']}/small"], check=False)
    return done.returncode == 0


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    reason = missing() or (None if shutil.which("wrk") and shutil.which("nginx") else "needs wrk and nginx")
    if reason is not None:
        print(f"mesh_bench: {reason}.", file=sys.stderr)
        return 1
    envoy, found = findEnvoy()
    cleanups = Cleanups()
    work = tempfile.mkdtemp(prefix="sidecar-mesh-bench-")
    cleanups.addCleanup(shutil.rmtree, work, True)
    results: Dict[str, Any] = {}
    try:
        mesh = Mesh(cleanups, work)
        mesh.certificates()
        prefix = Path(work) / "nginx"
        prefix.mkdir()
        writeUpstreamFiles(prefix)
        (prefix / "nginx.conf").write_text(nginxConfig(prefix, HTTP_PORT, None))
        nginx = ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"]
        client, server = mesh.clientCommand(), mesh.serverCommand()
        # The access logs off for both, as Envoy's configuration has none.
        client += ["--access-log", "none"]
        server += ["--access-log", "none"]
        mesh.start(service=nginx, ready="/small", redis=False, server=server, client=client)
        waitFor("our two sidecars to answer", lambda: answers(mesh), logs=[mesh.logs["client-proxy"]])
        pids = [mesh.processes["client-proxy"].pid, mesh.processes["server-proxy"].pid]
        results["ours"] = [measure(mesh, pids, args.seconds, args.connections) for _ in range(args.rounds)]
        for name in ("client-proxy", "server-proxy"):
            stop(mesh.processes[name])
        if envoy is None:
            print(f"mesh_bench: Envoy skipped: {found}.", file=sys.stderr)
        else:
            for pod, config in (("server", serverEnvoy(mesh.certs)), ("client", clientEnvoy(mesh.certs))):
                path = os.path.join(mesh.certs, f"envoy-{pod}.json")
                with open(path, "w") as f:
                    json.dump(config, f)
                os.chmod(path, 0o644)
                mesh.spawn(pod, f"{pod}-envoy", envoyCommand(envoy, Path(path), ()), asProxy=True)
            waitFor("the two Envoys to answer", lambda: answers(mesh),
                    logs=[mesh.logs["client-envoy"], mesh.logs["server-envoy"]])
            pids = [mesh.processes["client-envoy"].pid, mesh.processes["server-envoy"].pid]
            results["envoy"] = [measure(mesh, pids, args.seconds, args.connections) for _ in range(args.rounds)]
    finally:
        cleanups.run()
    print(f"two-hop mesh path (client sidecar + server sidecar), wrk -c{args.connections}, "
          f"{args.seconds:g} s x {args.rounds}, GET /small over originated mutual TLS")
    print(f"{'peer':8} {'requests/s':>11} {'CPU us/request (both proxies)':>31} {'client':>8} {'server':>8}")
    medians = {}
    for peer, rounds in results.items():
        medians[peer] = statistics.median(r["cpuMicrosecondsPerRequest"] for r in rounds)
        rps = statistics.median(r["rps"] for r in rounds)
        client = statistics.median(r["clientMicroseconds"] for r in rounds)
        server = statistics.median(r["serverMicroseconds"] for r in rounds)
        print(f"{peer:8} {rps:11.0f} {medians[peer]:31.1f} {client:8.1f} {server:8.1f}")
    if "ours" in medians and "envoy" in medians:
        print(f"ours / envoy, CPU per request: {medians['ours'] / medians['envoy']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "medians": medians}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
