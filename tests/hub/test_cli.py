"""Rule 9: the `hotswap hub` commands, their JSON output and their refusals (exit 1, stderr)."""

import json
import subprocess
import sys

import pytest

from hotswap.hub.cli import main

from .conftest import TINY_SOURCE


def run(capsys, *args) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_publish_list_show_alias_flow(capsys, registry, make_adapter):
    home = ["--home", str(registry.home)]
    code, out, _ = run(capsys, "hub", "publish", str(make_adapter(seed=1)), "--name", "sql", "--task", "text-to-sql",
                       "--language", "en", "--tag", "team=data", "--metric", "exact_match=0.9", "--alias", "prod", *home)
    assert (code, out.strip()) == (0, "sql@1")
    code, out, _ = run(capsys, "hub", "publish", str(make_adapter(seed=1)), "--name", "sql", *home)
    assert "sql@1 (unchanged" in out
    code, out, _ = run(capsys, "hub", "publish", str(make_adapter(seed=2)), "--name", "sql", "--json", *home)
    assert json.loads(out)["ref"] == "sql@2" and json.loads(out)["created"] is True

    code, out, _ = run(capsys, "hub", "list", "--kind", "adapter", "--json", *home)
    listed = json.loads(out)
    assert [(v["ref"], v["aliases"]) for v in listed] == [("sql@1", ["prod"]), ("sql@2", ["latest"])]
    code, out, _ = run(capsys, "hub", "show", "sql@prod", "--json", *home)
    shown = json.loads(out)
    assert shown["metadata"]["metrics"] == {"exact_match": 0.9} and shown["metadata"]["tags"] == {"team": "data"}
    assert {f["path"] for f in shown["files"]} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert shown["labels"] is None  # not a classifier
    code, out, _ = run(capsys, "hub", "show", "sql", *home)
    assert "ref: sql@2" in out and "base: tiny@1" in out
    assert sum(line.startswith("created_at:") for line in out.splitlines()) == 1  # once, not again from metadata

    assert run(capsys, "hub", "alias", "sql@2", "prod", *home)[1].strip() == "sql@prod -> sql@2"
    code, out, _ = run(capsys, "hub", "aliases", "sql", "--json", *home)
    history = [(e["alias"], e["from"], e["to"]) for e in json.loads(out)["history"]]
    assert ("prod", 1, 2) in history
    assert run(capsys, "hub", "rollback", "sql", "prod", *home)[1].strip() == "sql@prod -> sql@1"
    assert run(capsys, "hub", "verify", *home)[0] == 0


@pytest.mark.parametrize("args,message", [
    (["hub", "show", "nope"], "no entry named 'nope'"),
    (["hub", "show", "../etc"], "not an identifier"),
    (["hub", "alias", "tiny@7", "prod"], "tiny has no version 7"),
    (["hub", "rm", "tiny"], "refusing to remove tiny@1"),
    (["hub", "publish", "/nonexistent-folder", "--name", "x"], "is not a folder"),
    (["hub", "publish", ".", "--name", "x", "--tag", "novalue"], "must look like KEY=VALUE"),
])
def test_refusals_exit_nonzero_with_reason(capsys, registry, args, message):
    code, out, err = run(capsys, *args, "--home", str(registry.home))
    assert code == 1 and message in err and out == ""


def test_verify_exit_status_on_corruption(capsys, registry, make_adapter):
    version = registry.publish(make_adapter(), name="sql").version
    _, sha, _ = registry.files(version)[0]
    blob = registry.blobs.path(sha)
    blob.chmod(0o644)
    blob.write_bytes(b"tampered")
    code, _, err = run(capsys, "hub", "verify", "--home", str(registry.home))
    assert code == 1 and "CORRUPT sql@1" in err


