"""Adapters combined per request: ``"sql*0.7+extract*0.3"`` serves ``0.7 dW_sql + 0.3 dW_extract``.

A weighted sum of LoRA updates is itself a LoRA update whose rank is the sum of the ranks: the A
matrices stacked (each scaled by its weight and its own alpha/r) over the B matrices side by side.
That is PEFT's ``add_weighted_adapter(combination_type="cat")``, built here with the same values, so
the combination is exact (no SVD, no truncation) and is served like any adapter: it takes rows in
the device pools, shares batches with other adapters, and is cached by a digest of its parts'
digests and weights, never by their names.
"""

from __future__ import annotations

import hashlib
import math

import torch

from .spec import EDGES, MODULES, AdapterRefused, LoraSpec
from .weights import HostAdapter

MAX_PARTS = 8  # a combination's rank is the sum of its parts' ranks: keep it bounded
MAX_WEIGHT = 1e4  # far beyond any useful mix; larger ones push float32 logits to inf


def is_composite(model: str) -> bool:
    return "+" in model or "*" in model


def parse_composite(model: str) -> list[tuple[str, float]]:
    """``"a*0.5+b@2"`` -> ``[("a", 0.5), ("b@2", 1.0)]``; raises ``ValueError`` naming what is wrong."""
    parts = []
    for text in model.split("+"):
        ref, star, weight = (s.strip() for s in text.partition("*"))
        if not ref:
            raise ValueError(f"{model!r}: an empty adapter name in the combination")
        if not star:
            parts.append((ref, 1.0))
            continue
        try:
            value = float(weight)
        except ValueError:
            raise ValueError(f"{model!r}: weight {weight!r} of {ref!r} is not a number") from None
        if not math.isfinite(value) or abs(value) > MAX_WEIGHT:
            raise ValueError(f"{model!r}: weight {weight!r} of {ref!r} is not a finite number within "
                             f"[-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]")
        parts.append((ref, value))
    if len(parts) > MAX_PARTS:
        raise ValueError(f"{model!r} combines {len(parts)} adapters; at most {MAX_PARTS}")
    return parts


def composite_ref(parts: list[tuple[str, float]]) -> str:
    """The exact form: every part's immutable ``name@version`` and its weight as a full float."""
    # repr is exact and, for weights within MAX_WEIGHT, never holds the "+" that separates parts
    return "+".join(f"{ref}*{weight!r}" for ref, weight in parts)


def composite_digest(parts: list[tuple[str, float]]) -> str:
    """Keys the combination's rows, host copy and KV: a function of the parts' digests and weights."""
    text = "+".join(f"{digest}*{weight!r}" for digest, weight in parts)
    return hashlib.sha256(f"hotswap-combination:{text}".encode()).hexdigest()


def combine(parts: list[tuple[HostAdapter, float]], digest: str, ref: str, max_rank: int,
            pin_memory: bool = False) -> HostAdapter:
    """One adapter equal to the weighted sum of the parts' updates, in float32 (PEFT's "cat" values:
    ``A_i * weight_i * scale_i`` stacked, ``B_i`` side by side, scale 1)."""
    for host, _ in parts:
        if host.magnitude is not None:
            raise AdapterRefused(f"{host.ref} is a DoRA adapter: DoRA updates do not add up linearly")
        if host.head is not None:
            raise AdapterRefused(f"{host.ref} is a classification adapter: its head does not combine with others")
    pairs = sorted({pair for host, _ in parts for pair in host.a}, key=lambda p: (p[0], (MODULES + EDGES).index(p[1])))
    ranks = {pair: sum(host.spec.ranks.get(pair, 0) for host, _ in parts) for pair in pairs}
    worst = max(ranks, key=ranks.get)
    if ranks[worst] > max_rank:
        raise AdapterRefused(f"layer {worst[0]} {worst[1]}: the combined rank {ranks[worst]} is above the engine's "
                             f"max_rank {max_rank}")
    a_parts: dict[tuple[int, str], list[torch.Tensor]] = {pair: [] for pair in pairs}
    b_parts: dict[tuple[int, str], list[torch.Tensor]] = {pair: [] for pair in pairs}
    for host, weight in parts:
        for pair, a in host.a.items():
            a_parts[pair].append(a.float() * weight * host.spec.scales[pair])  # PEFT's order: the same values
            b_parts[pair].append(host.b[pair].float())
    total = sum(t.numel() for group in (a_parts, b_parts) for ts in group.values() for t in ts)
    # one allocation, as for a file: the host tier counts its bytes; a GPU copies from pinned memory fastest
    buffer = torch.empty(total, dtype=torch.float32, pin_memory=pin_memory)
    a, b, offset = {}, {}, 0
    for pair in pairs:
        for found, chunks, dim in ((a, a_parts[pair], 0), (b, b_parts[pair], 1)):
            shape = list(chunks[0].shape)
            shape[dim] = sum(t.shape[dim] for t in chunks)
            view = buffer[offset:offset + math.prod(shape)].view(shape)
            torch.cat(chunks, dim=dim, out=view)
            found[pair], offset = view, offset + view.numel()
    spec = LoraSpec(ranks=ranks, scales={pair: 1.0 for pair in pairs}, keys={})
    return HostAdapter(digest=digest, ref=ref, spec=spec, buffer=buffer.view(torch.uint8), a=a, b=b,
                       ranks={m: spec.module_rank(m) for m in spec.targets})
