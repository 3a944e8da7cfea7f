#!/usr/bin/env python3
"""gRPC with grpcio and no protobuf (messages are bytes), for burrow's tunnel tests.

The service is tests/src/grpc.rs's `burrow.test.Echo`, the same methods and metadata:

  python grpc_echo.py serve PORT
      Serves on 127.0.0.1:PORT (0: a port of the kernel's choice); prints `ready {port}` once
      serving, `seen {path} {metadata as JSON}` per call, and `ended {cancelled|deadline}` when
      a Wait call ends.

  python grpc_echo.py call TARGET AUTHORITY [--token T] [--ca FILE]
      Dials TARGET (127.0.0.1:{edge port}) with AUTHORITY ({port}-{key}.tunnel.localhost:{edge
      port}) as `:authority`, over TLS trusting FILE with --ca, sending `authorization: Bearer
      T` with --token; runs the checks below and prints one JSON object, a field per check.
      A call that fails is recorded as {"code": "NOT_FOUND", "details": "..."}, not raised.

      unary          "ok" when 8 MiB came back intact ("mismatch" if not)
      echo_header    the response header `x-echo-hello` (sent `x-echo-hello: world`)
      trailer        the trailer `x-trailer-echo` of a successful call (sent `x-trailer: t1`);
                     grpcio's server sets it, tonic's cannot (null)
      fail           code, details and trailer `x-trailer-echo` of `x-fail-with: 5`
      server_stream  {"count", "bytes", "ok"} for 5 messages of 100 KiB
      client_stream  {"total", "sha256_ok"} for messages of 1 B, 1000 B, 100 KiB and 1 MiB
      bidi           the three echoes of a ping-pong ("one", "two", "three": each sent once
                     the previous came back)
      deadline       code and details of Wait with a 0.3 s deadline, and "after" (seconds)
      no_token       with --token only: a unary call without it ("ok" or code and details)
"""

import argparse
import hashlib
import json
import os
import queue
import struct
import sys
import threading
import time
from concurrent import futures

import grpc

SERVICE = "burrow.test.Echo"
MAX_MESSAGE = 16 * 1024 * 1024
SIZES = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]
# Bounds every call of the client but Wait's: a stuck call fails the check, not the test run.
CALL_TIMEOUT = 30.0


def say(*words):
    print(*words, flush=True)


def printable(value):
    return value.hex() if isinstance(value, bytes) else value


def saw(path, context, extra=None):
    metadata = {key: printable(value) for key, value in context.invocation_metadata()}
    metadata.update(extra or {})
    say("seen", path, json.dumps(metadata, sort_keys=True))


def status_code(number):
    return next(code for code in grpc.StatusCode if code.value[0] == number)


def unary(request, context):
    saw(f"/{SERVICE}/Unary", context)
    metadata = dict(context.invocation_metadata())
    echo = [(k, v) for k, v in context.invocation_metadata() if k.startswith("x-echo-")]
    if echo:
        context.send_initial_metadata(echo)
    if "x-trailer" in metadata:
        context.set_trailing_metadata([("x-trailer-echo", metadata["x-trailer"])])
    if "x-fail-with" in metadata:
        context.abort(status_code(int(metadata["x-fail-with"])), "asked to fail")
    return request


def server_stream(request, context):
    saw(f"/{SERVICE}/ServerStream", context)
    if len(request) != 12:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "want a count (u64) and a size (u32)")
    count, size = struct.unpack(">QI", request)
    for i in range(count):
        yield bytes([i % 251]) * size


def client_stream(request_iterator, context):
    saw(f"/{SERVICE}/ClientStream", context)
    total, sha = 0, hashlib.sha256()
    for message in request_iterator:
        total += len(message)
        sha.update(message)
    return struct.pack(">Q", total) + sha.digest()


def bidi(request_iterator, context):
    saw(f"/{SERVICE}/Bidi", context)
    for message in request_iterator:
        yield message


def wait(request, context):
    saw(f"/{SERVICE}/Wait", context, {"time_remaining": context.time_remaining()})
    done = threading.Event()
    # Called when the call ends: the client cancelled it, or its deadline passed.
    if not context.add_callback(done.set):
        done.set()
    done.wait(timeout=600)
    remaining = context.time_remaining()
    say("ended", "deadline" if remaining is not None and remaining <= 0 else "cancelled")
    return b""


