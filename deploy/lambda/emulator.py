"""A local stand-in for AWS's Runtime Interface Emulator, to run a Lambda container image anywhere.

A Lambda container image runs a *runtime interface client* (``python -m awslambdaric
handler.lambda_handler``) that asks the **Runtime API** for the next event and posts back the
handler's answer. In AWS the Runtime API is Lambda itself. Locally, AWS's Runtime Interface
Emulator (``aws-lambda-rie``, a Go binary from GitHub) plays that part and adds the invoke URL
``POST /2015-03-31/functions/function/invocations``. This file does the same with the standard
library only, so the image can be checked on a machine that cannot download the emulator:

    python emulator.py [--host 127.0.0.1] [--port 8080] -- python -m awslambdaric handler.lambda_handler

When ``AWS_LAMBDA_RUNTIME_API`` is set (the image is running in AWS Lambda), it just replaces
itself with the command, as AWS's documented entry script does. One invocation at a time, like
the real emulator; an invocation the handler does not answer within ``--timeout`` seconds gets 504.
The Runtime API listens on loopback only; the published port serves the invoke URL alone. A
handler's error (or a runtime that failed to start) is answered 200 with ``X-Amz-Function-Error:
Unhandled``, as Lambda's Invoke API does. Unlike AWS's emulator it does not restart a runtime that
exited: the container stops with it.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RUNTIME = "/2018-06-01/runtime"
INVOKE = "/2015-03-31/functions/function/invocations"


class Emulator:
    """The two faces: the Runtime API the client polls, the invoke URL callers post events to."""

    def __init__(self, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.events: queue.Queue[tuple[str, bytes, int]] = queue.Queue()
        self.answers: dict[str, queue.Queue[tuple[int, bytes, bool]]] = {}
        self.lock = threading.Lock()
        self.invoke_lock = threading.Lock()            # one invocation at a time, as in Lambda
        self.init_error: bytes | None = None

    def invoke(self, event: bytes) -> tuple[int, bytes, bool]:
        """(status, body, function error?) for one event, as Lambda's Invoke API answers it."""
        with self.invoke_lock:
            if self.init_error is not None:
                return 200, self.init_error, True
            request_id = str(uuid.uuid4())
            answer: queue.Queue[tuple[int, bytes, bool]] = queue.Queue(maxsize=1)
            with self.lock:
                self.answers[request_id] = answer
            deadline_ms = int((time.time() + self.timeout) * 1000)   # from when the invoke arrived
            self.events.put((request_id, event, deadline_ms))
            try:
                return answer.get(timeout=self.timeout)
            except queue.Empty:
                return 504, json.dumps({"errorType": "Timeout",
                                        "errorMessage": f"no answer within {self.timeout:g} s"}).encode(), True
            finally:
                with self.lock:                        # a late answer for this id is refused, its event skipped
                    self.answers.pop(request_id, None)

    def next_event(self) -> tuple[str, bytes, int]:
        """The next event someone still waits for (a timed-out one is dropped)."""
        while True:
            request_id, event, deadline_ms = self.events.get()
            with self.lock:
                if request_id in self.answers:
                    return request_id, event, deadline_ms

    def answer(self, request_id: str, body: bytes, error: bool) -> bool:
        with self.lock:
            waiting = self.answers.pop(request_id, None)   # one answer per request id
        if waiting is None:
            return False
        waiting.put((200, body, error))                # Lambda answers 200 with the error object too
        return True

    def fail_all(self, body: bytes) -> None:
        """The runtime could not start or went away: every waiting invocation hears why."""
        with self.lock:
            waiting, self.answers = list(self.answers.values()), {}
        for answer in waiting:
            answer.put((200, body, True))

    def _base(self) -> type[BaseHTTPRequestHandler]:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True      # small replies: no 40 ms delayed-ACK stalls

            def log_message(self, *args: object) -> None:   # quiet: the function's own logs matter
                pass

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def _not_found(self) -> None:
                self._send(404, b'{"errorMessage": "not found"}')

        return Handler

    def invoke_handler(self) -> type[BaseHTTPRequestHandler]:
        """The public face (the container's published port): the invoke URL only."""
        emulator = self

        class Invoke(self._base()):  # type: ignore[misc]
            def do_GET(self) -> None:
                self._not_found()

            def do_POST(self) -> None:
                body = self._body()
                if self.path != INVOKE:
                    return self._not_found()
                status, answer, failed = emulator.invoke(body)
                self._send(status, answer, {"X-Amz-Function-Error": "Unhandled"} if failed else None)

        return Invoke

    def runtime_handler(self) -> type[BaseHTTPRequestHandler]:
        """The Runtime API, on loopback inside the container: what awslambdaric talks to."""
        emulator = self

        class Runtime(self._base()):  # type: ignore[misc]
            def do_GET(self) -> None:
                if self.path != f"{RUNTIME}/invocation/next":
                    return self._not_found()
                request_id, event, deadline_ms = emulator.next_event()
                self._send(200, event, {
                    "Lambda-Runtime-Aws-Request-Id": request_id,
                    "Lambda-Runtime-Deadline-Ms": str(deadline_ms),
                    "Lambda-Runtime-Invoked-Function-Arn": "arn:aws:lambda:local:000000000000:function:digits",
                    "Lambda-Runtime-Trace-Id": f"Root=1-{int(time.time()):08x}-{uuid.uuid4().hex[:24]};Sampled=0",
                })

            def do_POST(self) -> None:
                body = self._body()
                if self.path == f"{RUNTIME}/init/error":
                    emulator.init_error = body
                    emulator.fail_all(body)
                    return self._send(202, b'{"status": "OK"}')
                parts = self.path.split("/")        # /2018-06-01/runtime/invocation/<id>/response|error
                if len(parts) == 6 and parts[3] == "invocation" and parts[5] in ("response", "error"):
                    if not emulator.answer(parts[4], body, error=parts[5] == "error"):
                        return self._send(400, b'{"errorMessage": "unknown or already answered request id"}')
                    return self._send(202, b'{"status": "OK"}')
                return self._not_found()

        return Runtime


