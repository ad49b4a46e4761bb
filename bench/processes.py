# -*- test-case-name: bench.test_bench -*-
"""
The benchmark's edge with the operating system: the processes it starts (and only
those, by PID), their CPU time, loopback probes and wrk.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from bench.measure import (
    Workload,
    WrkSummary,
    answerProblem,
    cpuTicksFromStat,
    parentPidFromStat,
    reapedChildTicksFromStat,
    parseWrkOutput,
)

#: How long a started process gets to exit after SIGTERM before SIGKILL.
STOP_GRACE_SECONDS = 5.0

#: How often readiness is polled.
POLL_INTERVAL_SECONDS = 0.1

#: How long one probe request may take.
PROBE_TIMEOUT_SECONDS = 3.0

#: How long past its C{-d} a wrk run may take before it is killed.
WRK_GRACE_SECONDS = 30.0

#: Where wrk's script lives.
WRK_SCRIPT = Path(__file__).resolve().parent / "wrk.lua"


def freeLoopbackPort() -> int:
    """
    Ask the kernel for a free TCP port on 127.0.0.1.

    @return: a port that was free a moment ago.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pinned(argv: Sequence[str], cpu: int | None) -> list[str]:
    """
    Prefix a command with C{taskset -c CPU}; C{taskset} execs it, so the PID we get is
    the command's own.

    @param argv: the command.
    @param cpu: the CPU, or L{None} to leave the command unpinned.
    @return: the new argument vector.
    """
    if cpu is None:
        return list(argv)
    return ["taskset", "-c", str(cpu), *argv]


