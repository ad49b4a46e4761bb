"""
A real gRPC peer for the tests, on C{grpcio} with generic handlers (no protoc): the
helloworld C{Greeter} with raw-bytes messages.

  - C{python grpc_greeter.py server HOST:PORT}: serves C{/helloworld.Greeter/SayHello}
    (unary: C{b"Hello, " + name}) and C{/helloworld.Greeter/SayHelloStream} (server
    streaming: C{COUNT} replies C{b"Hello i, " + name}, the request being C{COUNT:NAME});
    prints C{ready} once listening.
  - C{python grpc_greeter.py client HOST:PORT}: calls both over plaintext HTTP/2, checks
    every reply, prints C{ok unary stream=N} and exits 0.
"""

import sys
import time
from concurrent import futures

import grpc

SERVICE = "helloworld.Greeter"


def _sayHello(request: bytes, context) -> bytes:
    return b"Hello, " + request


def _sayHelloStream(request: bytes, context):
    count, _, name = request.partition(b":")
    for i in range(int(count)):
        yield b"Hello %d, " % i + name


def server(address: str) -> None:
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "SayHello": grpc.unary_unary_rpc_method_handler(_sayHello),
        "SayHelloStream": grpc.unary_stream_rpc_method_handler(_sayHelloStream),
    })
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=(handler,))
    srv.add_insecure_port(address)
    srv.start()
    print("ready", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        srv.stop(0)


def client(address: str) -> None:
    count = 50
    with grpc.insecure_channel(address) as channel:
        unary = channel.unary_unary(f"/{SERVICE}/SayHello")
        reply = unary(b"sidecar", timeout=10)
        assert reply == b"Hello, sidecar", reply
        stream = channel.unary_stream(f"/{SERVICE}/SayHelloStream")
        replies = list(stream(b"%d:mesh" % count, timeout=10))
        assert replies == [b"Hello %d, mesh" % i for i in range(count)], replies
    print(f"ok unary stream={len(replies)}", flush=True)


if __name__ == "__main__":
    {"server": server, "client": client}[sys.argv[1]](sys.argv[2])