def test_import_base_from_folder_and_console_script(tmp_path, tiny_base_dir):
    home = tmp_path / "home"
    result = subprocess.run([sys.executable, "-m", "hotswap.hub.cli", "hub", "import-base", "tiny",
                             str(tiny_base_dir), "--source-id", TINY_SOURCE, "--home", str(home), "--json"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["metadata"]["source"] == TINY_SOURCE and info["metadata"]["architecture"] == "llama"
    assert main_json(["hub", "import-base", "plain", str(tiny_base_dir), "--home", str(home), "--json"])[
        "metadata"]["source"] == tiny_base_dir.name  # no id recorded in the folder: its name
    bad = subprocess.run([sys.executable, "-m", "hotswap.hub.cli", "hub", "import-base", "other", "not/a/valid/id",
                          "--home", str(home)], capture_output=True, text=True)
    assert bad.returncode == 1 and "neither a GGUF file, a model folder nor a Hub repo id" in bad.stderr
    none = subprocess.run([sys.executable, "-m", "hotswap.hub.cli", "hub", "import-base", "other",
                           "--home", str(home)], capture_output=True, text=True)
    assert none.returncode == 1 and "only 'smollm2'" in none.stderr


def main_json(args):
    result = subprocess.run([sys.executable, "-m", "hotswap.hub.cli", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_help_everywhere(capsys):
    for args in (["--help"], ["hub", "--help"], ["hub", "publish", "--help"], ["hub", "pull", "--help"],
                 ["serve", "--help"], ["train", "--help"], ["bench", "--help"]):
        code, out, _ = run(capsys, *args)
        assert code == 0, args
        assert "--install-completion" not in out, args  # a shell-completion installer `hotswap` does not offer
    code, out, _ = run(capsys, "--help")
    for name in ("train", "serve", "bench"):  # each says what it does, not only where to read it
        assert f"See `hotswap {name} --help`" not in out


def test_every_hub_option_and_argument_says_what_it_is(capsys):
    """Each hub command's --help explains each of its arguments and options, under the names the README uses."""
    import click
    import typer

    from hotswap.hub.commands import app

    for name, command in typer.main.get_command(app).commands.items():
        for param in command.params:
            assert getattr(param, "help", None), f"hub {name}: {param.name} has no help"
            if isinstance(param, click.Argument) or type(param).__name__ == "TyperArgument":
                assert param.metavar and param.metavar.upper() == param.metavar, f"hub {name}: {param.name}"


def test_usage_errors_exit_2_with_the_reason(capsys, tmp_path):
    code, out, err = run(capsys, "hub", "publish", str(tmp_path), "--home", str(tmp_path))
    assert code == 2 and "--name" in err
    code, out, err = run(capsys, "nosuchcommand")
    assert code == 2 and "nosuchcommand" in err


def test_show_names_a_classifiers_labels(capsys, registry, tiny_base_dir, tmp_path):
    """A SEQ_CLS adapter's labels.json (else LABEL_i, one per row of its head) and a full classifier's
    id2label, as the server answers with them; none for other versions."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import LlamaForSequenceClassification

    home = ["--home", str(registry.home)]
    torch.manual_seed(0)
    model = LlamaForSequenceClassification.from_pretrained(tiny_base_dir, num_labels=3)
    get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=2, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "unnamed")
    registry.publish(tmp_path / "unnamed", name="unnamed", base="tiny")
    (tmp_path / "unnamed" / "labels.json").write_text(json.dumps(["no", "maybe", "yes"]))
    registry.publish(tmp_path / "unnamed", name="named", base="tiny")
    full = LlamaForSequenceClassification.from_pretrained(tiny_base_dir, num_labels=2, id2label={0: "ham", 1: "spam"},
                                                          label2id={"ham": 0, "spam": 1})
    full.save_pretrained(tmp_path / "full")
    registry.publish(tmp_path / "full", name="spam-full", kind="model", base="tiny")
    for ref, labels in [("unnamed", ["LABEL_0", "LABEL_1", "LABEL_2"]), ("named", ["no", "maybe", "yes"]),
                        ("spam-full", ["ham", "spam"])]:
        code, out, _ = run(capsys, "hub", "show", ref, "--json", *home)
        assert (code, json.loads(out)["labels"]) == (0, labels)
    code, out, _ = run(capsys, "hub", "show", "spam-full", *home)
    assert "classifier labels: ham, spam" in out
    code, out, _ = run(capsys, "hub", "show", "tiny", "--json", *home)
    assert "labels" not in json.loads(out)
    # labels that cannot name the head's rows are refused at publish, and nothing is stored
    for bad, reason in [(["no", "yes"], "labels.json must list 3 distinct non-empty names"),
                        (["no", "no", "yes"], "labels.json must list 3 distinct"), ("{", "not readable JSON")]:
        (tmp_path / "unnamed" / "labels.json").write_text(bad if isinstance(bad, str) else json.dumps(bad))
        code, _, err = run(capsys, "hub", "publish", str(tmp_path / "unnamed"), "--name", "bad", "--base", "tiny", *home)
        assert code == 1 and reason in err
    assert [v.name for v in registry.list(kind="adapter")] == ["named", "unnamed"]


def test_a_listing_in_a_pipe_keeps_whole_values(capsys, registry, make_adapter):
    """Out of a terminal (a pipe, a CI log) the listing is tab-separated: a table there is cut to 80 columns."""
    home = ["--home", str(registry.home)]
    run(capsys, "hub", "publish", str(make_adapter(seed=1)), "--name", "a-rather-long-adapter-name",
        "--task", "text-to-sql-with-a-long-task-name", "--alias", "production-canary", *home)
    code, out, _ = run(capsys, "hub", "list", *home)
    header, *rows = [line.split("\t") for line in out.splitlines()]
    assert code == 0 and header[:4] == ["ref", "kind", "aliases", "task"]
    assert [r[:4] for r in rows if r[1] == "adapter"] == [
        ["a-rather-long-adapter-name@1", "adapter", "latest,production-canary", "text-to-sql-with-a-long-task-name"]]


def test_an_unusable_home_or_index_is_one_line(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "index.sqlite").write_bytes(b"this is not an SQLite database, whatever its name says" * 4)
    for home, why in ((afile, "is a file, not a folder"), (afile / "sub", "cannot make the registry home"),
                      (damaged, "index.sqlite is not a readable registry index")):
        code, out, err = run(capsys, "hub", "list", "--home", str(home))
        assert code == 1 and why in err and "Traceback" not in err, err
    assert (damaged / "index.sqlite").read_bytes().startswith(b"this is not an SQLite")  # left as it was


def test_listing_an_unknown_kind_is_refused(capsys, registry):
    code, _, err = run(capsys, "hub", "list", "--kind", "bogus", "--home", str(registry.home))
    assert code == 1 and "kind 'bogus' is not one of base, adapter, model" in err


@pytest.mark.parametrize("raised, code, said", [(EOFError("truncated pickle"), 1, "error: unexpected end of data: truncated"),
                                                (KeyboardInterrupt(), 130, "aborted")])
def test_an_eof_inside_a_command_is_an_error_and_ctrl_c_an_abort(capsys, registry, monkeypatch, raised, code, said):
    """click turns both into Abort; only Ctrl-C (or Ctrl-D at a prompt) is the user's abort."""
    from hotswap.hub import Registry

    def fail(self, **filters):
        raise raised
    monkeypatch.setattr(Registry, "list", fail)
    got, _, err = run(capsys, "hub", "list", "--home", str(registry.home))
    assert got == code and said in err
