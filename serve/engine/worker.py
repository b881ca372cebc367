"""A loaded checkpoint (the base, or a full fine-tuned model) with its own KV pool and scheduler."""

from __future__ import annotations

from typing import Callable

import torch

from ..lora import native
from ..lora.batch import build_lora_step
from .classify import classify_rows
from .config import EngineConfig
from .decode_graphs import DecodeGraphs
from .errors import IncompatibleAdapter
from .kv_cache import BlockManager, KVCache
from .metadata import SeqSpan, build_metadata
from .model import LlamaRunner
from .requests import Target, TokenLogprobs
from .sampler import sample, token_logprobs, token_piece
from .scheduler import Scheduler
from .sequence import Sequence

MAX_CONTEXT = 8192
Sampled = tuple[Sequence, int, TokenLogprobs | None]  # a sequence, its new token, that token's log-probabilities


def eos_ids(hf_model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    # a sequence classifier has no generation_config
    generation = getattr(hf_model, "generation_config", None)
    for value in (getattr(generation, "eos_token_id", None), hf_model.config.eos_token_id,
                  tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return frozenset(ids)


class Worker:
    """Runs steps for the sequences of one checkpoint; knows nothing of adapters' residency."""

    def __init__(self, target: Target, hf_model, tokenizer, config: EngineConfig,
                 labels: tuple[str, ...] | None = None) -> None:
        device, dtype = config.torch_device(), config.torch_dtype()
        self.target = target
        self.tokenizer = tokenizer
        self._pieces: dict[int, tuple[str, bytes | None]] = {}  # see _describe
        self.runner = LlamaRunner(hf_model, device, dtype)
        # a full sequence classifier: its own head and label names (an adapter's are in its slot)
        self.labels = labels if self.runner.classifier else None
        if self.runner.classifier and (labels is None or len(labels) != self.runner.lm_head.shape[0]):
            raise IncompatibleAdapter(f"{target.ref}: its classification head has {self.runner.lm_head.shape[0]} "
                                      f"rows but its config names {len(labels or ())} labels")
        if config.native_kernels and device.type == "cpu" and dtype == torch.float32:
            self.runner.kernels = native.load()
        self.eos_ids = eos_ids(hf_model, tokenizer)
        r = self.runner
        block_bytes = KVCache.block_bytes(r.num_layers, config.kv_block_size, r.num_kv_heads, r.head_dim, dtype)
        num_blocks = max(1, config.kv_cache_bytes // block_bytes)
        # one block more than the manager hands out: padded rows of bucketed decode steps write there
        self.kv = KVCache(r.num_layers, num_blocks + 1, config.kv_block_size, r.num_kv_heads, r.head_dim, dtype, device)
        self.blocks = BlockManager(num_blocks, config.kv_block_size, caching=config.prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_batch_tokens, config.max_running)
        self.max_model_len = min(config.max_model_len or min(r.max_positions, MAX_CONTEXT), r.max_positions)
        self.device = device
        self.graphs = DecodeGraphs(r, self.kv, num_blocks, config.kv_block_size, self.max_model_len,
                                   capture=device.type == "cuda") if config.use_decode_graphs() else None
        self.lora_batch_cache_bytes = config.batch_cache_bytes()

    @property
    def nbytes(self) -> int:
        return self.runner.nbytes + self.kv.nbytes

    def fits_kv(self, num_tokens: int) -> bool:
        return self.blocks.blocks_for(num_tokens) <= self.blocks.num_blocks

    @torch.inference_mode()
    def step(self, try_start: Callable[[Sequence], bool],
             on_preempt: Callable[[Sequence], None]) -> tuple[list[tuple[Sequence, int]], list[Sampled]]:
        """Schedule, run one forward, sample. Returns the plan (sequence, tokens computed) and
        (sequence, new token, its log-probabilities or None) for the sequences sampled."""
        plan = self.scheduler.schedule(try_start, on_preempt)
        if not plan:
            return [], []
        scores = [self._prompt_scores(seq, n) for seq, n in plan]
        logits = None
        if (self.graphs is not None and not any(scores) and all(n == 1 and seq.num_pending == 1 for seq, n in plan)
                and not self._needs_eager(plan)):
            logits = self.graphs.run([seq for seq, _ in plan])
            if logits is None:  # a capture failed on this device: eager from now on
                self.graphs = None
        hidden = [] if any(seq.classify for seq, _ in plan) else None
        if logits is None:
            logits = self._forward(plan, scores, hidden)
        num_sampled = sum(seq.num_computed + n == len(seq.token_ids) for seq, n in plan)
        self._keep_prompt_logprobs(plan, scores, logits[num_sampled:])
        logits = logits[:num_sampled]
        for seq, n in plan:
            seq.num_computed += n
        sampled = [seq for seq, _ in plan if seq.num_computed == len(seq.token_ids)]
        if hidden:
            heads = [self._head(s) if s.classify else None for s in sampled]
            for seq, found in zip(sampled, classify_rows(hidden[0], heads)):
                seq.classification = found
        asking = [i for i, s in enumerate(sampled) if s.sampling.logprobs is not None]
        # before sampling, which masks banned tokens in place: the model's own distribution
        raw = logits[asking].log_softmax(-1).cpu() if asking else None
        banned = [s.eos_ids if s.num_generated < s.sampling.min_tokens else frozenset() for s in sampled]
        tokens = sample(logits, [s.sampling for s in sampled], [s.token_ids for s in sampled],
                        [s.generator for s in sampled], banned, [s.prompt_len for s in sampled])
        found: list[TokenLogprobs | None] = [None] * len(sampled)
        for row, i in enumerate(asking):
            found[i] = token_logprobs(raw[row], tokens[i], sampled[i].sampling.logprobs, self._describe)
        return plan, list(zip(sampled, tokens, found))

    def _head(self, seq: Sequence) -> tuple[torch.Tensor, tuple[str, ...]]:
        """The classification head a classify row reads, and its label names."""
        if self.labels is not None:
            return self.runner.lm_head, self.labels
        slot = self.runner.lora.slot(seq.slot)
        return slot.head, slot.labels

    def _needs_eager(self, plan: list[tuple[Sequence, int]]) -> bool:
        """Whether the step holds what bucketed steps leave out: a classification, or an lm_head LoRA
        without the Triton kernels (the torch path groups its rows by adapter, at data-dependent shapes)."""
        pool = self.runner.lora
        if pool is None:
            return False
        if any(seq.classify for seq, _ in plan):
            return True
        return self.runner.triton is None and any(
            "lm_head" in pool.slot(seq.slot).rows for seq, _ in plan if seq.slot >= 0)

    @staticmethod
    def _prompt_scores(seq: Sequence, n: int) -> range:
        """Offsets in this step's span of the prompt positions whose next token gets a log-probability:
        only those not scored yet (a preempted sequence computes its prompt again)."""
        if seq.prompt_logprobs is None:
            return range(0)
        start = seq.num_computed
        first, stop = max(start, len(seq.prompt_logprobs) - 1), min(start + n, seq.prompt_len - 1)
        return range(first - start, max(first, stop) - start)

    def _keep_prompt_logprobs(self, plan: list[tuple[Sequence, int]], scores: list[range],
                              logits: torch.Tensor) -> None:
        """Turn the scored rows' logits (in plan order) into the next prompt tokens' entries."""
        row = 0
        for (seq, _), offsets in zip(plan, scores):
            if not offsets:
                continue
            rows = logits[row:row + len(offsets)].log_softmax(-1).cpu()
            row += len(offsets)
            for values, offset in zip(rows, offsets):
                token = seq.token_ids[seq.num_computed + offset + 1]
                k = seq.sampling.prompt_logprobs
                seq.prompt_logprobs.append(token_logprobs(values, token, k, self._describe))

    def _describe(self, token_id: int) -> tuple[str, bytes | None]:
        """A token's text and bytes, decoded once per token id (log-probabilities ask for the same
        few thousand tokens again and again)."""
        found = self._pieces.get(token_id)
        if found is None:
            found = self._pieces[token_id] = token_piece(self.tokenizer, token_id)
        return found

    def _forward(self, plan: list[tuple[Sequence, int]], scores: list[range],
                 hidden: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The step eagerly, at its own shapes: logits of the sequences whose step ends at their last
        token, then those of the prompt positions in ``scores``."""
        spans, segments, first = [], [], 0
        for (seq, n), score in zip(plan, scores):
            end = seq.num_computed + n
            spans.append(SeqSpan(seq.token_ids[seq.num_computed:end], seq.num_computed, seq.block_table,
                                 end == len(seq.token_ids), score))
            segments.append((first, n, seq.slot))
            first += n
        lora = None
        if self.runner.lora is not None:
            lora = build_lora_step(segments, first, self.runner.lora, self.device, self.lora_batch_cache_bytes,
                                   kernel=self.runner.lora.kernels is not None)
        meta = build_metadata(spans, self.blocks.block_size, self.device, lora)
        return self.runner.forward(meta, self.kv, hidden)

