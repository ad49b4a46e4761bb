# -*- test-case-name: tests.test_pod_netns -*-
"""
The article's demo, for real: a pod built out of a Linux network namespace.

Each test makes its own namespace (named after the process id and a random
suffix, deleted in cleanup) joined to this host by a veth pair whose two ends
hold the two addresses of a private /30 chosen for that test alone. Inside the
namespace run httpbin on port 80 and the sidecar on port 8000, and
C{init/sidecar-iptables.sh -p 8000 -b 80} redirects inbound traffic, exactly
as the init container does in the article's Pod. The requests come from this
host's namespace to the pod's address, so they cross the veth like traffic from
another pod. Every scenario runs once per iptables backend (nft and legacy),
and C{scripts/pod-demo.sh}, which does the same for people to watch, runs
under test too.

These tests need root (namespaces and iptables) and skip, saying so, without it.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import random
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence

from twisted.internet.threads import deferToThread
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, TestCase

ROOT = FilePath(__file__).parent().parent()
SCRIPT = ROOT.child("init").child("sidecar-iptables.sh")

SERVICE_PORT = 80
PROXY_PORT = 8000
ADMIN_PORT = 15000

# How long a spawned program may take to start answering, and how often to look.
READY_TIMEOUT = 30.0
POLL_INTERVAL = 0.1

# The /30 networks a test may pick from: private, and used only between the
# two ends of the test's own veth pair.
POD_NETWORKS = ipaddress.ip_network("10.250.0.0/16")


def proxyCommand() -> list[str]:
    """
    The sidecar's command line, as the article's proxy container runs it.

    @return: the argv that starts the proxy on 8000 in front of 80, logging
        the article's statistics to its standard output, with its admin
        server on 15000.
    """
    argv = [
        sys.executable,
        "-m",
        "twisted",
        "sidecar",
        "--listen",
        str(PROXY_PORT),
        "--upstream",
        str(SERVICE_PORT),
        "--log-format",
        "seed",
        "--access-log",
        "-",
        "--admin",
        # Every interface, said explicitly (a bare port is loopback only): these
        # tests probe the admin port from outside the pod, through the capture rules.
        f"tcp:{ADMIN_PORT}",
    ]
    from sidecar.tap import Options

    if any(parameter[0] == "drain-timeout" for parameter in Options.optParameters):
        # A proxy that drains on SIGTERM ends at once in cleanup this way.
        argv += ["--drain-timeout", "0"]
    return argv


def missingForNamespaces(programs: Sequence[str] = ()) -> str | None:
    """
    Say why the namespace tests cannot run here, if they cannot.

    @param programs: programs the caller needs beyond C{ip}.
    @return: a reason to skip, or L{None} when root and every program are there.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root to create network namespaces and change iptables rules"
    for program in ("ip", *programs):
        if shutil.which(program) is None:
            return f"needs the {program} program, which is not on PATH"
    return None


def missingForPod(backend: str) -> str | None:
    """
    Say why the pod scenario cannot run here, if it cannot.

    @param backend: C{"nft"} or C{"legacy"}, the iptables backend under test.
    @return: a reason to skip, or L{None}.
    """
    reason = missingForNamespaces(
        ("curl", f"iptables-{backend}", f"iptables-{backend}-save")
    )
    if reason is not None:
        return reason
    for module in ("gunicorn", "httpbin"):
        if importlib.util.find_spec(module) is None:
            return f"needs the {module} Python package (pip install -r requirements-test.txt)"
    return None


def run(
    argv: Sequence[str], check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """
    Run a program to completion and capture what it prints.

    @param argv: the program and its arguments.
    @param check: raise L{AssertionError} with the output if it exits non-zero.
    @param env: the environment, or L{None} for this process's.
    @return: the finished process, with text C{stdout} and C{stderr}.
    """
    done = subprocess.run(
        list(argv),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {done.returncode}\n"
            f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        )
    return done


def pollUntil(predicate: Callable[[], bool], what: Callable[[], str]) -> None:
    """
    Poll a readiness check until it holds, for at most L{READY_TIMEOUT} seconds.

    @param predicate: returns C{True} once the thing waited for is there.
    @param what: says what is waited for (with any log worth showing), for
        the failure message; called only on failure.
    @raise AssertionError: if it never holds in time.
    """
    deadline = time.monotonic() + READY_TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what()}")
        time.sleep(POLL_INTERVAL)


def normalizedRules(saved: str) -> list[str]:
    """
    The rules of an C{iptables-save} dump, without comments and counters.

    @param saved: the dump.
    @return: its meaningful lines, in order, with C{[packets:bytes]} removed.
    """
    lines = []
    for line in saved.splitlines():
        if not line or line.startswith("#"):
            continue
        lines.append(re.sub(r"\s*\[\d+:\d+\]$", "", line))
    return lines


