"""Recipes: one TOML file per adapter the project ships, validated before any training starts.

A recipe names its base (a registry reference), its task and language, its data, the method,
the hyperparameters and the metric. Unknown fields are refused with their dotted path, so a
typo never silently falls back to a default. `--set section.key=value` overrides apply to the
raw TOML before validation, so they are checked exactly like the file."""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hotswap.hub import InvalidName, check_identifier

from .errors import RecipeError

Method = Literal["lora", "dora", "full"]
METHODS: tuple[str, ...] = ("lora", "dora", "full")
RECIPE_FILE = "recipe.toml"

# BCP-47 as people write it: language, optional script, optional region, optional variants.
_BCP47 = re.compile(r"[a-zA-Z]{2,3}(-[a-zA-Z]{4})?(-([a-zA-Z]{2}|[0-9]{3}))?(-([a-zA-Z0-9]{5,8}|[0-9][a-zA-Z0-9]{3}))*")


class _Section(BaseModel):
    # inf and nan are valid TOML, but no learning rate, epoch count or scale can be either. Strict: a
    # value of another TOML type is refused, not converted (`rank = true` is no rank 1, `rslora = 1` no
    # switch); an integer still counts as a float.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)


class DataFiles(_Section):
    train: str = Field(description="training set, JSONL, relative to the recipe's folder")
    eval: str = Field(description="held-out evaluation set, JSONL, relative to the recipe's folder")


class LoraSettings(_Section):
    rank: int = Field(8, ge=1, le=1024, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rslora)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="module names (leaf names such as q_proj) or 'all-linear'",
    )
    rslora: bool = Field(False, description="rank-stabilised scaling alpha/sqrt(r)")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not value:
            raise ValueError("name at least one module, or 'all-linear'")
        return value


class TrainSettings(_Section):
    lr: float = Field(1e-3, gt=0, description="peak learning rate for adapter methods (lora, dora)")
    full_lr: float = Field(5e-5, gt=0, description="peak learning rate for full fine-tuning")
    epochs: float = Field(1.0, gt=0, description="passes over the training set (fractions allowed)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs when set")
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_length: int = Field(256, ge=8, description="tokens per example after the chat template; longer ones are cut")
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    # the data order draws from seed * 1_000_003 + epoch, which a 64-bit generator seed must hold
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds the initial weights, data order and dropout")
    checkpoint_every: int = Field(0, ge=0, description="save a resumable checkpoint every N steps (0: only at the end)")


class EvalSettings(_Section):
    every: int = Field(0, ge=0, description="held-out loss every N steps (0: only at the end)")
    patience: int = Field(0, ge=0, description="stop after N evaluations without improvement (0: never)")
    min_delta: float = Field(0.0, ge=0, description="improvement smaller than this counts as none")
    max_new_tokens: int = Field(64, ge=1, description="generation budget when scoring the metric")
    batch_size: int = Field(16, ge=1)
    limit: int | None = Field(None, ge=1, description="score only the first N held-out examples")


