"""The engine's own forward over the flattened tokens of a step, on a Llama base's weights.

Weights come from the HF ``LlamaForCausalLM`` (read once; q/k/v and gate/up fused into one matrix
each, which changes no output element); rotary cos/sin come from the HF rotary module, so every
rope scaling type HF knows stays exact. Attention is SDPA over padded views of the paged KV pool
(see metadata.py). LoRA is added per token from the stacked pools (serve/lora), and skipped when no
token of the step uses an adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..lora import ops
from ..lora.edges import embed_delta, head_delta
from ..lora.native import BaseLayers, CpuKernels
from ..lora.pool import GROUPS, LoraPool
from ..lora.triton_ops import TritonLora
from .architecture import check_architecture
from .kv_cache import KVCache
from .metadata import StepMetadata


# Up to this many tokens a projection runs on the CPU as ``W @ x.T``: BLAS then streams the weight
# once as the tall operand, where ``x @ W.T`` with a handful of rows ran several times slower.
SMALL_BATCH = 64
# Up to this many tokens, with the native CPU kernels, a projection runs there instead, its LoRA
# added in the same pass. On a 2-core CPU, a SmolLM2-135M decode step's 120 projections alone took
# 46 ms against BLAS's 85 for 8 tokens, 92 against 120 for 32, 152 against 163 for 64, and lost
# from about 192; with 8 adapters' LoRA, 190 against 210 ms for 64 tokens of interleaved adapters
# and 176 against 170 for runs of one adapter (prefill-like).
NATIVE_PROJECTION_TOKENS = 64


def project(x: Tensor, weight: Tensor) -> Tensor:
    """``x[T, in] @ weight[out, in].T -> [T, out]`` (contiguous)."""
    if x.shape[0] <= SMALL_BATCH and x.device.type == "cpu":  # GPU libraries pick their own kernels
        return torch.mm(weight, x.t()).t().contiguous()
    return F.linear(x, weight)



@dataclass(slots=True)
class LayerWeights:
    attn_norm: Tensor  # [H]
    qkv: Tensor  # [(nh + 2 * nkv) * hd, H]
    o: Tensor  # [H, nh * hd]
    mlp_norm: Tensor  # [H]
    gate_up: Tensor  # [2 * I, H]
    down: Tensor  # [H, I]


class LlamaRunner:
    """Holds one Llama checkpoint's weights and runs steps on them; optionally with a LoRA pool."""

    def __init__(self, hf_model, device: torch.device, dtype: torch.dtype) -> None:
        config = hf_model.config
        check_architecture(config)
        self.config = config
        self.device, self.dtype = device, dtype
        self.num_layers = config.num_hidden_layers
        self.hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden // self.num_heads
        self.intermediate = config.intermediate_size
        self.eps = config.rms_norm_eps
        self.max_positions = config.max_position_embeddings
        inner = hf_model.model

        def w(t: Tensor) -> Tensor:
            return t.detach().to(device=device, dtype=dtype).contiguous()

        self.embed = w(inner.embed_tokens.weight)
        head = getattr(hf_model, "lm_head", None)
        # a sequence classifier (LlamaForSequenceClassification) ends in ``score``, a head over its labels:
        # it takes lm_head's place, so a step's "logits" are its classes' (the worker reads them as such)
        self.classifier = head is None
        if self.classifier:
            self.lm_head = w(hf_model.score.weight)
        else:
            self.lm_head = self.embed if head.weight is inner.embed_tokens.weight else w(head.weight)
        self.norm = w(inner.norm.weight)
        self.layers = []
        for layer in inner.layers:
            at, mlp = layer.self_attn, layer.mlp
            self.layers.append(LayerWeights(
                attn_norm=w(layer.input_layernorm.weight),
                qkv=w(torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight])),
                o=w(at.o_proj.weight),
                mlp_norm=w(layer.post_attention_layernorm.weight),
                gate_up=w(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
                down=w(mlp.down_proj.weight)))
        self.rotary = inner.rotary_emb.to(device)
        self.scale = self.head_dim ** -0.5
        self.lora: LoraPool | None = None
        self._kernels: CpuKernels | None = None
        self._native: dict[str, BaseLayers] | None = None
        self._norms_sq: dict[tuple[int, str], Tensor] = {}  # see module_norm_sq
        self.triton: TritonLora | None = None  # GPU: decode steps' LoRA read from the pools in place

    @property
    def kernels(self) -> CpuKernels | None:
        """The native CPU kernels (LoRA and small projections), when enabled and built."""
        return self._kernels

    @kernels.setter
    def kernels(self, kernels: CpuKernels | None) -> None:
        self._kernels, self._native = kernels, None
        if kernels is not None and self.embed.dtype == torch.float32 and self.embed.device.type == "cpu":
            dims = self.module_dims()
            native = {g: BaseLayers([getattr(lw, g) for lw in self.layers], tuple(dims[m][1] for m in ms))
                      for g, ms in GROUPS.items()}
            native["lm_head"] = BaseLayers([self.lm_head], (self.lm_head.shape[0],))
            self._native = native

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each adaptable linear module."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def edge_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of the edges LoRA may target: the embedding maps token ids, lm_head makes logits."""
        vocab = self.embed.shape[0]
        return {"embed_tokens": (vocab, self.hidden), "lm_head": (self.hidden, vocab)}

    def edge_weight(self, module: str) -> Tensor:
        """The ``[vocab, hidden]`` weight of ``embed_tokens`` or ``lm_head`` (one tensor when tied)."""
        return {"embed_tokens": self.embed, "lm_head": self.lm_head}[module]

    def module_weight(self, layer: int, module: str) -> Tensor:
        """The ``[out, in]`` weight of one adaptable module (a view of the fused group it sits in)."""
        group = next(g for g, ms in GROUPS.items() if module in ms)
        dims, start = self.module_dims(), 0
        for m in GROUPS[group][:GROUPS[group].index(module)]:
            start += dims[m][1]
        return getattr(self.layers[layer], group)[start:start + dims[module][1]]

    def module_norm_sq(self, layer: int, module: str) -> Tensor:
        """Squared norms of the rows of ``module_weight`` (float32), computed once (DoRA adapters'
        loads need them; loads run on several threads, and a race only computes one twice)."""
        found = self._norms_sq.get((layer, module))
        if found is None:
            weight = self.module_weight(layer, module).float()
            # a reduction, so no [out, in] square is allocated (the first DoRA load computes them all)
            found = self._norms_sq[(layer, module)] = torch.linalg.vector_norm(weight, dim=1).square()
        return found

    @property
    def nbytes(self) -> int:
        tensors = [self.embed, self.norm, *(t for lw in self.layers for t in (lw.attn_norm, lw.qkv, lw.o, lw.mlp_norm, lw.gate_up, lw.down))]
        if self.lm_head is not self.embed:
            tensors.append(self.lm_head)
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.inference_mode()
    def forward(self, meta: StepMetadata, kv: KVCache, hidden_out: list[Tensor] | None = None) -> Tensor:
        """Run one step; returns float32 logits ``[N, vocab]`` for ``meta.logits_index``. ``hidden_out``
        receives those rows' final-norm hidden states ``[N, hidden]`` (classification heads read them)."""
        x = F.embedding(meta.input_ids, self.embed)
        lora = meta.lora if self.lora is not None else None
        edges = None if lora is None else lora.edges
        if edges is not None and "embed_tokens" in edges:
            x += embed_delta(meta.input_ids, edges["embed_tokens"], self.lora.edge_a["embed_tokens"],
                             self.lora.edge_b["embed_tokens"], x.dtype)
        cos, sin = self.rotary(x, meta.positions[None])
        half = self.head_dim // 2
        # rotate_half(x) * sin == roll(x, half) * sin with its first half negated
        cos, sin = cos[0, :, None, :], torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)[:, None, :]
        if lora is not None and not lora.rank:  # only edge LoRA in the step: the layers run as the base's
            lora = None
        for index, lw in enumerate(self.layers):
            h = F.rms_norm(x, (self.hidden,), lw.attn_norm, self.eps)
            attn = self._attention(index, lw, h, cos, sin, meta, kv, lora)
            x = x + self._linear(attn, lw.o, lora, index, "o", ("o_proj",))
            h = F.rms_norm(x, (self.hidden,), lw.mlp_norm, self.eps)
            gu = self._linear(h, lw.gate_up, lora, index, "gate_up", ("gate_proj", "up_proj"))
            gate, up = gu.split(self.intermediate, dim=-1)
            x = x + self._linear(F.silu(gate) * up, lw.down, lora, index, "down", ("down_proj",))
        last = F.rms_norm(x.index_select(0, meta.logits_index), (self.hidden,), self.norm, self.eps)
        if hidden_out is not None:
            hidden_out.append(last)
        rows = None if edges is None else edges.get("lm_head")
        if rows is not None:
            return self._head(last, rows.index_select(0, meta.logits_index))
        if self._native is not None and last.shape[0] <= NATIVE_PROJECTION_TOKENS:
            return self._kernels.project(self._native["lm_head"], 0, last)
        return project(last, self.lm_head).float()

    def _head(self, last: Tensor, rows: Tensor) -> Tensor:
        """Logits with the rows' lm_head LoRA (see edges.py). A few rows go through the native
        projection with the LoRA in the same pass, as the layers' decode steps do."""
        pool = self.lora
        if pool.kernels is not None and self._native is not None and last.shape[0] <= NATIVE_PROJECTION_TOKENS:
            n, k = rows.shape
            rows = rows.contiguous()
            call = self._kernels.group_call(pool.edge_kernel_pools("lm_head"), rows, rows[None], None,
                                            torch.empty(n * k), n)
            return call.project(self._native["lm_head"], 0, last)
        logits, a, b = project(last, self.lm_head).float(), pool.edge_a["lm_head"], pool.edge_b["lm_head"]
        if self.triton is None:
            return logits.add_(head_delta(last, rows, a, b).float())
        self.triton.add(logits, last, a, rows, [b], [rows], rows.shape[1])  # in place, fixed shapes (graphs)
        return logits

    def _linear(self, x: Tensor, weight: Tensor, lora, layer: int, group: str, modules: tuple[str, ...]) -> Tensor:
        """Base projection plus, when some token uses an adapter, its LoRA delta; a DoRA adapter's
        tokens then scale their outputs (DoRA: ``scales * (W x + s B A x)``, see ``weights.dora_scales``)."""
        y = self._lora_linear(x, weight, lora, layer, group, modules)
        if lora is not None and lora.dora is not None:
            y.mul_(lora.dora.tables[group][layer].index_select(0, lora.dora.index))
        return y

    def _lora_linear(self, x: Tensor, weight: Tensor, lora, layer: int, group: str, modules: tuple[str, ...]) -> Tensor:
        calls = None if lora is None else lora.kernel_calls
        if self._native is not None and x.shape[0] <= NATIVE_PROJECTION_TOKENS:
            # a few tokens (decode): the native projection, with the step's LoRA in the same pass
            # (x is contiguous here; the kernels refuse it otherwise)
            if calls is not None:
                return calls[group].project(self._native[group], layer, x)
            if lora is None:
                return self._kernels.project(self._native[group], layer, x)
        y = project(x, weight)
        if lora is None:
            return y
        if calls is not None:  # the CPU kernel: every adapter token's rows, in one call
            calls[group](layer, x, y)
            return y
        pool, k, cached = self.lora, lora.rank, lora.gathered
        if self.triton is not None and lora.block_len == 1 and lora.rows is not None:  # one token per block
            self.triton.add(y, x, pool.a_stacked[group][layer], lora.rows[group],
                            [pool.b_stacked[m][layer] for m in modules], [lora.rows[m] for m in modules], k,
                            lora.token_index)
            return y
        x_blocks = ops.gather_blocks(x, lora.token_index, lora.num_blocks, lora.block_len)
        if cached is not None:  # steady decoding: one product down, one (block-diagonal) back up
            h = ops.shrink(x_blocks, cached.a[group][layer])
            ops.expand_scatter_add(y, h, cached.b[group][layer], lora.block_pos, lora.token_ids)
            return y
        # rows stored narrower than the base (lora_dtype) widen here: the math runs in x's dtype
        h = ops.shrink(x_blocks, ops.gather_rows(pool.a_stacked[group][layer], lora.rows[group]).to(x.dtype))
        bs = [ops.gather_rows(pool.b_stacked[m][layer], lora.rows[m]).to(x.dtype) for m in modules]
        if lora.token_index is None and lora.block_len > 1:
            # whole prefill blocks in token order: accumulate straight into y's columns, no
            # concatenated copy of the (long) outputs; decode steps keep the fewer-op path below
            y_blocks, start = y.view(lora.num_blocks, lora.block_len, -1), 0
            for i, b in enumerate(bs):
                ops.expand_add(y_blocks[..., start:start + b.shape[-1]], h[..., i * k:(i + 1) * k], b)
                start += b.shape[-1]
            return y
        outs = [ops.expand(h[..., i * k:(i + 1) * k], b) for i, b in enumerate(bs)]
        ops.scatter_add(y, outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1), lora.block_pos, lora.token_ids)
        return y

    def _attention(self, layer: int, lw: LayerWeights, h: Tensor, cos: Tensor, sin: Tensor,
                   meta: StepMetadata, kv: KVCache, lora) -> Tensor:
        t = h.shape[0]
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self._linear(h, lw.qkv, lora, layer, "qkv", ("q_proj", "k_proj", "v_proj"))
        qk = qkv[:, :(nh + nkv) * hd].view(t, nh + nkv, hd)
        qk = qk * cos + torch.roll(qk, hd // 2, dims=-1) * sin
        q, k = qk[:, :nh], qk[:, nh:]
        v = qkv[:, (nh + nkv) * hd:].view(t, nkv, hd)
        k_cache, v_cache = kv.k[layer], kv.v[layer]
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
        out = torch.empty(t, nh * hd, dtype=h.dtype, device=h.device)
        for g in meta.groups:
            if g.q_index is None:
                qg = q[g.first_token:g.first_token + g.num_seqs]
            else:
                qg = q.index_select(0, g.q_index)
            qg = qg.view(g.num_seqs, g.q_len, nh, hd).transpose(1, 2)
            idx = g.ctx_slots.view(-1)
            kg = k_cache.index_select(0, idx).view(g.num_seqs, g.ctx_len, nkv, hd).transpose(1, 2)
            vg = v_cache.index_select(0, idx).view(g.num_seqs, g.ctx_len, nkv, hd).transpose(1, 2)
            og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, scale=self.scale,
                                                enable_gqa=nkv != nh)
            og = og.transpose(1, 2).reshape(g.num_seqs * g.q_len, nh * hd)
            if g.token_ids is None:
                out[g.first_token:g.first_token + g.num_seqs] = og
            else:
                out.index_copy_(0, g.token_ids, og.index_select(0, g.out_pos))
        return out
