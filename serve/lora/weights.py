"""Load an adapter's files into host tensors laid out for the pools: per module ``A[L, r, in]``, ``B[L, r, out]``.

PEFT's scaling (alpha/r, or alpha/sqrt(r) for rsLoRA, per module with patterns) is folded into B
here, once, so the serving path never multiplies by it. Layers the adapter does not target get
zero rows, which is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from .spec import AdapterRefused, LoraSpec, build_spec, read_config


@dataclass(slots=True)
class HostAdapter:
    """One adapter version's weights on the host, ready to copy into device rows."""

    digest: str
    ref: str
    spec: LoraSpec
    a: dict[str, Tensor]  # module -> [num_layers, rank_m, in_m]
    b: dict[str, Tensor]  # module -> [num_layers, rank_m, out_m], scale folded in

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))

    @property
    def rank(self) -> int:
        return max(t.shape[1] for t in self.a.values())


def load_adapter(folder: Path, digest: str, ref: str, num_layers: int, dims: dict[str, tuple[int, int]],
                 max_rank: int, dtype: torch.dtype, pin_memory: bool = False) -> HostAdapter:
    """Read ``adapter_config.json`` + ``adapter_model.safetensors`` and build the host layout.

    Raises ``AdapterRefused`` with the reason when the adapter cannot be applied exactly.
    """
    config = read_config(folder)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        found = sorted(p.name for p in folder.iterdir())
        raise AdapterRefused(f"no adapter_model.safetensors (files: {', '.join(found)})")
    with safe_open(str(weights), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        spec = build_spec(config, shapes, num_layers, dims, max_rank)
        a: dict[str, Tensor] = {}
        b: dict[str, Tensor] = {}
        for module in spec.modules:
            rank = spec.module_rank(module)
            d_in, d_out = dims[module]
            a_m = torch.zeros(num_layers, rank, d_in, dtype=dtype, pin_memory=pin_memory)
            b_m = torch.zeros(num_layers, rank, d_out, dtype=dtype, pin_memory=pin_memory)
            for layer in range(num_layers):
                keys = spec.keys.get((layer, module))
                if keys is None:
                    continue
                a_t, b_t = f.get_tensor(keys[0]), f.get_tensor(keys[1])
                r = a_t.shape[0]
                a_m[layer, :r] = a_t
                # scale in float32 before the cast, as PEFT's fp32 forward would multiply
                b_m[layer, :r] = (b_t.float().T * spec.scales[(layer, module)]).to(dtype)
            a[module], b[module] = a_m, b_m
    if not torch.isfinite(torch.stack([t.float().abs().max() for t in (*a.values(), *b.values())])).all():
        raise AdapterRefused("the adapter's weights hold NaN or infinite values")
    return HostAdapter(digest=digest, ref=ref, spec=spec, a=a, b=b)
