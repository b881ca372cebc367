"""The shipped adapters: each committed artifact matches its recipe and data, beats the base by a
wide margin on the same held-out set, and (integration) fits the real embedded base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hotswap.train.data import dataset_digest
from hotswap.train.recipe import load_recipe

ADAPTERS = Path(__file__).parents[2] / "adapters"
SHIPPED = sorted(p.parent.parent for p in ADAPTERS.glob("*/artifact/metrics.json"))
MARGIN = 0.4  # "a wide margin": at least 40 points of the metric above the base


@pytest.mark.parametrize("folder", SHIPPED, ids=[p.name for p in SHIPPED])
def test_artifact_records_match_recipe_and_data(folder):
    loaded = load_recipe(folder)
    artifact = folder / "artifact"
    lineage = json.loads((artifact / "lineage.json").read_text())
    assert lineage["recipe"]["digest"] == loaded.digest, "recipe changed since the artifact was trained"
    assert lineage["recipe"]["overrides"] == []
    digests = dataset_digest(loaded.train_path, loaded.eval_path)
    assert (lineage["dataset"]["train"], lineage["dataset"]["eval"]) == (digests["train"], digests["eval"])
    config = json.loads((artifact / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (artifact / "adapter_model.safetensors").stat().st_size < 12 * 2**20


@pytest.mark.parametrize("folder", SHIPPED, ids=[p.name for p in SHIPPED])
def test_artifact_beats_the_base_widely(folder):
    metrics = json.loads((folder / "artifact" / "metrics.json").read_text())
    assert metrics["metric"] == load_recipe(folder).recipe.metric
    assert metrics["score"] >= metrics["base_score"] + MARGIN, metrics


def test_the_shipped_adapters_are_there():
    assert {p.name for p in SHIPPED} >= {"sql", "extract", "support-de", "support-es", "ticket-topic"}


@pytest.mark.integration
def test_artifacts_publish_onto_the_embedded_base(embedded_home):
    from hotswap.hub import Registry
    from hotswap.train.publish import publish_artifact

    registry = Registry(embedded_home)
    for folder in SHIPPED:
        published = publish_artifact(registry, load_recipe(folder), folder / "artifact")
        meta = published.version.metadata
        assert meta.base_fingerprint == registry.resolve("smollm2").metadata.fingerprint
        assert meta.lineage["recipe"]["name"] == folder.name and meta.metrics


@pytest.mark.integration
@pytest.mark.parametrize("name", ["sql", "ticket-topic"])
def test_artifact_rescores_as_recorded(embedded_home, name):
    """`hotswap train eval` of the committed adapter reproduces its recorded held-out score (greedy
    decoding; the classifier's head labels), and of the base its recorded base score."""
    from hotswap.hub import Registry
    from hotswap.train.scoring import score_target

    folder = ADAPTERS / name
    recorded = json.loads((folder / "artifact" / "metrics.json").read_text())
    loaded, registry = load_recipe(folder), Registry(embedded_home)
    _label, report, _examples = score_target(loaded, registry, adapter=folder / "artifact")
    assert report.score == pytest.approx(recorded["score"], abs=0.05)
    if name == "ticket-topic":  # a quick one: 60 texts labelled, nothing generated
        _label, base, _examples = score_target(loaded, registry)
        assert base.score == pytest.approx(recorded["base_score"], abs=0.02)
