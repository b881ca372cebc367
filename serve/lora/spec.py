"""Read a PEFT LoRA adapter and decide whether the engine can apply it exactly; refuse it otherwise.

The file's tensors say which (layer, module) pairs an adapter changes, and they must be the pairs
PEFT would wrap (``target_modules``, ``layers_to_transform``, ``exclude_modules``, matched by PEFT's own
rule): PEFT ignores tensors of modules its config does not target, and starts a targeted module whose
tensors are missing from its initialisation, so either mismatch is refused rather than served
differently. The config supplies ranks' scaling (alpha, rsLoRA, per-module patterns). Anything
that would change the forward in a way the batched LoRA math does not reproduce is refused with the
reason: biases, modules_to_save, weight-modifying initialisations, ...
DoRA is applied: its magnitude vectors are read here and turned into per-output scales at load.
LoRA on the token embedding and on lm_head (the "edges" of the model) is applied too; PEFT then
also saves a copy of those base weights, which must equal the base's (see ``weights.load_adapter``).
A sequence-classification adapter (``task_type`` SEQ_CLS) brings its own head, ``score [labels,
hidden]`` (PEFT's ``modules_to_save``, the only one accepted), applied to a classification
request's last token (see ``engine/classify.py``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
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

# PEFT saves every key under base_model.model.; it loads none without it
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\."
                  r"(?:lora_([AB])\.weight|lora_(magnitude)_vector(?:\.weight)?)$")
_HEAD_KEY = re.compile(r"^base_model\.model\.score(?:\.modules_to_save(?:\.default)?)?\.weight$")
# what PEFT puts in modules_to_save of a SEQ_CLS adapter by itself: a Llama's head is named score
_CLASSIFIER_NAMES = {"classifier", "score"}
_EDGE_KEY = re.compile(r"^base_model\.model\.(?:model\.(embed_tokens)\.lora_embedding_([AB])"
                       r"|(lm_head)\.lora_([AB])\.weight|(?:model\.)?(embed_tokens|lm_head)\.base_layer\.(weight))$")


class AdapterRefused(ValueError):
    """The adapter cannot be applied exactly; the message says why."""


@dataclass(slots=True, frozen=True)
class LoraSpec:
    """What an adapter changes: per (layer, module) rank and the scale to fold into B."""

    ranks: dict[tuple[int, str], int]  # (layer, module) -> rank, only targeted pairs
    scales: dict[tuple[int, str], float]  # (layer, module) -> alpha/r or alpha/sqrt(r)
    keys: dict[tuple[int, str], tuple[str, str]]  # (layer, module) -> (lora_A key, lora_B key)
    magnitudes: dict[tuple[int, str], str] | None = None  # DoRA: (layer, module) -> magnitude vector key
    # edge module -> key of the copy of its base weight that PEFT saves beside an edge LoRA
    base_copies: dict[str, str] | None = None
    head: str | None = None  # SEQ_CLS: key of the classification head ``score [labels, hidden]``

    @property
    def modules(self) -> tuple[str, ...]:
        """Targeted modules of the layer stack, in the engine's order."""
        present = {m for _, m in self.ranks}
        return tuple(m for m in MODULES if m in present)

    @property
    def targets(self) -> tuple[str, ...]:
        """Every targeted module: those of the layer stack, then the edges."""
        present = {m for _, m in self.ranks}
        return self.modules + tuple(m for m in EDGES if m in present)

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
        if field == "modules_to_save" and _is_classifier(config):
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


def _targeted(config: dict) -> Callable[[str], bool]:
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


def _check_targets(config: dict, pairs: dict, num_layers: int, dims: dict) -> None:
    """The file's pairs are exactly those PEFT would wrap, but for wrapped pairs without tensors
    whose initialisation leaves them without effect (B = 0: init_lora_weights true or "gaussian")."""
    targeted = _targeted(config)
    for layer, module in pairs:
        if not targeted(_module_path(layer, module)):
            raise AdapterRefused(f"{_where(layer, module)}: the file holds its LoRA tensors, but adapter_config.json does "
                                 "not target it (target_modules, layers_to_transform, exclude_modules): PEFT would "
                                 "ignore them")
    if config.get("init_lora_weights", True) in (True, "gaussian"):
        return
    everything = [(layer, m) for layer in range(num_layers) for m in MODULES] + [(0, m) for m in EDGES if m in dims]
    missing = next((pair for pair in everything if pair not in pairs and targeted(_module_path(*pair))), None)
    if missing is not None:
        raise AdapterRefused(f"{_where(*missing)}: adapter_config.json targets it but the file holds no tensors for it; "
                             f"PEFT would start it from init_lora_weights={config.get('init_lora_weights')!r}")