def serve(port):
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Wait": grpc.unary_unary_rpc_method_handler(wait),
    }
    # No SO_REUSEPORT (grpcio's default): port 0 must be a port no other socket shares.
    options = SIZES + [("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    say("ready", bound)
    server.wait_for_termination()


def failure(error):
    return {"code": error.code().name, "details": error.details()}


def check(results, name, run):
    try:
        results[name] = run()
    except grpc.RpcError as error:
        results[name] = failure(error)


class Client:
    def __init__(self, channel, token):
        self.auth = [("authorization", f"Bearer {token}")] if token else []
        self.unary = channel.unary_unary(f"/{SERVICE}/Unary")
        self.server_stream = channel.unary_stream(f"/{SERVICE}/ServerStream")
        self.client_stream = channel.stream_unary(f"/{SERVICE}/ClientStream")
        self.bidi = channel.stream_stream(f"/{SERVICE}/Bidi")
        self.wait = channel.unary_unary(f"/{SERVICE}/Wait")

    def big(self):
        message = os.urandom(8 * 1024 * 1024)
        answer = self.unary(message, metadata=self.auth, timeout=CALL_TIMEOUT)
        return "ok" if answer == message else "mismatch"

    def echo_header(self):
        metadata = self.auth + [("x-echo-hello", "world")]
        _, call = self.unary.with_call(b"hi", metadata=metadata, timeout=CALL_TIMEOUT)
        return dict(call.initial_metadata()).get("x-echo-hello")

    def trailer(self):
        metadata = self.auth + [("x-trailer", "t1")]
        _, call = self.unary.with_call(b"hi", metadata=metadata, timeout=CALL_TIMEOUT)
        return dict(call.trailing_metadata() or ()).get("x-trailer-echo")

    def fail(self):
        metadata = self.auth + [("x-fail-with", "5"), ("x-trailer", "why")]
        try:
            self.unary(b"x", metadata=metadata, timeout=CALL_TIMEOUT)
        except grpc.RpcError as error:
            trailers = dict(error.trailing_metadata() or ())
            return {**failure(error), "trailer": trailers.get("x-trailer-echo")}
        return "ok"

    def server_streamed(self):
        count, size = 5, 100 * 1024
        request = struct.pack(">QI", count, size)
        replies = self.server_stream(request, metadata=self.auth, timeout=CALL_TIMEOUT)
        got = list(replies)
        ok = all(m == bytes([i % 251]) * size for i, m in enumerate(got)) and len(got) == count
        return {"count": len(got), "bytes": sum(map(len, got)), "ok": ok}

    def client_streamed(self):
        messages = [os.urandom(n) for n in (1, 1000, 100 * 1024, 1024 * 1024)]
        answer = self.client_stream(iter(messages), metadata=self.auth, timeout=CALL_TIMEOUT)
        total = struct.unpack(">Q", answer[:8])[0]
        sha = hashlib.sha256(b"".join(messages)).digest()
        return {"total": total, "sha256_ok": answer[8:] == sha}

    def ping_pong(self):
        words = ["one", "two", "three"]
        echoed = queue.Queue()

        def outgoing():
            for word in words:
                yield word.encode()
                # The next goes once this one came back: each is echoed as it arrives.
                echoed.get(timeout=CALL_TIMEOUT)

        got = []
        for reply in self.bidi(outgoing(), metadata=self.auth, timeout=CALL_TIMEOUT):
            got.append(reply.decode())
            echoed.put(None)
        return got

    def deadline(self):
        start = time.monotonic()
        try:
            self.wait(b"", metadata=self.auth, timeout=0.3)
            return "ok"
        except grpc.RpcError as error:
            return {**failure(error), "after": round(time.monotonic() - start, 3)}

    def no_token(self):
        self.unary(b"hi", timeout=CALL_TIMEOUT)
        return "ok"


def call(target, authority, token, ca):
    options = SIZES + [("grpc.default_authority", authority)]
    if ca:
        with open(ca, "rb") as pem:
            credentials = grpc.ssl_channel_credentials(root_certificates=pem.read())
        host = authority.rsplit(":", 1)[0]
        options.append(("grpc.ssl_target_name_override", host))
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    client = Client(channel, token)
    results = {}
    check(results, "unary", client.big)
    check(results, "echo_header", client.echo_header)
    check(results, "trailer", client.trailer)
    check(results, "fail", client.fail)
    check(results, "server_stream", client.server_streamed)
    check(results, "client_stream", client.client_streamed)
    check(results, "bidi", client.ping_pong)
    check(results, "deadline", client.deadline)
    if token:
        check(results, "no_token", client.no_token)
    channel.close()
    print(json.dumps(results, sort_keys=True), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    serving = modes.add_parser("serve", help="serve burrow.test.Echo on 127.0.0.1:PORT")
    serving.add_argument("port", type=int)
    calling = modes.add_parser("call", help="run the checks, print JSON")
    calling.add_argument("target", help="host:port to dial")
    calling.add_argument("authority", help="the :authority to send")
    calling.add_argument("--token", help="send authorization: Bearer TOKEN")
    calling.add_argument("--ca", help="TLS, trusting this PEM CA")
    args = parser.parse_args()
    if args.mode == "serve":
        serve(args.port)
    else:
        call(args.target, args.authority, args.token, args.ca)


if __name__ == "__main__":
    sys.exit(main())
