"""OpenAIHTTPBackend against a stub OpenAI-compatible server on 127.0.0.1 (429, 500, timeouts, 400)."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest
import torch

from llm_archetypes import Asker, BackendError, Choice, Distribution, OpenAIHTTPBackend, Prompt, Question


class Stub:
    """Scripted server: the first requests get the listed failures, the rest an answer."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.requests: list[tuple[str, dict]] = []
        self.lock = threading.Lock()

    def next_failure(self) -> str | None:
        with self.lock:
            return self.failures.pop(0) if self.failures else None


def make_handler(stub: Stub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with stub.lock:
                stub.requests.append((self.path, body))
            fail = stub.next_failure()
            if fail == "429":
                return self._send(429, {"error": "rate limited"})
            if fail == "500":
                return self._send(500, {"error": "boom"})
            if fail == "400":
                return self._send(400, {"error": "bad request"})
            if fail == "sleep":
                time.sleep(0.6)
            chat = self.path.endswith("/chat/completions")
            text = body["messages"][0]["content"] if chat else body["prompt"]
            old = "old" in text
            p_yes = 0.7 if old else 0.2
            top = {" yes": math.log(p_yes), " no": math.log(0.9 - p_yes), " maybe": math.log(0.1)}
            usage = {"total_tokens": 11}
            if body.get("logprobs"):
                if chat:
                    lp = {"content": [{"token": "yes", "logprob": top[" yes"],
                                       "top_logprobs": [{"token": k, "logprob": v} for k, v in top.items()]}]}
                    choice = {"message": {"role": "assistant", "content": "yes"}, "logprobs": lp}
                else:
                    choice = {"text": " yes", "logprobs": {"top_logprobs": [top]}}
            else:
                answer = " Yes." if old else " no"
                choice = {"message": {"role": "assistant", "content": answer}} if chat else {"text": answer}
            self._send(200, {"choices": [choice], "usage": usage})

    return Handler


@pytest.fixture()
def server() -> Iterator[tuple[str, Stub]]:
    stub = Stub()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(stub))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", stub
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def ps(q: Question) -> list[Prompt]:
    return [q.render({"who": w}, {}) for w in ("old", "young", "old", "young")]


QCHOICE = Question("stay", "An {who} person. Will they stay home?", Choice(("yes", "no")))
QDIST = Question("stay", "An {who} person. Will they stay home?", Distribution(("yes", "no")))


@pytest.mark.parametrize("chat", [False, True])
def test_complete_and_score_with_429_and_500_retried(server: tuple[str, Stub], chat: bool) -> None:
    url, stub = server
    stub.failures = ["429", "500", "500"]
    b = OpenAIHTTPBackend(url, "stub-model", chat=chat, backoff=0.01, max_backoff=0.05, concurrency=2, timeout=5)
    asker = Asker(b)
    ans = asker.ask(QCHOICE, ps(QCHOICE))
    assert ans.values == ("yes", "no", "yes", "no")
    assert b.http_retries == 3 and asker.stats.http_retries == 3 and asker.stats.calls == 4
    assert asker.stats.tokens == 4 * 11
    path = "/v1/chat/completions" if chat else "/v1/completions"
    assert all(p == path for p, _ in stub.requests)
    probs = asker.ask(QDIST, ps(QDIST)).probs
    expected = torch.tensor([[0.7, 0.2], [0.2, 0.7]] * 2)
    torch.testing.assert_close(probs, expected / expected.sum(-1, keepdim=True))
    assert all(body.get("max_tokens") == 1 for _, body in stub.requests[-4:])


def test_timeouts_are_retried_then_give_up(server: tuple[str, Stub]) -> None:
    url, stub = server
    stub.failures = ["sleep"]
    b = OpenAIHTTPBackend(url, "stub-model", timeout=0.2, backoff=0.01, max_retries=2, concurrency=1)
    assert b.complete([str(ps(QCHOICE)[0])]) == [" Yes."]
    assert b.http_retries == 1
    stub.failures = ["sleep"] * 3
    with pytest.raises(BackendError, match="gave up after 3 attempts"):
        b.complete(["An old person."])
    time.sleep(0.7)  # let the stub's sleeping handlers finish before shutdown


def test_client_errors_are_not_retried_and_fall_back(server: tuple[str, Stub]) -> None:
    url, stub = server
    stub.failures = ["400"] * 2
    b = OpenAIHTTPBackend(url, "stub-model", backoff=0.01, concurrency=1)
    asker = Asker(b, max_attempts=2, fallback="no")
    ans = asker.ask(QCHOICE, ps(QCHOICE)[:1])
    assert ans.status == ("fallback",) and b.http_retries == 0 and len(stub.requests) == 2
    assert asker.stats.failures == 2 and asker.stats.fallbacks == 1


def test_make_backend_for_cli_flag(server: tuple[str, Stub]) -> None:
    from llm_archetypes import RuleBackend, make_backend
    from llm_archetypes.examples import isolation_rule

    url, _ = server
    http = make_backend("http", url=url, model="stub-model", backoff=0.01)
    assert isinstance(http, OpenAIHTTPBackend) and http.complete(["An old person."]) == [" Yes."]
    assert isinstance(make_backend("rule", rule=isolation_rule), RuleBackend)
    with pytest.raises(ValueError, match="expected 'rule', 'local' or 'http'"):
        make_backend("gpt")
    with pytest.raises(ValueError, match="url= and model="):
        make_backend("http", url=None, model=None)
