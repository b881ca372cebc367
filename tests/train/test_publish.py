"""Publishing through the registry: lineage, metrics, `latest`, full checkpoints as kind model,
exported artifacts published later, and refusals that happen before any training."""

from __future__ import annotations

import json

import pytest

from hotswap.train.errors import RecipeError, TrainError
from hotswap.train.publish import publish_artifact, publish_result
from hotswap.train.recipe import load_recipe
from hotswap.train.run import export, prepare, run

from .conftest import TINY_SOURCE


def _run(folder, registry, run_dir, **kw):
    return run(prepare(load_recipe(folder, kw.pop("overrides", ())), registry), run_dir, show_progress=False, **kw)


def test_published_adapter_carries_lineage_and_metrics(write_recipe, registry, tmp_path):
    folder = write_recipe(steps=4)
    result = _run(folder, registry, tmp_path / "run", eval_base=True)
    published = publish_result(registry, result)
    version = registry.resolve("colours")
    assert published.created and version == published.version and version.kind == "adapter"
    meta = version.metadata
    base = registry.resolve("tiny")
    assert meta.base == base.ref and meta.base_fingerprint == base.metadata.fingerprint
    assert meta.task == "colours" and meta.language == "en" and meta.rank == 4
    assert meta.tags == {"method": "lora", "recipe": "colours", "metric": "sql_exact_match"}
    assert set(meta.metrics) >= {"sql_exact_match", "eval_loss", "base_sql_exact_match"}
    lineage = meta.lineage
    loaded = load_recipe(folder)
    assert lineage["recipe"]["digest"] == loaded.digest and lineage["recipe"]["text"] == loaded.text
    train_sha = "sha256:" + __import__("hashlib").sha256((folder / "train.jsonl").read_bytes()).hexdigest()
    assert lineage["dataset"]["train"] == train_sha and lineage["dataset"]["num_train"] == 8
    assert lineage["base"] == {"ref": base.ref, "fingerprint": base.metadata.fingerprint, "source": TINY_SOURCE}
    assert lineage["method"] == "lora" and lineage["seed"] == 0 and lineage["steps"] == 4
    assert set(lineage["libraries"]) == {"hotswap", "torch", "transformers", "peft"}
    stored = json.loads((registry.open("colours").path / "adapter_config.json").read_text())
    assert stored["base_model_name_or_path"] == TINY_SOURCE
    assert sorted(p.name for p in registry.open("colours").path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]


def test_second_publish_moves_latest(write_recipe, registry, tmp_path):
    folder = write_recipe(steps=2)
    first = publish_result(registry, _run(folder, registry, tmp_path / "a"))
    second = publish_result(registry, _run(folder, registry, tmp_path / "b", overrides=["train.seed=3"]),
                            aliases=("prod",))
    assert (first.version.version, second.version.version) == (1, 2)
    assert registry.resolve("colours").version == 2 and registry.aliases("colours")["prod"] == 2