class Child:
    """
    A process this benchmark started, known by its PID, its output in a log file.

    @ivar name: what the process is, for messages.
    @ivar logPath: the file holding its standard output and error.
    @ivar process: the running process.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        logPath: Path,
        environment: Mapping[str, str] | None = None,
        workingDirectory: Path | None = None,
    ) -> None:
        """
        Start the process.

        @param name: what the process is, for messages.
        @param argv: the command line.
        @param logPath: where its output goes.
        @param environment: its environment; the benchmark's own when L{None}.
        @param workingDirectory: its current directory.
        @raise OSError: when the program cannot be started.
        """
        self.name = name
        self.argv = list(argv)
        self.logPath = logPath
        self._log = open(logPath, "wb")
        try:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=None if environment is None else dict(environment),
                cwd=None if workingDirectory is None else str(workingDirectory),
            )
        except BaseException:
            self._log.close()
            raise

    @property
    def pid(self) -> int:
        """
        The process id.
        """
        return self.process.pid

    def running(self) -> bool:
        """
        Whether the process has not exited yet.
        """
        return self.process.poll() is None

    def cpuTicks(self) -> int:
        """
        The process's user plus system CPU time so far, in clock ticks, with that of
        its child processes (the workers of C{--workers}), running or exited.

        @raise OSError: when the process is gone.
        """
        own = Path(f"/proc/{self.pid}/stat").read_text()
        total = cpuTicksFromStat(own) + reapedChildTicksFromStat(own)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or entry.name == str(self.pid):
                continue
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            if parentPidFromStat(text) == self.pid:
                total += cpuTicksFromStat(text)
        return total

    def logTail(self, lines: int = 12) -> str:
        """
        The last lines the process wrote, for an error message.

        @param lines: how many.
        @return: the text, indented.
        """
        self._log.flush()
        try:
            text = self.logPath.read_text(errors="replace")
        except OSError:
            return "    (no output)"
        tail = text.strip().splitlines()[-lines:]
        return "\n".join(f"    {line}" for line in tail) or "    (no output)"

    def stop(self) -> None:
        """
        End the process: SIGTERM to its PID, then SIGKILL if it has not exited within
        L{STOP_GRACE_SECONDS}. Nothing else is signalled.
        """
        try:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=STOP_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=STOP_GRACE_SECONDS)
        finally:
            self._log.close()


def fetch(port: int, workload: Workload) -> tuple[int, bytes]:
    """
    Make one real request of C{workload} to 127.0.0.1:C{port}.

    @param port: the port.
    @param workload: what to ask.
    @return: the status and the whole body.
    @raise OSError: on a connection failure or timeout.
    @raise http.client.HTTPException: on a malformed answer.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=PROBE_TIMEOUT_SECONDS)
    try:
        body = b"x" * workload.requestBodyBytes if workload.requestBodyBytes else None
        headers = {"Content-Type": "application/octet-stream"} if body else {}
        if workload.newConnection:
            headers["Connection"] = "close"
        connection.request(workload.method, workload.path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def waitUntilServing(
    port: int,
    workload: Workload,
    child: Child | None,
    timeoutSeconds: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> str | None:
    """
    Poll with real requests until the peer on C{port} answers C{workload} correctly,
    for at most C{timeoutSeconds} and a bounded number of attempts.

    @param port: the port the peer serves on.
    @param workload: the request to poll with.
    @param child: the peer's process, to stop early if it exits; L{None} for none.
    @param timeoutSeconds: the time limit.
    @param clock: a monotonic clock.
    @param sleep: how to wait between attempts.
    @return: L{None} when the peer is serving, else why not.
    """
    deadline = clock() + timeoutSeconds
    attempts = int(timeoutSeconds / POLL_INTERVAL_SECONDS) + 1
    problem = "no attempt made"
    for _ in range(attempts):
        if child is not None and not child.running():
            return f"exited with status {child.process.returncode} before serving"
        try:
            status, body = fetch(port, workload)
        except (OSError, http.client.HTTPException) as error:
            problem = f"{type(error).__name__}: {error}"
        else:
            problem = answerProblem(workload, status, body)
            if problem is None:
                return None
        if clock() >= deadline:
            break
        sleep(POLL_INTERVAL_SECONDS)
    return f"not serving correctly after {timeoutSeconds:g} s ({problem})"


def checkEveryWorkload(port: int, workloads: Sequence[Workload]) -> str | None:
    """
    Ask each workload's request once and check the answer, so that a proxy that
    answers fast but wrongly is caught before it is measured.

    @param port: the port the peer serves on.
    @param workloads: the workloads to check.
    @return: L{None} when all are right, else the first problem.
    """
    for position, workload in enumerate(workloads):
        try:
            status, body = fetch(port, workload)
        except (OSError, http.client.HTTPException) as error:
            problem: str | None = f"{workload.method} {workload.path} failed: {error}"
        else:
            problem = answerProblem(workload, status, body)
        if problem is not None:
            before = ", ".join(f"{w.method} {w.path}" for w in workloads[:position])
            return f"{problem} (after {before} answered right)" if before else problem
    return None


class WrkFailed(Exception):
    """
    wrk exited with an error, timed out, or printed no summary.
    """


def runWrk(
    port: int,
    workload: Workload,
    durationSeconds: int,
    connections: int,
    threads: int,
    cpu: int | None,
) -> tuple[WrkSummary, str]:
    """
    Load 127.0.0.1:C{port} with wrk for C{durationSeconds}, keep-alive, with latency
    statistics, and read its summary.

    @param port: the port to load.
    @param workload: what to ask.
    @param durationSeconds: wrk's C{-d}.
    @param connections: wrk's C{-c}.
    @param threads: wrk's C{-t}.
    @param cpu: the CPU to pin wrk to, or L{None}.
    @return: the summary and wrk's whole output.
    @raise WrkFailed: when wrk fails or overruns.
    """
    argv = pinned(
        [
            "wrk",
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{durationSeconds}s",
            "--timeout",
            "5s",
            "--latency",
            "-s",
            str(WRK_SCRIPT),
            f"http://127.0.0.1:{port}{workload.path}",
        ],
        cpu,
    )
    environment = dict(os.environ, BENCH_BODY_BYTES=str(workload.requestBodyBytes),
                       BENCH_CLOSE="1" if workload.newConnection else "0")
    try:
        completed = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=environment,
            timeout=durationSeconds + WRK_GRACE_SECONDS,
        )
    except subprocess.TimeoutExpired as error:
        raise WrkFailed(f"wrk overran its {durationSeconds} s by {WRK_GRACE_SECONDS:g} s") from error
    if completed.returncode != 0:
        raise WrkFailed(f"wrk exited {completed.returncode}: {completed.stderr.strip()}")
    try:
        return parseWrkOutput(completed.stdout), completed.stdout
    except ValueError as error:
        raise WrkFailed(f"{error}\n{completed.stdout}{completed.stderr}") from error
