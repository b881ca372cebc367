"""Recipes: validation names the bad field; overrides are checked like the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from hotswap.train.errors import RecipeError
from hotswap.train.recipe import load_recipe

SHIPPED = sorted(p.parent for p in (Path(__file__).parents[2] / "adapters").glob("*/recipe.toml"))


def test_recipe_loads_with_defaults_and_paths(write_recipe):
    folder = write_recipe()
    loaded = load_recipe(folder)
    assert loaded.recipe.name == "colours" and loaded.recipe.lora.rank == 4
    assert loaded.train_path == folder.resolve() / "train.jsonl"
    assert loaded.digest.startswith("sha256:")


def test_unknown_top_level_field_is_named(write_recipe):
    folder = write_recipe()
    (folder / "recipe.toml").write_text("epochz = 3\n" + (folder / "recipe.toml").read_text())
    with pytest.raises(RecipeError, match=r"epochz: unknown field"):
        load_recipe(folder)


def test_unknown_nested_field_in_lora_is_named(write_recipe):
    folder = write_recipe()
    text = (folder / "recipe.toml").read_text().replace("rank = 4", "rnak = 4")
    (folder / "recipe.toml").write_text(text)
    with pytest.raises(RecipeError, match=r"lora\.rnak: unknown field"):
        load_recipe(folder)


def test_override_applies_and_is_validated(write_recipe):
    folder = write_recipe()
    loaded = load_recipe(folder, ["train.lr=2e-4", "lora.target_modules=['q_proj']", "train.seed=7"])
    assert loaded.recipe.train.lr == 2e-4 and loaded.recipe.lora.target_modules == ["q_proj"]
    assert loaded.digest != load_recipe(folder).digest
    with pytest.raises(RecipeError, match=r"train\.lrr: unknown field"):
        load_recipe(folder, ["train.lrr=1"])
    with pytest.raises(RecipeError, match=r"train\.batch_size"):
        load_recipe(folder, ["train.batch_size=0"])
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        load_recipe(folder, ["train.lr"])


@pytest.mark.parametrize("line, message", [
    ('language = "english"', "BCP-47"),
    ('metric = "bleu"', "unknown metric 'bleu'"),
    ('method = "qlora"', "method"),
    ('name = "Bad Name"', "is not an identifier"),
    ('name = "a..b"', "is not an identifier"),  # the registry's rule: names are never paths
])
def test_bad_values_are_refused(write_recipe, line, message):
    folder = write_recipe()
    key = line.split(" =")[0]
    lines = [line if l.startswith(key + " =") else l for l in (folder / "recipe.toml").read_text().splitlines()]
    (folder / "recipe.toml").write_text("\n".join(lines) + "\n")
    with pytest.raises(RecipeError, match=message):
        load_recipe(folder)


def test_missing_recipe_and_bad_toml(tmp_path):
    with pytest.raises(RecipeError, match="no recipe"):
        load_recipe(tmp_path)
    (tmp_path / "recipe.toml").write_text("name = \n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(tmp_path)


def test_method_switch_keeps_everything_else(write_recipe):
    loaded = load_recipe(write_recipe())
    full = loaded.with_method("full")
    assert full.recipe.method == "full" and full.recipe.lora == loaded.recipe.lora
    assert full.digest != loaded.digest


@pytest.mark.parametrize("folder", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_recipes_validate_and_their_data_reads(folder):
    from hotswap.train.data import read_jsonl

    loaded = load_recipe(folder)
    assert loaded.recipe.base == "smollm2"
    train, held_out = read_jsonl(loaded.train_path), read_jsonl(loaded.eval_path)
    assert len(train) >= 100 and len(held_out) >= 30
    seen = {e.messages[-1]["content"] for e in train}
    assert not any(e.messages[-1]["content"] in seen for e in held_out), "held-out prompts must not be in train"


@pytest.mark.parametrize("folder", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_reference_answers_score_full_marks(folder):
    """The metric accepts every reference answer: a low score is the model's, never the data's."""
    from hotswap.train.data import read_jsonl
    from hotswap.train.metrics import METRICS

    loaded = load_recipe(folder)
    metric = METRICS[loaded.recipe.metric]
    for example in read_jsonl(loaded.eval_path) + read_jsonl(loaded.train_path):
        assert metric.score(example.completion, example, loaded.recipe.language)[metric.name] == 1.0, example


@pytest.mark.parametrize("folder", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_data_is_what_the_generator_writes(folder, tmp_path):
    """The committed JSONL is reproducible from the committed generator."""
    import shutil
    import subprocess
    import sys

    shutil.copy(folder / "make_data.py", tmp_path / "make_data.py")
    subprocess.run([sys.executable, str(tmp_path / "make_data.py")], check=True, capture_output=True)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes(), name


@pytest.mark.parametrize("override, field", [
    ("train.epochs=inf", "train.epochs"), ("train.lr=nan", "train.lr"), ("lora.alpha=inf", "lora.alpha")])
def test_non_finite_numbers_are_refused(write_recipe, override, field):
    with pytest.raises(RecipeError, match=field.replace(".", r"\.") + ": Input should be a finite number"):
        load_recipe(write_recipe(), [override])


def test_a_recipe_that_is_not_utf8_is_named(write_recipe):
    folder = write_recipe()
    (folder / "recipe.toml").write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(RecipeError, match="not UTF-8 text"):
        load_recipe(folder)


def test_support_reply_needs_a_language_it_can_tell(write_recipe):
    folder = write_recipe(metric="support_reply")
    assert load_recipe(folder, ["language=de"]).recipe.language == "de"
    with pytest.raises(RecipeError, match="support_reply tells the languages de, en, .* apart, not 'ja'"):
        load_recipe(folder, ["language=ja"])


def test_a_full_fine_tunes_name_must_fit_with_its_suffix(write_recipe):
    """A full fine-tune is published as <name>-full: a name that fits alone but not with the suffix is
    refused when the recipe loads, not after training."""
    folder = write_recipe(name="n" * 62)
    assert load_recipe(folder).recipe.name == "n" * 62
    with pytest.raises(RecipeError, match="published as <name>-full: name 'n{62}-full' is longer than 64"):
        load_recipe(folder, method="full")


@pytest.mark.parametrize("override, message", [
    ("lora.rank=true", r"lora\.rank: Input should be a valid integer"),  # not rank 1
    ("lora.rslora=1", r"lora\.rslora: Input should be a valid boolean"),
    ("train.batch_size=8.0", r"train\.batch_size: Input should be a valid integer"),
    ("train.lr='1e-3'", r"train\.lr: Input should be a valid number"),
])
def test_a_value_of_another_type_is_refused_not_converted(write_recipe, override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write_recipe(), [override])
    assert load_recipe(write_recipe(), ["lora.alpha=16"]).recipe.lora.alpha == 16  # an integer is a float


@pytest.mark.parametrize("seed, message", [
    (2**32, "less than or equal to 4294967295"), (-1, "greater than or equal to 0")])
def test_a_seed_out_of_range_is_refused_before_training(write_recipe, seed, message):
    """The data order is drawn from seed * 1_000_003 + epoch: a larger seed overflowed the generator's
    64 bits at the first step, after the base had loaded."""
    with pytest.raises(RecipeError, match=r"train\.seed: Input should be " + message):
        load_recipe(write_recipe(), [f"train.seed={seed}"])
    assert load_recipe(write_recipe(), [f"train.seed={2**32 - 1}"]).recipe.train.seed == 2**32 - 1
