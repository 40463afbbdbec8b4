"""Fail loudly, early and safely (issue 17) and answer caches that cannot give the wrong run (issue 19).

Against a misbehaving OpenAI-compatible server on 127.0.0.1 (``reliability_server``):
bounded wall time for every failure mode, fallbacks counted, a loud failure above the
fallback bound, configuration errors (401/403/404, connection refused) at once without
retries, and the API key absent from messages, logs, cache files and results. Plus
safe deserialisation: a planted pickle in a cache is refused, never executed.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from llm_archetypes import (
    AnswerCache, AnswerError, Asker, BackendConfigError, BackendError, CacheCorrupt, CacheWarning, Distribution,
    FallbackLimitExceeded, Number, OpenAIHTTPBackend, Question,
)
from lpm.errors import CheckpointError, LPMError

from reliability_server import Misbehaving, refused_url, serve

KEY = "sk-test-SECRET-0123456789"
Q = Question("share", "Person {i}: what share of their week do they stay home?", Number(0, 100))
QD = Question("stay", "Person {i}: will they stay home?", Distribution(("yes", "no")))


def prompts(k: int, q: Question = Q) -> list:
    return [q.render({"i": f"p{i}"}, {}) for i in range(k)]


@pytest.fixture()
def server() -> Iterator[tuple[str, Misbehaving]]:
    srv = Misbehaving()
    yield from ((url, srv) for url in serve(srv))


def backend(url: str, **kw: object) -> OpenAIHTTPBackend:
    opts = dict(timeout=0.5, call_timeout=2.0, backoff=0.01, max_backoff=0.05, concurrency=4, api_key=KEY)
    opts.update(kw)
    return OpenAIHTTPBackend(url, "stub-model", **opts)


# ----------------------------------------------------------------- configuration errors: at once, no retries
@pytest.mark.parametrize("code,hint", [("401", "API key"), ("403", "API key"), ("404", "check the URL")])
def test_auth_and_not_found_fail_at_once_even_with_a_fallback(server, code: str, hint: str) -> None:
    url, srv = server
    srv.default = code
    asker = Asker(backend(url), fallback=50.0, max_attempts=3)
    t0 = time.perf_counter()
    with pytest.raises(BackendConfigError, match=hint) as err:
        asker.ask(Q, prompts(4))
    assert time.perf_counter() - t0 < 2.0
    assert srv.count() <= 4 and asker.backend.http_retries == 0  # one request per prompt at most, never retried
    assert isinstance(err.value, LPMError) and "stub-model" in str(err.value)
    assert asker.stats.fallbacks == 0


def test_connection_refused_fails_at_once_naming_the_url() -> None:
    url = refused_url()
    asker = Asker(backend(url), fallback=50.0)
    t0 = time.perf_counter()
    with pytest.raises(BackendConfigError, match="connection refused.*--llm-url"):
        asker.ask(Q, prompts(3))
    assert time.perf_counter() - t0 < 2.0


# ----------------------------------------------------------------- bounded waits
def test_long_retry_after_is_not_obeyed(server) -> None:
    url, srv = server
    srv.default = "429_long"
    b = backend(url, max_retry_after=5.0)
    t0 = time.perf_counter()
    with pytest.raises(BackendError, match=r"Retry-After.*max_retry_after=5"):
        b.complete(["An old person."])
    assert time.perf_counter() - t0 < 1.5 and srv.count() == 1


@pytest.mark.parametrize("mode", ["trickle", "hang"])
def test_one_call_is_bounded_by_its_total_deadline(server, mode: str) -> None:
    """A reply trickled one byte per 50 ms (each read well within ``timeout``) or no reply at all: cut at ``call_timeout``."""
    url, srv = server
    srv.default = mode
    b = backend(url, timeout=0.4, call_timeout=1.0, max_retries=10)
    t0 = time.perf_counter()
    with pytest.raises(BackendError, match="call_timeout=1"):
        b.complete(["An old person."])
    assert time.perf_counter() - t0 < 2.0


def test_retry_budget_bounds_a_whole_run(server) -> None:
    url, srv = server
    srv.default = "500"
    b = backend(url, max_retries=4, retry_budget=3, concurrency=1)
    with pytest.raises(BackendError, match="retry budget exhausted"):
        b.complete(["a"])
    n = srv.count()
    with pytest.raises(BackendError, match="retry budget exhausted"):
        b.complete(["b"])  # budget spent: one attempt, no more retries
    assert b.http_retries == 3 and srv.count() == n + 1


# ----------------------------------------------------------------- every failure mode: bounded, counted, loud above the bound
FAILURES = ["garbage", "invalid_json", "500", "reset", "empty_choices", "out_of_range", "hang", "trickle"]


@pytest.mark.parametrize("mode", FAILURES)
def test_failure_modes_are_bounded_counted_and_kept_per_prompt(server, mode: str) -> None:
    """One prompt of five always fails: its fallback is counted, the four others keep their valid answers."""
    url, srv = server
    srv.by_prompt = {"p2": mode}
    b = backend(url, timeout=0.3, call_timeout=0.8, max_retries=1)
    asker = Asker(b, fallback=50.0, max_attempts=2, max_fallback_share=0.25)
    t0 = time.perf_counter()
    ans = asker.ask(Q, prompts(5))
    assert time.perf_counter() - t0 < 6.0
    assert ans.status == ("ok", "ok", "fallback", "ok", "ok") and ans.values[2] == 50.0
    assert [v for i, v in enumerate(ans.values) if i != 2] == [42.0] * 4
    assert asker.stats.fallbacks == 1 and asker.stats.answers == 5 and asker.stats.fallback_share == 0.2
    assert asker.stats.last_error


def test_fallback_share_above_the_bound_stops_naming_the_last_error(server) -> None:
    url, srv = server
    srv.by_prompt = {"p2": "500", "p3": "500"}
    asker = Asker(backend(url, max_retries=0), fallback=50.0, max_attempts=1, max_fallback_share=0.05)
    with pytest.raises(FallbackLimitExceeded, match=r"2 of 6 answers.*max_fallback_share=0.05.*HTTP 500"):
        asker.ask(Q, prompts(6))


def test_without_fallback_a_failure_is_an_error(server) -> None:
    url, srv = server
    srv.by_prompt = {"p1": "garbage"}
    with pytest.raises(AnswerError, match="no valid answer after 2 attempt"):
        Asker(backend(url, max_retries=0), max_attempts=2).ask(Q, prompts(3))


# ----------------------------------------------------------------- cache: keys, validity, damage, concurrent writers
def test_cache_key_includes_url_and_decoding_settings(server) -> None:
    url, _ = server
    asker = Asker(backend(url))
    k = asker.key(Q, "complete", prompts(1)[0])
    assert k != Asker(backend(url + "/other")).key(Q, "complete", prompts(1)[0])
    assert k != Asker(backend(url, temperature=0.7)).key(Q, "complete", prompts(1)[0])
    assert k != Asker(backend(url, chat=True)).key(Q, "complete", prompts(1)[0])
    assert k == Asker(backend(url, api_key="another-key")).key(Q, "complete", prompts(1)[0])  # the key is not an input


def test_invalid_answers_are_never_cached(server, tmp_path: Path) -> None:
    url, srv = server
    cache = AnswerCache(tmp_path / "a.sqlite")
    srv.default = "out_of_range"
    with pytest.raises(AnswerError):
        Asker(backend(url), cache=cache, max_attempts=1).ask(Q, prompts(2))
    assert len(cache) == 0
    srv.default = "ok"  # the server is fixed: the next run gets valid answers, not a stuck garbage one
    assert Asker(backend(url), cache=cache).ask(Q, prompts(2)).values == (42.0, 42.0)
    assert len(cache) == 2


def test_a_stale_invalid_cached_answer_is_asked_again_and_replaced(server, tmp_path: Path) -> None:
    url, srv = server
    cache = AnswerCache(tmp_path / "a.sqlite")
    asker = Asker(backend(url), cache=cache)
    p = prompts(1)[0]
    cache.put(asker.key(Q, "complete", p), "banana")  # as an older version recorded it
    ans = asker.ask(Q, [p])
    assert ans.values == (42.0,) and asker.stats.cache_invalid == 1 and srv.count() == 1
    assert cache.get(asker.key(Q, "complete", p)) == " 42"


def test_corrupt_cache_row_is_reported_with_file_and_row(server, tmp_path: Path) -> None:
    url, srv = server
    path = tmp_path / "a.sqlite"
    asker = Asker(backend(url), cache=AnswerCache(path))
    asker.ask(Q, prompts(2))
    with sqlite3.connect(path) as db:
        db.execute("UPDATE answers SET value = '{not json' WHERE rowid = 2")
    with pytest.raises(CacheCorrupt, match=rf"{path.name}: row 2 .*not valid JSON"):
        Asker(backend(url), cache=AnswerCache(path, on_corrupt="raise")).ask(Q, prompts(2))
    skip = Asker(backend(url), cache=AnswerCache(path))
    with pytest.warns(CacheWarning, match=r"row 2 .*skipped"):
        assert skip.ask(Q, prompts(2)).values == (42.0, 42.0)
    assert skip.stats.cache_hits == 1 and skip.stats.calls == 1  # the damaged row was asked again ...
    with _no_warning():
        assert Asker(backend(url), cache=AnswerCache(path)).ask(Q, prompts(2)).values == (42.0, 42.0)  # ... and fixed


class _no_warning:
    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error", CacheWarning)

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


def test_not_an_sqlite_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "a.sqlite"
    bad.write_bytes(b"\x80\x04garbage that is not a database")
    with pytest.raises(CacheCorrupt, match="not an SQLite database"):
        AnswerCache(bad)


def test_concurrent_writers_with_different_answers_agree_and_replay(server, tmp_path: Path) -> None:
    """Two runs record the same prompt at once with different replies: both use the first writer's, so both replay."""
    url, srv = server
    path = tmp_path / "a.sqlite"
    first, second = AnswerCache(path), AnswerCache(path)
    a = Asker(backend(url), cache=first, mode="off")
    p = prompts(1)[0]
    key = a.key(Q, "complete", p)
    # run A asked and got " 42"; run B asked at the same time and got " 17", then records second
    assert first.put(key, " 42") == " 42"
    assert second.put(key, " 17") == " 42"
    srv.answer = " 17"
    b = Asker(backend(url), cache=AnswerCache(path))
    assert b.ask(Q, [p]).values == (42.0,)
    replay = Asker(backend(url), cache=AnswerCache(path), mode="replay")
    assert replay.ask(Q, [p]).values == (42.0,)


