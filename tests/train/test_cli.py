"""`hotswap train` on the tiny base: the default command, sub-commands, JSON output, refusals."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hotswap.train.cli import app

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_explains_the_default_command():
    result = _invoke("--help")
    assert result.exit_code == 0
    assert "short for" in result.stdout and "hotswap train run RECIPE" in result.stdout
    for command in ("run", "eval", "publish", "compare", "merge"):
        assert command in result.stdout


def test_every_argument_is_named_as_the_readme_names_it():
    """Arguments show as RECIPE and REF in each command's usage line, and each says what it is."""
    import typer

    for name, command in typer.main.get_command(app).commands.items():
        for param in command.params:
            if type(param).__name__ == "TyperArgument":
                assert param.help and param.metavar and param.metavar.upper() == param.metavar, (name, param.name)
    assert "RECIPE" in _invoke("run", "--help").stdout


def test_recipe_without_subcommand_trains_and_publishes(write_recipe, home, tmp_path):
    folder = write_recipe(steps=3)
    result = _invoke(folder, "--home", home, "--out", tmp_path / "run", "--publish", "--alias", "prod",
                     "--export", tmp_path / "export", "--json", "--quiet", "--set", "train.seed=2")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["published"] == "colours@1" and payload["steps"] == 3 and payload["method"] == "lora"
    assert (tmp_path / "export" / "metrics.json").is_file()
    scored = _invoke("eval", folder, "--ref", "colours@prod", "--home", home, "--json")
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["target"] == "colours@1"
    republished = _invoke("publish", folder, "--artifact", tmp_path / "export", "--home", home, "--json")
    assert republished.exit_code == 0, republished.output
    assert json.loads(republished.stdout) == {"published": "colours@1", "created": False}


def test_explicit_run_and_method_flag(write_recipe, home, tmp_path):
    folder = write_recipe(steps=1)
    result = _invoke("run", folder, "--method", "full", "--home", home, "--out", tmp_path / "r",
                     "--quiet", "--json", "--publish")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["method"] == "full" and payload["published"] == "colours-full@1"
    scored = _invoke("eval", folder, "--ref", "colours-full", "--home", home, "--json",
                     "--answers", tmp_path / "answers.jsonl")
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["target"] == "colours-full@1"
    assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize("args, message", [
    (["--set", "train.lrr=1"], "train.lrr: unknown field"),
    (["--method", "qlora"], "'qlora' is not one of lora, dora, full"),
])
def test_refusals_exit_non_zero_with_reason_on_stderr(write_recipe, home, args, message):
    result = _invoke(write_recipe(), "--home", home, *args)
    assert result.exit_code != 0
    assert message in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--alias", "Prod"], "alias 'Prod' is not an identifier"),
    (["--alias", "7"], "alias '7' is a number"),
    (["--name", "a..b"], "name 'a..b' is not an identifier"),
])
def test_a_name_or_alias_the_registry_refuses_stops_publish_before_training(write_recipe, home, tmp_path, args,
                                                                            message):
    result = _invoke(write_recipe(steps=1), "--home", home, "--publish", "--quiet", "--out", tmp_path / "r", *args)
    assert result.exit_code == 1 and message in result.stderr
    assert not (tmp_path / "r").exists()  # refused before the run began


def test_unusable_output_paths_are_refused_before_any_work(write_recipe, home, tmp_path):
    (tmp_path / "a-file").write_text("x")
    result = _invoke(write_recipe(steps=1), "--home", home, "--quiet", "--out", tmp_path / "a-file")
    assert result.exit_code == 1 and "--out: " in result.stderr and "is a file, not a folder" in result.stderr
    result = _invoke("eval", write_recipe(), "--home", home, "--answers", tmp_path / "a-file" / "answers.jsonl")
    assert result.exit_code == 1 and "--answers: " in result.stderr and "is a file" in result.stderr


def test_unknown_base_and_bad_data_refused(write_recipe, home):
    result = _invoke(write_recipe(base="nope"), "--home", home)
    assert result.exit_code == 1 and "error: base 'nope'" in result.stderr
    folder = write_recipe()
    (folder / "eval.jsonl").write_text('{"prompt": 1, "completion": "x"}\n')
    result = _invoke(folder, "--home", home)
    assert result.exit_code == 1 and "eval.jsonl:1: missing string field 'prompt'" in result.stderr
    result = _invoke("no-such-recipe-folder", "--home", home)
    assert result.exit_code == 1 and "no recipe at no-such-recipe-folder" in result.stderr


def test_merge_command(write_recipe, home, tmp_path):
    for seed in (1, 2):
        folder = write_recipe(name=f"site-{seed}", steps=1, seed=seed)
        assert _invoke(folder, "--home", home, "--publish", "--quiet", "--out", tmp_path / f"r{seed}").exit_code == 0
    result = _invoke("merge", "site-1", "site-2", "--weights", "0.4,0.6", "--method", "cat", "--name", "avg",
                     "--home", home, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["published"] == "avg@1"
    bad = _invoke("merge", "site-1", "site-2", "--weights", "0.4", "--name", "avg", "--home", home)
    assert bad.exit_code == 1 and "2 adapters but 1 weights" in bad.stderr


@pytest.mark.slow
def test_compare_writes_report_and_plot(write_recipe, home, tmp_path):
    result = _invoke("compare", write_recipe(steps=4, eval_every=2), "--home", home, "--out", tmp_path / "cmp",
                     "--work", tmp_path / "work",
                     "--quiet", "--json")
    assert result.exit_code == 0, result.output
    report = (tmp_path / "cmp" / "report.md").read_text()
    for row in ("trainable parameters", "wall time", "peak memory", "size on disk", "held-out sql_exact_match"):
        assert row in report
    assert "| | lora | full |" in report and "loss_curves.png" in report
    png = (tmp_path / "cmp" / "loss_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    payload = json.loads(result.stdout)
    lora, full = payload["runs"]
    assert lora["trainable_params"] < full["trainable_params"] == full["total_params"]
    assert lora["size_bytes"] < full["size_bytes"] and 0 <= payload["base_score"] <= 1
    assert "The base model without training scores" in report
