# -*- test-case-name: bench.test_bench -*-
"""
The benchmark's stock peer: twisted.web's own C{ReverseProxyResource} in a plain
C{Site}, served without twistd.

    python bench/stock_proxy.py --port 8081 --upstream-port 8080

This is what "proxying with Twisted" costs out of the box: the base class opens a new
upstream connection per request (HTTP/1.0, C{connection: close}) and the C{Site} formats
an access-log line per request into Twisted's global log. C{--no-access-log} turns that
line off, to separate its cost from the proxying.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def parseArguments(argv: Sequence[str]) -> argparse.Namespace:
    """
    Read the command line.

    @param argv: the arguments, without the program name.
    @return: the options.
    """
    parser = argparse.ArgumentParser(
        description="twisted.web.proxy.ReverseProxyResource on 127.0.0.1, no twistd."
    )
    parser.add_argument("--port", type=int, required=True, help="port to serve on")
    parser.add_argument("--upstream-host", default="127.0.0.1", help="the service's host")
    parser.add_argument("--upstream-port", type=int, required=True, help="the service's port")
    parser.add_argument(
        "--no-access-log",
        action="store_true",
        help="do not format an access-log line per request",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """
    Serve until SIGTERM or SIGINT.

    @param argv: the arguments, without the program name; C{sys.argv[1:]} when L{None}.
    @return: the exit status.
    """
    options = parseArguments(sys.argv[1:] if argv is None else argv)

    from twisted.internet import reactor
    from twisted.web.proxy import ReverseProxyResource
    from twisted.web.server import Site

    site = Site(ReverseProxyResource(options.upstream_host, options.upstream_port, b""))
    if options.no_access_log:
        site.log = lambda request: None
    reactor.listenTCP(options.port, site, interface="127.0.0.1")
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
