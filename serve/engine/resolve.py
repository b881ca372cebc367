"""Registry references -> engine targets, through the hub's public API only.

Names, versions and aliases are read at call time, so a moved alias reaches the next request;
what comes out is keyed by the version's digest.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hotswap.hub import HubError, NotFoundError, classifier_labels

from ..lora.compose import composite_digest, composite_ref, is_composite, parse_composite
from .config import EngineConfig
from .errors import AdapterNotFound, EngineError, IncompatibleAdapter, InvalidRequest
from .kv_cache import KVCache
from .loaders import has_tokenizer
from .requests import Target
from .worker import MAX_CONTEXT


@dataclass(slots=True, frozen=True)
class ModelInfo:
    """What submit needs to know of a full model before it is loaded."""

    tokenizer: object
    max_model_len: int
    estimate_bytes: int
    fits_kv: Callable[[int], bool]
    labels: tuple[str, ...] | None  # a sequence classifier's label names (see classify.py)
    pad_token_id: int | None  # where a sequence classifier pools: the last token that is not this one
    vocab_size: int  # rows of its embedding: a prompt's ids must be below (its tokenizer may know more)


def not_a_base(version) -> str | None:
    """Why a registry version cannot be served as a base (None when it is one)."""
    if version.kind == "base":
        return None
    return f"{version.ref} is {'an' if version.kind == 'adapter' else 'a'} {version.kind}, not a base"


def num_weights(folder: Path) -> int:
    """Elements of every tensor of a checkpoint's safetensors files, read from their headers."""
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as file:
            total += sum(math.prod(file.get_slice(name).get_shape()) for name in file.keys())
    return total


class Resolver:
    def __init__(self, registry, base_ref: str, max_rank: int) -> None:
        self.registry = registry
        self.base_ref = base_ref
        self.max_rank = max_rank
        self._lock = threading.Lock()  # one registry connection shared by request and loader threads
        self._models: dict[str, ModelInfo] = {}
        self.base_version = None

    def open_base(self) -> tuple[Target, Path]:
        version = self._resolve(self.base_ref)
        if problem := not_a_base(version):
            raise IncompatibleAdapter(problem)
        self.base_version = version
        return Target("base", version.ref, version.digest), self.open(version).path

    def _resolve(self, ref: str):
        try:
            with self._lock:
                return self.registry.resolve(ref)
        except NotFoundError as exc:
            raise AdapterNotFound(str(exc)) from None
        except HubError as exc:  # a malformed reference
            raise InvalidRequest(f"bad model reference {ref!r}: {exc}") from None

    def open(self, ref):
        try:
            with self._lock:
                return self.registry.open(ref)
        except NotFoundError as exc:
            raise AdapterNotFound(str(exc)) from None
        except HubError as exc:
            raise EngineError(f"cannot open {getattr(ref, 'ref', ref)}: {exc}") from None

    def resolve(self, model: str | None) -> Target:
        base = self.base_version
        if model is None or model == "":
            return Target("base", base.ref, base.digest)
        if not isinstance(model, str):
            raise InvalidRequest(f"model must be a registry reference string, got {type(model).__name__}")
        if is_composite(model):
            return self._combination(model)
        version = self._resolve(model)
        if version.kind == "base":
            if version.digest != base.digest:
                raise IncompatibleAdapter(f"{version.ref} is another base; this engine serves {base.ref}")
            return Target("base", version.ref, version.digest)
        if version.kind == "model":
            return Target("model", version.ref, version.digest)
        return self._adapter(version)

    def _combination(self, model: str) -> Target:
        """``"a*0.7+b@2*0.3"``: every part an adapter of this base; keyed by their digests and weights."""
        try:
            parts = parse_composite(model)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        targets = []
        for ref, weight in parts:
            version = self._resolve(ref)
            if version.kind != "adapter":
                raise InvalidRequest(f"{model!r}: {version.ref} is a {version.kind}; only adapters can be combined")
            targets.append((self._adapter(version), weight))
        return Target("adapter", composite_ref([(t.ref, w) for t, w in targets]),
                      composite_digest([(t.digest, w) for t, w in targets]))

    def _adapter(self, version) -> Target:
        base = self.base_version
        meta = version.metadata
        if meta.base_fingerprint != base.metadata.fingerprint:
            raise IncompatibleAdapter(f"adapter {version.ref} was made for base {meta.base or 'unknown'}, "
                                      f"not for {base.ref} which this engine serves")
        if meta.peft_type and str(meta.peft_type).upper() != "LORA":
            raise IncompatibleAdapter(f"adapter {version.ref} is {meta.peft_type}; only LoRA adapters are served")
        if meta.rank is not None and meta.rank > self.max_rank:
            raise IncompatibleAdapter(f"adapter {version.ref} has rank {meta.rank}, above max_rank {self.max_rank}")
        return Target("adapter", version.ref, version.digest)

    def model_info(self, target: Target, cfg: EngineConfig) -> ModelInfo:
        info = self._models.get(target.digest)
        if info is None:
            from transformers import AutoTokenizer

            snap = self.open(target.ref)
            config = json.loads((snap.path / "config.json").read_text())
            own = snap.path if has_tokenizer(snap.path) else self._base_of(snap.version)
            tokenizer = AutoTokenizer.from_pretrained(own)
            heads = config["num_attention_heads"]
            head_dim = config.get("head_dim") or config["hidden_size"] // heads
            block = KVCache.block_bytes(config["num_hidden_layers"], cfg.kv_block_size,
                                        config.get("num_key_value_heads", heads), head_dim, cfg.torch_dtype())
            num_blocks = max(1, cfg.kv_cache_bytes // block)
            # served in the engine's dtype whatever the files store (bfloat16 files served in float32 double)
            weights = num_weights(snap.path) * cfg.torch_dtype().itemsize
            positions = config.get("max_position_embeddings", MAX_CONTEXT)
            info = ModelInfo(
                tokenizer=tokenizer,
                max_model_len=min(cfg.max_model_len or min(positions, MAX_CONTEXT), positions),
                estimate_bytes=weights + (num_blocks + 1) * block,  # the worker's spare block too
                fits_kv=lambda n, nb=num_blocks: -(-n // cfg.kv_block_size) <= nb,
                labels=classifier_labels(config), pad_token_id=config.get("pad_token_id"),
                vocab_size=config.get("vocab_size") or len(tokenizer))
            self._models[target.digest] = info
        return info

    def _base_of(self, version) -> Path:
        """The folder of the base a model was published on (whose tokenizer reads its text when it holds
        none), which need not be the base this engine serves."""
        ref = version.metadata.base
        if not ref:
            raise IncompatibleAdapter(f"model {version.ref} holds no tokenizer and names no base to take one from")
        try:
            return self.open(ref).path
        except AdapterNotFound:
            raise IncompatibleAdapter(f"model {version.ref} holds no tokenizer and its base {ref} is gone "
                                      f"from the registry") from None

