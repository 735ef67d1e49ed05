"""A gRPC client for the ingress tests: calls the methods of server.py through the ingress
and prints what it got, one line per observation, for the test to compare.

usage: client.py TARGET AUTHORITY CASE [CA_PEM]
  TARGET     host:port to connect to (the ingress listener)
  AUTHORITY  the :authority to send (the route's host); with CA_PEM also the TLS name
  CASE       unary | stream | fail | stream-fail
  CA_PEM     if given, TLS (h2 over TLS) trusting this CA; else h2c with prior knowledge
A call that fails unexpectedly prints `error CODE DETAILS` instead.
"""

import os
import sys

import grpc

DEADLINE = 60


def call(fn):
    try:
        fn()
    except grpc.RpcError as error:
        print(f"error {error.code().name} {error.details()!r}", flush=True)


def main():
    target, authority, case = sys.argv[1:4]
    options = [("grpc.default_authority", authority), ("grpc.enable_http_proxy", 0)]
    if len(sys.argv) > 4:
        with open(sys.argv[4], "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        options.append(("grpc.ssl_target_name_override", authority))
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    echo = channel.unary_unary("/miren.test.Echo/Echo")
    count = channel.unary_stream("/miren.test.Echo/Count")
    fail = channel.unary_unary("/miren.test.Echo/Fail")

    if case == "unary":
        # A small message, then 1 MiB (many HTTP/2 frames, past the initial windows).
        for payload in [b"hello", os.urandom(1 << 20)]:
            def one(payload=payload):
                answer = echo(payload, timeout=DEADLINE)
                same = "same" if answer == payload else "DIFFERENT"
                print(f"echo {len(payload)} -> {len(answer)} {same}", flush=True)
            call(one)
    elif case in ("stream", "stream-fail"):
        request = b"5" if case == "stream" else b"3,fail"

        def stream():
            for message in count(request, timeout=DEADLINE):
                print(message.decode(), flush=True)
            print("end OK", flush=True)
        call(stream)
    elif case == "fail":
        try:
            answer = fail(b"anything", timeout=DEADLINE)
            print(f"unexpected answer {answer!r}", flush=True)
        except grpc.RpcError as error:
            trailers = dict(error.trailing_metadata() or ())
            print(f"status {error.code().name} {error.details()!r}", flush=True)
            print(f"x-why {trailers.get('x-why')!r}", flush=True)
    else:
        sys.exit(f"unknown case {case}")
    print("done", flush=True)


if __name__ == "__main__":
    main()
