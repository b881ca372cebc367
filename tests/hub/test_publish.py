"""Rules 1-5 and 9: kinds, immutable content-addressed versions, metadata, compatibility."""

import json
import shutil

import pytest

from hotswap.hub import IncompatibleAdapter, InvalidMetadata, NotFoundError, Registry

from .conftest import save_tiny_base


def test_publish_versions_and_metadata(registry, make_adapter):
    first = registry.publish(make_adapter(rank=4, seed=1), name="sql", task="text-to-sql", language="en",
                             tags={"team": "data"}, metrics={"exact_match": 0.5})
    assert first.created and first.version.ref == "sql@1"
    meta = first.version.metadata
    base = registry.resolve("tiny")
    assert (meta.kind, meta.base, meta.base_fingerprint) == ("adapter", "tiny@1", base.metadata.fingerprint)
    assert (meta.peft_type, meta.rank, meta.alpha, meta.target_modules) == ("LORA", 4, 8, ["q_proj", "v_proj"])
    assert meta.size_bytes > 0 and meta.tags == {"team": "data"} and meta.metrics == {"exact_match": 0.5}
    assert base.metadata.fingerprint.startswith("sha256:") and base.metadata.source == "org/tiny-llama"

    second = registry.publish(make_adapter(rank=8, seed=2), name="sql")
    assert second.version.ref == "sql@2"
    assert registry.resolve("sql").version == 2  # latest moved
    assert registry.resolve("sql@1").digest == first.version.digest  # old version unchanged
    assert [v.version for v in registry.versions("sql")] == [1, 2]


def test_identical_content_is_stored_once_and_reported(registry, make_adapter, tmp_path):
    folder = make_adapter(seed=3)
    first = registry.publish(folder, name="sql")
    blobs_before = registry.blobs.all_digests()
    copy = shutil.copytree(folder, tmp_path / "copy")
    again = registry.publish(copy, name="sql")
    assert not again.created and again.version.ref == "sql@1"
    other = registry.publish(copy, name="sql-copy")  # another name: new entry, no new bytes
    assert other.created and other.version.digest == first.version.digest
    assert registry.blobs.all_digests() == blobs_before


def test_base_matched_from_adapter_config_or_refused(registry, make_adapter):
    folder = make_adapter()
    assert registry.publish(folder, name="auto").version.metadata.base == "tiny@1"
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/unknown-model"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(NotFoundError, match="org/unknown-model.*matches no base.*--base"):
        registry.publish(folder, name="auto2")
    assert registry.publish(folder, name="auto2", base="tiny").created
    with pytest.raises(InvalidMetadata, match="auto@1 is an adapter, not a base"):  # said before reading it as one
        registry.publish(make_adapter(seed=5), name="auto3", base="auto")
    registry.alias("tiny@1", "prod")
    assert {v.ref for v in registry.list(base="tiny@prod")} == {v.ref for v in registry.list(base="tiny")} == {
        "auto@1", "auto2@1"}


