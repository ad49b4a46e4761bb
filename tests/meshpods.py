# -*- test-case-name: tests.test_mesh -*-
"""
A mesh of pods on one node, built out of network namespaces, shared by
C{tests/test_mesh.py}, C{scripts/mesh-demo.py} (C{make mesh-demo}) and
C{bench/mesh_bench.py}.

  node namespace: a bridge C{br0} holding 10.251.N.1/24 (the kubelet's and
      Prometheus's address)
  ├─ client pod 10.251.N.2: its sidecar (uid 1337, set with setpriv) with outbound
  │   capture (C{sidecar-iptables.sh -o 15001 -u 1337}) and its own workload
  │   certificate (C{spiffe://cluster.local/ns/default/sa/sleep}); the application
  │   is whatever runs in the pod as root (curl, redis-cli)
  ├─ server pod 10.251.N.3: httpbin on 127.0.0.1:80 and redis-server on
  │   127.0.0.1:6379, its sidecar in STRICT mutual TLS on 15006 (ports 80 and 6379
  │   redirected there, C{--upstream original}), allowing only the client's id;
  │   the health port 15021 outside the capture, with an app-health prober of httpbin
  └─ stranger pod 10.251.N.4: no sidecar

Every address is inside namespaces made here; nothing is added to this host's
namespace.  Everything is undone by the cleanups registered with the owner
(a trial test, or L{Cleanups} in a script).
"""

from __future__ import annotations

import os
import random
import secrets
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "init", "sidecar-iptables.sh")

PROXY_UID = 1337
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
HEALTH_PORT = 15021
ADMIN_PORT = 15000
HTTP_PORT = 80
REDIS_PORT = 6379
TRUST_DOMAIN = "cluster.local"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/sleep"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/httpbin"
PROBE_PATH = "/app-health/httpbin/readyz"


