"""A misbehaving OpenAI-compatible server on 127.0.0.1 for the reliability tests.

Each request's behaviour is chosen by ``Misbehaving.mode(prompt)``: a default mode, or a
per-prompt mode when the prompt text contains a key of ``by_prompt``. Modes:

``ok`` (valid answer), ``garbage`` (200, HTML body), ``invalid_json`` (200, truncated
JSON), ``401``, ``403``, ``404``, ``429_long`` (429 with ``Retry-After: 3600``), ``500``,
``hang`` (never answers until the server stops), ``trickle`` (a valid reply one byte every
50 ms), ``reset`` (TCP reset), ``empty_choices`` (``{"choices": []}``), ``out_of_range``
(the answer ``150`` to a question in [0, 100]), ``echo_auth`` (401 whose body echoes the
Authorization header, as a careless proxy might).
"""

from __future__ import annotations

import json
import math
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

__all__ = ["Misbehaving", "serve", "refused_url"]


class Misbehaving:
    """Scripted behaviour plus a log of what was received (paths, bodies, headers)."""

    def __init__(self, default: str = "ok") -> None:
        self.default = default
        self.by_prompt: dict[str, str] = {}
        self.answer = " 42"
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def mode(self, prompt: str) -> str:
        for key, m in self.by_prompt.items():
            if key in prompt:
                return m
        return self.default

    def count(self) -> int:
        with self.lock:
            return len(self.requests)


def _handler(srv: Misbehaving) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _raw(self, code: int, body: bytes, extra: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()

        def _ok_body(self, body: dict, answer: str | None = None) -> bytes:
            chat = self.path.endswith("/chat/completions")
            if body.get("logprobs"):
                top = {" yes": math.log(0.6), " no": math.log(0.4)}
                if chat:
                    lp = {"content": [{"token": "yes", "logprob": top[" yes"],
                                       "top_logprobs": [{"token": k, "logprob": v} for k, v in top.items()]}]}
                    choice = {"message": {"role": "assistant", "content": "yes"}, "logprobs": lp}
                else:
                    choice = {"text": " yes", "logprobs": {"top_logprobs": [top]}}
            else:
                text = srv.answer if answer is None else answer
                choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            return json.dumps({"choices": [choice], "usage": {"total_tokens": 7}}).encode()

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][0]["content"] if "messages" in body else body.get("prompt", "")
            with srv.lock:
                srv.requests.append({"path": self.path, "body": body, "headers": dict(self.headers)})
            mode = srv.mode(prompt)
            if mode == "ok":
                return self._raw(200, self._ok_body(body))
            if mode == "garbage":
                return self._raw(200, b"<html><body>502 Bad Gateway</body></html>")
            if mode == "invalid_json":
                return self._raw(200, b'{"choices": [{"text": " 4')
            if mode in ("401", "403", "404", "500"):
                return self._raw(int(mode), json.dumps({"error": {"message": f"status {mode}"}}).encode())
            if mode == "echo_auth":
                return self._raw(401, json.dumps({"error": f"bad key {self.headers.get('Authorization')}"}).encode())
            if mode == "429_long":
                return self._raw(429, b'{"error": "slow down"}', {"Retry-After": "3600"})
            if mode == "empty_choices":
                return self._raw(200, b'{"choices": []}')
            if mode == "out_of_range":
                return self._raw(200, self._ok_body(body, " 150"))
            if mode == "hang":
                srv.stop.wait(30)
                return
            if mode == "trickle":
                data = self._ok_body(body) + b" " * 400
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                for i in range(len(data)):
                    if srv.stop.is_set():
                        return
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                    time.sleep(0.05)
                return
            if mode == "reset":
                # SO_LINGER 0: close() sends RST, the client sees "connection reset by peer"
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True
                return
            raise AssertionError(f"unknown mode {mode!r}")

    return Handler


def serve(srv: Misbehaving) -> Iterator[str]:
    """Run ``srv`` on 127.0.0.1 in a thread; yields its base URL; stops it (and releases hangs) after."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(srv))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        srv.stop.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def refused_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"