def test_a_racing_writer_answer_is_adopted(server, tmp_path: Path) -> None:
    """The asker records its reply and uses whatever the cache holds after the write (the first writer's)."""
    url, srv = server
    path = tmp_path / "a.sqlite"
    asker = Asker(backend(url), cache=AnswerCache(path))
    p = prompts(1)[0]
    key = asker.key(Q, "complete", p)
    real_get = asker.cache.get
    calls = {"n": 0}

    def get_then_race(k: str):  # the first lookup misses; meanwhile another run records " 17"
        calls["n"] += 1
        out = real_get(k)
        if calls["n"] == 1:
            AnswerCache(path).put(key, " 17")
        return out

    asker.cache.get = get_then_race  # type: ignore[method-assign]
    assert asker.ask(Q, [p]).values == (17.0,)


# ----------------------------------------------------------------- the API key never leaks
def test_api_key_is_not_in_messages_logs_or_cache(server, tmp_path: Path, caplog) -> None:
    url, srv = server
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "a.sqlite"
    asker = Asker(backend(url), cache=AnswerCache(path))
    asker.ask(Q, prompts(3))
    asker.ask(QD, prompts(2, QD))
    assert all(r["headers"].get("Authorization") == f"Bearer {KEY}" for r in srv.requests)  # it is sent ...
    srv.default = "echo_auth"
    with pytest.raises(BackendConfigError) as err:
        Asker(backend(url), cache=AnswerCache(path)).ask(Q, [Q.render({"i": "new"}, {})])
    assert KEY not in str(err.value) and "***" in str(err.value)  # ... but redacted from what the server echoes
    asker.cache.close()
    blobs = [f.read_bytes() for f in tmp_path.iterdir()]
    assert blobs and not any(KEY.encode() in b for b in blobs)
    assert KEY not in caplog.text
    assert KEY not in json.dumps(asker.stats.as_dict()) and KEY not in json.dumps(asker.backend.settings())


