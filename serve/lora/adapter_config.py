"""What an adapter's ``adapter_config.json`` may ask for: the fields whose forward the engine
reproduces exactly, and PEFT's rule for which modules a config targets. Anything else is refused
with the reason (see ``spec.build_spec`` for the tensors' side)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable

# The seven linear module types of a Llama decoder layer, in the engine's order, with the
# sub-module that holds them.
MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Modules outside the layer stack that LoRA may target: an Embedding and the output Linear. Their
# pairs use layer 0. embed_tokens' A is ``lora_embedding_A [r, vocab]``, its B ``[hidden, r]``.
EDGES: tuple[str, ...] = ("embed_tokens", "lm_head")
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}

# Config fields whose value never changes the inference forward of a plain LoRA adapter.
_NEUTRAL = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
            "revision", "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha",
            "lora_dropout", "fan_in_fan_out", "use_rslora", "layers_to_transform", "layers_pattern",
            "rank_pattern", "alpha_pattern", "runtime_config", "megatron_core",
            "qalora_group_size", "init_lora_weights", "eva_config", "use_dora"}
# Fields that must be off, with the reason shown when they are not.
_REFUSED = {
    "modules_to_save": "modules_to_save replaces whole base modules per adapter",
    "trainable_token_indices": "trainable tokens change the embedding per adapter",
    "layer_replication": "layer replication changes the base's layer stack",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not supported",
    "use_qalora": "QA-LoRA pools inputs before the adapter",
    "alora_invocation_tokens": "activated LoRA (aLoRA) applies only after invocation tokens",
    "megatron_config": "Megatron-parallel LoRA layers are not supported",
    "lora_bias": "a bias on lora_B is not supported",
    "loftq_config": "LoftQ replaces the base weights with quantised residuals",
    "corda_config": "CorDA initialisation rewrites the base weights",
    "lora_ga_config": "LoRA-GA initialisation rewrites the base weights",
    "velora_config": "VeLoRA is not supported",
    "monteclora_config": "MonteCLoRA is not supported",
    "use_bdlora": "block-diagonal LoRA is not supported",
    "arrow_config": "Arrow routing is not supported",
    "kasa_config": "KaSA is not supported",
}
# init_lora_weights values after which the trained adapter only fits a rewritten base.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

# what PEFT puts in modules_to_save of a SEQ_CLS adapter by itself: a Llama's head is named score
_CLASSIFIER_NAMES = {"classifier", "score"}


class AdapterRefused(ValueError):
    """The adapter cannot be applied exactly; the message says why."""


def read_config(folder: Path) -> dict:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise AdapterRefused(f"{folder.name} has no adapter_config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterRefused(f"adapter_config.json is not valid JSON: {exc}") from exc


def check_config(config: dict, max_rank: int) -> None:
    """Refuse configs whose forward the engine cannot reproduce exactly."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterRefused(f"peft_type {config.get('peft_type')!r} is not LoRA")
    if config.get("bias", "none") != "none":
        raise AdapterRefused(f"bias={config['bias']!r}: trained biases change base modules; only 'none' is supported")
    for field, reason in _REFUSED.items():
        if field == "modules_to_save" and is_classifier(config):
            continue
        if config.get(field):
            raise AdapterRefused(f"{field}={config[field]!r}: {reason}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise AdapterRefused(f"init_lora_weights={init!r} trains against a rewritten base; "
                             "convert it to a plain LoRA adapter before publishing")
    if config.get("ensure_weight_tying") and _targets_edges(config):
        raise AdapterRefused("ensure_weight_tying=True ties an lm_head LoRA to the embedding's; "
                             "train the edges with separate adapters (ensure_weight_tying=False)")
    unknown = sorted(k for k, v in config.items() if k not in _NEUTRAL and k not in _REFUSED
                     and k not in ("bias", "ensure_weight_tying") and v not in (None, False, {}, [], "", 0))
    if unknown:
        raise AdapterRefused(f"unknown adapter config fields {unknown}: cannot tell whether they change the forward")
    _check_numbers(config)
    ranks = [config.get("r", 8), *(config.get("rank_pattern") or {}).values()]
    if max(ranks) > max_rank:
        raise AdapterRefused(f"rank {max(ranks)} is above the engine's max_rank {max_rank}")


def _check_numbers(config: dict) -> None:
    """Ranks are positive integers, alphas numbers, and pattern keys regular expressions."""
    ranks = {"r": config.get("r", 8), **{f"rank_pattern[{k!r}]": v for k, v in (config.get("rank_pattern") or {}).items()}}
    for field, value in ranks.items():
        if type(value) is not int or value < 1:
            raise AdapterRefused(f"{field}={value!r}: a rank is a positive integer")
    alphas = {"lora_alpha": config.get("lora_alpha", 8),
              **{f"alpha_pattern[{k!r}]": v for k, v in (config.get("alpha_pattern") or {}).items()}}
    for field, value in alphas.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise AdapterRefused(f"{field}={value!r}: an alpha is a finite number")
    for field in ("rank_pattern", "alpha_pattern"):
        for pattern in config.get(field) or {}:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise AdapterRefused(f"{field} key {pattern!r} is not a regular expression: {exc}") from None


def targeted(config: dict) -> Callable[[str], bool]:
    """Whether PEFT would put a LoRA layer on the module of this name (its own matching rule:
    target_modules as names, suffixes or one regular expression, layers_to_transform and
    layers_pattern, exclude_modules, and "all-linear" for every linear layer but lm_head)."""
    from types import SimpleNamespace

    from peft.tuners.tuners_utils import check_target_module_exists

    targets = config.get("target_modules") or []
    if targets == "all-linear" or (isinstance(targets, list) and "all-linear" in targets):
        targets = list(MODULES)
    fields = SimpleNamespace(target_modules=targets, exclude_modules=config.get("exclude_modules"),
                             modules_to_save=config.get("modules_to_save"), target_parameters=None,
                             layers_to_transform=config.get("layers_to_transform"),
                             layers_pattern=config.get("layers_pattern"))
    try:
        check_target_module_exists(fields, "model.layers.0.self_attn.q_proj")
    except re.error as exc:
        raise AdapterRefused(f"target_modules or exclude_modules is not a regular expression: {exc}") from None
    return lambda name: bool(check_target_module_exists(fields, name))


def is_classifier(config: dict) -> bool:
    """A SEQ_CLS adapter whose modules_to_save holds no more than its classification head."""
    if str(config.get("task_type") or "").upper() != "SEQ_CLS":
        return False
    if not set(config.get("modules_to_save") or ()) <= _CLASSIFIER_NAMES:
        raise AdapterRefused(f"modules_to_save={config['modules_to_save']!r}: a classification adapter may save "
                             f"only its head ({', '.join(sorted(_CLASSIFIER_NAMES))})")
    return True


def _targets_edges(config: dict) -> bool:
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        return any(re.fullmatch(targets, name) for name in ("model.embed_tokens", "lm_head"))
    return any(t in EDGES for t in targets)