def ourTrace(saved: str) -> list[str]:
    """
    The lines of an C{iptables-save} dump that the init script is responsible for.

    @param saved: the dump.
    @return: every rule, and every chain that is not one of the nat table's own.
    """
    builtin = {":PREROUTING", ":INPUT", ":OUTPUT", ":POSTROUTING"}
    return [
        line
        for line in normalizedRules(saved)
        if line.startswith("-A ")
        or (line.startswith(":") and line.split()[0] not in builtin)
    ]


def parseHTTP(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """
    Split what C{curl -i} printed into status, headers and body.

    @param raw: C{curl -i}'s standard output.
    @return: the status code, the headers (lower-cased names) and the body.
    """
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def seedRecords(log: str) -> list[dict[str, str]]:
    """
    Read the article's statistics blocks out of the proxy's log.

    @param log: the proxy's standard output.
    @return: one mapping of field name to value per C{Original URL:} block.
    """
    records: list[dict[str, str]] = []
    for line in log.splitlines():
        name, sep, value = line.partition(": ")
        if not sep:
            continue
        if name == "Original URL":
            records.append({})
        if records and name in (
            "Original URL",
            "Proxy URL",
            "Request Duration",
            "Request Size",
            "Response Size",
            "Response Status",
        ):
            records[-1][name] = value.strip()
    return records


class NetworkNamespace:
    """
    A network namespace made for one test, and deleted when the test ends.

    @ivar name: the namespace's name under C{/run/netns}.
    @ivar podAddress: the namespace's end of the veth pair, once L{addVeth} ran.
    @ivar hostAddress: this host's end of the veth pair, once L{addVeth} ran.
    """

    podAddress: str
    hostAddress: str

    def __init__(self, testCase: TestCase, label: str) -> None:
        """
        Create the namespace, with its loopback interface up.

        @param testCase: the test whose cleanup deletes the namespace.
        @param label: a word saying what the namespace is for, used in its name.
        """
        self.name = f"sidecar-{label}-{os.getpid()}-{secrets.token_hex(3)}"
        created = run(["ip", "netns", "add", self.name], check=False)
        if created.returncode != 0:
            raise SkipTest(
                "needs to create network namespaces, which this host refuses: "
                + created.stderr.strip()
            )
        testCase.addCleanup(run, ["ip", "netns", "delete", self.name], False)
        self.ip("link", "set", "lo", "up")

    def ip(self, *argv: str) -> str:
        """
        Run C{ip} inside the namespace.

        @param argv: C{ip}'s arguments.
        @return: what it printed.
        """
        return run(["ip", "-n", self.name, *argv]).stdout

    def execArgv(self, argv: Sequence[str]) -> list[str]:
        """
        Make a command line run inside the namespace.

        @param argv: the program and its arguments.
        @return: the same, behind C{ip netns exec}, which execs it in place, so
            the process id of the result is the program's own.
        """
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        """
        Run a program inside the namespace to completion.

        @param argv: the program and its arguments.
        @param check: raise if it exits non-zero.
        @return: the finished process.
        """
        return run(self.execArgv(argv), check=check)

    def addVeth(self) -> None:
        """
        Join the namespace to this host with a veth pair on a private /30 that
        nothing on this host uses yet; the namespace's end is C{eth0}.
        """
        network = self._freeNetwork()
        host, pod = list(network.hosts())
        self.hostAddress, self.podAddress = str(host), str(pod)
        hostEnd = self.hostEnd = f"scv{secrets.token_hex(4)}"
        run(["ip", "link", "add", hostEnd, "type", "veth", "peer", "name", "eth0",
             "netns", self.name])
        # Deleting the namespace deletes both ends; this covers a failure before that.
        run(["ip", "addr", "add", f"{host}/30", "dev", hostEnd])
        run(["ip", "link", "set", hostEnd, "up"])
        self.ip("addr", "add", f"{pod}/30", "dev", "eth0")
        self.ip("link", "set", "eth0", "up")

    def _freeNetwork(self) -> ipaddress.IPv4Network:
        """
        Pick a /30 out of L{POD_NETWORKS} that overlaps no address or route here.

        @return: the network.
        """
        taken = []
        for line in run(["ip", "-4", "-o", "addr", "show"]).stdout.splitlines():
            match = re.search(r"inet (\S+)", line)
            if match:
                taken.append(ipaddress.ip_interface(match.group(1)).network)
        for line in run(["ip", "-4", "route", "show", "table", "all"]).stdout.splitlines():
            for word in line.split()[:2]:
                try:
                    taken.append(ipaddress.ip_network(word, strict=False))
                except ValueError:
                    continue
                break
        blocks = 2 ** (30 - POD_NETWORKS.prefixlen)
        for _ in range(100):
            index = random.randrange(blocks)
            candidate = ipaddress.ip_network(
                f"{POD_NETWORKS.network_address + 4 * index}/30"
            )
            if not any(candidate.overlaps(network) for network in taken):
                return candidate
        raise AssertionError(f"found no free /30 in {POD_NETWORKS}")


class Pod:
    """
    The article's pod inside a L{NetworkNamespace}: httpbin, the sidecar and
    the init script's rules.

    @ivar namespace: the pod's namespace.
    @ivar backend: C{"nft"} or C{"legacy"}.
    @ivar proxyLog: the file the proxy's standard output goes to.
    """

    def __init__(self, testCase: TestCase, backend: str) -> None:
        """
        Make the namespace and its veth pair; start nothing yet.

        @param testCase: the test whose cleanup ends everything started here.
        @param backend: the iptables backend the init script is told to use.
        """
        self.testCase = testCase
        self.backend = backend
        self.namespace = NetworkNamespace(testCase, "pod")
        self.namespace.addVeth()
        self.proxyLog = FilePath(testCase.mktemp())
        self.proxyLog.parent().makedirs(ignoreExistingDirectory=True)

    def initScript(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """
        Run the init container's script in the pod, as the article's init
        container does, with the test's backend.

        @param argv: more arguments, such as C{clean}.
        @return: the finished script.
        """
        return self.namespace.run(
            ["sh", SCRIPT.path, "-i", self.backend, "-p", str(PROXY_PORT),
             "-b", str(SERVICE_PORT), *argv]
        )

    def natRules(self, family: str = "iptables") -> str:
        """
        Dump the pod's nat table with the backend under test.

        @param family: C{"iptables"} or C{"ip6tables"}.
        @return: the C{iptables-save -t nat} output.
        """
        return self.namespace.run([f"{family}-{self.backend}-save", "-t", "nat"]).stdout

    def spawn(self, argv: Sequence[str], output: FilePath, **kwargs: object) -> None:
        """
        Start a program in the pod, ended by its process id when the test ends.

        @param argv: the program and its arguments.
        @param output: where its standard output and error go.
        @param kwargs: more L{subprocess.Popen} arguments.
        """
        with output.open("w") as sink:
            process = subprocess.Popen(
                self.namespace.execArgv(argv),
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                **kwargs,  # type: ignore[call-overload]
            )
        self.testCase.addCleanup(stopProcess, process)

    def startService(self) -> None:
        """
        Start httpbin on 0.0.0.0:80 in the pod and wait until it answers on
        the pod's loopback.
        """
        self.serviceLog = FilePath(self.testCase.mktemp())
        self.spawn(
            [sys.executable, "-m", "gunicorn", "--workers", "1",
             "--bind", f"0.0.0.0:{SERVICE_PORT}", "httpbin:app"],
            self.serviceLog,
            env=dict(os.environ),
        )
        pollUntil(
            lambda: self.curl([f"http://127.0.0.1:{SERVICE_PORT}/status/204"], inside=True, check=False)[0]
            == 204,
            lambda: f"httpbin in the pod; its log:\n{self.serviceLog.getContent()!r}",
        )

    def startProxy(self) -> None:
        """
        Start the sidecar on 8000 in front of 80 in the pod, from this working
        tree, and wait until its admin server says it is ready to the pod's
        address from outside, as the kubelet's probes ask.
        """
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT.path
        env["PYTHONUNBUFFERED"] = "1"
        self.spawn(proxyCommand(), self.proxyLog, env=env, cwd=ROOT.path)
        pollUntil(
            lambda: self.curl([self.adminURL("/ready")], check=False)[0] == 200,
            lambda: f"the proxy's /ready in the pod; its log:\n{self.proxyLog.getContent()!r}",
        )

    def adminURL(self, path: str) -> str:
        """
        @param path: a path on the proxy's admin server.
        @return: its URL at the pod's address.
        """
        return f"http://{self.namespace.podAddress}:{ADMIN_PORT}{path}"

    def curl(
        self, argv: Sequence[str], inside: bool = False, check: bool = True
    ) -> tuple[int, dict[str, str], bytes]:
        """
        Send one request with C{curl -i} and parse the answer.

        @param argv: C{curl}'s arguments after the common ones (URL last).
        @param inside: send it from inside the pod rather than from this host.
        @param check: raise if curl fails.
        @return: status, headers and body; status 0 when curl failed unchecked.
        """
        command = ["curl", "-sS", "-i", "--noproxy", "*", "--max-time", "10", *argv]
        if inside:
            command = self.namespace.execArgv(command)
        done = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, timeout=30
        )
        if done.returncode != 0:
            if check:
                raise AssertionError(f"{command} failed: {done.stderr!r}")
            return 0, {}, b""
        return parseHTTP(done.stdout)

    def url(self, path: str) -> str:
        """
        @param path: a path and query.
        @return: the URL of the service port at the pod's address.
        """
        return f"http://{self.namespace.podAddress}:{SERVICE_PORT}{path}"

    def proxyRecords(self, count: int) -> list[dict[str, str]]:
        """
        Wait until the proxy has logged at least C{count} records.

        @param count: how many.
        @return: every record logged so far.
        """
        pollUntil(
            lambda: len(seedRecords(self.proxyLog.getContent().decode())) >= count,
            lambda: f"{count} records in the proxy's log:\n{self.proxyLog.getContent()!r}",
        )
        return seedRecords(self.proxyLog.getContent().decode())


def stopProcess(process: subprocess.Popen[bytes]) -> None:
    """
    End a spawned program by its process id: C{SIGTERM}, then C{SIGKILL} if it
    has not exited within ten seconds.

    @param process: the program.
    """
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class PodScenarioMixin:
    """
    The article's demo against one iptables backend; mixed into a
    L{TestCase} that names the backend.

    @cvar backend: C{"nft"} or C{"legacy"}.
    """

    backend: str

    def setUp(self) -> None:
        """
        Skip, saying why, unless root with the programs the pod needs; then make
        the pod's namespace and veth pair.
        """
        reason = missingForPod(self.backend)
        if reason is not None:
            raise SkipTest(reason)
        self.pod = Pod(self, self.backend)  # type: ignore[arg-type]

    def startPod(self) -> None:
        """
        Bring the pod up in the article's order: the init container's rules
        first, then the service and the proxy.
        """
        self.pod.initScript()
        self.pod.startService()
        self.pod.startProxy()

    def test_articleRequestsGoThroughTheProxy(self):
        """
        The article's three requests, sent from outside the pod to the
        service port 80 at the pod's address, are answered through the proxy
        (C{Server: amazing-proxy}), and the proxy logs one record per request
        with the article's fields: the original and proxied URLs, a duration,
        the request size (15 for the POST's C{body=parameters}), the response
        size equal to the body curl received, and the status.
        """
        return deferToThread(self._articleRequests)

    def _articleRequests(self) -> None:
        pod = self.pod
        self.startPod()
        requests = [
            ("/get?query=param", [], 0, 200),
            ("/post", ["-X", "POST", "-d", "body=parameters"], 15, 200),
            ("/status/429", [], 0, 429),
        ]
        answers = []
        for path, options, _, expectedStatus in requests:
            status, headers, body = pod.curl([*options, pod.url(path)])
            self.assertEqual((status, headers.get("server")), (expectedStatus, "amazing-proxy"))
            answers.append(body)

        records = pod.proxyRecords(len(requests))
        self.assertEqual(len(records), len(requests), records)
        for record, (path, _, requestSize, status), body in zip(records, requests, answers):
            self.assertEqual(
                sorted(record),
                ["Original URL", "Proxy URL", "Request Duration", "Request Size",
                 "Response Size", "Response Status"],
            )
            self.assertIn(pod.namespace.podAddress, record["Original URL"])
            self.assertTrue(record["Original URL"].endswith(path), record)
            self.assertTrue(
                record["Proxy URL"].endswith(f"127.0.0.1:{SERVICE_PORT}{path}"), record
            )
            self.assertNotEqual(record["Request Duration"], "")
            self.assertEqual(
                (record["Request Size"], record["Response Size"], record["Response Status"]),
                (str(requestSize), str(len(body)), str(status)),
            )

    def test_podReachesItselfDirectly(self):
        """
        Traffic the pod sends to itself, to C{127.0.0.1:80} or to its own
        address, goes over loopback straight to httpbin: no
        C{Server: amazing-proxy} header and no record in the proxy's log,
        while a request from outside right after it is the log's only record.
        """
        return deferToThread(self._podReachesItself)

    def _podReachesItself(self) -> None:
        pod = self.pod
        self.startPod()
        for host in ("127.0.0.1", pod.namespace.podAddress):
            status, headers, _ = pod.curl(
                [f"http://{host}:{SERVICE_PORT}/get"], inside=True
            )
            self.assertEqual(status, 200)
            self.assertNotEqual(headers.get("server"), "amazing-proxy", host)

        status, headers, _ = pod.curl([pod.url("/status/418")])
        self.assertEqual((status, headers.get("server")), (418, "amazing-proxy"))
        records = pod.proxyRecords(1)
        self.assertEqual([record["Response Status"] for record in records], ["418"])

    def test_probesReachTheAdminServer(self):
        """
        Even when every inbound port is captured (C{-b '*'}), the proxy's
        admin port is not: the kubelet's probe, C{GET /ready} on port 15000 at
        the pod's address from outside, reaches the admin server, while port
        80 still goes through the proxy.
        """
        return deferToThread(self._probes)

    def _probes(self) -> None:
        pod = self.pod
        pod.initScript("-b", "*")
        pod.startService()
        pod.startProxy()
        status, headers, body = pod.curl([pod.adminURL("/ready")])
        self.assertEqual(status, 200, body)
        _, headers, _ = pod.curl([pod.url("/get")])
        self.assertEqual(headers.get("server"), "amazing-proxy")

    def test_secondRunChangesNothing(self):
        """
        Running the init script twice leaves the same nat rules as running it
        once, for IPv4 and for IPv6 (the veth gives the pod an IPv6 link-local
        address, so the rules are mirrored): one jump from C{PREROUTING} to
        C{SIDECAR_INBOUND}, which returns loopback traffic and the proxy's own
        ports and redirects port 80 to 8000. Each run prints the resulting rules.
        """
        return deferToThread(self._secondRun)

    def _secondRun(self) -> None:
        pod = self.pod
        first = pod.initScript()
        once = {family: normalizedRules(pod.natRules(family)) for family in ("iptables", "ip6tables")}
        second = pod.initScript()
        twice = {family: normalizedRules(pod.natRules(family)) for family in ("iptables", "ip6tables")}
        self.assertEqual(once, twice)
        for family in ("iptables", "ip6tables"):
            self.assertEqual(
                ourTrace("\n".join(twice[family])),
                [
                    ":SIDECAR_INBOUND -",
                    "-A PREROUTING -p tcp -j SIDECAR_INBOUND",
                    "-A SIDECAR_INBOUND -i lo -j RETURN",
                    "-A SIDECAR_INBOUND -p tcp -m tcp --dport 8000 -j RETURN",
                    "-A SIDECAR_INBOUND -p tcp -m tcp --dport 8443 -j RETURN",
                    "-A SIDECAR_INBOUND -p tcp -m tcp --dport 15000 -j RETURN",
                    "-A SIDECAR_INBOUND -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 8000",
                ],
                family,
            )
        for done in (first, second):
            self.assertIn("-A PREROUTING -p tcp -j SIDECAR_INBOUND", done.stdout)

    def test_cleanRestoresDirectTraffic(self):
        """
        C{sidecar-iptables.sh clean} removes every rule and chain the script
        added, for IPv4 and IPv6, and a request from outside to port 80, which
        went through the proxy before, then reaches httpbin directly.
        """
        return deferToThread(self._clean)

    def _clean(self) -> None:
        pod = self.pod
        self.startPod()
        _, headers, _ = pod.curl([pod.url("/get")])
        self.assertEqual(headers.get("server"), "amazing-proxy")

        pod.initScript("clean")
        for family in ("iptables", "ip6tables"):
            self.assertEqual(ourTrace(pod.natRules(family)), [], family)
        status, headers, _ = pod.curl([pod.url("/get")])
        self.assertEqual(status, 200)
        self.assertNotEqual(headers.get("server"), "amazing-proxy")


class NftPodTests(PodScenarioMixin, TestCase):
    """
    The article's demo with the rules in the nf_tables backend (C{iptables-nft}).
    """

    backend = "nft"


class LegacyPodTests(PodScenarioMixin, TestCase):
    """
    The article's demo with the rules in the legacy xtables backend
    (C{iptables-legacy}).
    """

    backend = "legacy"


class PodDemoScriptTests(TestCase):
    """
    C{scripts/pod-demo.sh}, which C{make pod-demo} runs.
    """

    demo = ROOT.child("scripts").child("pod-demo.sh")

    def test_shellcheckFindsNothing(self):
        """
        C{shellcheck} reports nothing about the demo script.
        """
        if shutil.which("shellcheck") is None:
            raise SkipTest("needs the shellcheck program (apt-get install shellcheck)")
        done = run(["shellcheck", self.demo.path], check=False)
        self.assertEqual((done.returncode, done.stdout), (0, ""))

    def test_demoShowsInterceptionAndCleansUp(self):
        """
        The demo prints the article's three answers with
        C{Server: amazing-proxy}, the proxy's three records (the POST's
        request size 15), httpbin answering the pod directly, an unchanged
        second run and a clean one; it exits 0 and leaves no namespace behind.
        """
        reason = missingForPod("nft")
        if reason is None and shutil.which("iptables-save") is None:
            reason = "needs the iptables-save program, which is not on PATH"
        if reason is not None:
            raise SkipTest(reason)
        return deferToThread(self._demo)

    def _demo(self) -> None:
        env = dict(os.environ, PYTHON=sys.executable)
        done = subprocess.run(
            ["bash", self.demo.path], stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=120, env=env, cwd=ROOT.path,
        )
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        out = done.stdout
        self.assertEqual(out.count("Server: amazing-proxy"), 3, out)
        self.assertEqual(len(seedRecords(out)), 3, out)
        self.assertIn("Request Size: 15", out)
        self.assertEqual(out.count("Server: gunicorn"), 3, out)
        self.assertIn("same rules as after the first run", out)
        namespace = re.search(r"network namespace (\S+),", out).group(1)  # type: ignore[union-attr]
        self.assertNotIn(namespace, run(["ip", "netns", "list"]).stdout)


REDIS_PORT = 6379
SMTP_PORT = 25
GRPC_PORT = 50051


class EveryPortPodTests(TestCase):
    """
    One proxy in front of every port of the pod: the init script's C{-b '*'} and the
    proxy's C{--upstream original}, which forwards each connection to 127.0.0.1 on
    the port the client dialled (C{SO_ORIGINAL_DST}).  Behind it, at the same time:
    httpbin on 80 (still proxied at L7), a real C{redis-server} on 6379, a real SMTP
    server (aiosmtpd, server-first) on 25 and a real gRPC service (grpcio) on 50051,
    the last three listening on the pod's loopback only, so that a client from
    outside reaches them through the proxy or not at all.  One backend (nft): the
    rules are the same as in L{PodScenarioMixin}.
    """

    def setUp(self) -> None:
        reason = missingForPod("nft") or missingForNamespaces(("redis-server",))
        if reason is None:
            for module in ("redis", "grpc", "aiosmtpd"):
                if importlib.util.find_spec(module) is None:
                    reason = f"needs the {module} Python package (pip install -r requirements-test.txt)"
        if reason is not None:
            raise SkipTest(reason)
        self.pod = Pod(self, "nft")

    def startEverything(self, listen: str = str(PROXY_PORT)) -> None:
        pod = self.pod
        pod.initScript("-b", "*")
        pod.startService()
        peers = ROOT.child("tests").child("peers")
        for name, argv in (
            ("redis", ["redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1", "--save", "",
                       "--appendonly", "no"]),
            ("smtp", [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{SMTP_PORT}"]),
            ("grpc", [sys.executable, peers.child("grpc_greeter.py").path, "server", f"127.0.0.1:{GRPC_PORT}"]),
        ):
            log = FilePath(self.mktemp())
            setattr(self, name + "Log", log)
            pod.spawn(argv, log, env=dict(os.environ))
        for port in (REDIS_PORT, SMTP_PORT, GRPC_PORT):
            pollUntil(
                lambda port=port: pod.namespace.run(
                    [sys.executable, "-c", f"import socket; socket.create_connection(('127.0.0.1', {port}), 1)"],
                    check=False).returncode == 0,
                lambda port=port: f"a server on port {port} in the pod",
            )
        env = dict(os.environ, PYTHONPATH=ROOT.path, PYTHONUNBUFFERED="1")
        pod.spawn(proxyCommand() + ["--upstream", "original", "--log-format", "json", "--listen", listen],
                  pod.proxyLog, env=env, cwd=ROOT.path)
        pollUntil(
            lambda: pod.curl([pod.adminURL("/ready")], check=False)[0] == 200,
            lambda: f"the proxy's /ready in the pod; its log:\n{pod.proxyLog.getContent()!r}",
        )

    def records(self, predicate: Callable[[dict], bool], count: int) -> list[dict]:
        import json

        def found() -> list[dict]:
            lines = self.pod.proxyLog.getContent().decode().splitlines()
            return [r for r in (json.loads(line) for line in lines if line.startswith('{"start_time"'))
                    if predicate(r)]

        pollUntil(lambda: len(found()) >= count,
                  lambda: f"{count} records in the proxy's log:\n{self.pod.proxyLog.getContent()!r}")
        return found()

    def test_everyProtocolAtOnce(self):
        """
        Redis (redis-py SET/GET, a 10 MB value, MONITOR streaming and a raw
        connection whose bytes are known), an SMTP session (the greeting comes after
        the detection timeout), gRPC unary and streaming calls and HTTP requests to
        port 80, all sent from outside the pod at the same time, all succeed; HTTP
        is answered by the proxy at L7 (C{Server: amazing-proxy}, an HTTP record),
        and so is gRPC on its undeclared port (detected by the HTTP/2 preface: one
        HTTP/2 record per call, to 127.0.0.1 on the port dialled, with its gRPC
        status and message counts); every other connection has a TCP record to
        127.0.0.1 on the port dialled; the TCP metrics' byte totals equal the
        records' and every connection opened was closed.
        """
        return deferToThread(self._everyProtocol)

    def _everyProtocol(self) -> None:
        from tests.test_tcp import grpcClient, redisExchange, redisMonitor, redisPy, smtpSession, tcpTotal

        pod = self.pod
        self.startEverything()
        address = pod.namespace.podAddress
        results: dict[str, object] = {}
        failures: list[str] = []

        def job(name: str, f: Callable[[], object]) -> None:
            try:
                results[name] = f()
            except BaseException as e:  # reported below, with the others
                failures.append(f"{name}: {e!r}")

        jobs = {
            "redis-py": lambda: redisPy(REDIS_PORT, address),
            "monitor": lambda: redisMonitor(REDIS_PORT, 100, address),
            "exact": lambda: redisExchange(REDIS_PORT, address),
            "smtp": lambda: smtpSession(SMTP_PORT, address),
            "grpc": lambda: grpcClient(GRPC_PORT, address),
            "http": lambda: [pod.curl([pod.url(f"/anything/{i}")]) for i in range(5)],
        }
        threads = [threading.Thread(target=job, args=item) for item in jobs.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        self.assertEqual(failures, [])
        self.assertEqual(results["monitor"], 100)
        self.assertIn(b"ok unary stream=50", results["grpc"])
        for status, headers, _ in results["http"]:
            self.assertEqual((status, headers.get("server")), (200, "amazing-proxy"))
        greeting, waited = results["smtp"]
        self.assertGreaterEqual(waited, 1.0)

        http = self.records(lambda r: r["protocol"] == "HTTP/1.1", 5)
        self.assertEqual(sorted(r["path"] for r in http), [f"/anything/{i}" for i in range(5)])
        self.assertEqual({r["upstream_host"] for r in http}, {f"127.0.0.1:{SERVICE_PORT}"})
        grpc = self.records(lambda r: r["protocol"] == "HTTP/2", 2)
        self.assertEqual(sorted((r["upstream_host"], r["grpc_status"], r["response_messages"]) for r in grpc),
                         [(f"127.0.0.1:{GRPC_PORT}", "0", 1), (f"127.0.0.1:{GRPC_PORT}", "0", 50)])
        # redis-py (1), MONITOR (2), the raw exchange (1), SMTP (1).
        tcp = self.records(lambda r: r["protocol"] == "tcp", 5)
        self.assertEqual(len(tcp), 5, tcp)
        self.assertEqual(sorted(r["upstream_host"] for r in tcp),
                         [f"127.0.0.1:{p}" for p in (SMTP_PORT, REDIS_PORT, REDIS_PORT, REDIS_PORT, REDIS_PORT)])
        self.assertEqual({r["response_flags"] for r in tcp}, {"-"})
        sent, received = results["exact"]
        self.assertEqual([(r["bytes_received"], r["bytes_sent"]) for r in tcp if r["bytes_received"] == sent],
                         [(sent, received)])
        self.assertEqual({r["detected"] for r in tcp if r["upstream_host"].endswith(f":{SMTP_PORT}")}, {"timeout"})
        self.assertGreater(max(r["bytes_received"] for r in tcp), 10 * 1024 * 1024)
        self.assertIn(b"Subject: via sidecar", self.smtpLog.getContent())

        _, _, body = pod.curl([pod.adminURL("/stats/prometheus")])
        text = body.decode()
        self.assertEqual(tcpTotal(text, "istio_tcp_received_bytes_total"), sum(r["bytes_received"] for r in tcp))
        self.assertEqual(tcpTotal(text, "istio_tcp_sent_bytes_total"), sum(r["bytes_sent"] for r in tcp))
        self.assertEqual(tcpTotal(text, "istio_tcp_connections_opened_total"), 5)
        self.assertEqual(tcpTotal(text, "istio_tcp_connections_closed_total"), 5)
        self.assertEqual([float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                          if line.startswith("istio_requests_total{") and 'request_protocol="grpc"' in line
                          and 'grpc_response_status="0"' in line], [2.0])

    def test_ipv6AndIPv4OnOneDualStackListener(self):
        """
        Behind a dual-stack listener (C{tcp6:8000:interface=::}), a Redis exchange
        from outside over IPv6 (the original destination read with
        C{IP6T_SO_ORIGINAL_DST}) and one over IPv4 (C{SO_ORIGINAL_DST} on the same
        IPv6 socket) both reach the pod's Redis, each with its exact bytes recorded.
        """
        return deferToThread(self._dualStack)

    def _dualStack(self) -> None:
        from tests.test_tcp import redisExchange

        pod = self.pod
        prefix = f"fd00:{secrets.token_hex(2)}:{secrets.token_hex(2)}:{secrets.token_hex(2)}"
        run(["ip", "-6", "addr", "add", f"{prefix}::1/64", "dev", pod.namespace.hostEnd, "nodad"])
        pod.namespace.ip("-6", "addr", "add", f"{prefix}::2/64", "dev", "eth0", "nodad")
        self.startEverything(listen=f"tcp6:{PROXY_PORT}:interface=\\:\\:")
        exchanges = [redisExchange(REDIS_PORT, f"{prefix}::2"), redisExchange(REDIS_PORT, pod.namespace.podAddress)]
        tcp = self.records(lambda r: r["protocol"] == "tcp", 2)
        self.assertEqual(sorted((r["bytes_received"], r["bytes_sent"], r["upstream_host"], r["response_flags"])
                                for r in tcp),
                         sorted((sent, got, f"127.0.0.1:{REDIS_PORT}", "-") for sent, got in exchanges))
        clients = sorted(r["downstream_remote_address"].rpartition(":")[0] for r in tcp)
        host6 = ipaddress.IPv6Address(f"{prefix}::1")
        self.assertEqual(clients, sorted([f"[{host6}]", f"[::ffff:{pod.namespace.hostAddress}]"]))


class GrpcPodTests(TestCase):
    """
    In the network-namespace pod: a gRPC service (grpcio) on a port declared C{grpc}
    (C{--port-protocol}, as C{sidecar-inject} writes it from the Service's
    C{appProtocol} or port name) is proxied at L7 over HTTP/2 and shows up in the
    metrics as Istio's would.
    """

    def setUp(self) -> None:
        reason = missingForPod("nft")
        if reason is None and importlib.util.find_spec("grpc") is None:
            reason = "needs the grpc Python package (pip install -r requirements-test.txt)"
        if reason is not None:
            raise SkipTest(reason)
        self.pod = Pod(self, "nft")

    def test_declaredGrpcPortAtL7(self):
        """
        Unary and streaming calls from outside the pod succeed; each is an HTTP/2
        record with gRPC status 0 and its message counts; C{istio_requests_total} has
        C{request_protocol="grpc"} and C{grpc_response_status="0"}, and
        C{istio_response_messages_total} counts the 51 replies.
        """
        return deferToThread(self._grpc)

    def _grpc(self) -> None:
        import json

        from tests.test_tcp import grpcClient

        pod = self.pod
        pod.initScript("-b", str(GRPC_PORT))
        peers = ROOT.child("tests").child("peers")
        pod.spawn([sys.executable, peers.child("grpc_greeter.py").path, "server", f"127.0.0.1:{GRPC_PORT}"],
                  FilePath(self.mktemp()), env=dict(os.environ))
        pollUntil(
            lambda: pod.namespace.run(
                [sys.executable, "-c", f"import socket; socket.create_connection(('127.0.0.1', {GRPC_PORT}), 1)"],
                check=False).returncode == 0,
            lambda: "the gRPC service in the pod",
        )
        env = dict(os.environ, PYTHONPATH=ROOT.path, PYTHONUNBUFFERED="1")
        argv = proxyCommand()
        argv[argv.index("--upstream") + 1] = str(GRPC_PORT)
        argv[argv.index("--log-format") + 1] = "json"
        pod.spawn(argv + ["--port-protocol", f"{GRPC_PORT}=grpc"], pod.proxyLog, env=env, cwd=ROOT.path)
        pollUntil(
            lambda: pod.curl([pod.adminURL("/ready")], check=False)[0] == 200,
            lambda: f"the proxy's /ready in the pod; its log:\n{pod.proxyLog.getContent()!r}",
        )
        self.assertIn(b"ok unary stream=50", grpcClient(GRPC_PORT, pod.namespace.podAddress))

        def calls() -> list[dict]:
            lines = self.pod.proxyLog.getContent().decode().splitlines()
            return [r for r in (json.loads(line) for line in lines if line.startswith('{"start_time"'))
                    if r["protocol"] == "HTTP/2"]

        pollUntil(lambda: len(calls()) >= 2, lambda: f"two gRPC records:\n{pod.proxyLog.getContent()!r}")
        self.assertEqual(sorted((r["grpc_status"], r["response_messages"]) for r in calls()), [("0", 1), ("0", 50)])
        _, _, body = pod.curl([pod.adminURL("/stats/prometheus")])
        lines = [line for line in body.decode().splitlines()
                 if 'request_protocol="grpc"' in line and 'grpc_response_status="0"' in line]
        self.assertEqual([float(l.rsplit(" ", 1)[1]) for l in lines if l.startswith("istio_requests_total{")], [2.0])
        self.assertEqual([float(l.rsplit(" ", 1)[1]) for l in lines
                          if l.startswith("istio_response_messages_total{")], [51.0])
