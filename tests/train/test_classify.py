"""Classification recipes (``labels``): a sequence-classification adapter (LoRA plus its own head,
PEFT task_type SEQ_CLS) that learns, is scored by its head's label, and is saved so that PEFT (and
the server) load it with its label names."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from hotswap.train.errors import DataError, MergeError, RecipeError, TrainError
from hotswap.train.merge import merge_adapters
from hotswap.train.model import load_base
from hotswap.train.publish import publish_result
from hotswap.train.recipe import load_recipe
from hotswap.train.run import prepare, run
from hotswap.train.scoring import score_target

from .conftest import FRUITS

LABELS = sorted(set(FRUITS.values()))
RECORDS = [{"prompt": f"colour of {fruit}?", "completion": colour} for fruit, colour in FRUITS.items()]


# lr 1e-2: at 3e-2 the LoRA's held-out loss bounced on the tiny model (1.6 -> 0.8 in 80 steps, half the
# labels right, with the libraries of a fresh install); at 1e-2 it fits the 8 examples (loss 0.01)
def write(write_recipe, method="lora", metric="label_accuracy", labels=LABELS, records=RECORDS, steps=80):
    """A classification recipe over the fruit colours (the same examples held out: it must fit them)."""
    return write_recipe(name="fruit-colours", method=method, metric=metric, head=f"labels = {json.dumps(labels)}",
                        steps=steps, lr=1e-2, full_lr=1e-2, targets='"all-linear"', eval_every=10, train=records,
                        eval_records=records)


def test_a_classifier_learns_and_is_saved_for_peft_and_the_server(write_recipe, tmp_path, registry, tiny_chat_dir):
    loaded = load_recipe(write(write_recipe))
    result = run(prepare(loaded, registry), tmp_path / "run", eval_base=True, show_progress=False)
    assert result.loop.evals[-1]["eval_loss"] < result.loop.evals[0]["eval_loss"]
    assert result.metrics["label_accuracy"] >= 0.75 > result.metrics["base_label_accuracy"]
    artifact = result.artifact
    assert json.loads((artifact / "labels.json").read_text()) == LABELS
    config = json.loads((artifact / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"
    # PEFT loads the saved adapter (head included) and reads the same labels the run scored
    model = AutoModelForSequenceClassification.from_pretrained(tiny_chat_dir, num_labels=len(LABELS))
    model = PeftModel.from_pretrained(model, artifact).eval()
    answers = [json.loads(line)["answer"] for line in (result.run_dir / "answers.jsonl").read_text().splitlines()]
    tok = load_base(tiny_chat_dir, torch.device("cpu"))[1]
    with torch.inference_mode():
        for fruit, answer in zip(FRUITS, answers):
            logits = model(**tok(f"colour of {fruit}?", return_tensors="pt")).logits[0]
            assert LABELS[int(logits.argmax())] == answer
    published = publish_result(registry, result)
    assert published.version.metadata.peft_type == "LORA" and published.version.ref == "fruit-colours@1"
    with pytest.raises(MergeError, match="fruit-colours@1 is a classification adapter"):
        merge_adapters(registry, ["fruit-colours", "fruit-colours@1"], [0.5, 0.5], "linear", "mix")


def test_a_full_classifier_learns_is_published_as_a_model_and_rescores(write_recipe, tmp_path, registry):
    """method full: every weight and the new head train; the result is a whole sequence-classification
    checkpoint (its labels in config.json and labels.json), stored as kind model, and `train eval`
    scores the published model as the run scored it."""
    loaded = load_recipe(write(write_recipe, method="full", steps=40))
    result = run(prepare(loaded, registry), tmp_path / "run", eval_base=True, show_progress=False)
    assert result.trainable_params == result.total_params
    assert result.metrics["label_accuracy"] >= 0.75 > result.metrics["base_label_accuracy"]
    config = json.loads((result.artifact / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert [config["id2label"][str(i)] for i in range(len(LABELS))] == LABELS
    assert json.loads((result.artifact / "labels.json").read_text()) == LABELS
    published = publish_result(registry, result)
    assert published.version.ref == "fruit-colours-full@1" and published.version.kind == "model"
    _label, report, _ = score_target(loaded, registry, ref="fruit-colours-full")
    assert report.answers == result.report.answers
    # the untrained head of the base scores as the run's base did (same seed)
    _label, base_report, _ = score_target(loaded, registry)
    assert base_report.score == result.metrics["base_label_accuracy"]


def test_scoring_refuses_a_classifier_under_a_generation_recipe_and_the_reverse(write_recipe, tmp_path, registry):
    loaded = load_recipe(write(write_recipe, steps=1))
    adapter = run(prepare(loaded, registry), tmp_path / "run", show_progress=False).artifact
    with pytest.raises(TrainError, match="is a sequence classifier: score it with a classification recipe"):
        score_target(load_recipe(write_recipe(steps=1)), registry, adapter=adapter)
    plain = run(prepare(load_recipe(write_recipe(steps=1)), registry), tmp_path / "plain", show_progress=False)
    with pytest.raises(DataError, match="is not a sequence-classification adapter"):
        score_target(loaded, registry, adapter=plain.artifact)
    (adapter / "labels.json").write_text(json.dumps(list(reversed(LABELS))))
    with pytest.raises(DataError, match=r"classifies into \[.*\], but the recipe's labels are"):
        score_target(loaded, registry, adapter=adapter)
    (adapter / "labels.json").unlink()  # unnamed labels: the head's row count must still be the recipe's
    fewer = load_recipe(write(write_recipe, labels=LABELS[:-1], records=[r for r in RECORDS if r["completion"] != LABELS[-1]],
                              steps=1))
    with pytest.raises(DataError, match=f"has a head over {len(LABELS)} labels, but the recipe names {len(LABELS) - 1}"):
        score_target(fewer, registry, adapter=adapter)


@pytest.mark.parametrize("changes, reason", [
    (dict(metric="sql_exact_match"), "goes with labels"),
    (dict(labels=["red"]), "at least two distinct"),
    (dict(labels=["red", "red"]), "at least two distinct"),
])
def test_bad_classification_recipes_are_refused(write_recipe, changes, reason):
    with pytest.raises(RecipeError, match=reason):
        load_recipe(write(write_recipe, **changes))


def test_an_unknown_label_in_the_data_is_refused_with_its_example(write_recipe, registry):
    records = [{"prompt": "colour of apple?", "completion": "red"}, {"prompt": "colour of sky?", "completion": "blue"}]
    with pytest.raises(DataError, match=r"example 2 has label 'blue', not one of"):
        prepare(load_recipe(write(write_recipe, records=records)), registry)
