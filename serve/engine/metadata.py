"""Per-step metadata: everything the forward needs about the step, built once, passed explicitly.

Sequences of a step are laid out back to back in token order. Attention runs on padded views,
one per group of sequences with similar query lengths (decodes apart from prefill chunks), so a
decode batch never pays for a long chunk's padding. Padded views are built per step from the
paged KV pool; on CPU this gather costs little next to the matmuls, and a paged-attention kernel
can replace it on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..lora.batch import LoraStep


@dataclass(slots=True)
class AttnGroup:
    """G sequences attended together: queries padded to Lq, contexts to Lc."""

    num_seqs: int
    q_len: int
    ctx_len: int
    q_index: Tensor | None  # [G * Lq] token feeding each padded query; None: tokens [first, first+G) in order
    first_token: int
    out_pos: Tensor | None  # [T_g] padded position of each of the group's tokens; None: identity
    token_ids: Tensor | None  # [T_g] which step tokens those are; None: [first, first+G)
    ctx_slots: Tensor  # [G, Lc] KV slot of each context position (padding: slot 0, masked)
    mask: Tensor  # [G, 1, Lq, Lc] bool, True = may attend


@dataclass(slots=True)
class StepMetadata:
    """Shapes: T tokens in the step, S sequences, N of them sampled."""

    input_ids: Tensor  # [T]
    positions: Tensor  # [T]
    slot_mapping: Tensor  # [T] KV slot each token's key/value is written to
    groups: list[AttnGroup]
    logits_index: Tensor  # [N + M] token rows whose next-token logits are needed: N sampled, then M scored
    lora: LoraStep | None  # None: no token uses an adapter, LoRA is skipped


@dataclass(slots=True)
class SeqSpan:
    """One sequence's share of a step (host-side input to ``build_metadata``)."""

    token_ids: list[int]  # the tokens computed this step
    start_pos: int  # position of the first of them (= tokens already in the KV cache)
    block_table: list[int]
    sample: bool  # whether the step ends at the sequence's last known token
    score: range = range(0)  # prompt tokens of this span (offsets in it) whose next-token logits are wanted


def _slots_of(block_table: list[int], block_size: int, start: int, stop: int) -> list[int]:
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, stop)]


def build_metadata(spans: list[SeqSpan], block_size: int, device: torch.device,
                   lora: LoraStep | None) -> StepMetadata:
    input_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    logits_index: list[int] = []
    score_index: list[int] = []
    firsts: list[int] = []
    for span in spans:
        firsts.append(len(input_ids))
        n = len(span.token_ids)
        input_ids.extend(span.token_ids)
        positions.extend(range(span.start_pos, span.start_pos + n))
        slot_mapping.extend(_slots_of(span.block_table, block_size, span.start_pos, span.start_pos + n))
        if span.sample:
            logits_index.append(len(input_ids) - 1)
        score_index.extend(firsts[-1] + i for i in span.score)
    decode = [i for i, s in enumerate(spans) if len(s.token_ids) == 1]
    prefill = [i for i, s in enumerate(spans) if len(s.token_ids) > 1]
    groups = [_group(spans, firsts, members, block_size, device) for members in (decode, prefill) if members]

    def t(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)

    return StepMetadata(input_ids=t(input_ids), positions=t(positions), slot_mapping=t(slot_mapping),
                        groups=groups, logits_index=t(logits_index + score_index), lora=lora)


def _group(spans: list[SeqSpan], firsts: list[int], members: list[int], block_size: int,
           device: torch.device) -> AttnGroup:
    q_len = max(len(spans[i].token_ids) for i in members)
    ctx_len = max(spans[i].start_pos + len(spans[i].token_ids) for i in members)
    q_index: list[int] = []
    q_pos: list[list[int]] = []
    out_pos: list[int] = []
    token_ids: list[int] = []
    ctx_slots: list[list[int]] = []
    for g, i in enumerate(members):
        span, first, n = spans[i], firsts[i], len(spans[i].token_ids)
        q_index.extend(range(first, first + n))
        q_index.extend([first] * (q_len - n))
        # a padded query attends position 0 only, so no row of the mask is empty; its output is dropped
        q_pos.append(list(range(span.start_pos, span.start_pos + n)) + [0] * (q_len - n))
        out_pos.extend(range(g * q_len, g * q_len + n))
        token_ids.extend(range(first, first + n))
        total = span.start_pos + n
        ctx_slots.append(_slots_of(span.block_table, block_size, 0, total) + [0] * (ctx_len - total))
    first = firsts[members[0]]
    contiguous = token_ids == list(range(first, first + len(members))) and q_len == 1
    qp = torch.tensor(q_pos, dtype=torch.long)
    mask = torch.arange(ctx_len)[None, None, None, :] <= qp[:, None, :, None]

    def t(values) -> Tensor:
        return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)

    return AttnGroup(
        num_seqs=len(members), q_len=q_len, ctx_len=ctx_len,
        q_index=None if contiguous else t(q_index), first_token=first,
        out_pos=None if contiguous else t(out_pos), token_ids=None if contiguous else t(token_ids),
        ctx_slots=t(ctx_slots), mask=mask.to(device, non_blocking=True))
