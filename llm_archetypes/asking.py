"""Asking: cache lookup, backend calls, parsing, corrective retries, fallback, statistics.

An :class:`Asker` binds a backend to a cache mode and a failure policy::

    asker = Asker(backend, cache=AnswerCache("out/llm.sqlite"), mode="record",
                  max_attempts=3, fallback={"isolate": 0.5}, max_calls=10_000)
    answers = asker.ask_archetypes(archetypes, question, {"cases": 120.0})
    answers.scores        # [K] float32 raw scores in [0, 1]
    asker.stats           # calls, retries, failures, fallbacks, cache hits, tokens, seconds

Failure policy: an answer that does not parse (or lies out of range), and a backend
error or timeout, count as a failure of that prompt alone (the other prompts of the batch
keep their answers); the prompt is asked again (with a corrective instruction after a bad
answer) up to ``max_attempts`` times in all. Then the user's explicit ``fallback`` value is
used and counted, or, when none was given, an :class:`AnswerError` is raised. With
``max_fallback_share`` a run whose share of fallback answers (over all answers so far)
exceeds the bound stops with :class:`FallbackLimitExceeded`, naming the backend's last
error. A :class:`~llm_archetypes.backends.BackendConfigError` (wrong key, URL or model,
nothing listening) is never retried or replaced: it stops the run at once. Nothing is
ever silently replaced by 0.

Only valid answers are cached: a reply that fails to parse is never recorded, and a
cached reply that no longer parses (recorded by an older version) is re-asked and replaced.
When two runs record different replies to the same prompt at once, the first writer's
reply is the one both use (:meth:`AnswerCache.put` returns the stored value), so a replay
reproduces either run.

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

from lpm.errors import ConfigError, LPMError

from llm_archetypes.archetypes import Archetypes
from llm_archetypes.backends import Backend, BackendError, stable_hash
from llm_archetypes.cache import AnswerCache, CacheMiss
from llm_archetypes.questions import ParseError, Prompt, Question

__all__ = ["Asker", "Answers", "Stats", "AnswerError", "BudgetExceeded", "FallbackLimitExceeded"]


class AnswerError(LPMError, RuntimeError):
    """No valid answer after all attempts and no fallback was chosen."""


class FallbackLimitExceeded(AnswerError):
    """More answers were fallbacks than the run's ``max_fallback_share`` allows."""