class Cleanups:
    """
    For scripts: the cleanups a trial test would run, run in reverse order by L{run}.
    """

    def __init__(self) -> None:
        self.calls: List[Any] = []

    def addCleanup(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.calls.append((f, args, kwargs))

    def run(self) -> None:
        while self.calls:
            f, args, kwargs = self.calls.pop()
            try:
                f(*args, **kwargs)
            except Exception as e:  # a cleanup must not stop the others
                print(f"cleanup {f!r} failed: {e}", file=sys.stderr)


def sh(argv: Sequence[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """
    Run a program to completion, capturing its text output.
    """
    done = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


def missing() -> Optional[str]:
    """
    Why the mesh cannot be built here, or C{None}.
    """
    import importlib.util
    import shutil

    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root to create network namespaces and change iptables rules"
    for program in ("ip", "iptables", "curl", "setpriv", "redis-server", "redis-cli", "tcpdump"):
        if shutil.which(program) is None:
            return f"needs the {program} program, which is not on PATH"
    for module in ("gunicorn", "httpbin"):
        if importlib.util.find_spec(module) is None:
            return f"needs the {module} Python package (pip install -r requirements-test.txt)"
    return None


def stop(process: subprocess.Popen) -> None:
    """
    End a program this module started, by its process id.
    """
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Namespace:
    """
    One network namespace made here, deleted by the owner's cleanups.
    """

    def __init__(self, owner: Any, label: str) -> None:
        self.owner = owner
        self.name = f"sidecar-{label}-{os.getpid()}-{secrets.token_hex(3)}"
        sh(["ip", "netns", "add", self.name])
        owner.addCleanup(sh, ["ip", "netns", "delete", self.name], False)
        self.ip("link", "set", "lo", "up")

    def ip(self, *argv: str) -> str:
        return sh(["ip", "-n", self.name, *argv]).stdout

    def argv(self, argv: Sequence[str]) -> List[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return sh(self.argv(argv), check, timeout)

    def spawn(self, argv: Sequence[str], log: str, env: Optional[Dict[str, str]] = None,
              cwd: Optional[str] = None) -> subprocess.Popen:
        """
        Start a program in the namespace (ended by its process id in cleanup), its
        output to the file C{log}.
        """
        with open(log, "wb") as sink:
            process = subprocess.Popen(self.argv(argv), stdin=subprocess.DEVNULL, stdout=sink,
                                       stderr=subprocess.STDOUT, env=env, cwd=cwd)
        self.owner.addCleanup(stop, process)
        return process


def waitFor(what: str, check: Callable[[], bool], timeout: float = 30.0, logs: Sequence[str] = ()) -> None:
    """
    Poll C{check} until it holds, at most C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            shown = "".join(f"\n--- {path}:\n{open(path, errors='replace').read()[-4000:]}" for path in logs)
            raise AssertionError(f"gave up waiting for {what}{shown}")
        time.sleep(0.1)


class Mesh:
    """
    The node, its three pods and the certificates (see the module docstring).

    @ivar work: a folder for certificates and logs.
    @ivar subnet: the pods' /24 (as C{10.251.N}).
    """

    def __init__(self, owner: Any, work: str) -> None:
        self.owner = owner
        self.work = work
        os.makedirs(work, exist_ok=True)
        os.chmod(work, 0o755)
        self.subnet = f"10.251.{random.randrange(256)}"
        self.node = Namespace(owner, "node")
        self.node.ip("link", "add", "br0", "type", "bridge")
        self.node.ip("addr", "add", f"{self.subnet}.1/24", "dev", "br0")
        self.node.ip("link", "set", "br0", "up")
        self.pods: Dict[str, Namespace] = {}
        self.addresses: Dict[str, str] = {}
        for index, name in enumerate(("client", "server", "stranger"), start=2):
            pod = self.pods[name] = Namespace(owner, name)
            self.addresses[name] = f"{self.subnet}.{index}"
            host = f"veth{index}"
            sh(["ip", "-n", self.node.name, "link", "add", host, "type", "veth", "peer", "name", "eth0",
                "netns", pod.name])
            self.node.ip("link", "set", host, "master", "br0")
            self.node.ip("link", "set", host, "up")
            pod.ip("addr", "add", f"{self.addresses[name]}/24", "dev", "eth0")
            pod.ip("link", "set", "eth0", "up")
        self.env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
        self.logs: Dict[str, str] = {}
        self.processes: Dict[str, subprocess.Popen] = {}

    # -- certificates ------------------------------------------------------------------

    def certificates(self) -> Dict[str, str]:
        """
        A mesh CA and the two workloads' certificates from C{sidecar-certs}, readable
        by the proxies' user.
        """
        import shutil
        import tempfile

        # Outside the work folder, whose parents may be closed to the proxies' user.
        certs = tempfile.mkdtemp(prefix="sidecar-mesh-certs-")
        self.owner.addCleanup(shutil.rmtree, certs, True)
        os.chmod(certs, 0o755)
        certsCommand = [sys.executable, "-m", "sidecar.certs"]
        sh([*certsCommand, "ca", "--trust-domain", TRUST_DOMAIN, "--dir", certs])
        for account in ("sleep", "httpbin"):
            sh([*certsCommand, "workload", "--ns", "default", "--sa", account, "--dir", certs])
        for name in os.listdir(certs):
            os.chown(os.path.join(certs, name), PROXY_UID, PROXY_UID)
        os.chmod(certs, 0o755)
        self.certs = certs
        return {name: os.path.join(certs, name) for name in os.listdir(certs)}

    def tlsFlags(self, account: str) -> List[str]:
        return ["--tls-cert", os.path.join(self.certs, account + ".crt"),
                "--tls-key", os.path.join(self.certs, account + ".key"),
                "--tls-ca", os.path.join(self.certs, "ca.crt")]

    # -- pods --------------------------------------------------------------------------

    def spawn(self, pod: str, name: str, argv: Sequence[str], asProxy: bool = False) -> subprocess.Popen:
        """
        Start C{argv} in C{pod}, as the proxies' user when C{asProxy}.
        """
        log = self.logs[name] = os.path.join(self.work, name + ".log")
        if asProxy:
            argv = ["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups", *argv]
        process = self.processes[name] = self.pods[pod].spawn(argv, log, env=self.env, cwd=ROOT)
        return process

    def serverCommand(self) -> List[str]:
        """
        The server pod's sidecar: STRICT mutual TLS on 15006 (where its ports are
        redirected), the client's id only, the app-health prober of httpbin.
        """
        import json

        probers = {PROBE_PATH: {"httpGet": {"path": "/status/200", "port": HTTP_PORT}, "timeoutSeconds": 2}}
        return [sys.executable, "-m", "twisted", "sidecar", "--listen", "none", "--tls-listen", str(INBOUND_PORT),
                "--upstream", "original", *self.tlsFlags("httpbin"), "--tls-allow", CLIENT_ID,
                "--opaque-ports", str(REDIS_PORT), "--admin", str(ADMIN_PORT), "--health", str(HEALTH_PORT),
                "--app-probers", json.dumps(probers), "--workload", "httpbin", "--namespace", "default",
                "--app", "httpbin", "--app-version", "v1", "--log-format", "json", "--drain-timeout", "0"]

    def clientCommand(self) -> List[str]:
        """
        The client pod's sidecar: the outbound listener, the pods' /24 in the mesh, the
        server's exact id required.
        """
        return [sys.executable, "-m", "twisted", "sidecar", "--listen", "none",
                "--outbound-listen", str(OUTBOUND_PORT), "--mesh-networks", f"{self.subnet}.0/24",
                "--mesh-peer", f"{self.addresses['server']}/32={SERVER_ID}", *self.tlsFlags("sleep"),
                "--admin", str(ADMIN_PORT), "--health", str(HEALTH_PORT), "--workload", "sleep",
                "--namespace", "default", "--app", "sleep", "--app-version", "v1", "--log-format", "json",
                "--drain-timeout", "0"]

    def start(self, server: Optional[List[str]] = None, client: Optional[List[str]] = None,
              service: Optional[List[str]] = None, ready: str = "/status/200", redis: bool = True) -> None:
        """
        The init scripts' rules, the services and both sidecars (or the commands given
        instead of ours: C{server}, C{client}; C{service} instead of httpbin, answering
        C{ready}), waiting until each answers.
        """
        if not hasattr(self, "certs"):
            self.certificates()
        serverPod, clientPod = self.pods["server"], self.pods["client"]
        serverPod.run(["sh", SCRIPT, "-p", str(INBOUND_PORT), "-b", f"{HTTP_PORT},{REDIS_PORT}",
                       "-t", str(INBOUND_PORT)])
        clientPod.run(["sh", SCRIPT, "-p", "8000", "-b", str(HTTP_PORT), "-o", str(OUTBOUND_PORT),
                       "-u", str(PROXY_UID)])
        self.spawn("server", "httpbin", service or [sys.executable, "-m", "gunicorn", "--workers", "1", "--bind",
                                                    f"127.0.0.1:{HTTP_PORT}", "httpbin:app"])
        if redis:
            self.spawn("server", "redis", ["redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1",
                                           "--save", "", "--appendonly", "no"])
        self.spawn("server", "server-proxy", server or self.serverCommand(), asProxy=True)
        self.spawn("client", "client-proxy", client or self.clientCommand(), asProxy=True)
        waitFor("the service in the server pod",
                lambda: serverPod.run(["curl", "-sf", "-o", "/dev/null", f"http://127.0.0.1:{HTTP_PORT}{ready}"],
                                      check=False).returncode == 0, logs=[self.logs["httpbin"]])
        if redis:
            waitFor("redis in the server pod",
                    lambda: serverPod.run(["redis-cli", "-p", str(REDIS_PORT), "PING"], check=False).stdout.strip()
                    == "PONG", logs=[self.logs["redis"]])
        if server is None and client is None:
            for pod in ("server", "client"):
                waitFor(f"the {pod} pod's sidecar",
                        lambda pod=pod: self.fromNode(["curl", "-sf", "-o", "/dev/null",
                                                       f"http://{self.addresses[pod]}:{HEALTH_PORT}/healthz/ready"],
                                                      check=False).returncode == 0,
                        logs=[self.logs[f"{pod}-proxy"]])

    def fromNode(self, argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
        """
        Run a program on the node (the kubelet's and Prometheus's place).
        """
        return self.node.run(argv, check)

    def inPod(self, pod: str, argv: Sequence[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.pods[pod].run(argv, check, timeout)

    def metrics(self, pod: str) -> str:
        """
        The pod sidecar's Prometheus exposition, scraped from the node.
        """
        return self.fromNode(["curl", "-sS", "--max-time", "10",
                              f"http://{self.addresses[pod]}:{HEALTH_PORT}/stats/prometheus"]).stdout

    def capture(self, pod: str, filter: str) -> Callable[[], bytes]:
        """
        Start C{tcpdump} on C{pod}'s eth0 with C{filter}; returns a function that stops
        it and gives the capture (pcap bytes).
        """
        path = os.path.join(self.work, f"capture-{secrets.token_hex(3)}.pcap")
        log = path + ".log"
        process = self.pods[pod].spawn(["tcpdump", "-i", "eth0", "--immediate-mode", "-U", "-s", "0", "-w", path, filter], log)
        waitFor("tcpdump to listen", lambda: "listening on" in open(log, errors="replace").read(), logs=[log])

        def done() -> bytes:
            time.sleep(0.3)
            stop(process)
            with open(path, "rb") as f:
                return f.read()

        return done


def tcpPayloads(pcap: bytes) -> List[tuple]:
    """
    The TCP segments with a payload in a pcap capture (Ethernet, IPv4):
    C{(source, source port, destination, destination port, payload)}.
    """
    import socket
    import struct

    magic = pcap[:4]
    endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    out = []
    at = 24
    while at + 16 <= len(pcap):
        _, _, included, _ = struct.unpack(endian + "IIII", pcap[at:at + 16])
        frame = pcap[at + 16:at + 16 + included]
        at += 16 + included
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        headerLength = (ip[0] & 0x0F) * 4
        if ip[9] != 6:
            continue
        total = struct.unpack("!H", ip[2:4])[0]
        tcp = ip[headerLength:total]
        if len(tcp) < 20:
            continue
        sport, dport = struct.unpack("!HH", tcp[:4])
        payload = tcp[(tcp[12] >> 4) * 4:]
        if payload:
            out.append((socket.inet_ntoa(ip[12:16]), sport, socket.inet_ntoa(ip[16:20]), dport, payload))
    return out
