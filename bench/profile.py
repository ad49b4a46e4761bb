#!/usr/bin/env python3
# -*- test-case-name: bench.test_bench -*-
"""
Where a small GET's CPU goes in our fast door, by component: the sidecar under wrk,
sampled by py-spy (C{--native}), each sample put in one component and the shares
multiplied by the CPU microseconds per request measured over the same window.

    python3 bench/profile.py [--connections 16] [--seconds 10]

It needs py-spy (C{pip install py-spy}), wrk, nginx and taskset, as the benchmark.
Samples whose innermost frame is C{epoll_wait} are the proxy waiting for work; they
are counted apart and left out of the shares.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterable, Mapping

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import cpuTicksFromStat, systemTicksFromStat
from bench.peers import nginxCommand, nginxConfig, oursCommand, writeUpstreamFiles
from bench.processes import freeLoopbackPort, pinned

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent

#: Native functions that are system calls (or their wrappers) on the data path.
SYSCALL = re.compile(r"^(send|sendmsg|recv|recvmsg|sock_\w+|__libc_\w+|writev|readv|accept4?|connect|close|"
                     r"epoll_ctl|getsockopt|setsockopt|getpeername|getsockname|__GI_\w+|syscall|socket)$")
PYTHON_FRAME = re.compile(r"\((sidecar|twisted)/([\w/]+)\.py:\d+\)$")
IDLE = "waiting in epoll_wait (left out)"


def component(frames: list[str]) -> str:
    """
    The component one sample belongs to, from its frames (outermost first, as py-spy's
    raw format writes them: C{function (file:line)} for Python, C{function (library)}
    for native code).
    """
    leaf = frames[-1]
    name = leaf.split(" ", 1)[0]
    python = [frame for frame in frames if re.search(r"\.py:\d+\)$", frame)]
    native = not re.search(r"\.py:\d+\)$", leaf)
    if native and name == "epoll_wait":
        return IDLE
    if native and SYSCALL.match(name):
        return KERNEL
    if "httptools" in leaf or "llhttp" in leaf:
        return "llhttp (httptools)"
    if native:
        return "CPython runtime (native: objects, allocation, the evaluation loop)"
    match = PYTHON_FRAME.search(python[-1]) if python else None
    if match is None:
        return "other Python (standard library, attrs)"
    package, module = match.groups()
    return f"{package}: {module.replace('/', '.')}"


def shares(rawLines: Iterable[str]) -> tuple[collections.Counter, int, int]:
    """
    Samples by component from py-spy's raw (folded) output.

    @return: the counter, the busy samples and the idle ones.
    """
    counts: collections.Counter = collections.Counter()
    busy = idle = 0
    for line in rawLines:
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        which = component(stack.split(";"))
        if which == IDLE:
            idle += int(number)
        else:
            busy += int(number)
            counts[which] += int(number)
    return counts, busy, idle


KERNEL = "kernel: socket system calls"


def renderShares(counts: Mapping[str, int], busy: int, microseconds: float,
                 systemMicroseconds: float | None = None) -> str:
    """
    A markdown table: component, share of the CPU, microseconds per request.

    @param systemMicroseconds: the system (kernel) CPU time per request, measured
        (C{stime} in C{/proc/PID/stat}).  Given, the kernel's row is that figure and
        the other components share the rest (the user time) in proportion to their
        samples: py-spy stops a busy process at its next kernel entry or exit, so
        samples land in system calls far more often than the process spends there
        (77% of the samples against 40% of the time, measured on 2026-12-01).
        Without it, every row is its share of the samples.
    """
    rows = ["| component | share | µs per request |", "| --- | ---: | ---: |"]
    if systemMicroseconds is None:
        perSample = {name: microseconds * count / busy for name, count in counts.items()}
    else:
        userSamples = busy - counts.get(KERNEL, 0)
        userMicroseconds = microseconds - systemMicroseconds
        perSample = {name: userMicroseconds * count / userSamples
                     for name, count in counts.items() if name != KERNEL and userSamples}
        perSample[KERNEL + " (system time, measured)"] = systemMicroseconds
    for name, value in sorted(perSample.items(), key=lambda item: -item[1]):
        rows.append(f"| {name} | {100 * value / microseconds:.1f}% | {value:.1f} |")
    rows.append(f"| **total** | 100% | {microseconds:.1f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Where a small GET's CPU goes in the fast door.")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--extra-args", default="", help="flags appended to the sidecar's command line")
    parser.add_argument("--close", action="store_true",
                        help="a new connection per request (Connection: close), the close workload")
    parser.add_argument("--raw", type=Path, default=None, help="keep py-spy's raw samples in this file")
    options = parser.parse_args(argv)
    pySpy = shutil.which("py-spy")
    if pySpy is None:
        print("profile: py-spy not found (pip install py-spy)", file=sys.stderr)
        return 1
    directory = Path(tempfile.mkdtemp(prefix="sidecar-profile-"))
    writeUpstreamFiles(directory)
    upstream, port = freeLoopbackPort(), freeLoopbackPort()
    (directory / "nginx.conf").write_text(nginxConfig(directory, upstream, None))
    children = [subprocess.Popen(pinned(nginxCommand(directory, directory / "nginx.conf"), 0),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        proxy = subprocess.Popen(
            pinned(oursCommand(sys.executable, port, upstream, options.extra_args.split()), 1),
            env=dict(os.environ, PYTHONPATH=str(REPOSITORY_ROOT)), cwd=str(directory),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        children.append(proxy)
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/small", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        close = ["-H", "Connection: close"] if options.close else []
        wrk = subprocess.Popen(pinned(["wrk", "-t1", f"-c{options.connections}", f"-d{options.seconds + 4}s",
                                       *close, f"http://127.0.0.1:{port}/small"], 0),
                               stdout=subprocess.PIPE, text=True)
        children.append(wrk)
        time.sleep(2)
        stat = Path(f"/proc/{proxy.pid}/stat")
        before, began = cpuTicksFromStat(stat.read_text()), time.monotonic()
        systemBefore = systemTicksFromStat(stat.read_text())
        raw = directory / "raw.txt"
        subprocess.run([pySpy, "record", "--native", "-r", "250", "-d", str(options.seconds), "-f", "raw",
                        "-o", str(raw), "-p", str(proxy.pid)], capture_output=True, timeout=options.seconds + 60)
        cpu = (cpuTicksFromStat(stat.read_text()) - before) / os.sysconf("SC_CLK_TCK")
        system = (systemTicksFromStat(stat.read_text()) - systemBefore) / os.sysconf("SC_CLK_TCK")
        window = time.monotonic() - began
        output = wrk.communicate(timeout=options.seconds + 30)[0]
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.terminate()
                child.wait(10)
    match = re.search(r"(\d+) requests in ([\d.]+)s", output)
    if match is None:
        print(f"profile: wrk said {output!r}", file=sys.stderr)
        return 1
    rate = int(match.group(1)) / float(match.group(2))
    microseconds = cpu / (rate * window) * 1e6
    systemMicroseconds = system / (rate * window) * 1e6
    counts, busy, idle = shares(raw.read_text().splitlines())
    if options.raw is not None:
        shutil.copyfile(raw, options.raw)
    shutil.rmtree(directory, ignore_errors=True)
    print(f"{rate:,.0f} req/s, {microseconds:.1f} CPU µs per request, proxy CPU {100 * cpu / window:.0f}%, "
          f"{busy} busy samples, {idle} waiting in epoll_wait (left out)\n")
    print(renderShares(counts, busy, microseconds, systemMicroseconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
