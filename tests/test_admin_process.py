# -*- test-case-name: tests.test_admin_process -*-
"""
Integration tests of the admin site, the metrics and the drain with real processes on
127.0.0.1: httpbin under gunicorn as the service, the sidecar under C{twistd -n} or
C{python -m twisted}, real clients, C{promtool} and a real Prometheus server.  Every
port is chosen by the kernel (port 0) or found free; every process is ended by its
PID in a cleanup.
"""

from __future__ import annotations

import fcntl
import http.client
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from typing import Any, Callable, Dict, List, Optional, Tuple

from prometheus_client.parser import text_string_to_metric_families
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from tests.test_metrics import promtoolProblems

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

READY = re.compile(r"sidecar ready: listening on 127\.0\.0\.1:(\d+) .*admin on 127\.0\.0\.1:(\d+), "
                   r"health on (?:127\.0\.0\.1:(\d+)|none)")


def missingPeers() -> Optional[str]:
    """
    Why httpbin cannot be run here, if it cannot.
    """
    for module in ("gunicorn", "httpbin"):
        if importlib.util.find_spec(module) is None:
            return f"needs the {module} Python package (pip install -r requirements-test.txt)"
    return None


def freePort() -> int:
    """
    A TCP port on 127.0.0.1 that was free a moment ago (for programs that cannot report
    the port they bound).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def canConnect(port: int) -> bool:
    """
    Whether a TCP connect to 127.0.0.1:C{port} succeeds now.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def waitFor(predicate: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """
    Poll C{predicate} until it returns something true, at most C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def environment() -> Dict[str, str]:
    """
    This process's environment, importing this working tree first.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for name in ("POD_NAME", "POD_NAMESPACE", "SERVICE_ACCOUNT", "APP", "APP_VERSION", "ISTIO_META_WORKLOAD_NAME"):
        env.pop(name, None)
    return env


class Child:
    """
    A spawned program whose output goes to a file; ended by its PID in a cleanup.
    """

    def __init__(self, testCase: SynchronousTestCase, argv: List[str], output: FilePath,
                 cwd: Optional[str] = None) -> None:
        self.argv = argv
        self.output = output
        with open(output.path, "wb") as out:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, env=environment(), cwd=cwd)
        testCase.addCleanup(self.end)

    @property
    def pid(self) -> int:
        return self.process.pid

    def text(self) -> str:
        return self.output.getContent().decode("utf-8", "replace")

    def signal(self, number: int) -> None:
        os.kill(self.pid, number)

    def wait(self, timeout: float) -> Optional[int]:
        """
        The exit code once it has exited, or C{None} after C{timeout} seconds.
        """
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def end(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def startHttpbin(testCase: SynchronousTestCase, port: Optional[int] = None) -> int:
    """
    httpbin under gunicorn on 127.0.0.1, with threads enough for slow requests.
    """
    port = port or freePort()
    output = FilePath(testCase.mktemp())
    child = Child(testCase, [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", "-k", "gthread",
                             "--threads", "16", "-w", "1", "httpbin:app"], output)
    waitFor(lambda: canConnect(port) or child.process.poll() is not None, "httpbin to listen")
    if child.process.poll() is not None:
        raise AssertionError(f"gunicorn exited: {child.text()}")
    return port


class Sidecar(Child):
    """
    The sidecar, on kernel-chosen ports read from its start-up line.
    """

    def __init__(self, testCase: SynchronousTestCase, upstream: int, *flags: str, runner: str = "twistd",
                 waitReady: bool = True) -> None:
        self.accessLog = FilePath(testCase.mktemp())
        directory = FilePath(testCase.mktemp())
        directory.makedirs()
        if runner == "twistd":
            prefix = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="]
        else:
            prefix = [sys.executable, "-m", "twisted"]
        argv = prefix + ["sidecar", "--listen", "tcp:0:interface=127.0.0.1", "--admin",
                         "tcp:0:interface=127.0.0.1", "--health", "tcp:0:interface=127.0.0.1",
                         "--upstream", str(upstream),
                         "--access-log", self.accessLog.path, *flags]
        Child.__init__(self, testCase, argv, FilePath(testCase.mktemp()), cwd=directory.path)
        self.port = self.adminPort = self.healthPort = 0
        if waitReady:
            self.waitReady()

    def waitReady(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"the sidecar exited: {self.text()}")
            return READY.search(self.text()) is not None

        waitFor(ready, "the sidecar's start-up line", timeout)
        match = READY.search(self.text())
        self.port, self.adminPort = int(match.group(1)), int(match.group(2))
        self.healthPort = int(match.group(3) or 0)

    def admin(self, method: str, path: str) -> Tuple[int, Dict[str, str], bytes]:
        return request(self.adminPort, method, path)

    def get(self, path: str, **kwargs: Any) -> Tuple[int, Dict[str, str], bytes]:
        return request(self.port, "GET", path, **kwargs)


def request(port: int, method: str, path: str, body: Optional[bytes] = None,
            timeout: float = 30.0) -> Tuple[int, Dict[str, str], bytes]:
    """
    One request on a new connection: status, headers (lower-case names) and body.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def abortedRequest(port: int, path: str, after: float) -> None:
    """
    Send a request and close the connection C{after} seconds later, before the answer.
    """
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode("ascii"))
        time.sleep(after)


class Background(threading.Thread):
    """
    A request run in a thread: its result (or exception) and when it ended.
    """

    def __init__(self, f: Callable[[], Any]) -> None:
        threading.Thread.__init__(self, daemon=True)
        self.f = f
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.ended = 0.0
        self.start()

    def run(self) -> None:
        try:
            self.result = self.f()
        except BaseException as e:  # noqa: B902 - reported by the test
            self.error = e
        self.ended = time.monotonic()


def waitForInFlight(sidecar: Sidecar, count: int = 1) -> None:
    """
    Wait until C{count} requests are in flight in C{sidecar}, by its own gauge.
    """
    waitFor(lambda: f"sidecar_requests_active {count:.1f}" in sidecar.admin("GET", "/stats/prometheus")[2].decode(),
            f"{count} requests in flight", timeout=10)


def requestCounts(text: str) -> Dict[Tuple[str, str], float]:
    """
    C{istio_requests_total} by (response_code, response_flags).
    """
    counts: Dict[Tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "istio_requests_total":
                key = (sample.labels["response_code"], sample.labels["response_flags"])
                counts[key] = counts.get(key, 0) + sample.value
    return counts


class MetricsProcessTests(SynchronousTestCase):
    """
    C{/stats/prometheus} of a running sidecar after a known mix of requests.
    """

    def setUp(self) -> None:
        reason = missingPeers()
        if reason is not None:
            raise self.skipTest(reason)
        self.upstream = startHttpbin(self)

    def scrape(self, sidecar: Sidecar) -> str:
        status, headers, body = sidecar.admin("GET", "/stats/prometheus")
        self.assertEqual(status, 200)
        return body.decode("utf-8")

    def test_knownMix(self) -> None:
        """
        After 2xx, 4xx and 5xx answers, a request the service answers too late (504, UT)
        and one the client abandons (status 0, DC), every counter and every histogram
        count in the parsed exposition equals what was sent, and the byte sums match
        the bodies.
        """
        sidecar = Sidecar(self, self.upstream, "--upstream-timeout", "1", "--workload", "httpbin",
                          "--namespace", "test")
        for _ in range(3):
            self.assertEqual(sidecar.get("/status/200")[0], 200)
        status, _, _ = request(sidecar.port, "POST", "/anything", body=b"x" * 1000)
        self.assertEqual(status, 200)
        for _ in range(2):
            self.assertEqual(sidecar.get("/status/404")[0], 404)
        self.assertEqual(sidecar.get("/status/503")[0], 503)
        self.assertEqual(sidecar.get("/delay/3")[0], 504)
        abortedRequest(sidecar.port, "/delay/3", after=0.3)
        expected = {("200", "-"): 4, ("404", "-"): 2, ("503", "-"): 1, ("504", "UT"): 1, ("0", "DC"): 1}
        text = waitFor(lambda: (lambda t: t if requestCounts(t) == expected else None)(self.scrape(sidecar)),
                       "the scrape to count every request", timeout=10)
        families = {f.name: f for f in text_string_to_metric_families(text)}
        for name in ("istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes"):
            counts: Dict[Tuple[str, str], float] = {}
            for sample in families[name].samples:
                labels = sample.labels
                if sample.name == name + "_count" or (sample.name == name + "_bucket" and labels["le"] == "+Inf"):
                    key = (labels["response_code"], labels["response_flags"], sample.name)
                    counts[key] = counts.get(key, 0) + sample.value
            self.assertEqual({(c, f, n[len(name):]): v for (c, f, n), v in counts.items()},
                             {**{(c, f, "_count"): v for (c, f), v in expected.items()},
                              **{(c, f, "_bucket"): v for (c, f), v in expected.items()}}, name)
        requestSums = {s.labels["response_code"]: s.value for s in families["istio_request_bytes"].samples
                       if s.name == "istio_request_bytes_sum"}
        self.assertEqual(requestSums["200"], 1000)
        durations = {s.labels["response_code"]: s.value for s in families["istio_request_duration_milliseconds"].samples
                     if s.name == "istio_request_duration_milliseconds_sum"}
        self.assertGreaterEqual(durations["504"], 1000)
        self.assertLess(durations["504"], 3000)
        sample = families["istio_requests"].samples[0]
        self.assertEqual((sample.labels["destination_workload"], sample.labels["destination_workload_namespace"],
                          sample.labels["reporter"]), ("httpbin", "test", "destination"))
        gauges = {s.name: s.value for f in families.values() for s in f.samples if s.name.startswith("sidecar_")}
        self.assertEqual(gauges["sidecar_downstream_connections_total"], 9)
        self.assertEqual(gauges["sidecar_requests_active"], 0)
        self.assertEqual(gauges["sidecar_draining"], 0)
        # The JSON view has the same counters.
        status, _, body = sidecar.admin("GET", "/stats")
        counters = {(s["labels"]["response_code"], s["labels"]["response_flags"]): s["value"]
                    for s in json.loads(body)["stats"] if s["name"] == "istio_requests_total"}
        self.assertEqual(counters, expected)

    def test_promtool(self) -> None:
        """
        C{promtool check metrics} finds no error in a live scrape (its only remark is on
        the unit in Istio's own duration metric name).
        """
        promtool = shutil.which("promtool")
        if promtool is None:
            raise self.skipTest("promtool is not installed (Debian package prometheus; .ci/run installs it)")
        sidecar = Sidecar(self, self.upstream)
        sidecar.get("/status/200")
        sidecar.get("/status/500")
        done = subprocess.run([promtool, "check", "metrics"], input=self.scrape(sidecar).encode(),
                              capture_output=True, timeout=60)
        self.assertEqual(promtoolProblems(done.stdout + done.stderr), [])
        self.assertIn(done.returncode, (0, 3))

    def test_prometheusScrapes(self) -> None:
        """
        A real Prometheus server scrapes the health port and its query API returns
        C{istio_requests_total} for the sidecar's workload.
        """
        prometheus = shutil.which("prometheus")
        if prometheus is None:
            raise self.skipTest("prometheus is not installed (Debian package prometheus; .ci/run installs it)")
        sidecar = Sidecar(self, self.upstream, "--workload", "scraped", "--namespace", "test")
        for _ in range(3):
            sidecar.get("/status/200")
        config = FilePath(self.mktemp())
        config.setContent(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: sidecar\n    metrics_path: /stats/prometheus\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{sidecar.healthPort}']\n".encode())
        storage = FilePath(self.mktemp())
        port = freePort()
        server = Child(self, [prometheus, f"--config.file={config.path}", f"--storage.tsdb.path={storage.path}",
                              f"--web.listen-address=127.0.0.1:{port}"], FilePath(self.mktemp()))

        def query() -> Any:
            if server.process.poll() is not None:
                raise AssertionError(f"prometheus exited: {server.text()}")
            url = (f"http://127.0.0.1:{port}/api/v1/query?"
                   + urllib.parse.urlencode({"query": 'istio_requests_total{destination_workload="scraped"}'}))
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    result = json.load(response)["data"]["result"]
            except OSError:
                return None
            return result or None

        result = waitFor(query, "Prometheus to return istio_requests_total", timeout=60)
        self.assertEqual(result[0]["metric"]["response_code"], "200")
        self.assertEqual(result[0]["metric"]["job"], "sidecar")
        self.assertEqual(float(result[0]["value"][1]), 3)


class DrainProcessTests(SynchronousTestCase):
    """
    SIGTERM, a second SIGTERM and C{/quitquitquit} on a running sidecar.
    """

    def setUp(self) -> None:
        reason = missingPeers()
        if reason is not None:
            raise self.skipTest(reason)
        self.upstream = startHttpbin(self)

    def test_sigtermDrain(self) -> None:
        """
        On SIGTERM: C{/ready} turns 503 at once; new requests during the drain period
        are served with C{Connection: close}; after it, new connections are refused; the
        slow request in flight completes with 200; the process exits soon after it ends
        (well before C{--drain-timeout} plus C{--shutdown-grace}), with status 0, and
        the access log holds every request.
        """
        drain, grace = 1.5, 15.0
        sidecar = Sidecar(self, self.upstream, "--drain-timeout", str(drain), "--shutdown-grace", str(grace),
                          runner="twist")
        slow = Background(lambda: sidecar.get("/delay/4"))
        waitForInFlight(sidecar)
        signalled = time.monotonic()
        sidecar.signal(signal.SIGTERM)
        status, _, body = sidecar.admin("GET", "/ready")
        self.assertEqual((status, body), (503, b"DRAINING\n"))
        status, headers, _ = sidecar.get("/status/200")
        self.assertEqual((status, headers.get("connection")), (200, "close"))
        time.sleep(max(0.0, signalled + drain + 0.3 - time.monotonic()))
        self.assertFalse(canConnect(sidecar.port), "the listener still accepts after the drain period")
        self.assertEqual(sidecar.admin("GET", "/ready")[0], 503)
        code = sidecar.wait(drain + grace)
        exited = time.monotonic()
        slow.join(10)
        self.assertIsNone(slow.error)
        self.assertEqual(slow.result[0], 200)
        self.assertEqual(code, 0, sidecar.text())
        self.assertLess(exited - slow.ended, 3.0)
        self.assertLess(exited - signalled, drain + grace)
        log = sidecar.accessLog.getContent().decode()
        self.assertIn('"GET /delay/4 HTTP/1.1" 200', log)
        self.assertEqual(log.count('"GET /status/200 HTTP/1.1" 200'), 1)

    def test_graceDeadline(self) -> None:
        """
        A request still in flight at C{--drain-timeout} plus C{--shutdown-grace} does not
        hold the process: it exits on time, and the cut request is in the access log.
        """
        drain, grace = 0.5, 1.0
        sidecar = Sidecar(self, self.upstream, "--drain-timeout", str(drain), "--shutdown-grace", str(grace))
        slow = Background(lambda: sidecar.get("/delay/8"))
        waitForInFlight(sidecar)
        signalled = time.monotonic()
        sidecar.signal(signal.SIGTERM)
        code = sidecar.wait(drain + grace + 5)
        self.assertEqual(code, 0, sidecar.text())
        self.assertLess(time.monotonic() - signalled, drain + grace + 3.0)
        slow.join(10)
        self.assertIsNotNone(slow.error)
        log = sidecar.accessLog.getContent().decode()
        self.assertRegex(log, r'"GET /delay/8 HTTP/1.1" 0 (DC|UC)')

    def test_secondSigterm(self) -> None:
        """
        A second SIGTERM exits at once, without waiting for the drain period.
        """
        sidecar = Sidecar(self, self.upstream, "--drain-timeout", "30")
        Background(lambda: sidecar.get("/delay/5"))
        waitForInFlight(sidecar)
        sidecar.signal(signal.SIGTERM)
        self.assertEqual(sidecar.admin("GET", "/ready")[0], 503)
        signalled = time.monotonic()
        sidecar.signal(signal.SIGTERM)
        self.assertEqual(sidecar.wait(10), 0, sidecar.text())
        self.assertLess(time.monotonic() - signalled, 5.0)

    def test_quitquitquit(self) -> None:
        """
        C{GET /quitquitquit} is refused with 405; C{POST} from loopback answers 200 and
        the process drains and exits with status 0 (as a Kubernetes Job's sidecar must).
        """
        sidecar = Sidecar(self, self.upstream, "--drain-timeout", "0.3")
        self.assertEqual(sidecar.admin("GET", "/quitquitquit")[0], 405)
        self.assertIsNone(sidecar.wait(0.5))
        started = time.monotonic()
        status, _, body = sidecar.admin("POST", "/quitquitquit")
        self.assertEqual((status, body), (200, b"OK\n"))
        self.assertEqual(sidecar.wait(10), 0, sidecar.text())
        self.assertLess(time.monotonic() - started, 5.0)

    def test_quitquitquitPrompt(self) -> None:
        """
        With nothing in flight, C{POST /quitquitquit} exits with status 0 within a
        second, even with the default 5 s drain timeout and an idle keep-alive client
        connected (Envoy's semantics, what a Job calls when its work is done).
        """
        sidecar = Sidecar(self, self.upstream)
        keepAlive = http.client.HTTPConnection("127.0.0.1", sidecar.port, timeout=10)
        self.addCleanup(keepAlive.close)
        keepAlive.request("GET", "/status/200")
        self.assertEqual(keepAlive.getresponse().read(), b"")
        started = time.monotonic()
        status, _, body = sidecar.admin("POST", "/quitquitquit")
        self.assertEqual((status, body), (200, b"OK\n"))
        self.assertEqual(sidecar.wait(10), 0, sidecar.text())
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertIn('"GET /status/200 HTTP/1.1" 200', sidecar.accessLog.getContent().decode())

    def test_quitquitquitWaitsForInFlight(self) -> None:
        """
        With a request in flight, C{POST /quitquitquit} closes the listener at once,
        lets the request finish with 200, and exits within a second of its end (well
        before the drain timeout).
        """
        sidecar = Sidecar(self, self.upstream, "--drain-timeout", "10")
        slow = Background(lambda: sidecar.get("/delay/2"))
        waitForInFlight(sidecar)
        started = time.monotonic()
        self.assertEqual(sidecar.admin("POST", "/quitquitquit")[0], 200)
        waitFor(lambda: not canConnect(sidecar.port), "the listener to close", timeout=1)
        code = sidecar.wait(15)
        exited = time.monotonic()
        slow.join(10)
        self.assertEqual(code, 0, sidecar.text())
        self.assertIsNone(slow.error)
        self.assertEqual(slow.result[0], 200)
        self.assertLess(exited - slow.ended, 1.0)
        self.assertLess(exited - started, 10.0)
        self.assertIn('"GET /delay/2 HTTP/1.1" 200', sidecar.accessLog.getContent().decode())

    def test_waitForUpstream(self) -> None:
        """
        With C{--wait-for-upstream}, C{/ready} answers 503 and the start-up line waits
        until the service accepts connections; with C{--ready-requires-upstream}, it
        turns 503 again when the service goes away.
        """
        port = freePort()
        sidecar = Sidecar(self, port, "--wait-for-upstream", "60", "--ready-requires-upstream",
                          waitReady=False)
        self.assertEqual(request(self.adminPortFrom(sidecar), "GET", "/ready")[:3:2], (503, b"INITIALIZING\n"))
        self.assertIsNone(READY.search(sidecar.text()))
        service = socket.socket()
        service.bind(("127.0.0.1", port))
        service.listen(16)
        sidecar.waitReady(timeout=10)
        self.assertEqual(sidecar.admin("GET", "/ready")[:3:2], (200, b"LIVE\n"))
        service.close()
        self.assertEqual(sidecar.admin("GET", "/ready")[:3:2], (503, b"UPSTREAM UNREACHABLE\n"))

    def adminPortFrom(self, sidecar: Sidecar) -> int:
        """
        The admin port of a sidecar that is not ready yet, from twistd's own "starting
        on" line.
        """
        match = waitFor(lambda: re.search(r"AdminSite starting on (\d+)", sidecar.text()), "the admin site")
        return int(match.group(1))


class PortsProcessTests(SynchronousTestCase):
    """
    Where the admin site and the health port listen, and what each serves.
    """

    def setUp(self) -> None:
        reason = missingPeers()
        if reason is not None:
            raise self.skipTest(reason)
        self.upstream = startHttpbin(self)

    def test_bareAdminPortIsLoopback(self) -> None:
        """
        A bare C{--admin} port listens on 127.0.0.1 only, a bare C{--health} port on
        every interface, as the start-up line says (it prints the bound addresses).
        """
        admin, health = freePort(), freePort()
        sidecar = Sidecar(self, self.upstream, "--admin", str(admin), "--health", str(health), waitReady=False)
        waitFor(lambda: "sidecar ready" in sidecar.text() or sidecar.process.poll() is not None,
                "the start-up line")
        self.assertIn(f"admin on 127.0.0.1:{admin}, health on 0.0.0.0:{health}", sidecar.text())
        self.assertEqual(request(health, "GET", "/healthz/ready")[:3:2], (200, b"LIVE\n"))
        self.assertEqual(request(admin, "GET", "/config_dump")[0], 200)

    def test_healthPort(self) -> None:
        """
        The health port answers C{/ready} and C{/healthz/ready} as the admin site's
        C{/ready}, serves the metrics (with C{istio_build}, C{process_*} and
        C{python_info}), and 404 for everything else, mutations included: a C{POST
        /quitquitquit} there neither answers nor stops the process.
        """
        from sidecar import __version__

        sidecar = Sidecar(self, self.upstream)
        self.assertEqual(sidecar.get("/status/200")[0], 200)
        for path in ("/ready", "/healthz/ready"):
            self.assertEqual(request(sidecar.healthPort, "GET", path)[:3:2], (200, b"LIVE\n"), path)
        status, headers, body = request(sidecar.healthPort, "GET", "/stats/prometheus")
        self.assertEqual(status, 200)
        samples = {s.name: s for f in text_string_to_metric_families(body.decode()) for s in f.samples}
        self.assertEqual(samples["istio_build"].labels, {"component": "proxy", "tag": __version__})
        self.assertEqual(samples["istio_requests_total"].value, 1)
        self.assertGreater(samples["process_resident_memory_bytes"].value, 1024 * 1024)
        self.assertGreater(samples["process_open_fds"].value, 3)
        self.assertIn("python_info", samples)
        for method, path in (("GET", "/config_dump"), ("GET", "/server_info"), ("GET", "/stats"), ("GET", "/"),
                             ("POST", "/quitquitquit"), ("POST", "/healthcheck/fail"),
                             ("POST", "/drain_listeners")):
            self.assertEqual(request(sidecar.healthPort, method, path)[0], 404, (method, path))
        self.assertIsNone(sidecar.wait(0.3))
        self.assertEqual(sidecar.admin("GET", "/ready")[:3:2], (200, b"LIVE\n"))
        self.assertEqual(sidecar.admin("GET", "/config_dump")[0], 200)


class AccessLogPipeProcessTests(SynchronousTestCase):
    """
    C{twistd sidecar} logging to a standard output that nobody reads (a stalled
    container log pipe).
    """

    def setUp(self) -> None:
        reason = missingPeers()
        if reason is not None:
            raise self.skipTest(reason)
        self.upstream = startHttpbin(self)

    def test_unreadStdout(self) -> None:
        """
        With stdout a 16 KiB pipe nobody reads and a 16 KiB log buffer, 100 requests
        with 1 kB records are all answered promptly and C{/ready} stays 200; the
        records that did not fit are counted in
        C{sidecar_access_log_dropped_records_total}.  Once the pipe is read, the first
        records come out whole and in order, one line tells how many were dropped, and
        later records follow.
        """
        read, write = os.pipe()
        fcntl.fcntl(write, getattr(fcntl, "F_SETPIPE_SZ", 1031), 16384)
        listen, admin = freePort(), freePort()
        errors = FilePath(self.mktemp())
        directory = FilePath(self.mktemp())
        directory.makedirs()
        with open(errors.path, "wb") as err:
            process = subprocess.Popen(
                [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
                 "sidecar", "--listen", f"tcp:{listen}:interface=127.0.0.1", "--admin", str(admin),
                 "--health", "none", "--upstream", str(self.upstream), "--access-log", "-",
                 "--access-log-buffer", "16384"],
                stdin=subprocess.DEVNULL, stdout=write, stderr=err, env=environment(), cwd=directory.path)
        os.close(write)
        self.addCleanup(os.close, read)
        self.addCleanup(lambda: process.poll() is None and (process.kill(), process.wait(10)))
        waitFor(lambda: canConnect(admin) and request(admin, "GET", "/ready")[0] == 200, "the sidecar")
        pad = "p" * 1000
        for i in range(100):
            started = time.monotonic()
            self.assertEqual(request(listen, "GET", f"/status/200?n={i}&pad={pad}", timeout=5)[0], 200, i)
            self.assertLess(time.monotonic() - started, 2.0, i)
            if i % 25 == 0:
                self.assertEqual(request(admin, "GET", "/ready", timeout=5)[:3:2], (200, b"LIVE\n"))
        metrics = request(admin, "GET", "/stats/prometheus", timeout=5)[2].decode()
        samples = {s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples}
        dropped = int(samples["sidecar_access_log_dropped_records_total"])
        self.assertGreater(dropped, 50)
        self.assertLessEqual(samples["sidecar_access_log_buffered_bytes"], 16384)
        received = bytearray()
        reader = Background(lambda: readAll(read, received))
        waitFor(lambda: f"dropped {dropped} records".encode() in received, "the dropped-records line", timeout=10)
        self.assertEqual(request(listen, "GET", "/status/200?marker", timeout=5)[0], 200)
        waitFor(lambda: b"?marker" in received, "the next record", timeout=10)
        kept = [int(n) for n in re.findall(rb'"GET /status/200\?n=(\d+)&', bytes(received))]
        self.assertEqual(kept, list(range(100 - dropped)))
        self.assertEqual(bytes(received).count(b" dropped "), 1)
        process.kill()
        process.wait(10)
        reader.join(5)


def readAll(fd: int, into: bytearray) -> None:
    """
    Read C{fd} into C{into} until its end.
    """
    while True:
        data = os.read(fd, 65536)
        if not data:
            return
        into.extend(data)
