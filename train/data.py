"""Training and held-out examples read from JSONL.

Each line is one JSON object in one of two shapes:
  {"prompt": "...", "completion": "..."}                      a single user turn and its answer
  {"messages": [{"role": ..., "content": ...}, ..., {"role": "assistant", ...}]}
                                                              a chat; the last assistant turn is the answer
Either may carry "meta": {...}, handed to the metric (e.g. the facts a reply must state).
A line that breaks these rules is refused with its file and line number."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, slots=True)
class Example:
    """One conversation: the turns before the answer, the answer, and what the metric needs."""

    messages: tuple[dict[str, str], ...]  # system/user/assistant turns before the answer
    completion: str
    meta: dict[str, Any] = field(default_factory=dict)

    def prompt_messages(self, system: str | None) -> list[dict[str, str]]:
        """The turns the model sees, with the recipe's system prompt first unless the example has one."""
        turns = list(self.messages)
        if system is not None and not (turns and turns[0]["role"] == "system"):
            turns.insert(0, {"role": "system", "content": system})
        return turns


def read_jsonl(path: Path) -> list[Example]:
    """Every example of a JSONL file; `DataError` names the file and line of the first bad one."""
    path = Path(path)
    try:
        # lines end at "\n" only: JSON strings may hold U+2028 and U+2029, which splitlines() splits on
        lines = [line.removesuffix("\r") for line in path.read_text(encoding="utf-8").split("\n")]
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file") from None
    except OSError as exc:  # a folder, no permission
        raise DataError(f"{path}: not readable ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: malformed JSON: {exc.msg} (column {exc.colno})") from None
        try:
            examples.append(_example(record))
        except ValueError as exc:
            raise DataError(f"{path}:{number}: {exc}") from None
    if not examples:
        raise DataError(f"{path}: holds no examples")
    return examples


def _example(record: Any) -> Example:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    meta = record.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError("'meta' must be an object")
    unknown = set(record) - {"prompt", "completion", "messages", "meta"}
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))} (use prompt/completion or messages, and meta)")
    if "messages" in record:
        if "prompt" in record or "completion" in record:
            raise ValueError("give either 'messages' or 'prompt'/'completion', not both")
        return _from_messages(record["messages"], meta)
    for key in ("prompt", "completion"):
        if not isinstance(record.get(key), str):
            raise ValueError(f"missing string field {key!r}")
    if not record["completion"].strip():
        raise ValueError("'completion' is empty")
    return Example(({"role": "user", "content": record["prompt"]},), record["completion"], meta)


def _from_messages(messages: Any, meta: dict[str, Any]) -> Example:
    if not isinstance(messages, list) or len(messages) < 2:
        raise ValueError("'messages' must be a list of at least two turns")
    turns = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or set(turn) != {"role", "content"}:
            raise ValueError(f"messages[{i}] must be an object with exactly 'role' and 'content'")
        if turn["role"] not in ROLES or not isinstance(turn["content"], str):
            raise ValueError(f"messages[{i}]: role must be one of {', '.join(ROLES)} and content a string")
        turns.append({"role": turn["role"], "content": turn["content"]})
    if turns[-1]["role"] != "assistant" or not turns[-1]["content"].strip():
        raise ValueError("the last turn of 'messages' must be a non-empty assistant turn (the answer)")
    return Example(tuple(turns[:-1]), turns[-1]["content"], meta)


def file_digest(path: Path) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def dataset_digest(train: Path, eval_: Path) -> dict[str, str]:
    """Content digests of both files: the dataset half of a published entry's lineage."""
    return {"train": file_digest(train), "eval": file_digest(eval_)}
