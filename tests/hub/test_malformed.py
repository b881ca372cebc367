"""Bad input in user files and stored rows: refused with a HubError that names what is wrong, never
a raw traceback, and never a row that makes the registry unreadable."""

import json
import shutil
import sqlite3
import struct

import pytest

from hotswap.hub import (IncompatibleAdapter, InUseError, InvalidMetadata, UnsafeContent, classifier_label_names,
                         classifier_labels, is_classifier)
from hotswap.hub.cli import main
from hotswap.hub.compat import read_safetensors_header

from .conftest import TINY_SOURCE


def _write_header(path, header) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def _adapter_folder(tmp_path, header=None, **config):
    """A hand-made adapter folder for the tiny base: its config, and a weights file holding `header` only."""
    folder = tmp_path / "adapter"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": TINY_SOURCE, "peft_type": "LORA", "r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj"], **config}))
    _write_header(folder / "adapter_model.safetensors", {} if header is None else header)
    return folder


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_metric_is_refused_before_anything_is_stored(registry, tiny_base_dir, tmp_path, value):
    folder = shutil.copytree(tiny_base_dir, tmp_path / "copy")
    (folder / "notes.txt").write_text("bytes no version holds yet")
    blobs = registry.blobs.all_digests()
    with pytest.raises(InvalidMetadata, match=r"metrics\.acc: .*finite"):
        registry.publish(folder, name="copy", kind="base", metrics={"acc": value, "loss": 0.5})
    assert registry.blobs.all_digests() == blobs and [v.ref for v in registry.list()] == ["tiny@1"]


def test_the_cli_refuses_a_nan_metric(capsys, registry, tiny_base_dir):
    with pytest.raises(SystemExit) as exit_:
        main(["hub", "publish", str(tiny_base_dir), "--name", "copy", "--kind", "base", "--metric", "acc=nan",
              "--home", str(registry.home)])
    assert exit_.value.code == 1 and "metrics.acc" in capsys.readouterr().err
    assert [v.ref for v in registry.list()] == ["tiny@1"]


def test_a_stored_row_with_a_null_metric_stays_listable_and_removable(registry, make_adapter):
    """An earlier release stored a NaN metric, as null, in the base's row; nothing may trip over it."""
    with sqlite3.connect(registry.home / "index.sqlite") as db:
        (text,) = db.execute("SELECT metadata FROM versions WHERE name = 'tiny'").fetchone()
        db.execute("UPDATE versions SET metadata = ? WHERE name = 'tiny'",
                   (json.dumps({**json.loads(text), "metrics": {"acc": None, "loss": 0.5}}),))
    assert [v.ref for v in registry.list()] == ["tiny@1"]
    assert registry.resolve("tiny").metadata.metrics == {"loss": 0.5}
    adapter = registry.publish(make_adapter(), name="sql").version  # its base matched among the listed ones
    assert adapter.metadata.base == "tiny@1" and registry.verify() == [] and registry.gc() == (0, 0)
    with pytest.raises(InUseError, match="refusing to remove tiny@1"):
        registry.remove("tiny@1")
    registry.remove("sql@1", force=True)
    assert registry.remove("tiny@1", force=True).ref == "tiny@1" and registry.list() == []


@pytest.mark.parametrize("header,problem", [
    ([], "its header is not a JSON object"),
    ({"w": 3}, "tensor 'w' has no dtype and shape"),
    ({"w": {"dtype": "F32"}}, "tensor 'w' has no dtype and shape"),
    ({"w": {"dtype": "F32", "shape": ["2"]}}, "tensor 'w' has no dtype and shape"),
    ({"w": {"shape": [2]}}, "tensor 'w' has no dtype and shape"),
])
def test_a_malformed_safetensors_header_is_refused(registry, tmp_path, header, problem):
    folder = _adapter_folder(tmp_path, header, task_type="SEQ_CLS")
    with pytest.raises(UnsafeContent, match=f"adapter_model.safetensors is not a safetensors file: {problem}"):
        registry.publish(folder, name="bad")
    assert classifier_label_names(folder) is None  # a reader says it cannot tell, and does not crash
    assert [v.ref for v in registry.list()] == ["tiny@1"]


def test_a_safetensors_header_keeps_its_metadata_entry_apart(tmp_path):
    _write_header(tmp_path / "w.safetensors", {"__metadata__": {"format": "pt"},
                                               "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}})
    assert read_safetensors_header(tmp_path / "w.safetensors") == {"w": [2, 3]}


@pytest.mark.parametrize("targets,problem", [
    ("(q_proj", "is not a valid regular expression"),
    ([1, 2], "must be a list of module names or one regular expression"),
    ({"q_proj": True}, "must be a list of module names or one regular expression"),
])
def test_unusable_target_modules_are_refused(registry, tmp_path, targets, problem):
    with pytest.raises(IncompatibleAdapter, match=f"target_modules in adapter_config.json {problem}"):
        registry.publish(_adapter_folder(tmp_path, target_modules=targets), name="bad")
    assert [v.ref for v in registry.list()] == ["tiny@1"]


@pytest.mark.parametrize("num_labels", ["three", 0, -1, 2.5, True, 1_000_001])
def test_an_unusable_num_labels_is_refused_and_readers_do_not_crash(registry, tiny_base_dir, tmp_path, num_labels):
    folder = shutil.copytree(tiny_base_dir, tmp_path / "classifier")
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["LlamaForSequenceClassification"], num_labels=num_labels)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidMetadata, match="num_labels in config.json must be an integer from 1 to"):
        registry.publish(folder, name="classifier", kind="model", base="tiny")
    assert [v.ref for v in registry.list()] == ["tiny@1"]
    assert is_classifier(folder) and classifier_label_names(folder) is None


def test_num_labels_gives_the_label_count_when_id2label_is_absent():
    config = {"architectures": ["LlamaForSequenceClassification"]}
    assert classifier_labels(config) == ("LABEL_0", "LABEL_1")
    assert classifier_labels({**config, "num_labels": 3}) == ("LABEL_0", "LABEL_1", "LABEL_2")
