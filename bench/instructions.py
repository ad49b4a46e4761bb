#!/usr/bin/env python3
# -*- test-case-name: bench.test_bench -*-
"""
User-space instructions per proxied request, counted by valgrind's callgrind: a
before/after of a change on the hot path that the noise of a shared machine cannot
blur (the same run gives the same count within a percent or two, where CPU time moves
by ten).

    python3 bench/instructions.py [--workloads small,post] [--baseline DIR] [--seconds 8]

For each peer (our sidecar from this checkout, and with C{--baseline} the one of
another checkout, e.g. a git worktree of the commit before a change), it starts nginx
and the sidecar under C{valgrind --tool=callgrind --instr-atstart=no}, warms it up
with wrk, switches counting on (C{callgrind_control -i on}), loads it for C{--seconds}
with wrk, switches counting off, and divides the instructions by the requests wrk
completed.

What it does not see: the kernel's share (system calls, the TCP stack), which is about
half of a small GET's CPU; count system calls with C{strace -c} for that.  It is not a
comparison with Envoy: the benchmark (C{bench/run.py}) is, in CPU time.

It needs valgrind (Debian C{valgrind}), wrk and nginx.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import WORKLOADS
from bench.peers import flagsKnownBy, nginxCommand, nginxConfig, oursCommand, writeUpstreamFiles
from bench.processes import WRK_SCRIPT, fetch, freeLoopbackPort

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent

#: How long the sidecar gets to answer its first request under valgrind.
READY_SECONDS = 120


def instructionsFromOutput(text: str) -> int:
    """
    The instructions counted in one callgrind output file (its C{totals:} line).
    """
    match = re.search(r"^totals: (\d+)", text, re.M)
    return int(match.group(1)) if match else 0


def wrkCommand(port: int, path: str, seconds: int) -> list[str]:
    """
    wrk at 16 connections with the benchmark's script (which prints exact counts).
    """
    return ["wrk", "-t1", "-c16", f"-d{seconds}s", "--timeout", "20s", "-s", str(WRK_SCRIPT),
            f"http://127.0.0.1:{port}{path}"]


def countOne(root: Path, workloadName: str, seconds: int, directory: Path) -> tuple[int, int]:
    """
    Count the sidecar of checkout C{root} under one workload.

    @return: C{(instructions, requests)}.
    """
    workload = WORKLOADS[workloadName]
    upstreamPort = freeLoopbackPort()
    config = directory / "nginx.conf"
    echo = next(iter(Path("/usr/lib/nginx/modules").glob("*echo*")), None)
    config.write_text(nginxConfig(directory, upstreamPort, echo))
    nginx = subprocess.Popen(nginxCommand(directory, config), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    port = freeLoopbackPort()
    output = directory / f"callgrind-{workloadName}.out"
    argv = flagsKnownBy(str(root), oursCommand(sys.executable, port, upstreamPort, []))
    proxy = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={output}", *argv],
        env=dict(os.environ, PYTHONPATH=str(root)), cwd=str(root),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    environment = dict(os.environ, BENCH_BODY_BYTES=str(workload.requestBodyBytes),
                       BENCH_CLOSE="1" if workload.newConnection else "0")
    try:
        deadline = time.monotonic() + READY_SECONDS
        while True:
            try:
                if fetch(port, workload)[0] == 200:
                    break
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline or proxy.poll() is not None:
                raise RuntimeError(f"the sidecar of {root} did not answer under valgrind")
            time.sleep(1)
        subprocess.run(wrkCommand(port, workload.path, 3), env=environment, capture_output=True, timeout=120)
        subprocess.run(["callgrind_control", "-i", "on", str(proxy.pid)], capture_output=True, timeout=60)
        result = subprocess.run(wrkCommand(port, workload.path, seconds), env=environment,
                                capture_output=True, text=True, timeout=seconds + 120)
        subprocess.run(["callgrind_control", "-i", "off", str(proxy.pid)], capture_output=True, timeout=60)
    finally:
        for child in (proxy, nginx):
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    summary = re.search(r"BENCH-JSON (\{.*\})", result.stdout)
    if summary is None:
        raise RuntimeError(f"wrk printed no summary: {result.stdout[-300:]!r}")
    requests = int(json.loads(summary.group(1))["requests"])
    instructions = sum(instructionsFromOutput(path.read_text()) for path in directory.glob(output.name + "*"))
    return instructions, requests


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="small,post",
                        help="comma-separated workloads of bench/run.py (default: small,post)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="also count the sidecar of this checkout (e.g. a worktree of the commit before)")
    parser.add_argument("--seconds", type=int, default=8, help="seconds of counted load (default 8)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep callgrind's output files in this directory (for callgrind_annotate)")
    options = parser.parse_args(argv)
    for program in ("valgrind", "callgrind_control", "wrk", "nginx"):
        if shutil.which(program) is None:
            parser.error(f"{program} is not installed")
    roots = [("ours", REPOSITORY_ROOT)]
    if options.baseline is not None:
        if not (options.baseline / "sidecar" / "tap.py").exists():
            parser.error(f"--baseline {options.baseline}: no sidecar/tap.py there")
        roots.append(("base", options.baseline.resolve()))
    workloads = [name for name in options.workloads.split(",") if name]
    for name in workloads:
        if name not in WORKLOADS:
            parser.error(f"--workloads: unknown workload {name!r}")
    print("| peer | workload | requests | user instructions / request |")
    print("| --- | --- | ---: | ---: |")
    counts = {}
    for name in workloads:
        for peer, root in roots:
            with tempfile.TemporaryDirectory() as temporary:
                directory = Path(temporary)
                writeUpstreamFiles(directory)
                instructions, requests = countOne(root, name, options.seconds, directory)
                if options.keep is not None:
                    options.keep.mkdir(parents=True, exist_ok=True)
                    for path in directory.glob("callgrind-*.out*"):
                        shutil.copy(path, options.keep / f"{peer}-{path.name}")
            counts[peer, name] = instructions / max(requests, 1)
            print(f"| {peer} | {WORKLOADS[name].description} | {requests} | {counts[peer, name]:,.0f} |", flush=True)
    if options.baseline is not None:
        for name in workloads:
            print(f"ours ÷ base, {WORKLOADS[name].description}: {counts['ours', name] / counts['base', name]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
