"""Decode steps at fixed shapes, replayed from CUDA graphs on a GPU.

Why: on a GPU, a decode step of a 1B base is about 550 small kernels. Launched one by one from
Python they took ~16 ms a step (H100, batch 32), while the GPU was busy for 2.5-3.7 ms of it. A
CUDA graph records a step's kernels once and replays them with one launch.

A graph fixes every shape and address, so a decode step is laid out at a bucketed shape: the
batch padded to ``batch_bucket``, the context to a multiple of ``CTX_BUCKET`` tokens, the LoRA rank
to ``rank_bucket`` (extra rows read the zero row). Everything that changes from step to step
(token ids, positions, block tables, adapter row ids) goes through one int64 buffer that the graph
reads; KV slots and the attention mask are derived from the block tables inside the step. Padded
rows write their K/V into a spare KV block that no sequence owns, and their logits are dropped.
Adapter rows are read from the pools inside the step (by the Triton kernels, serve/lora/triton_ops.py,
else gathered), so a graph serves any adapters. DoRA adapters and LoRA on embed_tokens and lm_head
are in the graphs too (lm_head only with the Triton kernels: the torch path's grouping of rows by
adapter has data-dependent shapes), so such a request does not make its whole batch decode eagerly:
a shape records whether it scales outputs by DoRA and each edge's bucketed rank.

On the CPU the same fixed-shape steps run eagerly (``capture=False``): the tests check them
token for token against PEFT there, and on a GPU the captured ones too.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from torch import Tensor

from ..lora.batch import DoraStep, LoraStep, pad_rows, row_ids
from ..lora.pool import GROUPS
from .kv_cache import KVCache
from .metadata import AttnGroup, StepMetadata
from .model import LlamaRunner
from .sequence import Sequence

log = logging.getLogger("hotswap.engine")

CTX_BUCKET = 256  # context positions are padded to a multiple of this (attention reads them all)
MAX_GRAPHS = 48  # captured shapes kept, least recently used dropped first


def batch_bucket(n: int) -> int:
    """Rows a step of ``n`` sequences is padded to: powers of two up to 16, then multiples of 16."""
    return 1 << (n - 1).bit_length() if n <= 16 else -(-n // 16) * 16


def rank_bucket(rank: int) -> int:
    """LoRA rows per module a step reads: 0 (no adapter), else a power of two, at least 8."""
    return 0 if rank == 0 else max(8, 1 << (rank - 1).bit_length())


class _Shape:
    """One bucketed shape: its input buffer and views, and its graph once captured. ``edges``:
    (edge module, bucketed rank) of the edges some row's adapter targets; ``dora``: outputs are
    scaled per row (see ``DoraTable``)."""

    def __init__(self, rows: int, blocks: int, rank: int, dora: bool, edges: tuple[tuple[str, int], ...],
                 device: torch.device) -> None:
        self.rows, self.blocks, self.rank, self.dora, self.edges = rows, blocks, rank, dora, edges
        sizes = {"input_ids": rows, "positions": rows, "tables": rows * blocks}
        if rank:
            sizes.update({g: rows * len(ms) * rank for g, ms in GROUPS.items()})
            sizes.update({m: rows * rank for ms in GROUPS.values() for m in ms})
        self.lora_names = list(sizes)[3:]
        sizes.update({m: rows * r for m, r in edges})
        self.head = rows * (2 + blocks)  # the part rewritten every step; adapter row ids follow
        self.lora_key: tuple | None = None  # the rows' slots (and generations) the row ids were written for
        self.buffer = torch.zeros(sum(sizes.values()), dtype=torch.long, device=device)
        self.views: dict[str, Tensor] = {}
        start = 0
        for name, size in sizes.items():
            self.views[name] = self.buffer[start:start + size]
            start += size
        self.all_rows = torch.arange(rows, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None

    def lora_rows(self) -> dict[str, Tensor]:
        return {name: self.views[name].view(self.rows, -1) for name in self.lora_names}

    def edge_rows(self) -> dict[str, Tensor] | None:
        return {m: self.views[m].view(self.rows, r) for m, r in self.edges} or None


class DoraTable:
    """DoRA scales of a batch's rows, per group ``[num_layers, rows, outs]`` (ones for a row without
    DoRA), shared by the shapes of one row count and rewritten when their batch's adapters change."""

    def __init__(self, pool, rows: int) -> None:
        device = pool.a_stacked["qkv"].device
        self.tables = {g: torch.ones(pool.num_layers, rows, sum(pool.dims[m][1] for m in ms),
                                     dtype=pool.compute_dtype, device=device) for g, ms in GROUPS.items()}
        self.key: tuple | None = None

    def fill(self, key: tuple, slots: list) -> None:
        if key == self.key:
            return
        for group, table in self.tables.items():
            table.fill_(1)
            for i, info in enumerate(slots):
                if info is not None and info.dora is not None:
                    table[:, i].copy_(info.dora[group])
        self.key = key

    def step(self, all_rows: Tensor) -> DoraStep:
        return DoraStep({g: list(t.unbind(0)) for g, t in self.tables.items()}, all_rows)


