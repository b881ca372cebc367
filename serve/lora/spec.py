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

import math
import re
from dataclasses import dataclass

from .adapter_config import (EDGES, MODULES, PARENT, AdapterRefused, check_config, is_classifier, read_config,
                             targeted as targeted_by)

__all__ = ["EDGES", "MODULES", "PARENT", "AdapterRefused", "LoraSpec", "build_spec", "check_config", "read_config"]

# PEFT saves every key under base_model.model.; it loads none without it
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\."
                  r"(?:lora_([AB])\.weight|lora_(magnitude)_vector(?:\.weight)?)$")
_HEAD_KEY = re.compile(r"^base_model\.model\.score(?:\.modules_to_save(?:\.default)?)?\.weight$")
_EDGE_KEY = re.compile(r"^base_model\.model\.(?:model\.(embed_tokens)\.lora_embedding_([AB])"
                       r"|(lm_head)\.lora_([AB])\.weight|(?:model\.)?(embed_tokens|lm_head)\.base_layer\.(weight))$")


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


def _check_targets(config: dict, pairs: dict, num_layers: int, dims: dict) -> None:
    """The file's pairs are exactly those PEFT would wrap, but for wrapped pairs without tensors
    whose initialisation leaves them without effect (B = 0: init_lora_weights true or "gaussian")."""
    targeted = targeted_by(config)
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
        if _HEAD_KEY.match(key) and is_classifier(config):
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
    if is_classifier(config):
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
