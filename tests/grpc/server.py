"""A gRPC server for the ingress tests: h2c (plain HTTP/2, prior knowledge) on 127.0.0.1,
on a free port that it prints as its first line of stdout.

No .proto: the methods take and return raw bytes (no (de)serializers). Service
`miren.test.Echo`:
  Echo  (unary)         answers with the request's bytes.
  Count (server stream) request "N" or "N,fail": answers "message 0".."message N-1", then
                        ends OK, or with "fail" ABORTED "stopped after N".
  Fail  (unary)         ends with NOT_FOUND "no such thing" and trailing metadata
                        x-why: it-was-never-there (a trailers-only response).
Every call is logged to stderr with the request metadata it came with.
"""

import sys
from concurrent import futures

import grpc


def log(context, method, request):
    metadata = ", ".join(f"{k}={v!r}" for k, v in context.invocation_metadata())
    print(f"call {method} ({len(request)} bytes) metadata: {metadata}",
          file=sys.stderr, flush=True)


def echo(request, context):
    log(context, "Echo", request)
    return request


def count(request, context):
    log(context, "Count", request)
    text = request.decode()
    n, _, then = text.partition(",")
    for i in range(int(n)):
        yield f"message {i}".encode()
    if then == "fail":
        context.abort(grpc.StatusCode.ABORTED, f"stopped after {n}")


def fail(request, context):
    log(context, "Fail", request)
    context.set_trailing_metadata((("x-why", "it-was-never-there"),))
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Count": grpc.unary_stream_rpc_method_handler(count),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("miren.test.Echo", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
