"""Device rows for adapters: per module type a preallocated pool of rank rows, and the slot table.

An adapter of rank r occupies r rows (any free ones, the same row ids in every layer) in each
module pool it targets, and nothing elsewhere; row 0 of every pool holds zeros and pads. So the
capacity is in bytes (rank x modules x dims), adapters of any rank and targets share a batch, and
activation is a copy into rows that already exist, never an allocation. The pools of modules that
read the same input (q/k/v, gate/up) are slices of one tensor so a single gather serves them.
LoRA on the edges (embed_tokens, lm_head) has pools of its own, ``edge_rows`` rows each: their rows
are a vocabulary long, so they are not sized like the layers'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .native import POOL_DTYPES, CpuKernels, PoolLayers
from .ops import gather_rows
from .spec import EDGES, MODULES
from .weights import HostAdapter

# Modules sharing an input, in the order their A rows are stacked.
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",),
}


@dataclass(slots=True)
class GatheredRows:
    """A batch's adapter rows, per group and layer: ``a[group][layer]`` ``[NB, n*k, in]``,
    ``b[group][layer]`` ``[NB, n*k, sum of the group's outs]`` (block-diagonal over its modules)."""

    a: dict[str, list[Tensor]]
    b: dict[str, list[Tensor]]


@dataclass(slots=True)
class Slot:
    rows: dict[str, list[int]]  # module -> row ids, len = the adapter's rank there (absent: not targeted)
    rank: int
    layer_rank: int  # the highest rank over the layers' modules (0: an adapter of embed_tokens/lm_head only)
    nbytes: int
    generation: int  # changes whenever the slot's rows are (re)written
    # DoRA: group -> [num_layers, sum of the group's outs], the scales of its outputs (1 where the
    # adapter leaves a module or layer alone); None for plain LoRA
    dora: dict[str, Tensor] | None = None
    head: Tensor | None = None  # a classification adapter's ``score [labels, hidden]``, on the device
    labels: tuple[str, ...] | None = None  # and its labels' names


class LoraPool:
    """Stacked adapter rows for every layer; plain-Python bookkeeping of rows and slots.

    ``a_stacked[group]``: ``[num_layers, len(group) * (max_rows + 1), in]``;
    ``b_stacked[module]``: ``[num_layers, max_rows + 1, out]``;
    ``edge_a[edge]``: ``[edge_rows + 1, in]``, ``edge_b[edge]``: ``[edge_rows + 1, out]`` (see edges.py;
    ``edge_dims``: embed_tokens ``(vocab, hidden)``, lm_head ``(hidden, vocab)``).
    Rows are stored in ``dtype``; the steps compute in ``compute_dtype`` (the base's, by default),
    which gathered rows, DoRA scales and classification heads take.
    """

    def __init__(self, num_layers: int, dims: dict[str, tuple[int, int]], max_rows: int,
                 dtype: torch.dtype, device: torch.device, edge_dims: dict[str, tuple[int, int]] | None = None,
                 edge_rows: int = 0, compute_dtype: torch.dtype | None = None) -> None:
        assert max_rows >= 0 and edge_rows >= 0
        self.num_layers, self.dims, self.max_rows, self.edge_rows = num_layers, dims, max_rows, edge_rows
        self.edge_dims = dict(edge_dims or {}) if edge_rows else {}
        n = max_rows + 1
        self.a_stacked = {g: torch.zeros(num_layers, len(ms) * n, dims[ms[0]][0], dtype=dtype, device=device)
                          for g, ms in GROUPS.items()}
        self.b_stacked = {m: torch.zeros(num_layers, n, dims[m][1], dtype=dtype, device=device) for m in MODULES}
        self.edge_a = {m: torch.zeros(edge_rows + 1, i, dtype=dtype, device=device) for m, (i, _) in self.edge_dims.items()}
        self.edge_b = {m: torch.zeros(edge_rows + 1, o, dtype=dtype, device=device) for m, (_, o) in self.edge_dims.items()}
        self._free = {m: list(range(max_rows, 0, -1)) for m in MODULES}  # pop() hands out low rows first
        self._free.update({m: list(range(edge_rows, 0, -1)) for m in self.edge_dims})
        self._slots: dict[int, Slot] = {}
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._generation = 0
        self._batch_key: tuple | None = None  # the blocks whose rows ``_batch`` holds
        self._batch: GatheredRows | None = None
        self._step_key: tuple | None = None  # the decode batch ``_step`` serves (kernel steps)
        self._step = None
        self._kernel_pools: dict[str, PoolLayers] = {}
        self.dtype, self.compute_dtype = dtype, compute_dtype or dtype
        self._elem = dtype.itemsize
        self.kernels: CpuKernels | None = None  # set by the engine: activation in one native call

    # --- capacity -------------------------------------------------------------------
    @staticmethod
    def rows_for_bytes(capacity_bytes: int, num_layers: int, dims: dict[str, tuple[int, int]],
                       dtype: torch.dtype) -> int:
        """How many rows per module fit ``capacity_bytes`` when every module type gets the same count."""
        per_row = num_layers * sum(i + o for i, o in dims.values()) * dtype.itemsize
        return capacity_bytes // per_row

    def row_bytes(self, module: str) -> int:
        if module in self.edge_dims:
            return sum(self.edge_dims[module]) * self._elem
        return self.num_layers * sum(self.dims[module]) * self._elem

    def rows_of(self, module: str) -> int:
        """How many rows ``module``'s pool has for adapters (0: adapters on it are refused)."""
        if module in EDGES:
            return self.edge_rows if module in self.edge_dims else 0
        return self.max_rows

    @property
    def capacity_bytes(self) -> int:
        return sum(self.row_bytes(m) * self.rows_of(m) for m in (*MODULES, *self.edge_dims))

    @property
    def used_bytes(self) -> int:
        return sum(s.nbytes for s in self._slots.values())

    def fits_now(self, adapter: HostAdapter) -> bool:
        return all(r <= len(self._free[m]) for m, r in adapter.ranks.items())

    # --- slots ----------------------------------------------------------------------
    def activate(self, adapter: HostAdapter) -> int:
        """Copy an adapter into free rows and return its slot (caller checked ``fits_now``).

        A and scale-folded B are written layer by layer straight from the host buffer; rows a
        layer does not use (untargeted layers, lower ranks by pattern) are zeroed, since freed
        rows keep whatever their last owner wrote.
        """
        rows = {m: [self._free[m].pop() for _ in range(r)] for m, r in adapter.ranks.items()}
        n = self.max_rows + 1
        native = self.kernels is not None and all(
            t.dtype in POOL_DTYPES for t in (*adapter.a.values(), *adapter.b.values()))
        items = []
        for group, modules in GROUPS.items():
            for i, m in enumerate(modules):
                if m not in rows:
                    continue
                a_pool, b_pool = self.a_stacked[group][:, i * n:(i + 1) * n], self.b_stacked[m]
                if native:
                    items += [(adapter.a.get((layer, m)), adapter.b.get((layer, m)), a_pool[layer], b_pool[layer],
                               adapter.spec.scales.get((layer, m), 0.0), rows[m]) for layer in range(self.num_layers)]
                else:
                    self._write(adapter, m, rows[m], a_pool, b_pool)
        if items:
            self.kernels.activate(items)
        for m in EDGES:
            if m in rows:
                self._write_edge(adapter, m, rows[m])
        slot = self._free_slots.pop() if self._free_slots else self._new_slot()
        self._generation += 1
        dora = self._dora_scales(adapter)
        head = None if adapter.head is None else adapter.head.to(self.a_stacked["qkv"].device, self.compute_dtype,
                                                                  copy=True)
        self._slots[slot] = Slot(rows=rows, rank=adapter.rank,
                                 layer_rank=max((len(r) for m, r in rows.items() if m not in EDGES), default=0),
                                 nbytes=sum(self.row_bytes(m) * len(r) for m, r in rows.items())
                                 + sum(t.nbytes for t in (dora or {}).values()) + (0 if head is None else head.nbytes),
                                 generation=self._generation, dora=dora, head=head, labels=adapter.labels)
        return slot

    def _dora_scales(self, adapter: HostAdapter) -> dict[str, Tensor] | None:
        if not adapter.dora_scales:
            return None
        device = self.a_stacked["qkv"].device
        found = {}
        for group, modules in GROUPS.items():
            outs = [self.dims[m][1] for m in modules]
            scales = torch.ones(self.num_layers, sum(outs), dtype=self.compute_dtype, device=device)
            for i, m in enumerate(modules):
                for layer in range(self.num_layers):
                    g = adapter.dora_scales.get((layer, m))
                    if g is not None:
                        scales[layer, sum(outs[:i]):sum(outs[:i + 1])] = g
            found[group] = scales
        return found

    def _write(self, adapter: HostAdapter, module: str, rows: list[int], a_pool: Tensor, b_pool: Tensor) -> None:
        first, count = rows[0], len(rows)
        run = rows == list(range(first, first + count))  # the usual case: plain slices, no temporaries
        index = None if run else torch.tensor(rows, device=a_pool.device)
        for layer in range(self.num_layers):
            pair = (layer, module)
            a = adapter.a.get(pair)
            r = 0 if a is None else a.shape[0]
            if r and run and a_pool.device.type == "cpu":
                a_pool[layer, first:first + r].copy_(a)
                # float32 math whatever the file's dtype; one rounding into a narrower pool
                torch.mul(adapter.b[pair].T.float(), adapter.spec.scales[pair], out=b_pool[layer, first:first + r])
            elif r:
                b = adapter.b[pair].T.float() * adapter.spec.scales[pair]  # [r, out], float32 math
                dest = torch.arange(first, first + r, device=a_pool.device) if run else index[:r]
                a_pool[layer].index_copy_(0, dest, a.to(a_pool.device, a_pool.dtype, non_blocking=True))
                b_pool[layer].index_copy_(0, dest, b.to(b_pool.device, b_pool.dtype, non_blocking=True))
            if r < count:  # freed rows keep their last owner's values: clear what this layer leaves unused
                unused = torch.arange(first + r, first + count, device=a_pool.device) if run else index[r:]
                a_pool[layer].index_fill_(0, unused, 0)
                b_pool[layer].index_fill_(0, unused, 0)

    def _write_edge(self, adapter: HostAdapter, module: str, rows: list[int]) -> None:
        a, b = adapter.a[(0, module)], adapter.b[(0, module)]
        dest = torch.tensor(rows, device=self.edge_a[module].device)
        scaled = b.T.float() * adapter.spec.scales[(0, module)]  # [r, out], float32 math as in the layers
        self.edge_a[module].index_copy_(0, dest, a.to(dest.device, self.dtype, non_blocking=True))
        self.edge_b[module].index_copy_(0, dest, scaled.to(dest.device, self.dtype, non_blocking=True))

    def _new_slot(self) -> int:
        self._next_slot += 1
        return self._next_slot - 1

    def release(self, slot: int) -> None:
        """Give the slot's rows back. Rows keep stale values: no step reads a row that no slot lists."""
        info = self._slots.pop(slot)
        for m, rows in info.rows.items():
            self._free[m].extend(reversed(rows))

        self._free_slots.append(slot)

    def slot(self, slot: int) -> Slot:
        return self._slots[slot]

    @property
    def num_slots(self) -> int:
        return len(self._slots)

    def cached_batch(self, key: tuple) -> GatheredRows | None:
        return self._batch if key == self._batch_key else None

    def batch_rows(self, key: tuple, rows: dict[str, Tensor], budget_bytes: int) -> GatheredRows | None:
        """Every layer's rows of a step's blocks, gathered once and kept while the same blocks come
        back (steady decoding), so those steps only read them. ``key`` names the blocks' slots and
        generations. None when the copy would exceed ``budget_bytes``.

        Each group's B rows are laid out block-diagonally, ``[NB, n*k, sum of outs]`` (module i's
        k rows filled only in its own output columns), so one batched product expands every
        module of the group: on a GPU, where a decode step's cost is mostly kernel launches, that
        is one launch instead of one per module plus a concatenation."""
        if key == self._batch_key:
            return self._batch
        self._batch_key = self._batch = None  # free the old copy before making the new one
        num_blocks, rank = rows["q_proj"].shape
        per_block = sum(len(ms) * (self.dims[ms[0]][0] + sum(self.dims[m][1] for m in ms)) for ms in GROUPS.values())
        if self.num_layers * num_blocks * rank * per_block * self.compute_dtype.itemsize > budget_bytes:
            return None
        a = {g: list(gather_rows(self.a_stacked[g], rows[g]).to(self.compute_dtype).unbind(0)) for g in GROUPS}
        b = {}
        for group, modules in GROUPS.items():
            outs = [self.dims[m][1] for m in modules]
            diag = self.b_stacked[modules[0]].new_zeros(self.num_layers, num_blocks, len(modules) * rank, sum(outs),
                                                        dtype=self.compute_dtype)
            for i, m in enumerate(modules):
                start = sum(outs[:i])
                diag[:, :, i * rank:(i + 1) * rank, start:start + outs[i]] = gather_rows(self.b_stacked[m], rows[m])
            b[group] = list(diag.unbind(0))
        self._batch_key, self._batch = key, GatheredRows(a, b)
        return self._batch

    def cached_step(self, key: tuple):
        return self._step if key == self._step_key else None

    def keep_step(self, key: tuple, step):
        """A kernel decode step (``batch.LoraStep``: row ids, scratch, calls), kept while the same
        batch comes back: built once, not per step. ``key`` names its slots, their generations and
        the tokens they sit at."""
        self._step_key, self._step = key, step
        return step

    def kernel_pools(self, group: str) -> PoolLayers:
        """``group``'s A and B pools of every layer as the native kernel takes them (made once)."""
        found = self._kernel_pools.get(group)
        if found is None:
            found = PoolLayers(list(self.a_stacked[group].unbind(0)),
                               [[self.b_stacked[m][layer] for m in GROUPS[group]] for layer in range(self.num_layers)])
            self._kernel_pools[group] = found
        return found

    def edge_kernel_pools(self, module: str) -> PoolLayers:
        """An edge module's pools as the native kernel takes them (one "layer"; made once)."""
        found = self._kernel_pools.get(module)
        if found is None:
            found = self._kernel_pools[module] = PoolLayers([self.edge_a[module]], [[self.edge_b[module]]])
        return found

    def module_view(self, module: str, layer: int) -> tuple[Tensor, Tensor]:
        """This layer's ``(A[rows, in], B[rows, out])`` of one module (tests and debugging)."""
        group = next(g for g, ms in GROUPS.items() if module in ms)
        i, n = GROUPS[group].index(module), self.max_rows + 1
        return self.a_stacked[group][layer, i * n:(i + 1) * n], self.b_stacked[module][layer]
