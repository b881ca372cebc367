"""Read a PEFT LoRA adapter and decide whether the engine can apply it exactly; refuse it otherwise.

The tensors in the file, not the config's ``target_modules``, say which (layer, module) pairs an
adapter changes; the config supplies ranks' scaling (alpha, rsLoRA, per-module patterns). Anything
that would change the forward in a way the batched LoRA math does not reproduce is refused with the
reason: biases, embedding or lm_head LoRA, modules_to_save, weight-modifying initialisations, ...
DoRA is applied: its magnitude vectors are read here and turned into per-output scales at load.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

# The seven linear module types of a Llama decoder layer, in the engine's order, with the
# sub-module that holds them.
MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}

# Config fields whose value never changes the inference forward of a plain LoRA adapter.
_NEUTRAL = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
            "revision", "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha",
            "lora_dropout", "fan_in_fan_out", "use_rslora", "layers_to_transform", "layers_pattern",
            "rank_pattern", "alpha_pattern", "runtime_config", "ensure_weight_tying", "megatron_core",
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

_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\."
                  r"(?:lora_([AB])\.weight|lora_(magnitude)_vector(?:\.weight)?)$")


class AdapterRefused(ValueError):
    """The adapter cannot be applied exactly; the message says why."""


@dataclass(slots=True, frozen=True)
class LoraSpec:
    """What an adapter changes: per (layer, module) rank and the scale to fold into B."""

    ranks: dict[tuple[int, str], int]  # (layer, module) -> rank, only targeted pairs
    scales: dict[tuple[int, str], float]  # (layer, module) -> alpha/r or alpha/sqrt(r)
    keys: dict[tuple[int, str], tuple[str, str]]  # (layer, module) -> (lora_A key, lora_B key)
    magnitudes: dict[tuple[int, str], str] | None = None  # DoRA: (layer, module) -> magnitude vector key

    @property
    def modules(self) -> tuple[str, ...]:
        present = {m for _, m in self.ranks}
        return tuple(m for m in MODULES if m in present)

    def module_rank(self, module: str) -> int:
        """Rows this adapter needs in ``module``'s pool: the highest rank over layers."""
        return max((r for (_, m), r in self.ranks.items() if m == module), default=0)


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
        if config.get(field):
            raise AdapterRefused(f"{field}={config[field]!r}: {reason}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise AdapterRefused(f"init_lora_weights={init!r} trains against a rewritten base; "
                             "convert it to a plain LoRA adapter before publishing")
    unknown = sorted(k for k, v in config.items() if k not in _NEUTRAL and k not in _REFUSED
                     and k != "bias" and v not in (None, False, {}, [], "", 0))
    if unknown:
        raise AdapterRefused(f"unknown adapter config fields {unknown}: cannot tell whether they change the forward")
    ranks = [config.get("r", 8), *(config.get("rank_pattern") or {}).values()]
    if max(ranks) > max_rank:
        raise AdapterRefused(f"rank {max(ranks)} is above the engine's max_rank {max_rank}")


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's ``get_pattern_key``: the first pattern that matches the end of the module name."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return patterns[pattern]
    return default


def build_spec(config: dict, tensor_shapes: dict[str, tuple[int, ...]], num_layers: int,
               dims: dict[str, tuple[int, int]], max_rank: int) -> LoraSpec:
    """Map the file's tensors onto (layer, module) pairs and check every shape against the base.

    ``dims[module] = (in_features, out_features)`` of the base.
    """
    check_config(config, max_rank)
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    for key in tensor_shapes:
        match = _KEY.match(key)
        if match is None:
            what = "embedding/lm_head LoRA" if ("embed" in key or "lm_head" in key) else "a tensor outside the decoder's linear layers"
            raise AdapterRefused(f"{key}: {what} is not supported")
        layer, parent, module, ab = int(match[1]), match[2], match[3], match[4] or "M"
        if module not in PARENT or PARENT[module] != parent:
            raise AdapterRefused(f"{key}: target module {parent}.{module} is not one of {', '.join(MODULES)}")
        if layer >= num_layers:
            raise AdapterRefused(f"{key}: layer {layer} does not exist (the base has {num_layers})")
        pairs.setdefault((layer, module), {})[ab] = key
    if not pairs:
        raise AdapterRefused("the adapter file holds no LoRA tensors")
    alpha, r0, dora = config.get("lora_alpha", 8), config.get("r", 8), bool(config.get("use_dora"))
    ranks, scales, keys, magnitudes = {}, {}, {}, {}
    for (layer, module), ab in sorted(pairs.items()):
        if "M" in ab and not dora:
            raise AdapterRefused(f"layer {layer} {module}: a DoRA magnitude vector, but the config does not set use_dora")
        if not {"A", "B"} <= set(ab):
            raise AdapterRefused(f"layer {layer} {module}: lora_A and lora_B must both be present")
        if dora and "M" not in ab:
            raise AdapterRefused(f"layer {layer} {module}: use_dora is set but its lora_magnitude_vector is missing")
        a_shape, b_shape = tensor_shapes[ab["A"]], tensor_shapes[ab["B"]]
        d_in, d_out = dims[module]
        if dora and tuple(tensor_shapes[ab["M"]]) != (d_out,):
            raise AdapterRefused(f"layer {layer} {module}: DoRA magnitude {tuple(tensor_shapes[ab['M']])} does not fit "
                                 f"the {d_out} outputs of the layer")
        if dora:
            magnitudes[(layer, module)] = ab["M"]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != d_in or b_shape[0] != d_out or a_shape[0] != b_shape[1]:
            raise AdapterRefused(f"layer {layer} {module}: lora_A {tuple(a_shape)} / lora_B {tuple(b_shape)} "
                                 f"do not fit a {d_in}->{d_out} linear layer")
        rank = a_shape[0]
        if rank > max_rank:
            raise AdapterRefused(f"layer {layer} {module}: rank {rank} is above the engine's max_rank {max_rank}")
        name = f"model.layers.{layer}.{PARENT[module]}.{module}"
        expected = _pattern_value(config.get("rank_pattern") or {}, name, r0)
        if rank != expected:
            raise AdapterRefused(f"layer {layer} {module}: tensors have rank {rank} but the config says {expected}")
        a = _pattern_value(config.get("alpha_pattern") or {}, name, alpha)
        ranks[(layer, module)] = rank
        scales[(layer, module)] = a / math.sqrt(rank) if config.get("use_rslora") else a / rank
        keys[(layer, module)] = (ab["A"], ab["B"])
    return LoraSpec(ranks=ranks, scales=scales, keys=keys, magnitudes=magnitudes if dora else None)
