"""Surveys: ask every archetype one question and get a tidy table."""

from __future__ import annotations

from typing import Any, Mapping

import pandas as pd

from llm_archetypes.archetypes import Archetypes
from llm_archetypes.asking import Asker
from llm_archetypes.backends import Backend
from llm_archetypes.questions import Question

__all__ = ["survey"]


def survey(archetypes: Archetypes, question: Question, backend: Backend | Asker,
           context: Mapping[str, Any] | None = None, *, t: int | None = None) -> pd.DataFrame:
    """One row per archetype: attributes, size, context labels, answer, score, ``p_<option>``, status.

    ``backend`` may be a bare backend (no cache, failures raise) or an :class:`Asker`
    (its cache, failure policy and statistics apply). ``t`` is recorded as a column.
    """
    asker = backend if isinstance(backend, Asker) else Asker(backend, mode="off")
    ctx = dict(context or {})
    ans = asker.ask_archetypes(archetypes, question, ctx)
    df = archetypes.to_pandas()
    if t is not None:
        df.insert(0, "t", t)
    df.insert(0, "question", question.name)
    labels, _ = question.render_context(ctx)
    for k, v in labels.items():
        df[f"context_{k}"] = v
    if ans.probs is not None:
        df["answer"] = [question.answer.options[int(row.argmax())] for row in ans.probs]
        for j, o in enumerate(question.answer.options):
            df[f"p_{o}"] = ans.probs[:, j].numpy()
    else:
        df["answer"] = list(ans.values)
    df["score"] = ans.scores.numpy()
    df["status"] = list(ans.status)
    return df