class BudgetExceeded(LPMError, RuntimeError):
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
    answers: int = 0
    cache_invalid: int = 0
    last_error: str = ""

    @property
    def fallback_share(self) -> float:
        """Share of answers that are fallbacks (0 when nothing was answered)."""
        return self.fallbacks / self.answers if self.answers else 0.0

    @property
    def cache_hit_rate(self) -> float:
        """Share of prompts answered from the cache (0 when nothing was asked)."""
        total = self.cache_hits + self.calls + self.retries
        return self.cache_hits / total if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Counters plus the hit rate, JSON-ready."""
        return {**asdict(self), "cache_hit_rate": self.cache_hit_rate, "fallback_share": self.fallback_share}


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
                 max_tokens: int | None = None, max_fallback_share: float | None = None) -> None:
        if mode not in ("record", "replay", "off"):
            raise ValueError(f"mode: expected 'record', 'replay' or 'off', got {mode!r}")
        if mode == "replay" and cache is None:
            raise ValueError("mode='replay' needs a cache")
        if max_attempts < 1:
            raise ValueError(f"max_attempts: expected >= 1, got {max_attempts}")
        if max_fallback_share is not None and not 0.0 <= float(max_fallback_share) <= 1.0:
            raise ValueError(f"max_fallback_share: expected a share in [0, 1], got {max_fallback_share!r}")
        self.backend = backend
        self.cache = AnswerCache(cache) if isinstance(cache, str) else cache
        self.mode = mode
        self.max_attempts = int(max_attempts)
        self.fallback = fallback
        self.max_calls = max_calls
        self.max_tokens = max_tokens
        self.max_fallback_share = None if max_fallback_share is None else float(max_fallback_share)
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
        """Raw reply per prompt, or that prompt's :class:`BackendError`."""
        b = self.backend
        tok0, http0, t0 = b.tokens, b.http_retries, time.perf_counter()
        try:
            if kind == "score":
                return b.score_each(prompts, list(question.answer.options))
            return b.complete_each(prompts)
        finally:
            self.stats.seconds += time.perf_counter() - t0
            self.stats.tokens += b.tokens - tok0
            self.stats.http_retries += b.http_retries - http0
            if self.max_tokens is not None and self.stats.tokens > self.max_tokens:
                raise BudgetExceeded(f"LLM token budget max_tokens={self.max_tokens} exceeded "
                                     f"({self.stats.tokens} tokens used)")

    def _parse(self, kind: str, question: Question, raw: Any) -> Any:
        try:
            return question.answer.parse(raw) if kind == "complete" else question.answer.validate(raw)
        except (TypeError, ValueError) as e:  # a reply of the wrong type (e.g. a list for a text answer)
            if isinstance(e, ParseError):
                raise
            raise ParseError(f"{str(raw)[:60]!r} is not a valid {question.answer.kind} answer ({e})") from None

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
        stale: set[str] = set()  # keys whose cached reply no longer parses: replaced when answered again
        while pending:
            parsed: dict[int, Any] = {}
            keys = {i: self.key(question, kind, current[i]) for i in pending}
            to_call = []
            for i in pending:
                hit = self.cache.get(keys[i]) if use_cache else None
                if hit is not None:
                    try:
                        parsed[i] = self._parse(kind, question, hit)
                        self.stats.cache_hits += 1
                        continue
                    except ParseError:
                        self.stats.cache_invalid += 1  # recorded before answers were validated: ask again
                        stale.add(keys[i])
                if self.mode == "replay":
                    raise CacheMiss(f"replay: no recorded answer for question {question.name!r} "
                                    f"(backend {self.backend.name}, model {self.backend.model}); prompt:\n{current[i]}")
                to_call.append(i)
            if to_call:
                first = sum(1 for i in to_call if attempts[i] == 0)
                self._charge(first, len(to_call) - first)
                replies = self._call(kind, question, [current[i] for i in to_call])
                for i, r in zip(to_call, replies):
                    if isinstance(r, BaseException):
                        errors[i] = f"{type(r).__name__}: {r}"
                        continue
                    try:
                        value = self._parse(kind, question, r)
                    except ParseError as e:
                        errors[i] = str(e)
                        if kind == "complete":
                            current[i] = question.corrective(prompts[i], str(r), str(e))
                        continue
                    if use_cache:
                        stored = self.cache.put(keys[i], r, {"question": question.name}, replace=keys[i] in stale)
                        if stored != r:  # another run recorded this prompt first: use its answer, as a replay will
                            value = self._parse(kind, question, stored)
                    parsed[i] = value
            next_pending = []
            for i in pending:
                attempts[i] += 1
                if i in parsed:
                    values[i] = parsed[i]
                    status[i] = "ok" if attempts[i] == 1 else "retried"
                    continue
                self.stats.failures += 1
                self.stats.last_error = errors.get(i, "")
                if attempts[i] < self.max_attempts:
                    next_pending.append(i)
                    continue
                fb = self._fallback_for(question)
                if fb is None:
                    raise AnswerError(f"question {question.name!r}: no valid answer after {attempts[i]} attempt(s) "
                                      f"(last error: {errors[i]}); pass fallback= to Asker (--llm-fallback) to use "
                                      f"a value instead; prompt:\n{prompts[i]}")
                values[i] = answer.validate(fb)
                status[i] = "fallback"
                self.stats.fallbacks += 1
            pending = next_pending
        self.stats.answers += n
        self._check_fallback_share(question)
        scores = torch.tensor([answer.score(v) for v in values], dtype=torch.float32)
        probs = (torch.tensor(values, dtype=torch.float32).reshape(n, len(answer.options))
                 if kind == "score" else None)
        return Answers(tuple(values), scores, probs, tuple(status), tuple(prompts))

    def _check_fallback_share(self, question: Question) -> None:
        st, bound = self.stats, self.max_fallback_share
        if bound is None or st.fallback_share <= bound:
            return
        raise FallbackLimitExceeded(
            f"question {question.name!r}: {st.fallbacks} of {st.answers} answers ({st.fallback_share:.1%}) are the "
            f"fallback value, more than max_fallback_share={bound:g}; the backend {self.backend.name} "
            f"({self.backend.model}) last failed with: {st.last_error or self.backend.last_error or 'unknown'}")

    def ask_archetypes(self, archetypes: Archetypes, question: Question,
                       context: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> Answers:
        """Render one prompt per archetype under ``context`` (shared, or one per archetype) and ask them all (K prompts)."""
        if isinstance(context, Mapping):
            context = [context] * archetypes.K
        elif len(context) != archetypes.K:
            raise ConfigError(f"context: expected one mapping, or one per archetype (K={archetypes.K}), "
                              f"got {len(context)}")
        prompts = [question.render(archetypes.labels[k], context[k]) for k in range(archetypes.K)]
        self.stats.decisions += 1
        return self.ask(question, prompts)