def test_full_fine_tune_publishes_a_model_with_its_base(write_recipe, registry, tmp_path):
    result = _run(write_recipe(method="full", steps=2), registry, tmp_path / "run")
    published = publish_result(registry, result)
    version = published.version
    assert version.name == "colours-full" and version.kind == "model"
    assert version.metadata.base == registry.resolve("tiny").ref
    assert version.metadata.lineage["method"] == "full"
    files = {p.name for p in registry.open(version).path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files


def test_exported_artifact_publishes_later_with_its_records(write_recipe, registry, tmp_path):
    folder = write_recipe(steps=2)
    result = _run(folder, registry, tmp_path / "run")
    shipped = export(result, tmp_path / "artifact")
    assert sorted(p.name for p in shipped.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "lineage.json", "metrics.json"]
    published = publish_artifact(registry, load_recipe(folder), shipped)
    assert published.version.metadata.lineage == result.lineage
    assert published.version.metadata.metrics["sql_exact_match"] == result.metrics["sql_exact_match"]
    lineage = json.loads((shipped / "lineage.json").read_text())
    lineage["base"]["fingerprint"] = "sha256:other"
    (shipped / "lineage.json").write_text(json.dumps(lineage))
    with pytest.raises(TrainError, match="trained on a base with fingerprint sha256:other"):
        publish_artifact(registry, load_recipe(folder), shipped)


def test_a_run_folder_publishes_later_and_bad_records_are_named(write_recipe, registry, tmp_path):
    """A run folder (or its artifact/) publishes without retraining; records that cannot be read, or
    that lack what publishing needs, are refused with the file named."""
    result = _run(write_recipe(steps=1), registry, tmp_path / "run")
    loaded = result.loaded
    for folder in (tmp_path / "run", tmp_path / "run" / "artifact"):
        published = publish_artifact(registry, loaded, folder)
        assert published.version.ref == "colours@1" and published.version.metadata.lineage == result.lineage
    files = {p.name for p in registry.open("colours@1").path.iterdir()}
    assert files == {"adapter_config.json", "adapter_model.safetensors"}  # no answers, history or records
    shipped = export(result, tmp_path / "export")
    (shipped / "metrics.json").write_text('{"metrics": ')
    with pytest.raises(TrainError, match=r"export/metrics\.json is not readable JSON"):
        publish_artifact(registry, loaded, shipped)
    shipped = export(result, tmp_path / "export")
    lineage = json.loads((shipped / "lineage.json").read_text())
    del lineage["method"]
    (shipped / "lineage.json").write_text(json.dumps(lineage))
    with pytest.raises(TrainError, match=r"lineage\.json must give \"method\""):
        publish_artifact(registry, loaded, shipped)
    with pytest.raises(TrainError, match="lacks metrics.json"):
        publish_artifact(registry, loaded, tmp_path)
    other = load_recipe(write_recipe(name="support-bot"))  # another recipe would publish it under its own tags
    with pytest.raises(TrainError, match="was trained by recipe 'colours', not 'support-bot'"):
        publish_artifact(registry, other, tmp_path / "run")


def test_export_replaces_an_earlier_export_and_refuses_other_folders(write_recipe, registry, tmp_path):
    folder = write_recipe(steps=1)
    export(_run(folder, registry, tmp_path / "lora"), tmp_path / "out")
    export(_run(folder, registry, tmp_path / "full", overrides=["method=full"]), tmp_path / "out")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "model.safetensors" in names and "adapter_model.safetensors" not in names  # no mix of the two
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(TrainError, match="holds files that are not an earlier export"):
        export(_run(folder, registry, tmp_path / "again"), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_an_interrupted_export_leaves_the_earlier_one_whole(write_recipe, registry, tmp_path, monkeypatch):
    import shutil

    from hotswap.train import run as run_module

    folder = write_recipe(steps=1)
    first, second = _run(folder, registry, tmp_path / "a"), _run(folder, registry, tmp_path / "b", overrides=["train.seed=1"])
    out = export(first, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    copies, real_copy = [], shutil.copy2

    def copy_then_interrupt(src, dst):  # Ctrl-C after the first file of the new export
        if copies:
            raise KeyboardInterrupt
        copies.append(real_copy(src, dst))

    monkeypatch.setattr(run_module.shutil, "copy2", copy_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        export(second, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    export(second, out)  # the interrupted one's leftovers are no obstacle
    assert (out / "adapter_model.safetensors").read_bytes() == (second.artifact / "adapter_model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


def test_json_fields_references_that_are_not_objects_are_refused_before_training(write_recipe, registry):
    from hotswap.train.errors import DataError

    folder = write_recipe(metric="json_fields")  # the fruit data's completions are plain words
    with pytest.raises(DataError, match=r"eval\.jsonl: example 1: metric json_fields needs a JSON object"):
        prepare(load_recipe(folder), registry)
    records = [{"prompt": "p", "completion": "{}"}]
    folder = write_recipe(metric="json_fields", eval_records=records)
    with pytest.raises(DataError, match="needs a non-empty JSON object as the completion, not '{}'"):
        prepare(load_recipe(folder), registry)


def test_unknown_base_refused_before_training(write_recipe, registry):
    with pytest.raises(RecipeError, match="base 'nope'.*no entry named 'nope'"):
        prepare(load_recipe(write_recipe(base="nope")), registry)


def test_missing_target_module_refused_before_training(write_recipe, registry):
    folder = write_recipe(targets='["q_proj", "qkv_proj"]')
    with pytest.raises(RecipeError, match=r"'qkv_proj' not in base tiny@1 \(its linear modules: .*q_proj"):
        prepare(load_recipe(folder), registry)


def test_malformed_data_refused_before_training(write_recipe, registry):
    folder = write_recipe()
    with open(folder / "train.jsonl", "a") as handle:
        handle.write('{"prompt": "x", "completion": "y"\n')
    from hotswap.train.errors import DataError

    with pytest.raises(DataError, match=r"train\.jsonl:9: malformed JSON"):
        prepare(load_recipe(folder), registry)


def test_dora_and_rslora_train_and_publish(write_recipe, registry, tmp_path):
    folder = write_recipe(method="dora", steps=2, extra="")
    result = _run(folder, registry, tmp_path / "run", overrides=["lora.rslora=true"])
    config = json.loads((result.artifact / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True
    version = publish_result(registry, result).version
    assert version.kind == "adapter" and version.metadata.tags["method"] == "dora"


def test_publishing_an_export_copies_none_of_its_files(write_recipe, registry, tmp_path, monkeypatch):
    """The export's files are staged as hard links: a full model is not written out twice, and a
    publish killed mid-way leaves no copy of it in the temporary folder."""
    import shutil

    folder = write_recipe(method="full", steps=1)
    shipped = export(_run(folder, registry, tmp_path / "run"), tmp_path / "export")

    def no_copy(*args, **kwargs):
        raise AssertionError("copied a file of the export")

    monkeypatch.setattr(shutil, "copy2", no_copy)
    published = publish_artifact(registry, load_recipe(folder), shipped)
    assert published.created and published.version.name == "colours-full"
    files = {p.name for p in registry.open(published.version).path.iterdir()}
    assert "model.safetensors" in files and not files & {"metrics.json", "lineage.json"}