class DecodeGraphs:
    """Runs decode-only steps of one worker at bucketed shapes; on a GPU from CUDA graphs."""

    def __init__(self, runner: LlamaRunner, kv: KVCache, spare_block: int, block_size: int,
                 max_model_len: int, capture: bool) -> None:
        self.runner, self.kv = runner, kv
        self.spare_block, self.block_size = spare_block, block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.capture = capture
        self.device = runner.device
        self._shapes: OrderedDict[tuple, _Shape] = OrderedDict()
        self._dora: dict[int, DoraTable] = {}  # by row count
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self.steps = 0  # decode steps served here (tests and stats)
        self.captures = 0

    def run(self, seqs: list[Sequence]) -> Tensor | None:
        """Logits ``[len(seqs), vocab]`` of a decode-only step (each sequence has exactly its last
        token pending); None when a capture failed (the caller then runs its steps eagerly, for good)."""
        pool = self.runner.lora
        slots = [pool.slot(s.slot) if s.slot >= 0 and pool is not None else None for s in seqs]
        held = [info for info in slots if info is not None]
        rank = rank_bucket(max((info.layer_rank for info in held), default=0))
        edges = tuple((m, rank_bucket(r)) for m in (pool.edge_dims if pool is not None else ())
                      if (r := max((len(info.rows.get(m, ())) for info in held), default=0)))
        dora = any(info.dora is not None for info in held)
        longest = max(s.num_computed for s in seqs) + 1
        blocks = min(-(-(-(-longest // CTX_BUCKET) * CTX_BUCKET) // self.block_size), self.max_blocks)
        key = (batch_bucket(len(seqs)), blocks, rank, dora, edges)
        shape = self._shapes.get(key)
        if shape is None:
            shape = self._shapes[key] = _Shape(*key, self.device)
            while len(self._shapes) > MAX_GRAPHS:
                self._shapes.popitem(last=False)
        self._shapes.move_to_end(key)
        self._fill(shape, seqs, slots)
        if not self.capture:
            logits = self._forward(shape)
        else:
            if shape.graph is None and not self._capture(shape):
                return None
            shape.graph.replay()
            logits = shape.logits
        self.steps += 1
        return logits[:len(seqs)]

    def _fill(self, shape: _Shape, seqs: list[Sequence], slots: list) -> None:
        pad = shape.rows - len(seqs)
        spare = [self.spare_block] * shape.blocks
        values = [s.token_ids[s.num_computed] for s in seqs] + [0] * pad
        values += [s.num_computed for s in seqs] + [0] * pad
        for s in seqs:
            table = s.block_table[:shape.blocks]
            values += table + spare[len(table):]
        values += spare * pad
        shape.buffer[:shape.head].copy_(torch.tensor(values, dtype=torch.long))
        # adapter row ids change only when the batch's adapters do (a join, a leave, a slot rewritten):
        # steady decoding skips building and uploading them (~1.5 ms a step for 32 rows on a slow CPU)
        if not shape.rank and not shape.edges:
            return
        key = tuple(None if info is None else (s.slot, info.generation) for s, info in zip(seqs, slots))
        if shape.dora:  # made once per row count (not setdefault: its default would be allocated every step)
            table = self._dora.get(shape.rows)
            if table is None:
                table = self._dora[shape.rows] = DoraTable(self.runner.lora, shape.rows)
            table.fill(key, slots)
        if key != shape.lora_key:
            ids = row_ids(self.runner.lora, slots + [None] * pad, shape.rank) if shape.rank else {}
            flat = [r for name in shape.lora_names for row in ids[name] for r in row]
            for m, r in shape.edges:  # each row's own rows in the edge pool, padded with the zero row 0
                flat += [i for info in slots + [None] * pad
                         for i in pad_rows(info.rows.get(m, ()) if info is not None else (), r)]
            shape.buffer[shape.head:].copy_(torch.tensor(flat, dtype=torch.long))
            shape.lora_key = key

    def _forward(self, shape: _Shape) -> Tensor:
        """The step on the shape's buffers, with no host work: what a graph records."""
        rows, bs, v = shape.rows, self.block_size, shape.views
        positions = v["positions"]
        tables = v["tables"].view(rows, shape.blocks)
        cols = torch.arange(shape.blocks * bs, device=self.device)
        ctx_slots = tables.repeat_interleave(bs, dim=1) * bs + cols % bs
        slot_mapping = ctx_slots.gather(1, positions[:, None]).view(rows)
        mask = (cols[None, :] <= positions[:, None]).view(rows, 1, 1, -1)
        group = AttnGroup(num_seqs=rows, q_len=1, ctx_len=shape.blocks * bs, q_index=None, first_token=0,
                          out_pos=None, token_ids=None, ctx_slots=ctx_slots, mask=mask)
        lora = None if not shape.rank and not shape.edges else LoraStep(
            num_blocks=rows, block_len=1, rank=shape.rank, token_index=None, block_pos=None, token_ids=None,
            rows=shape.lora_rows() if shape.rank else None, gathered=None, edges=shape.edge_rows(),
            dora=self._dora[rows].step(shape.all_rows) if shape.dora else None)
        meta = StepMetadata(input_ids=v["input_ids"], positions=positions, slot_mapping=slot_mapping,
                            groups=[group], logits_index=shape.all_rows, lora=lora)
        return self.runner.forward(meta, self.kv)

    def _capture(self, shape: _Shape) -> bool:
        try:
            # one eager run first, on a side stream as capture needs: lazy initialisation (library
            # handles, kernel choice) stays out of the graph. It writes this step's K/V, which the
            # replay then writes again with the same values
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._forward(shape)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                shape.logits = self._forward(shape)
            shape.graph = graph
            self.captures += 1
            return True
        except Exception:  # a step that cannot be captured still runs, eagerly and for good
            log.exception("capturing a decode step as a CUDA graph failed; decode steps run eagerly")
            self._shapes.clear()
            return False
