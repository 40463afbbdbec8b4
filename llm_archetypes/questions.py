"""Questions: prompt templates, bucketed context and typed, validated answers.

A :class:`Question` renders one archetype's decoded attributes and the current context
into a prompt. Numeric context (weekly cases per 100k, ...) is bucketed into a few
labels so that prompts repeat across weeks and runs and the cache can answer them.
Each question declares its answer type:

- :class:`Number` ``(low, high)``: a number parsed from generated text, range checked;
- :class:`Choice` ``(options)``: one option parsed from generated text;
- :class:`Distribution` ``(options)``: probabilities over options, scored by the backend.

Every answer type maps an answer to a raw *score* in [0, 1] (number rescaled, option's
value, expected value under the distribution): the input of a :class:`~llm_archetypes.link.Link`.
"""

from __future__ import annotations

import json
import math
import re
import string
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from lpm.errors import ConfigError

from llm_archetypes.archetypes import bin_labels

__all__ = ["Bucket", "Number", "Choice", "Distribution", "AnswerType", "Question", "Prompt", "ParseError"]


class ParseError(ValueError):
    """A model's answer does not parse to the declared type or lies out of range."""


@dataclass(frozen=True)
class Bucket:
    """Cuts a numeric context value at ``edges`` into one of ``len(edges) + 1`` labels."""

    edges: tuple[float, ...]
    labels: tuple[str, ...] = ()
    unit: str = ""

    def __post_init__(self) -> None:
        edges = tuple(float(e) for e in self.edges)
        object.__setattr__(self, "edges", edges)
        if not self.labels:
            object.__setattr__(self, "labels", bin_labels(edges, self.unit))
        if len(self.labels) != len(edges) + 1:
            raise ConfigError(f"Bucket: expected {len(edges) + 1} labels for {len(edges)} edges, got {len(self.labels)}")

    def level(self, value: float) -> int:
        """Index of the bucket holding ``value`` (right-closed edges go up)."""
        v = float(value)
        if not math.isfinite(v):
            raise ConfigError(f"Bucket: expected a finite context value, got {value!r}")
        return sum(v >= e for e in self.edges)

    def __call__(self, value: float) -> str:
        """Label of the bucket holding ``value``."""
        return self.labels[self.level(value)]


def _norm(text: str) -> str:
    return text.strip().strip(string.punctuation + " \n\t\"'").lower()


@dataclass(frozen=True)
class Number:
    """A number in ``[low, high]``; score ``(x - low) / (high - low)``."""

    low: float
    high: float
    kind: str = field(default="number", init=False)

    def __post_init__(self) -> None:
        if not float(self.low) < float(self.high):
            raise ConfigError(f"Number: expected low < high, got ({self.low}, {self.high})")

    def instruction(self) -> str:
        """What the model is told to answer."""
        return f"Answer with a single number between {self.low:g} and {self.high:g}."

    def parse(self, text: str) -> float:
        """First number in ``text``, range checked."""
        m = re.search(r"[-+]?\d+(?:\.\d+)?", text)
        if m is None:
            raise ParseError(f"no number found in {text[:60]!r}")
        x = float(m.group(0))
        if not self.low <= x <= self.high:
            raise ParseError(f"{x:g} is outside [{self.low:g}, {self.high:g}]")
        return x

    def validate(self, value: Any) -> float:
        """Check a direct value (rule backend, fallback)."""
        x = float(value)
        if not (math.isfinite(x) and self.low <= x <= self.high):
            raise ParseError(f"{value!r} is not a number in [{self.low:g}, {self.high:g}]")
        return x

    def score(self, value: float) -> float:
        """Rescale to [0, 1]."""
        return (value - self.low) / (self.high - self.low)

    def spec(self) -> dict[str, Any]:
        """JSON description for cache keys."""
        return {"kind": self.kind, "low": self.low, "high": self.high}


