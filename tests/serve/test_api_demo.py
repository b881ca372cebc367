"""The demo script end to end on the tiny store: prompts from a shipped recipe, answers, examples."""

from __future__ import annotations

import json

from hotswap.serve.api import demo

from . import api_support
from .api_support import BASE, free_port, save_adapter, save_base

store = api_support.store  # the fixture, for this module's tests


def _recipe(root, name: str, toml: str, first: dict) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "recipe.toml").write_text(f'name = "{name}"\n{toml}[data]\neval = "e.jsonl"\n')
    (root / name / "e.jsonl").write_text(json.dumps(first) + "\n")


def test_shipped_prompts_are_the_prompts_the_trainer_sees(tmp_path):
    """A `messages` example's prompt is every turn before the final answer (train/data.py), earlier
    assistant turns included; a classifier's text is the last of those turns (train/classify.py)."""
    chat = [{"role": "user", "content": "list users"}, {"role": "assistant", "content": "SELECT name FROM users"},
            {"role": "user", "content": "only admins"}, {"role": "assistant", "content": "SELECT ... admin"}]
    _recipe(tmp_path, "sql-chat", 'system = "SQL only."\n', {"messages": chat})
    _recipe(tmp_path, "topic", 'labels = ["a", "b"]\n',
            {"messages": [{"role": "user", "content": "where is my parcel"}, {"role": "assistant", "content": "b"}]})
    _recipe(tmp_path, "one-turn", "", {"messages": [{"role": "assistant", "content": "a"}]})
    found = demo.shipped_prompts(tmp_path)
    assert found["sql-chat"].messages == [{"role": "system", "content": "SQL only."}, *chat[:-1]]
    assert found["topic"].classifier and found["topic"].messages == [{"role": "user", "content": "where is my parcel"}]
    assert "one-turn" not in found  # no prompt before the answer: skipped with a reason, not a crash


def test_demo_shows_base_and_adapters_then_exits(store, tmp_path, capsys):
    recipe = tmp_path / "adapters" / "acme-sql"
    recipe.mkdir(parents=True)
    (recipe / "recipe.toml").write_text('name = "acme-sql"\ntask = "text-to-sql"\nlanguage = "en"\nmetric = "em"\n'
                                        'system = "Answer with SQL only."\n[data]\ntrain = "t.jsonl"\neval = "e.jsonl"\n')
    (recipe / "e.jsonl").write_text(json.dumps({"prompt": "names of all users", "completion": "SELECT name"}) + "\n")
    missing = tmp_path / "adapters" / "not-published"
    missing.mkdir()
    (missing / "recipe.toml").write_text('name = "not-published"\n[data]\neval = "e.jsonl"\n')
    (missing / "e.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                                              {"role": "assistant", "content": "a"}]}) + "\n")
    table = tmp_path / "answers.md"

    code = demo.main(["--base", BASE, "--home", str(store.home), "--adapters-dir", str(tmp_path / "adapters"),
                      "--port", str(free_port()), "--max-tokens", "4", "--markdown", str(table), "--no-serve"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "hotswap train publish" in err and "not-published" in err
    assert "=== acme-sql" in out and "names of all users" in out and "e.jsonl, line 1" in out
    assert "curl -s http://127.0.0.1:" in out and "from openai import OpenAI" in out
    rows = table.read_text().splitlines()
    assert rows[2] == "| adapter | prompt | base answer | adapter answer |"
    assert any(r.startswith("| `acme-sql` | names of all users |") for r in rows)
    assert any(r.startswith("| `globex-sql` |") for r in rows)


def test_demo_says_how_to_import_a_missing_base(store, capsys):
    assert demo.main(["--base", "smollm9", "--home", str(store.home), "--no-serve"]) == 2
    assert "hotswap hub import-base smollm9" in capsys.readouterr().err


def test_demo_classifies_with_a_shipped_classifier(store, tmp_path, capsys):
    """A recipe with labels is shown on /v1/classify; a classifier without a recipe is refused for
    chat, and the demo says so and goes on."""
    import shutil

    from hotswap.hub import Registry

    from .test_engine_classify import save_classifier

    home = tmp_path / "home"
    shutil.copytree(store.home, home)
    registry = Registry(home)
    for name, seed in (("acme-topic", 71), ("loose-topic", 72)):
        registry.publish(save_classifier(store.base_dir, tmp_path / name, seed=seed), name=name, kind="adapter", base=BASE)
    registry.close()
    recipe = tmp_path / "adapters" / "acme-topic"
    recipe.mkdir(parents=True)
    (recipe / "recipe.toml").write_text('name = "acme-topic"\nlabels = ["a", "b", "c"]\n[data]\neval = "e.jsonl"\n')
    (recipe / "e.jsonl").write_text(json.dumps({"prompt": "where is my parcel", "completion": "b"}) + "\n")
    code = demo.main(["--base", BASE, "--home", str(home), "--adapters-dir", str(tmp_path / "adapters"),
                      "--port", str(free_port()), "--max-tokens", "4", "--no-serve"])
    out = capsys.readouterr().out
    assert code == 0
    shown = out[out.index("=== acme-topic"):]
    assert "where is my parcel" in shown and "(no classification head)" in shown and "(p=" in shown
    assert "refused: loose-topic@1 is a sequence-classification adapter" in out
    assert "/v1/classify" in out and '"model": "acme-topic@1"' in out


def test_demo_asks_the_served_base_and_each_adapters_newest_fitting_version(store, tmp_path, capsys):
    """`tiny` and `globex-sql` name newer versions made for another base; the demo serves tiny@1 and
    must ask it, and globex-sql@1, by ref."""
    import shutil

    from hotswap.hub import Registry

    home = tmp_path / "home"
    shutil.copytree(store.home, home)
    registry = Registry(home)
    other = save_base(tmp_path / "tiny-v2", hidden=32, seed=3)
    assert registry.publish(other, name=BASE, kind="base", source="org/tiny").version.ref == f"{BASE}@2"
    refit = save_adapter(other, tmp_path / "globex-v2", seed=21)
    assert registry.publish(refit, name="globex-sql", base=f"{BASE}@2").version.ref == "globex-sql@2"
    assert demo.servable_adapters(registry, f"{BASE}@1")["globex-sql"] == "globex-sql@1"
    registry.close()
    code = demo.main(["--base", f"{BASE}@1", "--home", str(home), "--adapters-dir", str(tmp_path / "none"),
                      "--port", str(free_port()), "--max-tokens", "2", "--no-serve"])
    out = capsys.readouterr().out
    assert code == 0
    assert "=== globex-sql@1" in out and "=== acme-sql@2" in out
    assert "refused" not in out
    assert '"model": "tiny@1", "prompt"' in out  # the printed examples name what is served too


def test_every_demo_flag_says_what_it_does(capsys):
    import re

    import pytest

    with pytest.raises(SystemExit):
        demo.main(["--help"])
    options = capsys.readouterr().out.split("options:", 1)[1]
    flags = re.findall(r"^  (--[a-z-]+)(?: [A-Z_]+)?(.*)$", options, re.MULTILINE)
    assert {f for f, _ in flags} >= {"--base", "--home", "--host", "--port", "--max-tokens", "--markdown", "--no-serve"}
    for flag, rest in flags:  # the help follows on the same line, or indented on the next when the flag is long
        next_line = options.split(flag, 1)[1].split("\n", 2)[1]
        assert rest.strip() or (next_line.startswith("   ") and next_line.strip()), f"{flag} has no help"
