"""`hotswap train eval`: the recipe's held-out metric for the base, a registry entry (adapter or
full model) or an adapter folder, scored exactly as a training run scores its result."""

from __future__ import annotations

from pathlib import Path

from hotswap.hub import HubError, Registry, is_classifier

from .classify import load_scored_classifier
from .data import Example, read_jsonl
from .encode import pad_id_of
from .errors import RecipeError, TrainError
from .evaluate import EvalReport, evaluate
from .metrics import check_references
from .model import ADAPTER_FILES, Placement, load_adapter, load_base
from .recipe import LoadedRecipe


def score_target(loaded: LoadedRecipe, registry: Registry, ref: str | None = None,
                 adapter: Path | None = None) -> tuple[str, EvalReport, list[Example]]:
    """(what was scored, its report, the held-out examples)."""
    if ref is not None and adapter is not None:
        raise TrainError("give --ref or --adapter, not both")
    recipe = loaded.recipe
    examples = read_jsonl(loaded.eval_path)
    check_references(recipe.metric, examples, str(loaded.eval_path))
    place = Placement.pick()
    try:
        entry = registry.resolve(ref or recipe.base)
        if entry.kind == "adapter":
            base = registry.open(entry.metadata.base)
            target = registry.open(entry).path
        else:
            base, target = registry.open(entry), None
    except HubError as exc:
        raise RecipeError(str(exc)) from None
    label = entry.ref
    if adapter is not None:
        missing = [f for f in ADAPTER_FILES if not (adapter / f).is_file()]
        if missing:
            raise TrainError(f"{adapter} is not an adapter folder (lacks {', '.join(missing)})")
        target, label = adapter, f"{adapter} on {entry.ref}"
    scored = target if target is not None else base.path if entry.kind == "model" else None
    if not recipe.classifier and scored is not None and is_classifier(scored):
        raise TrainError(f"{label} is a sequence classifier: score it with a classification recipe (labels)")
    if recipe.classifier:  # a head over the labels instead of lm_head (see classify.py)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base.path)
        whole = base.path if entry.kind == "model" and target is None else None
        model = load_scored_classifier(base.path, target, whole, recipe.labels, recipe.train.seed, label,
                                       pad_id_of(tokenizer), place.device)
    else:
        model, tokenizer = load_base(base.path, place.device)
        if target is not None:
            model = load_adapter(model, target, label)
    return label, evaluate(model, tokenizer, examples, recipe, place), examples
