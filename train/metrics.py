"""Held-out metrics, computed automatically from a generated answer and the example.

Each metric scores one example as a dict of numbers in [0, 1]; the key named like the metric
is the headline, the others explain it (e.g. how many answers were valid JSON at all). A run's
score is the mean over the held-out set."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from .data import Example
from .errors import DataError
from .langid import detect_language, primary_subtag

Scores = dict[str, float]


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    description: str
    score: Callable[[str, Example, str], Scores]  # (generated answer, example, recipe language)


_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```\s*$", re.DOTALL)


def strip_fence(text: str) -> str:
    """A model may wrap its answer in a Markdown code fence; the content is what counts."""
    text = text.strip()
    match = _FENCE.match(text)
    return match.group(1).strip() if match else text


# --- text-to-SQL ------------------------------------------------------------------------------
# Every character lands in some token (the last alternative takes any other one), so two queries
# that differ anywhere but in case and spacing never normalise alike.
_SQL_TOKEN = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\d+(?:\.\d+)?|[^\W\d][\w.]*|<=|>=|<>|!=|\|\||\S")


def normalize_sql(text: str) -> str:
    """Keyword/identifier case, spacing, a trailing semicolon and `!=` vs `<>` do not matter;
    string literals and quoted identifiers keep their case."""
    tokens = _SQL_TOKEN.findall(strip_fence(text))
    out = [t if t[0] in "'\"" else ("<>" if t == "!=" else t.lower()) for t in tokens]
    while out and out[-1] == ";":
        out.pop()
    return " ".join(out)


def sql_exact_match(answer: str, example: Example, language: str) -> Scores:
    return {"sql_exact_match": float(normalize_sql(answer) == normalize_sql(example.completion))}


# --- field extraction into JSON ---------------------------------------------------------------
def _same_value(got: object, want: object) -> bool:
    if isinstance(want, str):
        return isinstance(got, str) and " ".join(got.split()).casefold() == " ".join(want.split()).casefold()
    if isinstance(want, bool) or want is None:
        return got is want
    if isinstance(want, (int, float)):
        return isinstance(got, (int, float)) and not isinstance(got, bool) and float(got) == float(want)
    return got == want


def json_fields(answer: str, example: Example, language: str) -> Scores:
    """Valid JSON object with exactly the expected fields, each with the expected value."""
    want = json.loads(example.completion)
    try:
        got = json.loads(strip_fence(answer))
    except json.JSONDecodeError:
        got = None
    if not isinstance(got, dict):
        return {"json_fields": 0.0, "json_valid": 0.0, "field_accuracy": 0.0}
    right = sum(1 for key, value in want.items() if key in got and _same_value(got[key], value))
    exact = right == len(want) and set(got) == set(want)
    return {"json_fields": float(exact), "json_valid": 1.0, "field_accuracy": right / len(want)}


# --- customer-support replies -----------------------------------------------------------------
def _squash(text: str) -> str:
    return " ".join(text.split()).casefold()


def _states(reply: str, fact: str) -> bool:
    """Whether the squashed reply states the fact as a whole: not inside a longer number or word
    (order 58963 is not in 589631, "6. oktober" not in "16. oktober"); a word may go on after it
    ("3 werktag" is in "3 werktagen")."""
    return re.search(r"(?<!\w)" + re.escape(_squash(fact)) + r"(?!\d)", reply) is not None


def support_reply(answer: str, example: Example, language: str) -> Scores:
    """In the recipe's language (function-word identification) and stating every required fact
    (order numbers, dates, amounts: the example's meta.facts) verbatim."""
    facts = example.meta["facts"]  # a non-empty list of strings: check_references saw to it
    reply = _squash(answer)
    found = sum(1 for fact in facts if _states(reply, fact))
    right_language = detect_language(answer) == primary_subtag(language)
    all_facts = found == len(facts)
    return {"support_reply": float(right_language and all_facts), "right_language": float(right_language),
            "facts_recall": found / len(facts) if facts else 1.0}


# --- classification -----------------------------------------------------------------------------
CLASSIFICATION_METRIC = "label_accuracy"


def label_accuracy(answer: str, example: Example, language: str) -> Scores:
    """The predicted label (the head's most likely one) is the example's label."""
    return {CLASSIFICATION_METRIC: float(answer == example.completion.strip())}


def check_references(metric: str, examples: list[Example], what: str) -> None:
    """Refuse held-out references the metric cannot score, before any training: for ``json_fields``
    each completion is a non-empty JSON object (the fields an answer must give); for ``support_reply``
    each example's ``meta.facts`` is a non-empty list of strings."""
    if metric == "support_reply":
        for number, example in enumerate(examples, start=1):
            facts = example.meta.get("facts")
            if not isinstance(facts, list) or not facts or not all(isinstance(f, str) and f.strip() for f in facts):
                raise DataError(f"{what}: example {number}: metric support_reply needs meta.facts, a non-empty list "
                                f"of the facts a reply must state (strings), not {str(facts)[:40]}")
        return
    if metric != "json_fields":
        return
    for number, example in enumerate(examples, start=1):
        try:
            want = json.loads(example.completion)
        except json.JSONDecodeError as exc:
            raise DataError(f"{what}: example {number}: metric json_fields needs a JSON object as the "
                            f"completion ({exc.msg}, column {exc.colno})") from None
        if not isinstance(want, dict) or not want:
            raise DataError(f"{what}: example {number}: metric json_fields needs a non-empty JSON object as the "
                            f"completion, not {example.completion[:40]!r}")


METRICS: dict[str, Metric] = {
    m.name: m for m in (
        Metric("sql_exact_match", "generated SQL equals the reference after normalisation", sql_exact_match),
        Metric("json_fields", "valid JSON object with exactly the right fields and values", json_fields),
        Metric("support_reply", "reply in the right language that states every required fact", support_reply),
        Metric(CLASSIFICATION_METRIC, "a classifier's predicted label is the right one", label_accuracy),
    )
}


def aggregate(per_example: list[Scores]) -> Scores:
    keys = per_example[0].keys() if per_example else ()
    return {key: sum(s[key] for s in per_example) / len(per_example) for key in keys}
