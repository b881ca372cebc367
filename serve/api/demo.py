"""The demo: serve the base and every adapter of it, show the base and each adapter answering the same
prompt, print example `curl` and `openai` calls, then keep serving until Ctrl-C.

    python -m hotswap.serve.api.demo [--base smollm2] [--adapters-dir adapters] [--port 8000] [--no-serve]

It expects the base and the shipped adapters to be in the registry already (`make demo` does that with
`hotswap hub import-base` and `hotswap train publish`); it says what to run when they are not. A shipped
adapter's demo prompt is the first example of its recipe's held-out set (`adapters/<name>/recipe.toml`,
`[data] eval`), read as a file: the server never imports the trainer.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

DEFAULT_PROMPT = [{"role": "user", "content": "In one sentence, what is a LoRA adapter?"}]


@dataclass
class Showcase:
    adapter: str  # registry name
    messages: list[dict[str, str]]
    source: str  # where the prompt came from
    classifier: bool = False  # a classification recipe's adapter (``labels``): answered on /v1/classify
    ref: str = ""  # the version asked: the newest that fits the served base (the bare name may not)


def shipped_prompts(adapters_dir: Path) -> dict[str, Showcase]:
    """name -> the first held-out example of each shipped recipe (with the recipe's system prompt)."""
    found: dict[str, Showcase] = {}
    for recipe_file in sorted(adapters_dir.glob("*/recipe.toml")):
        try:
            recipe = tomllib.loads(recipe_file.read_text())
            name, eval_file = recipe["name"], recipe_file.parent / recipe["data"]["eval"]
            first = json.loads(next(line for line in eval_file.read_text().splitlines() if line.strip()))
            # the prompt the trainer sees (train/data.py): every turn before the final answer,
            # assistant turns included; a classifier reads the last of them alone (train/classify.py)
            turns = ([dict(m) for m in first["messages"][:-1]] if "messages" in first
                     else [{"role": "user", "content": first["prompt"]}])
            text = turns[-1]["content"]
        except (OSError, KeyError, StopIteration, ValueError, IndexError, TypeError) as exc:
            print(f"demo: skipping {recipe_file}: {exc!r}", file=sys.stderr)
            continue
        if recipe.get("labels"):  # a classifier reads the text alone: no chat template, no system prompt
            found[name] = Showcase(name, [{"role": "user", "content": text}],
                                   f"{eval_file.relative_to(adapters_dir.parent)}, line 1", classifier=True)
            continue
        if recipe.get("system") and not (turns and turns[0]["role"] == "system"):
            turns.insert(0, {"role": "system", "content": recipe["system"]})
        found[name] = Showcase(name, turns, f"{eval_file.relative_to(adapters_dir.parent)}, line 1")
    return found


def servable_adapters(registry, base_ref: str) -> dict[str, str]:
    """name -> ref of its newest version that fits this base (its `latest` may be trained on another)."""
    base = registry.resolve(base_ref)
    fitting = [v for v in registry.list(kind="adapter") if v.metadata.base_fingerprint == base.metadata.fingerprint]
    newest: dict[str, Any] = {}
    for version in sorted(fitting, key=lambda v: v.version):  # a later version replaces an earlier one
        newest[version.name] = version
    return {name: newest[name].ref for name in sorted(newest)}


def start_server(app, engine, host: str, port: int):
    import httpx
    import uvicorn

    from .command import http_url
    from .server import DrainingServer

    # as `hotswap serve` stops: Ctrl-C with a stream open ends it (cancelled, [DONE]) after the drain
    server = DrainingServer(uvicorn.Config(app, host=host, port=port, log_level="warning"), engine)
    thread = threading.Thread(target=server.run, name="hotswap-demo-server", daemon=True)
    thread.start()
    url = http_url(host, port)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and thread.is_alive():
        try:
            response = httpx.get(url + "/ready", timeout=5)
            if response.status_code == 200:
                return server, thread, url
            detail = response.json().get("detail") or ""
            if detail.startswith("failed"):  # it will not become ready: say why now, not after the deadline
                server.should_exit = True
                raise SystemExit(f"demo: the server on {url} {detail}")
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"demo: the server did not become ready on {url}")


def answer(client, model: str, messages: list[dict[str, str]], max_tokens: int) -> str:
    import openai

    try:
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    except openai.BadRequestError as exc:  # e.g. a classification adapter: say why, and go on
        return f"(refused: {exc.body.get('message') if isinstance(exc.body, dict) else exc})"
    return reply.choices[0].message.content.strip()


def classify(url: str, model: str, text: str) -> str:
    import httpx

    row = httpx.post(url + "/v1/classify", json={"model": model, "input": text}, timeout=600).json()["data"][0]
    return f"{row['label']} (p={max(row['probs']):.2f})"