class Recipe(_Section):
    name: str = Field(description="registry name the result is published under")
    base: str = Field("smollm2", description="registry reference of the base model")
    task: str
    language: str = Field(description="BCP-47 tag of the language the adapter serves")
    description: str = ""
    method: Method = "lora"
    metric: str = Field(description="name of the held-out metric (see hotswap.train.metrics)")
    system: str | None = Field(None, description="system prompt put before every example's messages")
    labels: list[str] | None = Field(None, description=(
        "a classification recipe: the label names, class 0 first; each example's completion is one of them. "
        "The result is a sequence-classification adapter (PEFT task_type SEQ_CLS) with its own head, or with "
        "method full a whole sequence-classification model"))
    data: DataFiles
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        try:  # the registry's own rule, so a run is never refused its name only after training
            return check_identifier(value, "name")
        except InvalidName as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _full_name_fits(self) -> Recipe:
        if self.method == "full":  # published as <name>-full
            try:
                check_identifier(f"{self.name}-full", "name")
            except InvalidName as exc:
                raise ValueError(f"a full fine-tune is published as <name>-full: {exc}") from None
        return self

    @field_validator("language")
    @classmethod
    def _bcp47(cls, value: str) -> str:
        if not _BCP47.fullmatch(value):
            raise ValueError(f"{value!r} is not a BCP-47 language tag (e.g. en, de, es, pt-BR)")
        return value

    @model_validator(mode="after")
    def _known_metric(self) -> Recipe:
        from .metrics import CLASSIFICATION_METRIC, METRICS

        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r} (known: {', '.join(sorted(METRICS))})")
        if (self.labels is not None) != (self.metric == CLASSIFICATION_METRIC):
            raise ValueError(f"metric {CLASSIFICATION_METRIC!r} goes with labels (a classification recipe), and only with them")
        if self.metric == "support_reply":  # it checks the reply's language: one it cannot tell would score 0
            from .langid import STOPWORDS, primary_subtag

            if primary_subtag(self.language) not in STOPWORDS:
                raise ValueError(f"metric support_reply tells the languages {', '.join(sorted(STOPWORDS))} apart, "
                                 f"not {self.language!r}")
        return self

    @model_validator(mode="after")
    def _classifier(self) -> Recipe:
        if self.labels is None:
            return self
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels) or not all(n.strip() for n in self.labels):
            raise ValueError("labels: give at least two distinct, non-empty names")
        return self

    @property
    def classifier(self) -> bool:
        return self.labels is not None


class LoadedRecipe(BaseModel):
    """A validated recipe with where it came from: the folder data paths are relative to."""

    model_config = ConfigDict(frozen=True)

    recipe: Recipe
    folder: Path
    text: str = Field(description="the recipe file as written")
    overrides: tuple[str, ...] = ()

    @property
    def train_path(self) -> Path:
        return self.folder / self.recipe.data.train

    @property
    def eval_path(self) -> Path:
        return self.folder / self.recipe.data.eval

    @property
    def digest(self) -> str:
        """sha256 of the effective recipe (file plus overrides), canonical JSON."""
        effective = self.recipe.model_dump(mode="json")
        if effective["labels"] is None:  # a field added later: recipes without it keep their digests
            del effective["labels"]
        blob = json.dumps(effective, sort_keys=True).encode()
        return "sha256:" + hashlib.sha256(blob).hexdigest()

    def with_method(self, method: str | None) -> LoadedRecipe:
        if method is None or method == self.recipe.method:
            return self
        return self.model_copy(update={"recipe": _validate({**self.recipe.model_dump(), "method": method}, self.folder)})


def recipe_path(spec: str | Path) -> Path:
    """A recipe is named by its file or by the folder holding `recipe.toml`."""
    path = Path(spec)
    if path.is_dir():
        path = path / RECIPE_FILE
    if not path.is_file():
        raise RecipeError(f"no recipe at {spec} (give a recipe.toml file or a folder holding one)")
    return path


def load_recipe(spec: str | Path, overrides: list[str] | tuple[str, ...] = (), method: str | None = None) -> LoadedRecipe:
    """Read, override and validate a recipe; raise `RecipeError` naming every bad field."""
    path = recipe_path(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text ({exc})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML: {exc}") from None
    for item in overrides:
        _apply_override(raw, item)
    if method is not None:
        raw["method"] = method
    recipe = _validate(raw, path)
    return LoadedRecipe(recipe=recipe, folder=path.parent.resolve(), text=text, overrides=tuple(overrides))


def _validate(raw: dict[str, Any], where: Path) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "recipe"
            message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{field}: {message}")
        raise RecipeError(f"{where}: invalid recipe: " + "; ".join(problems)) from None


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=2e-4")
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = _parse_value(text.strip())


def _parse_value(text: str) -> Any:
    """A TOML value (number, bool, list, quoted string); anything else is taken as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
