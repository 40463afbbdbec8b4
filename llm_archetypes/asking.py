"""Asking: cache lookup, backend calls, parsing, corrective retries, fallback, statistics.

An :class:`Asker` binds a backend to a cache mode and a failure policy::

    asker = Asker(backend, cache=AnswerCache("out/llm.sqlite"), mode="record",
                  max_attempts=3, fallback={"isolate": 0.5}, max_calls=10_000)
    answers = asker.ask_archetypes(archetypes, question, {"cases": 120.0})
    answers.scores        # [K] float32 raw scores in [0, 1]
    asker.stats           # calls, retries, failures, fallbacks, cache hits, tokens, seconds

Failure policy: an answer that does not parse (or lies out of range), and a backend
error or timeout, count as a failure; the prompt is asked again (with a corrective
instruction after a bad answer) up to ``max_attempts`` times in all. Then the user's
explicit ``fallback`` value is used and counted, or, when none was given, an
:class:`AnswerError` is raised. Nothing is ever silently replaced by 0.

Cache modes: ``"record"`` reads the cache and records misses; ``"replay"`` reads only
and raises :class:`~llm_archetypes.cache.CacheMiss` instead of calling the backend (a
backend that raises on any call reproduces a recorded run exactly); ``"off"`` calls the
backend every time.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from llm_archetypes.archetypes import Archetypes
from llm_archetypes.backends import Backend, BackendError, stable_hash
from llm_archetypes.cache import AnswerCache, CacheMiss
from llm_archetypes.questions import ParseError, Prompt, Question

__all__ = ["Asker", "Answers", "Stats", "AnswerError", "BudgetExceeded"]

_RETRYABLE = (BackendError, TimeoutError, ConnectionError)


class AnswerError(RuntimeError):
    """No valid answer after all attempts and no fallback was chosen."""


class BudgetExceeded(RuntimeError):
    """The run would exceed its call or token budget."""


@dataclass
class Stats:
    """Counters of one asker: backend prompts sent, retries, failures, fallbacks, cache hits, tokens, seconds."""

    calls: int = 0
    retries: int = 0
    failures: int = 0
    fallbacks: int = 0
    cache_hits: int = 0
    http_retries: int = 0
    tokens: int = 0
    seconds: float = 0.0
    decisions: int = 0

    @property
    def cache_hit_rate(self) -> float:
        """Share of prompts answered from the cache (0 when nothing was asked)."""
        total = self.cache_hits + self.calls + self.retries
        return self.cache_hits / total if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Counters plus the hit rate, JSON-ready."""
        return {**asdict(self), "cache_hit_rate": self.cache_hit_rate}


@dataclass(frozen=True)
class Answers:
    """Answers of K prompts: parsed values, scores ``[K]``, probabilities ``[K, n]`` and how each was obtained."""

    values: tuple[Any, ...]
    scores: Tensor
    probs: Tensor | None
    status: tuple[str, ...]
    prompts: tuple[Prompt, ...] = field(repr=False, default=())