def serve(command: list[str], host: str, port: int, timeout: float) -> int:
    emulator = Emulator(timeout)
    runtime_api = ThreadingHTTPServer(("127.0.0.1", 0), emulator.runtime_handler())
    invoke_api = ThreadingHTTPServer((host, port), emulator.invoke_handler())
    for server in (runtime_api, invoke_api):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "AWS_LAMBDA_RUNTIME_API": f"127.0.0.1:{runtime_api.server_address[1]}",
           "AWS_LAMBDA_FUNCTION_NAME": "digits", "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
           "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "1024"}
    print(f"emulator: invoke at http://{host}:{port}{INVOKE}", file=sys.stderr, flush=True)
    # As PID 1 of a container, SIGTERM (docker stop, Lambda's shutdown) is ignored unless handled.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    client = subprocess.Popen(command, env=env)
    try:
        code = client.wait()
        emulator.fail_all(json.dumps({"errorType": "Runtime.ExitError",
                                      "errorMessage": f"the runtime exited with status {code}"}).encode())
        return code
    except KeyboardInterrupt:
        return 0
    finally:
        client.terminate()
        try:
            client.wait(timeout=5)
        except subprocess.TimeoutExpired:
            client.kill()
        for server in (runtime_api, invoke_api):
            server.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the runtime interface client to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --, e.g. -- python -m awslambdaric handler.lambda_handler")
    if os.environ.get("AWS_LAMBDA_RUNTIME_API"):   # inside AWS Lambda: no emulator
        os.execvp(command[0], command)
    return serve(command, args.host, args.port, args.timeout)


if __name__ == "__main__":
    raise SystemExit(main())