def examples(url: str, base_name: str, adapter: str, messages: list[dict[str, str]]) -> str:
    body = json.dumps({"model": adapter, "messages": messages, "max_tokens": 64, "temperature": 0})
    quoted = body.replace("'", "'\\''")  # inside a single-quoted shell word
    return f"""# Generation with an adapter (any OpenAI client works; `model` picks the adapter)
curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\
  -d '{quoted}'

# Streaming (server-sent events), with the base alone
curl -sN {url}/v1/completions -H 'Content-Type: application/json' \\
  -d '{{"model": "{base_name}", "prompt": "The capital of France is", "max_tokens": 16, "stream": true}}'

# What can be served, and where each adapter is held now (disk, host, device)
curl -s {url}/v1/models
curl -s {url}/v1/adapters
curl -s -X POST {url}/v1/adapters/{adapter}/pin
curl -s {url}/metrics | grep hotswap_requests_total

# Python, the official client unmodified
python - <<'EOF'
from openai import OpenAI
client = OpenAI(base_url="{url}/v1", api_key="unused-without-keys")
reply = client.chat.completions.create(model="{adapter}", messages={messages!r}, max_tokens=64, temperature=0)
print(reply.choices[0].message.content)
EOF"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hotswap.serve.api.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="smollm2", help="registry reference of the base to serve (default: smollm2)")
    parser.add_argument("--home", type=Path, default=None, metavar="DIR",
                        help="registry folder (default: $HOTSWAP_HOME or the per-user one)")
    parser.add_argument("--adapters-dir", type=Path, default=Path("adapters"), metavar="DIR",
                        help="the recipes; each adapter is asked its recipe's first held-out example "
                             "(default: adapters)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per answer in the showcase (default: 48)")
    parser.add_argument("--markdown", type=Path, default=None, metavar="FILE",
                        help="also write the answers as a Markdown table")
    parser.add_argument("--no-serve", dest="serve", action="store_false", help="exit after the showcase")
    args = parser.parse_args(argv)

    import openai

    from hotswap.hub import HubError, Registry

    from ..engine import Engine, EngineConfig
    from ..engine.resolve import not_a_base
    from .app import create_app
    from .command import listen_problem, settings_error
    from .settings import ServerSettings

    try:  # every refusal before the base loads, on one line
        settings = ServerSettings(host=args.host, port=args.port)
        settings.check_binding()
    except ValueError as exc:
        print(f"demo: {settings_error(exc)}", file=sys.stderr)
        return 2
    problem = listen_problem(args.host, args.port)
    if args.markdown is not None and (args.markdown.is_dir() or not args.markdown.parent.is_dir()):
        problem = f"--markdown {args.markdown}: not a file in an existing folder"  # else found after the showcase
    if problem:
        print(f"demo: {problem}", file=sys.stderr)
        return 2
    registry = Registry(args.home)
    try:
        base = registry.resolve(args.base)
    except HubError as exc:
        print(f"demo: {exc}\ndemo: import it first: hotswap hub import-base {args.base}", file=sys.stderr)
        return 2
    if problem := not_a_base(base):
        print(f"demo: --base {args.base}: {problem}", file=sys.stderr)
        return 2
    prompts = shipped_prompts(args.adapters_dir) if args.adapters_dir.is_dir() else {}
    in_registry = servable_adapters(registry, base.ref)
    for name in sorted(set(prompts) - set(in_registry)):
        print(f"demo: shipped adapter {name} is not in the registry: "
              f"hotswap train publish {args.adapters_dir / name}", file=sys.stderr)
    showcases = [replace(prompts.get(n) or Showcase(n, DEFAULT_PROMPT, "a generic prompt"), ref=ref)
                 for n, ref in in_registry.items()]

    engine = Engine(registry, base.ref, EngineConfig())
    app = create_app(engine, registry, settings)
    for noisy in ("httpx", "httpx2"):  # the demo's own client calls; keep its output readable
        logging.getLogger(noisy).setLevel(logging.WARNING)
    server, thread, url = start_server(app, engine, args.host, args.port)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused-without-keys", max_retries=0)

    print(f"\nhotswap is serving {base.ref} and {len(in_registry)} adapters on {url} (OpenAPI: {url}/schema)\n")
    rows = []
    for show in showcases:
        question = show.messages[-1]["content"]
        if show.classifier:
            base_says, adapter_says = "(no classification head)", classify(url, show.ref, question)
        else:
            # by ref: `base.name` is its `latest`, maybe not the base served here
            base_says = answer(client, base.ref, show.messages, args.max_tokens)
            adapter_says = answer(client, show.ref, show.messages, args.max_tokens)
        rows.append((show, base_says, adapter_says))
        print(f"=== {show.ref}  (prompt: {show.source})\n  prompt : {question}\n"
              f"  {base.name:<7}: {base_says}\n  adapter: {adapter_says}\n")
    if not showcases:
        print("no adapters of this base in the registry yet: publish one (hotswap train publish adapters/<name>)\n")
    if args.markdown:
        args.markdown.write_text(markdown(base.name, rows))
        print(f"answers written to {args.markdown}")
    first = next((s for s in showcases if not s.classifier), Showcase(base.name, DEFAULT_PROMPT, "", ref=base.ref))
    print(examples(url, base.ref, first.ref, first.messages))
    for show in (s for s in showcases if s.classifier):
        text = json.dumps({"model": show.ref, "input": show.messages[-1]["content"]}).replace("'", "'\\''")
        print(f"\n# Classification with {show.adapter}\ncurl -s {url}/v1/classify -H 'Content-Type: application/json' \\\n"
              f"  -d '{text}'")
    if not args.serve:
        server.should_exit = True
        thread.join(timeout=30)
        return 0
    print(f"\nserving on {url}; Ctrl-C stops it")
    try:
        while thread.is_alive():
            thread.join(timeout=1)
    except KeyboardInterrupt:
        server.should_exit = True
        thread.join(timeout=30)
    return 0


def markdown(base_name: str, rows) -> str:
    lines = ["| adapter | prompt | base answer | adapter answer |", "|---|---|---|---|"]
    cell = lambda text: text.replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    for show, base_says, adapter_says in rows:
        lines.append(f"| `{show.adapter}` | {cell(show.messages[-1]['content'])} | {cell(base_says)} | "
                     f"{cell(adapter_says)} |")
    return f"Same prompt, greedy, `{base_name}` alone and with each adapter:\n\n" + "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