@dataclass(frozen=True)
class Choice:
    """One of ``options``; score ``values[option]`` (default: first option 1, last 0)."""

    options: tuple[str, ...]
    values: tuple[float, ...] = ()
    kind: str = field(default="choice", init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", tuple(self.options))
        if len(self.options) < 2 or len({_norm(o) for o in self.options}) != len(self.options):
            raise ConfigError(f"{type(self).__name__}: expected >= 2 distinct options, got {self.options}")
        if not self.values:
            n = len(self.options)
            object.__setattr__(self, "values", tuple(1.0 - i / (n - 1) for i in range(n)))
        object.__setattr__(self, "values", tuple(float(v) for v in self.values))
        if len(self.values) != len(self.options):
            raise ConfigError(f"{type(self).__name__}: expected one value per option ({len(self.options)}), "
                             f"got {len(self.values)}")

    def instruction(self) -> str:
        """What the model is told to answer."""
        return "Answer with exactly one of: " + ", ".join(self.options) + "."

    def parse(self, text: str) -> str:
        """The option the text starts with, else the only option it mentions."""
        t = _norm(text)
        for o in sorted(self.options, key=len, reverse=True):
            if t.startswith(_norm(o)):
                return o
        hits = [o for o in self.options if re.search(rf"\b{re.escape(_norm(o))}\b", t)]
        if len(hits) == 1:
            return hits[0]
        raise ParseError(f"{text[:60]!r} is not one of {list(self.options)}")

    def validate(self, value: Any) -> str:
        """Check a direct value (rule backend, fallback)."""
        if value not in self.options:
            raise ParseError(f"{value!r} is not one of {list(self.options)}")
        return value

    def score(self, value: str) -> float:
        """Value of the chosen option."""
        return self.values[self.options.index(value)]

    def spec(self) -> dict[str, Any]:
        """JSON description for cache keys."""
        return {"kind": self.kind, "options": list(self.options), "values": list(self.values)}


@dataclass(frozen=True)
class Distribution(Choice):
    """Probabilities over ``options`` (from next-token scores); score = expected value."""

    kind: str = field(default="distribution", init=False)

    def parse(self, text: str) -> list[float]:
        """A JSON list of probabilities (for backends that answer in text)."""
        try:
            value = json.loads(text.strip())
        except json.JSONDecodeError:
            raise ParseError(f"{text[:60]!r} is not a JSON list of {len(self.options)} probabilities") from None
        return self.validate(value)

    def validate(self, value: Any) -> list[float]:
        """Non-negative finite weights, one per option, normalised to sum 1."""
        try:
            p = [float(v) for v in value]
        except (TypeError, ValueError):
            raise ParseError(f"{value!r} is not a list of numbers") from None
        if len(p) != len(self.options) or not all(math.isfinite(v) and v >= 0 for v in p) or sum(p) <= 0:
            raise ParseError(f"{value!r} is not {len(self.options)} non-negative weights with positive sum")
        s = sum(p)
        return [v / s for v in p]

    def score(self, value: Sequence[float]) -> float:
        """Expected option value."""
        return float(sum(p * v for p, v in zip(value, self.values)))


AnswerType = Number | Choice | Distribution


class Prompt(str):
    """Prompt text that also carries what it was rendered from (for rule backends and surveys)."""

    attributes: dict[str, str]
    context: dict[str, str]
    levels: dict[str, int]
    question: "Question | None"

    def __new__(cls, text: str, attributes: Mapping[str, str] | None = None,
                context: Mapping[str, str] | None = None, levels: Mapping[str, int] | None = None,
                question: "Question | None" = None) -> "Prompt":
        obj = super().__new__(cls, text)
        obj.attributes = dict(attributes or {})
        obj.context = dict(context or {})
        obj.levels = dict(levels or {})
        obj.question = question
        return obj

    def with_text(self, text: str) -> "Prompt":
        """Same metadata, new text (corrective retries)."""
        return Prompt(text, self.attributes, self.context, self.levels, self.question)


@dataclass(frozen=True)
class Question:
    """A named prompt template with typed answer and bucketed context.

    ``template`` is a ``str.format`` string over attribute and context names, e.g.
    ``"You are a {age_band} {sex} living in {borough}. Cases this week: {cases}. ..."``.
    Numeric context values must have a :class:`Bucket` in ``buckets`` (so prompts repeat);
    strings are inserted as given. The answer type's instruction and ``cue`` end the prompt.
    """

    name: str
    template: str
    answer: AnswerType
    buckets: Mapping[str, Bucket] = field(default_factory=dict)
    cue: str = "Answer:"
    instruct: bool = True

    def render_context(self, context: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, int]]:
        """Bucket numeric context values into labels; return (labels, bucket levels)."""
        labels: dict[str, str] = {}
        levels: dict[str, int] = {}
        for k, v in context.items():
            if k in self.buckets:
                levels[k] = self.buckets[k].level(float(v))
                labels[k] = self.buckets[k].labels[levels[k]]
            elif isinstance(v, str):
                labels[k] = v
            else:
                raise ConfigError(f"question {self.name!r}: context value {k!r}={v!r} is numeric but has no "
                                 f"Bucket in buckets (unbucketed numbers make every prompt unique)")
        return labels, levels

    def render(self, attributes: Mapping[str, str], context: Mapping[str, Any]) -> Prompt:
        """Prompt for one archetype under ``context``."""
        labels, levels = self.render_context(context)
        try:
            body = self.template.format(**attributes, **labels)
        except KeyError as e:
            raise ConfigError(f"question {self.name!r}: template needs {e.args[0]!r}; attributes "
                             f"{sorted(attributes)}, context {sorted(labels)}") from None
        parts = [body.rstrip()]
        if self.instruct:
            parts.append(self.answer.instruction())
        parts.append(self.cue)
        return Prompt("\n".join(parts), attributes, labels, levels, self)

    def corrective(self, prompt: Prompt, bad_answer: str, reason: str) -> Prompt:
        """Retry prompt: the original, the bad answer and why it was rejected."""
        base = str(prompt)
        cue_at = base.rfind(self.cue)
        head = base[:cue_at] if cue_at >= 0 else base + "\n"
        text = (f"{head}{self.cue} {bad_answer.strip()[:80]}\n"
                f"That answer was invalid ({reason}). {self.answer.instruction()}\n{self.cue}")
        return prompt.with_text(text)

    def spec(self) -> dict[str, Any]:
        """JSON description for cache keys."""
        return {"name": self.name, **self.answer.spec()}
