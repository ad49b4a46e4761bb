"""
A real WebSocket peer for the tests, built on the C{websockets} library.

  - C{python ws_peer.py server}: an echo server on 127.0.0.1, port 0; prints its port.
  - C{python ws_peer.py client PORT}: connects to ws://127.0.0.1:PORT/ws, sends text and
    binary messages (one of 1 MiB), checks every echo, prints C{ok N} and exits 0.
"""

import os
import sys

from websockets.sync.client import connect
from websockets.sync.server import serve


def server() -> None:
    def echo(ws):
        for message in ws:
            ws.send(message)

    with serve(echo, "127.0.0.1", 0, max_size=None) as srv:
        print(srv.socket.getsockname()[1], flush=True)
        srv.serve_forever()


def client(port: int) -> None:
    messages = ["hello", b"\x00\x01binary", "x" * 70000, os.urandom(1 << 20)]
    with connect(f"ws://127.0.0.1:{port}/ws", max_size=None, open_timeout=10, close_timeout=5) as ws:
        for message in messages:
            ws.send(message)
            back = ws.recv(timeout=10)
            if back != message:
                print("mismatch", type(message), len(message), flush=True)
                sys.exit(1)
    print(f"ok {len(messages)}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server()
    else:
        client(int(sys.argv[2]))
