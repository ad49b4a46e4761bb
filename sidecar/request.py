# -*- test-case-name: tests.test_request -*-
"""
C{sidecar-request}: one HTTP request to the proxy's own admin or health port, as
Istio's C{pilot-agent request} does for Envoy's admin.

The admin server listens on loopback only, and the proxy's image has no C{curl}, so
this is how an operator reaches it inside the pod and how the image's
C{HEALTHCHECK} asks the health port::

    kubectl exec POD -c sidecar-proxy -- sidecar-request GET /stats
    kubectl exec POD -c sidecar-proxy -- sidecar-request POST /quitquitquit
    sidecar-request --port 15021 GET /healthz/ready      # the image's HEALTHCHECK

It prints the response body and exits 0 for a 2xx answer, 1 for any other answer or
none within C{--timeout} seconds (with one sentence on standard error), 2 for bad
arguments.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn, Sequence, TextIO

import treq
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTCP, IReactorTime

from sidecar.cli import OneSentenceParser

METHODS = ("GET", "HEAD", "POST")


def _port(text: str) -> int:
    """
    @param text: a port flag's value.
    @return: the port.
    @raise argparse.ArgumentTypeError: if it is not a port from 1 to 65535.
    """
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, not {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    """
    @param text: a duration flag's value.
    @return: the seconds.
    @raise argparse.ArgumentTypeError: if it is not a positive number.
    """
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 3600:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text!r}")
    return value


def parser(errors: TextIO | None = None) -> argparse.ArgumentParser:
    """
    @param errors: where usage errors go; L{None} for C{sys.stderr}.
    @return: the command line's parser.
    """
    p = OneSentenceParser(
        prog="sidecar-request",
        description="Send one request to the proxy's admin (or health) port and print the answer.",
    )
    p.add_argument("method", type=str.upper, choices=METHODS, help="the HTTP method")
    p.add_argument("path", help="the path, e.g. /stats, /ready, /quitquitquit")
    p.add_argument("--host", default="127.0.0.1", help="the address to ask (default: %(default)s)")
    p.add_argument("--port", type=_port, default=15000,
                   help="the admin port, or 15021 for the health port (default: %(default)s)")
    p.add_argument("--timeout", type=_seconds, default=5.0,
                   help="seconds to wait for the whole answer (default: %(default)s)")
    p.errors = errors
    return p


def requestURL(host: str, port: int, path: str) -> str:
    """
    @param host: an address or name; IPv6 addresses are bracketed.
    @param port: the port.
    @param path: the path, with or without its leading C{/}.
    @return: the URL to ask.
    """
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}/{path.lstrip('/')}"


def request(
    reactor: IReactorTCP | IReactorTime | Any,
    argv: Sequence[str],
    stdout: TextIO,
    stderr: TextIO,
) -> Deferred[int]:
    """
    Send the request the arguments describe and print its answer.

    @param reactor: the reactor to connect with and time out on.
    @param argv: the arguments, without the program name.
    @param stdout: where the body goes.
    @param stderr: where a failure's sentence goes.
    @return: a L{Deferred} that fires with the exit status.
    @raise SystemExit: with status 2 for bad arguments (before any request).
    """
    options = parser(stderr).parse_args(argv)
    url = requestURL(options.host, options.port, options.path)
    return _ask(reactor, options.method, url, options.timeout, stdout, stderr)


@inlineCallbacks
def _ask(reactor: Any, method: str, url: str, timeout: float, stdout: TextIO, stderr: TextIO) -> Any:
    """
    The request itself; see L{request}.
    """
    try:
        response = yield treq.request(method, url, timeout=timeout, reactor=reactor, persistent=False)
        body = yield treq.content(response)
    except Exception as e:
        stderr.write(f"sidecar-request: no answer from {url}: {_describe(e)}.\n")
        return 1
    stdout.write(body.decode("utf-8", "replace"))
    stdout.flush()
    if 200 <= response.code < 300:
        return 0
    stderr.write(f"sidecar-request: {url} answered {response.code}.\n")
    return 1


def _describe(error: BaseException) -> str:
    """
    @param error: why a request got no answer.
    @return: a few words for the user.
    """
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(str(r.value) or type(r.value).__name__ for r in reasons)
    return str(error).rstrip(".") or type(error).__name__


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """
    Run C{sidecar-request} on the global reactor and exit with its status.

    @param argv: the arguments, without the program name; L{None} for C{sys.argv}.
    """
    from twisted.internet.task import react

    arguments = list(sys.argv[1:] if argv is None else argv)

    def run(reactor: Any) -> Deferred[None]:
        def exit(status: int) -> None:
            # react() exits 0 on success; a SystemExit carries any other status.
            if status:
                raise SystemExit(status)

        return request(reactor, arguments, sys.stdout, sys.stderr).addCallback(exit)

    react(run)


if __name__ == "__main__":
    main()