@pytest.mark.parametrize("change, message", [
    ({"r": 999}, "has rank 4, but adapter_config.json gives r=999"),
    ({"r": 2, "rank_pattern": {"v_proj": 3}}, r"gives r=2 and rank_pattern ranks \[3\]"),
    ({"r": "4"}, "r and rank_pattern values must be positive integers"),
])
def test_a_config_that_misstates_the_rank_is_refused(registry, make_adapter, change, message):
    folder = make_adapter()
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 4
    (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(IncompatibleAdapter, match=message):
        registry.publish(folder, name="misstated", base="tiny")
    assert registry.list(kind="adapter") == []


def test_incompatible_shapes_refused_naming_module(registry, make_adapter, tmp_path):
    other_base = save_tiny_base(tmp_path / "wide", hidden=32)
    folder = make_adapter(base_dir=other_base)
    with pytest.raises(IncompatibleAdapter, match=r"module 'model\.layers\.0\.self_attn\.q_proj'.*shape \[4, 32\]"
                                                  r".*\[64, 64\]"):
        registry.publish(folder, name="wrong", base="tiny")
    assert registry.list(kind="adapter") == []


def test_edge_lora_with_peft_base_copies_is_published_and_copies_are_shape_checked(registry, make_adapter):
    """PEFT saves the base's embedding and lm_head (``...base_layer.weight``) beside their LoRA."""
    from safetensors.torch import load_file, save_file

    folder = make_adapter(targets=("embed_tokens", "lm_head", "q_proj"))
    tensors = load_file(folder / "adapter_model.safetensors")
    copy = "base_model.model.model.embed_tokens.base_layer.weight"
    assert copy in tensors
    assert registry.publish(folder, name="edges").created
    tensors[copy] = tensors[copy][:, :8].contiguous()
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(IncompatibleAdapter, match=r"module 'model\.embed_tokens'.*a replacement must have shape"):
        registry.publish(folder, name="edges2")


def test_unknown_target_module_refused(registry, make_adapter):
    folder = make_adapter()
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "qkv_proj"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(IncompatibleAdapter, match="target module 'qkv_proj' does not exist in base tiny@1"):
        registry.publish(folder, name="wrong")


def test_metadata_validated(registry, make_adapter):
    with pytest.raises(InvalidMetadata, match="language.*BCP-47"):
        registry.publish(make_adapter(), name="x", language="english")
    with pytest.raises(InvalidMetadata, match="kind 'lora' is not one of"):
        registry.publish(make_adapter(), name="x", kind="lora")
    registry.publish(make_adapter(), name="x", language="pt-BR")
    with pytest.raises(InvalidMetadata, match="x is an adapter; it cannot take a base"):
        registry.publish(make_adapter(), name="x", kind="base")


def test_full_model_kind_has_lineage_and_must_match_base(registry, tiny_base_dir, tmp_path):
    finetuned = save_tiny_base(tmp_path / "ft", seed=7)
    model = registry.publish(finetuned, name="tiny-ft", kind="model", base="tiny")
    meta = model.version.metadata
    assert meta.base == "tiny@1" and meta.fingerprint != registry.resolve("tiny").metadata.fingerprint
    with pytest.raises(InvalidMetadata, match="must name its base"):
        registry.publish(finetuned, name="tiny-ft2", kind="model")
    with pytest.raises(IncompatibleAdapter, match="shape"):
        registry.publish(save_tiny_base(tmp_path / "narrow", hidden=32), name="tiny-ft3", kind="model", base="tiny")


def test_a_full_classifier_model_must_hold_a_head_over_its_labels(registry, tiny_base_dir, tmp_path):
    """A *ForSequenceClassification checkpoint keeps the base's tensors and adds ``score [labels, hidden]``."""
    from transformers import LlamaForSequenceClassification

    folder = tmp_path / "intent"
    model = LlamaForSequenceClassification.from_pretrained(tiny_base_dir, num_labels=3)
    model.save_pretrained(folder)
    published = registry.publish(folder, name="intent", kind="model", base="tiny")
    assert published.version.metadata.kind == "model"
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {str(i): f"l{i}" for i in range(4)}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(IncompatibleAdapter, match=r"needs its head score.weight of shape \[4, \d+\] \(4 labels in "
                                                  r"config.json\), but it has shape \[3, \d+\]"):
        registry.publish(folder, name="intent2", kind="model", base="tiny")
    assert [v.ref for v in registry.list(kind="model")] == ["intent@1"]


def test_list_filters(registry, make_adapter):
    registry.publish(make_adapter(seed=1), name="sql", task="text-to-sql", language="en", tags={"tier": "gold"})
    registry.publish(make_adapter(seed=2), name="support-es", task="support", language="es")
    refs = lambda **kw: [v.ref for v in registry.list(**kw)]  # noqa: E731
    assert refs(kind="adapter") == ["sql@1", "support-es@1"]
    assert refs(kind="base") == ["tiny@1"]
    assert refs(language="es") == ["support-es@1"]
    assert refs(task="text-to-sql") == ["sql@1"]
    assert refs(tag="tier=gold") == refs(tag="tier") == ["sql@1"]
    assert refs(base="tiny") == refs(base="tiny@1") == ["sql@1", "support-es@1"]


def test_registry_reopens_from_disk(registry, make_adapter):
    registry.publish(make_adapter(), name="sql", aliases=["prod"])
    again = Registry(registry.home)
    assert again.resolve("sql@prod").ref == "sql@1"
    snap = again.open("sql@prod")
    assert sorted(p.name for p in snap.path.iterdir()) == ["README.md", "adapter_config.json",
                                                           "adapter_model.safetensors"]
