# -*- test-case-name: bench.test_bench -*-
"""
What the benchmark sends and what it measures, as plain data.

Nothing here starts a process, opens a socket or reads a clock: L{bench.run} hands in
wrk's output, C{/proc/<pid>/stat} text and durations, and gets numbers back.
"""

from __future__ import annotations

import json
import statistics
from typing import Sequence

from attrs import frozen

#: The prefix of the one line C{bench/wrk.lua} prints when wrk is done.
WRK_SUMMARY_MARKER = "BENCH-JSON "

#: What the upstream answers to C{GET /small}: 13 bytes.
SMALL_BODY = b"hello, world\n"

#: What the upstream answers to C{POST /post} once it has read the whole request body.
POST_ANSWER_BODY = b"ok\n"

#: The size of the large response body (C{GET /1m}).
LARGE_BODY_BYTES = 1024 * 1024

#: The size of the request body of C{POST /post}.
POST_BODY_BYTES = 64 * 1024


@frozen
class Workload:
    """
    One kind of request the load generator sends over and over.

    @ivar name: the short name used on the command line and in the table.
    @ivar method: the HTTP method.
    @ivar path: the request path, the same on the upstream and through every proxy.
    @ivar requestBodyBytes: the size of the request body; 0 for none.
    @ivar responseBodyBytes: the size of the body the upstream answers with.
    @ivar description: a few words for the table.
    @ivar newConnection: every request on a new connection (C{Connection: close}: the
        proxy answers and closes, the client connects again).
    """

    name: str
    method: str
    path: str
    requestBodyBytes: int
    responseBodyBytes: int
    description: str
    newConnection: bool = False


#: Every workload, in the order the table lists them.
WORKLOADS: dict[str, Workload] = {
    workload.name: workload
    for workload in (
        Workload("small", "GET", "/small", 0, len(SMALL_BODY), "GET 13 B"),
        Workload("1m", "GET", "/1m", 0, LARGE_BODY_BYTES, "GET 1 MiB"),
        Workload(
            "post", "POST", "/post", POST_BODY_BYTES, len(POST_ANSWER_BODY), "POST 64 KiB"
        ),
        Workload("close", "GET", "/small", 0, len(SMALL_BODY), "GET 13 B, new connection", newConnection=True),
    )
}


def answerProblem(workload: Workload, status: int, body: bytes) -> str | None:
    """
    Say what is wrong with one answer to C{workload}, if anything.

    @param workload: what was asked.
    @param status: the response status code.
    @param body: the whole response body.
    @return: L{None} when the answer is the one the upstream gives, else a sentence.
    """
    if status != 200:
        return f"{workload.method} {workload.path} answered {status}, not 200"
    if len(body) != workload.responseBodyBytes:
        return (
            f"{workload.method} {workload.path} answered {len(body)} body bytes,"
            f" not {workload.responseBodyBytes}"
        )
    if workload.path == "/small" and body != SMALL_BODY:
        return f"GET /small answered {body!r}, not {SMALL_BODY!r}"
    return None


@frozen
class WrkSummary:
    """
    What one wrk run reports, in wrk's own units.

    @ivar requests: requests completed.
    @ivar durationMicroseconds: how long the run lasted.
    @ivar bytesRead: response bytes read, headers included.
    @ivar connectErrors: failed connection attempts.
    @ivar readErrors: failed reads.
    @ivar writeErrors: failed writes.
    @ivar statusErrors: responses whose status was not 2xx or 3xx.
    @ivar timeouts: requests that got no answer within wrk's timeout.
    @ivar p50Microseconds: the median latency.
    @ivar p99Microseconds: the 99th percentile latency.
    """

    requests: int
    durationMicroseconds: int
    bytesRead: int
    connectErrors: int
    readErrors: int
    writeErrors: int
    statusErrors: int
    timeouts: int
    p50Microseconds: float
    p99Microseconds: float

    @property
    def errors(self) -> int:
        """
        Every kind of error wrk counts, added up.
        """
        return (
            self.connectErrors
            + self.readErrors
            + self.writeErrors
            + self.statusErrors
            + self.timeouts
        )