class Asker:
    """Backend + cache mode + failure policy + budget, with running :class:`Stats`."""

    def __init__(self, backend: Backend, *, cache: AnswerCache | str | None = None, mode: str = "record",
                 max_attempts: int = 3, fallback: Any = None, max_calls: int | None = None,
                 max_tokens: int | None = None) -> None:
        if mode not in ("record", "replay", "off"):
            raise ValueError(f"mode: expected 'record', 'replay' or 'off', got {mode!r}")
        if mode == "replay" and cache is None:
            raise ValueError("mode='replay' needs a cache")
        if max_attempts < 1:
            raise ValueError(f"max_attempts: expected >= 1, got {max_attempts}")
        self.backend = backend
        self.cache = AnswerCache(cache) if isinstance(cache, str) else cache
        self.mode = mode
        self.max_attempts = int(max_attempts)
        self.fallback = fallback
        self.max_calls = max_calls
        self.max_tokens = max_tokens
        self.stats = Stats()

    # -- keys and fallback ---------------------------------------------------------

    def key(self, question: Question, kind: str, prompt: str) -> str:
        """Cache key: backend, model, decoding settings, call kind, answer type and prompt."""
        b = self.backend
        return stable_hash({"backend": b.name, "model": b.model, "settings": b.settings(), "kind": kind,
                            "answer": question.answer.spec(), "prompt": str(prompt)})

    def _fallback_for(self, question: Question) -> Any:
        fb = self.fallback
        if isinstance(fb, Mapping):
            return fb.get(question.name)
        return fb

    # -- calling ---------------------------------------------------------------------

    def _charge(self, n_first: int, n_retry: int) -> None:
        sent = self.stats.calls + self.stats.retries
        if self.max_calls is not None and sent + n_first + n_retry > self.max_calls:
            raise BudgetExceeded(f"LLM call budget max_calls={self.max_calls} would be exceeded: {sent} prompts "
                                 f"sent so far, {n_first + n_retry} more needed; raise max_calls or use the cache")
        self.stats.calls += n_first
        self.stats.retries += n_retry

    def _call(self, kind: str, question: Question, prompts: list[Prompt]) -> list[Any]:
        b = self.backend
        tok0, http0, t0 = b.tokens, b.http_retries, time.perf_counter()
        try:
            if kind == "score":
                probs = b.score(prompts, list(question.answer.options))
                if tuple(probs.shape) != (len(prompts), len(question.answer.options)):
                    raise BackendError(f"{b.name}.score returned shape {tuple(probs.shape)}, expected "
                                       f"({len(prompts)}, {len(question.answer.options)})")
                # Python floats: what the cache stores, so record and replay build identical tensors.
                return [[float(x) for x in row] for row in probs.double().cpu().tolist()]
            texts = b.complete(prompts)
            if len(texts) != len(prompts):
                raise BackendError(f"{b.name}.complete returned {len(texts)} answers for {len(prompts)} prompts")
            return [str(t) for t in texts]
        finally:
            self.stats.seconds += time.perf_counter() - t0
            self.stats.tokens += b.tokens - tok0
            self.stats.http_retries += b.http_retries - http0
            if self.max_tokens is not None and self.stats.tokens > self.max_tokens:
                raise BudgetExceeded(f"LLM token budget max_tokens={self.max_tokens} exceeded "
                                     f"({self.stats.tokens} tokens used)")

    def ask(self, question: Question, prompts: Sequence[Prompt]) -> Answers:
        """Answer every prompt: cache, backend, parse, corrective retries, fallback."""
        answer = question.answer
        kind = "score" if answer.kind == "distribution" else "complete"
        use_cache = self.cache is not None and self.mode != "off"
        n = len(prompts)
        current = list(prompts)
        values: list[Any] = [None] * n
        status = [""] * n
        attempts = [0] * n
        errors: dict[int, str] = {}
        pending = list(range(n))
        while pending:
            raw: dict[int, Any] = {}
            keys = {i: self.key(question, kind, current[i]) for i in pending}
            to_call = []
            for i in pending:
                hit = self.cache.get(keys[i]) if use_cache else None
                if hit is not None:
                    raw[i] = hit
                    self.stats.cache_hits += 1
                elif self.mode == "replay":
                    raise CacheMiss(f"replay: no recorded answer for question {question.name!r} "
                                    f"(backend {self.backend.name}, model {self.backend.model}); prompt:\n{current[i]}")
                else:
                    to_call.append(i)
            if to_call:
                first = sum(1 for i in to_call if attempts[i] == 0)
                self._charge(first, len(to_call) - first)
                try:
                    replies = self._call(kind, question, [current[i] for i in to_call])
                except _RETRYABLE as e:
                    for i in to_call:
                        errors[i] = f"{type(e).__name__}: {e}"
                else:
                    for i, r in zip(to_call, replies):
                        raw[i] = r
                        if use_cache:
                            self.cache.put(keys[i], r, {"question": question.name})
            next_pending = []
            for i in pending:
                attempts[i] += 1
                if i in raw:
                    try:
                        values[i] = answer.parse(raw[i]) if kind == "complete" else answer.validate(raw[i])
                        status[i] = "ok" if attempts[i] == 1 else "retried"
                        continue
                    except ParseError as e:
                        errors[i] = str(e)
                        if kind == "complete":
                            current[i] = question.corrective(prompts[i], str(raw[i]), str(e))
                self.stats.failures += 1
                if attempts[i] < self.max_attempts:
                    next_pending.append(i)
                    continue
                fb = self._fallback_for(question)
                if fb is None:
                    raise AnswerError(f"question {question.name!r}: no valid answer after {attempts[i]} attempt(s) "
                                      f"(last error: {errors[i]}); pass fallback= to Asker to use a value "
                                      f"instead; prompt:\n{prompts[i]}")
                values[i] = answer.validate(fb)
                status[i] = "fallback"
                self.stats.fallbacks += 1
            pending = next_pending
        scores = torch.tensor([answer.score(v) for v in values], dtype=torch.float32)
        probs = (torch.tensor(values, dtype=torch.float32).reshape(n, len(answer.options))
                 if kind == "score" else None)
        return Answers(tuple(values), scores, probs, tuple(status), tuple(prompts))

    def ask_archetypes(self, archetypes: Archetypes, question: Question, context: Mapping[str, Any]) -> Answers:
        """Render one prompt per archetype under ``context`` and ask them all (K prompts)."""
        prompts = [question.render(archetypes.labels[k], context) for k in range(archetypes.K)]
        self.stats.decisions += 1
        return self.ask(question, prompts)
