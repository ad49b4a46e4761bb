"""
The article's demo, on one machine: an upstream on a loopback port (httpbin when it is
installed, else the built-in L{sidecar.demo} service, or yours with --upstream), the
sidecar in front of it, the article's three requests, the responses and the statistics.
Everything it starts, it stops.

  python scripts/demo.py [--upstream PORT|HOST:PORT] [--builtin] [--log-format seed|text|json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def waitFor(port: int, what: str, proc: subprocess.Popen, seconds: float = 20) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"demo: {what} exited with status {proc.returncode} before answering")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"demo: {what} did not answer on port {port} within {seconds:.0f} s")


def request(label: str, url: str, data: bytes | None = None) -> None:
    print(f"$ {label}")
    if shutil.which("curl"):
        args = ["curl", "-s", "-i", "--max-time", "10", url]
        if data is not None:
            args[1:1] = ["-X", "POST", "-d", data.decode()]
        out = subprocess.run(args, capture_output=True, text=True).stdout
    else:
        req = urllib.request.Request(url, data=data)
        try:
            resp = urllib.request.urlopen(req, timeout=10)
        except urllib.error.HTTPError as e:
            resp = e
        out = f"HTTP/1.1 {resp.status} {resp.reason}\n{resp.headers}\n{resp.read().decode()}"
    print(out.replace("\r\n", "\n").rstrip() + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--upstream", help="use your service (PORT or HOST:PORT) instead of starting one")
    parser.add_argument("--builtin", action="store_true", help="use the built-in service even if httpbin is installed")
    parser.add_argument("--log-format", default="seed", choices=["seed", "text", "json"])
    options = parser.parse_args()

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    children = []

    def stop() -> None:
        for proc in reversed(children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(children):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    try:
        if options.upstream:
            upstream = options.upstream
            print(f"demo: using your service at {upstream}")
        else:
            port = freePort()
            try:
                import gunicorn  # noqa: F401
                import httpbin  # noqa: F401
                useHttpbin = not options.builtin
            except ImportError:
                useHttpbin = False
            if useHttpbin:
                argv = [sys.executable, "-m", "gunicorn", "-w", "1", "-b", f"127.0.0.1:{port}", "httpbin:app"]
                name = "httpbin"
            else:
                argv = [sys.executable, "-m", "sidecar.demo", "--port", str(port)]
                name = "the built-in demo service"
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            children.append(proc)
            waitFor(port, name, proc)
            upstream = str(port)
            print(f"demo: {name} on 127.0.0.1:{port}")

        listen = freePort()
        fd, logPath = tempfile.mkstemp(prefix="sidecar-demo-", suffix=".log")
        os.close(fd)
        sidecar = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
             "sidecar", "--listen", f"tcp:{listen}:interface=127.0.0.1", "--upstream", upstream,
             "--admin", "none", "--health", "none", "--log-format", options.log_format, "--access-log", logPath],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        children.append(sidecar)
        waitFor(listen, "the sidecar", sidecar)
        print(f"demo: sidecar on 127.0.0.1:{listen} -> {upstream}\n")

        base = f"http://127.0.0.1:{listen}"
        request(f"curl -i '{base}/get?query=param'", f"{base}/get?query=param")
        request(f"curl -i -X POST -d 'body=parameters' {base}/post", f"{base}/post", b"body=parameters")
        request(f"curl -i {base}/status/429", f"{base}/status/429")

        time.sleep(0.3)
        print("demo: the sidecar's statistics, one record per request:\n")
        with open(logPath) as f:
            print(f.read().rstrip())
        os.remove(logPath)
    finally:
        stop()


if __name__ == "__main__":
    main()
