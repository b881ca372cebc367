"""The trainer's refusals. Each message names what was wrong (file and line, field, module);
the CLI prints it on stderr and exits non-zero."""

from __future__ import annotations


class TrainError(Exception):
    """Base class of every refusal the trainer makes."""


class RecipeError(TrainError):
    """A recipe that cannot be trained: bad TOML, unknown field, unknown base or module."""


class DataError(TrainError):
    """A data file that cannot be read: malformed JSONL (with file and line), missing fields."""


class CheckpointError(TrainError):
    """A checkpoint that cannot be resumed (missing, or made by a different recipe)."""


class MergeError(TrainError):
    """Adapters that cannot be merged (different bases, DoRA, wrong weight count)."""
