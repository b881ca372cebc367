"""`hotswap train` refuses unusable paths and damaged checkpoints with a one-line reason on stderr
and status 1, before any training or scoring work where it can: never a traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from hotswap.train.cli import app

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _refused(result, *messages: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    for message in messages:
        assert message in result.stderr, result.stderr


def test_a_bad_export_folder_is_refused_before_training(write_recipe, home, tmp_path):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("keep me")
    for export, message in ((tmp_path / "a-file", "is a file, not a folder"),
                            (tmp_path / "foreign", "holds files that are not an earlier export")):
        result = _invoke(write_recipe(steps=1), "--home", home, "--quiet", "--out", tmp_path / "run",
                         "--export", export)
        _refused(result, f"--export {export}", message)
        assert not (tmp_path / "run").exists()  # no run was started
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "keep me"


def test_answers_naming_a_folder_is_refused_before_scoring(write_recipe, home, tmp_path):
    _refused(_invoke("eval", write_recipe(), "--home", home, "--answers", tmp_path),
             f"--answers: {tmp_path} is a folder, not a file")


@pytest.mark.parametrize("option", ["--out", "--work"])
def test_compare_refuses_a_file_for_its_folders_before_training(write_recipe, home, tmp_path, option):
    (tmp_path / "a-file").write_text("x")
    result = _invoke("compare", write_recipe(steps=1), "--home", home, "--quiet", option, tmp_path / "a-file")
    _refused(result, f"{option}: {tmp_path / 'a-file'} is a file, not a folder")


def test_a_home_that_is_a_file_is_one_line(write_recipe, tmp_path):
    (tmp_path / "a-file").write_text("x")
    _refused(_invoke(write_recipe(), "--home", tmp_path / "a-file", "--quiet"), "error: ", "a-file")


def test_merge_refuses_a_bad_name_before_loading_adapters(home):
    # the adapters do not exist: a refusal of the name proves nothing was loaded first
    _refused(_invoke("merge", "x", "y", "--weights", "1,1", "--name", "Bad", "--home", home), "name 'Bad'")
    _refused(_invoke("merge", "x", "y", "--weights", "1,1", "--name", "m", "--alias", "7", "--home", home),
             "alias '7' is a number")


@pytest.mark.parametrize("damage", ["state", "empty-optimizer", "truncated-weights", "no-optimizer"])
def test_a_damaged_checkpoint_is_refused_with_its_folder(write_recipe, home, tmp_path, damage):
    folder = write_recipe(steps=2, checkpoint_every=1)
    run_dir = tmp_path / "run"
    first = _invoke(folder, "--home", home, "--quiet", "--out", run_dir)
    assert first.exit_code == 0, first.output
    checkpoint = run_dir / "checkpoint"
    if damage == "state":
        (checkpoint / "state.json").write_text('{"x')
    elif damage == "empty-optimizer":  # torch raises EOFError, which the root command would read as Ctrl-D
        (checkpoint / "optimizer.pt").write_bytes(b"")
    elif damage == "truncated-weights":
        weights = checkpoint / "trainable.safetensors"
        weights.write_bytes(weights.read_bytes()[:50])
    else:
        (checkpoint / "optimizer.pt").unlink()
    result = _invoke(folder, "--home", home, "--quiet", "--out", run_dir, "--resume")
    _refused(result, f"{checkpoint} is damaged", "start afresh without --resume")


def test_merge_refuses_a_seed_the_generator_cannot_take(write_recipe, home, tmp_path):
    for site in (1, 2):  # adapters that exist: a seed out of range failed only after they had loaded
        folder = write_recipe(name=f"site-{site}", steps=1, seed=site)
        assert _invoke(folder, "--home", home, "--publish", "--quiet", "--out", tmp_path / f"r{site}").exit_code == 0
    result = _invoke("merge", "site-1", "site-2", "--weights", "1,1", "--method", "dare_linear", "--name", "m",
                     "--seed", 2**64, "--home", home)
    assert result.exit_code == 2 and "--seed" in result.output and result.exception.__class__ is SystemExit


def test_eval_of_an_adapter_made_for_another_base_is_one_line(write_recipe, home, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    get_peft_model(wider, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "wider")
    _refused(_invoke("eval", write_recipe(), "--home", home, "--adapter", tmp_path / "wider"),
             "does not fit the base it is scored on: size mismatch for ", "q_proj")