# ----------------------------------------------------------------- safe deserialisation
class Exploit:
    """Unpickling this object creates ``marker`` (harmless stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def test_planted_pickle_in_population_cache_is_refused_not_executed(tmp_path: Path) -> None:
    from experiments import covid_nyc as nyc

    marker = tmp_path / "pwned"
    areas = nyc._check_boroughs(["SI"])
    path = nyc._cache_path(tmp_path, 0.001, 0, areas)
    path.parent.mkdir(parents=True)
    torch.save({"population": Exploit(marker)}, path)
    for planted in (path, path.with_suffix(".pt")):  # the new path and where the old format lived
        torch.save({"population": Exploit(marker)}, planted)
    with pytest.raises(CheckpointError, match="population cache .*refused"):
        nyc.build_population(0.001, 0, areas, cache_dir=tmp_path)
    assert not marker.exists()


def test_population_cache_roundtrip_is_validated(tmp_path: Path) -> None:
    from experiments import covid_nyc as nyc

    areas = nyc._check_boroughs(["SI"])
    pop, net, _, info = nyc.build_population(0.001, 0, areas, cache_dir=tmp_path)
    assert not info["cached"]
    pop2, net2, _, info2 = nyc.build_population(0.001, 0, areas, cache_dir=tmp_path)
    assert info2["cached"] and torch.equal(pop.age, pop2.age) and torch.equal(net.rowptr, net2.rowptr)
    assert pop2.codebooks["area"].labels == ("SI",)
    import h5py

    with h5py.File(Path(info["cache"]), "r+") as f:  # flip agents' ages: the checksum no longer matches
        f["population/age"][:5] = (f["population/age"][:5] + 1) % 18
    with pytest.raises(CheckpointError, match="checksum"):
        nyc.build_population(0.001, 0, areas, cache_dir=tmp_path)


def test_planted_pickle_as_calibration_checkpoint_is_refused_not_executed(tmp_path: Path) -> None:
    import calibration as cal
    from test_calibration import AREAS, OBS, build, synthetic_frame

    marker = tmp_path / "pwned"
    ck = tmp_path / "state.pt"
    torch.save({"params": Exploit(marker), "optimizer": {}, "seeds": [0], "iteration": 0}, ck)
    model, params, system, state = build(N=300, init=5)
    frame, dates = synthetic_frame(model, params, system, state, 10, seeds=(1,))
    data = cal.align(frame, dates, areas=AREAS)
    with pytest.raises(CheckpointError, match="refused"):
        cal.fit(cal.Problem(model, system, state, None, OBS, data, cal.Loss("poisson")), params,
                torch.optim.Adam(params.parameters()), 1, hooks=[cal.Checkpoint(ck)])
    assert not marker.exists()
