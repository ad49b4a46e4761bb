# -*- test-case-name: tests.test_demo -*-
"""
A small built-in upstream for the demo, answering like httpbin on the paths the article
uses: C{/get}, C{/post}, C{/status/N}, plus C{/headers}.

  python -m sidecar.demo --port 8080
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict
from urllib.parse import parse_qsl

from twisted.web import resource, server


def _headers(request: server.Request) -> Dict[str, str]:
    return {k.decode("latin-1").title(): b", ".join(v).decode("latin-1")
            for k, v in request.requestHeaders.getAllRawHeaders()}


class DemoService(resource.Resource):
    """
    httpbin's C{/get}, C{/post}, C{/status/N} and C{/headers}, in a few lines.
    """

    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        path = request.path.decode("latin-1")
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        url = f"http://{host}{request.uri.decode('latin-1')}"
        origin = getattr(request.getClientAddress(), "host", "")
        request.setHeader(b"server", b"demo-service")
        if path.startswith("/status/") and path[8:].isdigit():
            request.setResponseCode(int(path[8:]))
            return b""
        if path == "/get" and request.method in (b"GET", b"HEAD"):
            args = dict(parse_qsl(request.uri.partition(b"?")[2].decode("latin-1")))
            return self._json(request, {"args": args, "headers": _headers(request), "origin": origin, "url": url})
        if path == "/post" and request.method == b"POST":
            body = request.content.read()
            form: Dict[str, Any] = {}
            if request.getHeader(b"content-type") == b"application/x-www-form-urlencoded":
                form = dict(parse_qsl(body.decode("latin-1")))
            return self._json(request, {"args": {}, "data": "" if form else body.decode("latin-1"),
                                        "form": form, "headers": _headers(request), "origin": origin,
                                        "url": url})
        if path == "/headers":
            return self._json(request, {"headers": _headers(request)})
        request.setResponseCode(404)
        return b"not found\n"

    def _json(self, request: server.Request, value: Dict[str, Any]) -> bytes:
        out = (json.dumps(value, indent=2) + "\n").encode()
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % len(out))
        return out


def main(argv: Any = None) -> None:
    """
    Serve L{DemoService} on 127.0.0.1.
    """
    parser = argparse.ArgumentParser(description="A tiny httpbin-like service for the sidecar demo.")
    parser.add_argument("--port", type=int, default=8080)
    options = parser.parse_args(argv)
    from twisted.internet import reactor

    site = server.Site(DemoService())
    site.noisy = False
    port = reactor.listenTCP(options.port, site, interface="127.0.0.1")
    print(f"demo service on 127.0.0.1:{port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