def parseWrkOutput(text: str) -> WrkSummary:
    """
    Read the summary line C{bench/wrk.lua}'s C{done()} prints.

    @param text: wrk's whole standard output.
    @return: the summary.
    @raise ValueError: when there is no summary line.
    """
    for line in text.splitlines():
        if line.startswith(WRK_SUMMARY_MARKER):
            fields = json.loads(line[len(WRK_SUMMARY_MARKER) :])
            return WrkSummary(
                requests=int(fields["requests"]),
                durationMicroseconds=int(fields["duration_us"]),
                bytesRead=int(fields["bytes"]),
                connectErrors=int(fields["connect_errors"]),
                readErrors=int(fields["read_errors"]),
                writeErrors=int(fields["write_errors"]),
                statusErrors=int(fields["status_errors"]),
                timeouts=int(fields["timeouts"]),
                p50Microseconds=float(fields["p50_us"]),
                p99Microseconds=float(fields["p99_us"]),
            )
    raise ValueError(
        "wrk printed no summary line; it must run with -s bench/wrk.lua"
    )


def cpuTicksFromStat(statText: str) -> int:
    """
    Add up the user and system CPU time in the text of C{/proc/<pid>/stat}.

    The figure covers every thread of the process (Envoy runs several).

    @param statText: the file's content.
    @return: C{utime + stime}, in clock ticks (C{SC_CLK_TCK} per second).
    """
    # The command name (field 2) is in parentheses and may hold spaces; count from
    # the last ")". Field 3 (state) is then index 0, so utime (14) is 11, stime (15) 12.
    fields = statText[statText.rindex(")") + 1 :].split()
    return int(fields[11]) + int(fields[12])


def systemTicksFromStat(statText: str) -> int:
    """
    The system (kernel) CPU time in the text of C{/proc/<pid>/stat} (C{stime}), in
    clock ticks.
    """
    return int(statText[statText.rindex(")") + 1 :].split()[12])


def reapedChildTicksFromStat(statText: str) -> int:
    """
    The CPU time of a process's children that have exited and been waited for
    (C{cutime + cstime}, fields 16 and 17 of C{/proc/<pid>/stat}), in clock ticks.
    """
    fields = statText[statText.rindex(")") + 1 :].split()
    return int(fields[13]) + int(fields[14])


def parentPidFromStat(statText: str) -> int:
    """
    The parent process id (field 4) in the text of C{/proc/<pid>/stat}.
    """
    return int(statText[statText.rindex(")") + 1 :].split()[1])


@frozen
class Measurement:
    """
    What one peer did under one workload: one round, or the median of several.

    @ivar peer: the peer's name.
    @ivar workload: the workload's name.
    @ivar requests: requests completed (summed over rounds).
    @ivar errors: errors wrk counted (summed over rounds).
    @ivar requestsPerSecond: completed requests per second.
    @ivar p50Milliseconds: median latency.
    @ivar p99Milliseconds: 99th percentile latency.
    @ivar megabytesPerSecond: response bytes read per second, in units of 10**6 bytes.
    @ivar cpuMicrosecondsPerRequest: the proxy's CPU time (user + system) over the run,
        divided by the requests completed; L{None} when there is no proxy process.
    @ivar cpuPercent: the proxy's CPU time as a share of one core over the run; L{None}
        when there is no proxy process.
    @ivar rounds: how many rounds this figure summarises.
    @ivar loadCpuPercent: the load generator's CPU time (wrk and the upstream nginx) as
        a share of one core over the run; L{None} when not measured.
    """

    peer: str
    workload: str
    requests: int
    errors: int
    requestsPerSecond: float
    p50Milliseconds: float
    p99Milliseconds: float
    megabytesPerSecond: float
    cpuMicrosecondsPerRequest: float | None
    cpuPercent: float | None
    rounds: int = 1
    loadCpuPercent: float | None = None

    @property
    def errorFraction(self) -> float:
        """
        Errors as a share of the requests attempted.
        """
        attempted = self.requests + self.errors
        return self.errors / attempted if attempted else 1.0


