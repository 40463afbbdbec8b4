"""Asker: retries, explicit fallbacks, budget, cache record/replay, cache safety across processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Sequence

import pytest
import torch
from torch import Tensor

from lpm import Params
from llm_archetypes import (
    AnswerCache, AnswerError, Archetypes, Asker, Backend, BudgetExceeded, CacheMiss, Number, Prompt, Question,
    RuleBackend,
)
from llm_archetypes.examples import isolation_question, isolation_rule

from test_llm_archetypes import BOOKS, population, town

from conftest import DEVICE  # one source: the device fixture's value
REPO = Path(__file__).resolve().parents[1]
CACHE_PY = str(REPO / "llm_archetypes" / "cache.py")


class Scripted(Backend):
    """Answers attempt j of every prompt with ``script[j]`` (text, or an exception to raise)."""

    name = "scripted"
    model = "script"

    def __init__(self, script: Sequence[object]) -> None:
        super().__init__()
        self.script = list(script)
        self.batches: list[list[str]] = []

    def complete(self, prompts: Sequence[str]) -> list[str]:
        step = self.script[min(len(self.batches), len(self.script) - 1)]
        self.batches.append([str(p) for p in prompts])
        if isinstance(step, BaseException):
            raise step
        self.tokens += 3 * len(prompts)
        return [str(step)] * len(prompts)


def prompts(k: int = 4) -> tuple[Question, list[Prompt]]:
    q = Question("share", "Person {i}: what share of their week do they stay home?", Number(0, 100))
    return q, [q.render({"i": str(i)}, {}) for i in range(k)]


def test_garbage_then_out_of_range_then_valid_counts_retries() -> None:
    q, ps = prompts(4)
    backend = Scripted(["banana", "150", "42"])
    asker = Asker(backend, max_attempts=3)
    ans = asker.ask(q, ps)
    assert ans.values == (42.0,) * 4 and ans.status == ("retried",) * 4
    torch.testing.assert_close(ans.scores, torch.full((4,), 0.42))
    s = asker.stats
    assert (s.calls, s.retries, s.failures, s.fallbacks, s.tokens) == (4, 8, 8, 0, 36)
    # corrective prompts quote the bad answer and the reason
    assert "banana" in backend.batches[1][0] and "invalid" in backend.batches[1][0]
    assert "outside [0, 100]" in backend.batches[2][0]


def test_timeouts_then_explicit_fallback_is_counted() -> None:
    q, ps = prompts(3)
    asker = Asker(Scripted([TimeoutError("read timed out")]), max_attempts=2, fallback=50.0)
    ans = asker.ask(q, ps)
    assert ans.status == ("fallback",) * 3 and ans.values == (50.0,) * 3
    assert (asker.stats.calls, asker.stats.retries, asker.stats.failures, asker.stats.fallbacks) == (3, 3, 6, 3)
    # a fallback must itself be a valid answer
    with pytest.raises(Exception, match="outside|not a number"):
        Asker(Scripted(["nope"]), max_attempts=1, fallback=500.0).ask(q, ps)


def test_no_fallback_raises_never_silent_zero() -> None:
    q, ps = prompts(2)
    with pytest.raises(AnswerError, match="no valid answer after 3 attempt.*fallback="):
        Asker(Scripted(["banana"]), max_attempts=3).ask(q, ps)


def test_budget_cap() -> None:
    q, ps = prompts(5)
    asker = Asker(Scripted(["7"]), max_calls=4)
    with pytest.raises(BudgetExceeded, match="max_calls=4"):
        asker.ask(q, ps)
    assert asker.stats.calls == 0
    asker = Asker(Scripted(["banana", "7"]), max_calls=8)
    with pytest.raises(BudgetExceeded, match="5 prompts sent so far, 5 more"):
        asker.ask(q, ps)
    with pytest.raises(BudgetExceeded, match="token budget"):
        Asker(Scripted(["7"]), max_tokens=10).ask(q, ps)


class Raising(RuleBackend):
    """Same identity as the recording backend, but any call is an error."""

    def complete(self, prompts: Sequence[str]) -> list[str]:
        raise AssertionError("replay must not call the backend")

    def score(self, prompts: Sequence[str], options: Sequence[str]) -> Tensor:
        raise AssertionError("replay must not call the backend")


def test_record_then_replay_with_raising_backend_gives_identical_tensors(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    rec = Asker(RuleBackend(isolation_rule), cache=AnswerCache(path), mode="record")
    model, system, state, decide = town(rec, every=7)
    first = model.simulate(Params(), system, state, 21, seed=3, progress=False)
    K = decide.archetypes.K
    assert rec.stats.calls == 3 * K and rec.stats.cache_hits == 0

    rerun = Asker(RuleBackend(isolation_rule), cache=AnswerCache(path), mode="record")
    model, system, state, _ = town(rerun, every=7)
    again = model.simulate(Params(), system, state, 21, seed=3, progress=False)
    assert rerun.stats.calls == 0 and rerun.stats.cache_hits == 3 * K and rerun.stats.cache_hit_rate == 1.0

    rep = Asker(Raising(isolation_rule), cache=AnswerCache(path), mode="replay")
    model, system, state, _ = town(rep, every=7)
    replayed = model.simulate(Params(), system, state, 21, seed=3, progress=False)
    for name in first.observables:
        assert torch.equal(first[name], replayed[name]) and torch.equal(first[name], again[name])
    assert torch.equal(first.final_state.isolation, replayed.final_state.isolation)

    # a different context bucket was never recorded: replay says so instead of calling the model
    arch = Archetypes.from_attributes(population(100), list(BOOKS), codebooks=BOOKS)
    with pytest.raises(CacheMiss, match="replay: no recorded answer"):
        rep.ask_archetypes(arch, isolation_question(), {"cases": 1e6})


def test_cache_key_separates_models_and_settings(tmp_path: Path) -> None:
    cache = AnswerCache(tmp_path / "c.sqlite")
    q, ps = prompts(2)
    a = Asker(Scripted(["7"]), cache=cache)
    a.ask(q, ps)
    b = Scripted(["9"])
    b.model = "other-model"
    ans = Asker(b, cache=cache).ask(q, ps)
    assert ans.values == (9.0, 9.0)
    q2 = Question("share", q.template, Number(0, 10))
    assert Asker(Scripted(["9"]), cache=cache).key(q, "complete", ps[0]) != Asker(Scripted(["9"])).key(q2, "complete", ps[0])


# The writer loads cache.py alone (stdlib only), so a process starts in milliseconds, not torch's seconds.
WRITER = textwrap.dedent("""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("answer_cache", sys.argv[4])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    AnswerCache = mod.AnswerCache
    import os, time
    path, start, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    cache = AnswerCache(path)
    while len(sys.argv) > 5 and not os.path.exists(sys.argv[5]):  # start together with the other writer
        time.sleep(0.01)
    for i in range(start, stop):
        cache.put(f"key{i}", {"i": i, "text": "x" * (i % 50)})
    print("done", flush=True)
""")


def test_two_concurrent_writer_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.sqlite")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, path, str(a), str(b), CACHE_PY, str(go)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for a, b in ((0, 600), (300, 900))]
    time.sleep(0.5)
    go.touch()
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    cache = AnswerCache(path)
    assert len(cache) == 900 and cache.integrity_ok()
    assert all(cache.get(f"key{i}") == {"i": i, "text": "x" * (i % 50)} for i in range(900))


def test_interrupted_writer_leaves_a_valid_cache(tmp_path: Path) -> None:
    path = str(tmp_path / "killed.sqlite")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-c", WRITER, path, "0", "10000000", CACHE_PY], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until it has written something
        time.sleep(0.3)
        if os.path.exists(path) and len(AnswerCache(path)) > 100:
            break
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    cache = AnswerCache(path)
    n = len(cache)
    assert n > 100 and cache.integrity_ok()
    assert all(cache.get(f"key{i}") == {"i": i, "text": "x" * (i % 50)} for i in range(n))
