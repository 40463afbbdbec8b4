"""LLM archetypes: one language-model judgement per cluster of similar agents.

Agents are grouped into archetypes by the attributes a prompt uses (:class:`Archetypes`);
a :class:`Question` renders each archetype and a bucketed context into a prompt; a
backend (:class:`TransformersBackend` offline, :class:`OpenAIHTTPBackend`, or the
deterministic :class:`RuleBackend`) answers; an :class:`Asker` parses, validates,
retries, falls back explicitly, caches (:class:`AnswerCache`) and counts (:class:`Stats`);
a learnable :class:`Link` maps scores to behavioural parameters; :func:`survey` tabulates
answers; :class:`ArchetypeDecision` is the substep that puts it all in a simulation.
"""

from llm_archetypes.archetypes import Archetypes, bin_labels
from llm_archetypes.asking import Answers, AnswerError, Asker, BudgetExceeded, FallbackLimitExceeded, Stats
from llm_archetypes.backends import (
    Backend,
    BackendConfigError,
    BackendError,
    OpenAIHTTPBackend,
    RuleBackend,
    TransformersBackend,
    default_cache_dir,
    local_model_available,
    make_backend,
)
from llm_archetypes.cache import AnswerCache, CacheCorrupt, CacheMiss, CacheWarning
from llm_archetypes.decision import ArchetypeDecision
from llm_archetypes.link import Link
from llm_archetypes.questions import Bucket, Choice, Distribution, Number, ParseError, Prompt, Question
from llm_archetypes.survey import survey

__all__ = [
    "Archetypes", "bin_labels",
    "Question", "Prompt", "Bucket", "Number", "Choice", "Distribution", "ParseError",
    "Backend", "BackendError", "BackendConfigError", "RuleBackend", "TransformersBackend", "OpenAIHTTPBackend",
    "default_cache_dir", "local_model_available", "make_backend",
    "AnswerCache", "CacheMiss", "CacheCorrupt", "CacheWarning",
    "Asker", "Answers", "Stats", "AnswerError", "BudgetExceeded", "FallbackLimitExceeded",
    "Link", "survey", "ArchetypeDecision",
]