def measurementFrom(
    peer: str,
    workload: str,
    summary: WrkSummary,
    cpuTicks: int | None,
    ticksPerSecond: int,
    cpuWindowSeconds: float,
    loadTicks: int | None = None,
) -> Measurement:
    """
    Turn one wrk run and the proxy's CPU ticks over it into a L{Measurement}.

    @param peer: the peer's name.
    @param workload: the workload's name.
    @param summary: what wrk reported.
    @param cpuTicks: the growth of the proxy's C{utime + stime} between just before wrk
        started and just after it ended; L{None} when there is no proxy.
    @param ticksPerSecond: C{os.sysconf("SC_CLK_TCK")}.
    @param cpuWindowSeconds: the wall-clock time between the two readings of C{cpuTicks}.
    @param loadTicks: the CPU time of wrk and the upstream over the same run, in ticks.
    @return: the measurement.
    """
    seconds = summary.durationMicroseconds / 1e6
    cpuPerRequest: float | None = None
    cpuPercent: float | None = None
    if cpuTicks is not None:
        cpuSeconds = cpuTicks / ticksPerSecond
        if summary.requests:
            cpuPerRequest = cpuSeconds * 1e6 / summary.requests
        if cpuWindowSeconds > 0:
            cpuPercent = 100.0 * cpuSeconds / cpuWindowSeconds
    return Measurement(
        peer=peer,
        workload=workload,
        requests=summary.requests,
        errors=summary.errors,
        requestsPerSecond=summary.requests / seconds if seconds else 0.0,
        p50Milliseconds=summary.p50Microseconds / 1000.0,
        p99Milliseconds=summary.p99Microseconds / 1000.0,
        megabytesPerSecond=summary.bytesRead / seconds / 1e6 if seconds else 0.0,
        cpuMicrosecondsPerRequest=cpuPerRequest,
        cpuPercent=cpuPercent,
        loadCpuPercent=(None if loadTicks is None or cpuWindowSeconds <= 0
                        else 100.0 * loadTicks / ticksPerSecond / cpuWindowSeconds),
    )


def _medianOrNone(values: Sequence[float | None]) -> float | None:
    """
    The median of C{values}, or L{None} if any of them is missing.
    """
    if not values or any(value is None for value in values):
        return None
    return statistics.median(value for value in values if value is not None)


def medianOf(rounds: Sequence[Measurement]) -> Measurement:
    """
    Summarise several rounds of the same peer and workload: the median of each rate,
    latency and cost, and the sum of the counts.

    @param rounds: at least one measurement, all of one peer and one workload.
    @return: the summary.
    """
    first = rounds[0]
    return Measurement(
        peer=first.peer,
        workload=first.workload,
        requests=sum(each.requests for each in rounds),
        errors=sum(each.errors for each in rounds),
        requestsPerSecond=statistics.median(each.requestsPerSecond for each in rounds),
        p50Milliseconds=statistics.median(each.p50Milliseconds for each in rounds),
        p99Milliseconds=statistics.median(each.p99Milliseconds for each in rounds),
        megabytesPerSecond=statistics.median(each.megabytesPerSecond for each in rounds),
        cpuMicrosecondsPerRequest=_medianOrNone(
            [each.cpuMicrosecondsPerRequest for each in rounds]
        ),
        cpuPercent=_medianOrNone([each.cpuPercent for each in rounds]),
        rounds=len(rounds),
        loadCpuPercent=_medianOrNone([each.loadCpuPercent for each in rounds]),
    )