def _is_classifier(config: dict) -> bool:
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
    base_copies: dict[str, str] = {}
    head = None
    for key in tensor_shapes:
        if not key.startswith("base_model.model."):
            raise AdapterRefused(f"{key}: PEFT saves every key under base_model.model. and would load none of "
                                 "this file's; save the adapter with PEFT's save_pretrained")
        if _HEAD_KEY.match(key) and _is_classifier(config):
            head = key
            continue
        edge = _EDGE_KEY.match(key)
        if edge is not None and edge[6]:  # PEFT's copy of the base weight: checked against the base at load
            base_copies[edge[5]] = key
            continue
        if edge is not None:
            pairs.setdefault((0, edge[1] or edge[3]), {})[edge[2] or edge[4]] = key
            continue
        match = _KEY.match(key)
        if match is None:
            raise AdapterRefused(f"{key}: a tensor outside the decoder's linear layers, embed_tokens and lm_head "
                                 "is not supported")
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
        if dora and module in EDGES:
            raise AdapterRefused(f"{module}: DoRA on embed_tokens or lm_head is not supported")
        if "M" in ab and not dora:
            raise AdapterRefused(f"layer {layer} {module}: a DoRA magnitude vector, but the config does not set use_dora")
        if not {"A", "B"} <= set(ab):
            raise AdapterRefused(f"{_where(layer, module)}: lora_A and lora_B must both be present")
        if dora and "M" not in ab:
            raise AdapterRefused(f"layer {layer} {module}: use_dora is set but its lora_magnitude_vector is missing")
        a_shape, b_shape = tensor_shapes[ab["A"]], tensor_shapes[ab["B"]]
        if module not in dims:
            raise AdapterRefused(f"{module}: the base has no such module")
        d_in, d_out = dims[module]
        if dora and tuple(tensor_shapes[ab["M"]]) != (d_out,):
            raise AdapterRefused(f"layer {layer} {module}: DoRA magnitude {tuple(tensor_shapes[ab['M']])} does not fit "
                                 f"the {d_out} outputs of the layer")
        if dora:
            magnitudes[(layer, module)] = ab["M"]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != d_in or b_shape[0] != d_out or a_shape[0] != b_shape[1]:
            raise AdapterRefused(f"{_where(layer, module)}: lora_A {tuple(a_shape)} / lora_B {tuple(b_shape)} "
                                 f"do not fit a {d_in}->{d_out} {'embedding' if module == 'embed_tokens' else 'linear layer'}")
        rank = a_shape[0]
        if rank > max_rank:
            raise AdapterRefused(f"{_where(layer, module)}: rank {rank} is above the engine's max_rank {max_rank}")
        name = _module_path(layer, module)
        expected = _pattern_value(config.get("rank_pattern") or {}, name, r0)
        if rank != expected:
            raise AdapterRefused(f"{_where(layer, module)}: tensors have rank {rank} but the config says {expected}")
        a = _pattern_value(config.get("alpha_pattern") or {}, name, alpha)
        ranks[(layer, module)] = rank
        scales[(layer, module)] = a / math.sqrt(rank) if config.get("use_rslora") else a / rank
        keys[(layer, module)] = (ab["A"], ab["B"])
    for module, key in base_copies.items():
        if (0, module) not in ranks:
            raise AdapterRefused(f"{key}: a copy of the base's {module} weight, but no LoRA on {module}")
        want = dims[module] if module == "embed_tokens" else dims[module][::-1]  # both [vocab, hidden]
        if tuple(tensor_shapes[key]) != want:
            raise AdapterRefused(f"{key}: shape {tuple(tensor_shapes[key])}, but the base's {module} weight is {want}")
    _check_targets(config, pairs, num_layers, dims)
    if _is_classifier(config):
        if head is None:
            raise AdapterRefused("task_type SEQ_CLS but the file holds no classification head (score.weight)")
        shape = tuple(tensor_shapes[head])
        if len(shape) != 2 or shape[0] < 1 or shape[1] != dims["q_proj"][0]:
            raise AdapterRefused(f"{head}: shape {shape} is not [labels, {dims['q_proj'][0]}] (labels x hidden)")
    return LoraSpec(ranks=ranks, scales=scales, keys=keys, magnitudes=magnitudes if dora else None,
                    base_copies=base_copies or None, head=head)


def _module_path(layer: int, module: str) -> str:
    if module == "embed_tokens":
        return "model.embed_tokens"
    if module == "lm_head":
        return "lm_head"
    return f"model.layers.{layer}.{PARENT[module]}.{module}"


def _where(layer: int, module: str) -> str:
    return module if module in EDGES else f"layer {layer} {module}"
