"""
A real WebSocket peer for the tests, built on the C{websockets} library.

  - C{python ws_peer.py server}: an echo server on 127.0.0.1, port 0; prints its port.
  - C{python ws_peer.py client PORT}: connects to ws://127.0.0.1:PORT/ws, sends text and
    binary messages (one of 1 MiB), checks every echo, prints C{ok N} and exits 0.
  - C{python ws_peer.py client-close PORT}: one echo, then the client closes; prints
    C{closed SECONDS}, the time the close took (the library waits up to its 5 s close
    timeout for the TCP connection to end).
  - C{python ws_peer.py server-close PORT}: asks for C{/close}, where the server closes
    after one echo; prints C{closed SECONDS}, from the message sent to the connection's
    end.

On the server, a path of C{/close} makes it close the connection after one echo.
"""

import os
import sys
import time

from websockets.sync.client import connect
from websockets.sync.server import serve


def server() -> None:
    def echo(ws):
        for message in ws:
            ws.send(message)
            if ws.request.path == "/close":
                ws.close()
                return

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


def closing(port: int, serverCloses: bool) -> None:
    path = "/close" if serverCloses else "/ws"
    with connect(f"ws://127.0.0.1:{port}{path}", open_timeout=10, close_timeout=5) as ws:
        start = time.monotonic()
        ws.send("hello")
        if ws.recv(timeout=10) != "hello":
            print("mismatch", flush=True)
            sys.exit(1)
        if serverCloses:
            try:
                ws.recv(timeout=10)
            except Exception:
                pass
        else:
            start = time.monotonic()
        # The library's closing handshake is over once the TCP connection has ended.
        ws.close()
    print(f"closed {time.monotonic() - start:.3f}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server()
    elif sys.argv[1] == "client-close":
        closing(int(sys.argv[2]), serverCloses=False)
    elif sys.argv[1] == "server-close":
        closing(int(sys.argv[2]), serverCloses=True)
    else:
        client(int(sys.argv[2]))
