"""An adapter's file in host memory: one read into one buffer, tensors as views of it.

The host tier keeps exactly the file's bytes (no per-tensor allocations, no re-layout), so a cold
load is one sequential read after the registry's digest check. PEFT's scaling (alpha/r, or
alpha/sqrt(r) for rsLoRA, per module with patterns) is folded into B when the rows are copied into
the device pool (``LoraPool.activate``), so the serving path never multiplies by it.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .spec import AdapterRefused, LoraSpec, build_spec, read_config

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@dataclass(slots=True)
class HostAdapter:
    """One adapter version on the host, ready to copy into device rows."""

    digest: str
    ref: str
    spec: LoraSpec
    buffer: Tensor  # uint8: the whole safetensors file
    a: dict[tuple[int, str], Tensor]  # (layer, module) -> lora_A [r, in], a view of ``buffer``
    b: dict[tuple[int, str], Tensor]  # (layer, module) -> lora_B [out, r], a view of ``buffer``
    ranks: dict[str, int]  # module -> rows it needs in that module's pool (highest rank over layers)
    # DoRA: (layer, module) -> lora_magnitude_vector [out] (a view of ``buffer``), and the per-output
    # scales magnitude / ||W + scale * B A|| that the loader derives from them and the base (float32)
    magnitude: dict[tuple[int, str], Tensor] | None = None
    dora_scales: dict[tuple[int, str], Tensor] | None = None
    # edge module -> PEFT's copy of its base weight (a view of ``buffer``), until ``drop_base_copies``
    base_copies: dict[str, Tensor] | None = None
    # a classification adapter's head ``score [labels, hidden]`` (a view of ``buffer``) and its labels'
    # names (``labels.json`` beside the weights, else LABEL_0, LABEL_1, ... as transformers names them)
    head: Tensor | None = None
    labels: tuple[str, ...] | None = None

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() + sum(t.nbytes for t in (self.dora_scales or {}).values())

    @property
    def rank(self) -> int:
        return max(self.ranks.values())


def read_safetensors(path: Path, pin_memory: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """The file in one buffer and its tensors as views (CPU); only float tensors are accepted."""
    size = path.stat().st_size
    if size < 8:
        raise AdapterRefused(f"{path.name} is not a safetensors file")
    with open(path, "rb") as handle:
        if pin_memory:  # a GPU copies from page-locked memory fastest
            buffer = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            if handle.readinto(memoryview(buffer.numpy())) != size:
                raise AdapterRefused(f"{path.name} changed while it was read")
        else:  # map the (page-cached) file read-only: no copy, every page mapped in one call
            mapped = mmap.mmap(handle.fileno(), size, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0),
                               prot=mmap.PROT_READ)
            with warnings.catch_warnings():  # torch warns that the memory is not writable; nothing writes it
                warnings.simplefilter("ignore", UserWarning)
                buffer = torch.frombuffer(mapped, dtype=torch.uint8)
    if size < 8:
        raise AdapterRefused(f"{path.name} is not a safetensors file")
    (length,) = struct.unpack("<Q", bytes(buffer[:8].tolist()))
    try:
        header = json.loads(bytes(buffer[8:8 + length].numpy()))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterRefused(f"{path.name} has an unreadable header: {exc}") from None
    start = 8 + length
    if not isinstance(header, dict):
        raise AdapterRefused(f"{path.name} is not a safetensors file: its header is not a JSON object")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
        if dtype is None:
            raise AdapterRefused(f"{name}: dtype {info.get('dtype') if isinstance(info, dict) else info!r} is not "
                                 "a float type the engine loads")
        begin, end = _extent(path, name, info, dtype.itemsize, start, size)
        raw = buffer[begin:end]
        if begin % dtype.itemsize:  # an unaligned tensor: copy it out instead of viewing it
            raw = raw.clone()
        tensors[name] = raw.view(dtype).view(info["shape"])
    return buffer, tensors


def _extent(path: Path, name: str, info: dict, itemsize: int, start: int, size: int) -> tuple[int, int]:
    """A tensor's [begin, end) in the file, checked against its shape and the file's size (a truncated
    or hand-edited file is refused, not read past its end)."""
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if (not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape)
            or not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)):
        raise AdapterRefused(f"{path.name}: tensor {name} has no usable shape and data_offsets")
    begin, end = start + offsets[0], start + offsets[1]
    if not start <= begin <= end <= size or end - begin != math.prod(shape) * itemsize:
        raise AdapterRefused(f"{path.name}: tensor {name}'s bytes [{offsets[0]}, {offsets[1]}) do not hold its shape "
                             f"{shape} within the file (truncated or damaged)")
    return begin, end


def _check_finite(tensors: dict[str, Tensor]) -> None:
    """Refuse NaN/inf weights. One sum over all float32 data when they are back to back (a sum is
    finite only if every value is, overflow aside, which is refused too); else tensor by tensor."""
    values = list(tensors.values())
    if values and all(t.dtype == torch.float32 for t in values):
        ordered = sorted(values, key=lambda t: t.data_ptr())
        start, end = ordered[0].data_ptr(), ordered[-1].data_ptr() + ordered[-1].nbytes
        if sum(t.nbytes for t in values) == end - start:
            whole = ordered[0].view(-1)  # a view of the buffer, widened to the whole data region
            whole = torch.as_strided(whole, ((end - start) // 4,), (1,))
            if torch.isfinite(whole.sum()):
                return
    for name, t in tensors.items():
        if not torch.isfinite(t.float().sum()):
            raise AdapterRefused(f"{name} holds NaN or infinite values")


def load_adapter(folder: Path, digest: str, ref: str, num_layers: int, dims: dict[str, tuple[int, int]],
                 max_rank: int, pin_memory: bool = False) -> HostAdapter:
    """Read ``adapter_config.json`` + ``adapter_model.safetensors`` and check them against the base.

    Raises ``AdapterRefused`` with the reason when the adapter cannot be applied exactly.
    """
    try:
        return _load_adapter(folder, digest, ref, num_layers, dims, max_rank, pin_memory)
    except AdapterRefused:
        raise
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:  # a file no check above foresaw: refused, not a 500
        raise AdapterRefused(f"unreadable adapter ({type(exc).__name__}: {exc})") from exc


def _load_adapter(folder: Path, digest: str, ref: str, num_layers: int, dims: dict[str, tuple[int, int]],
                  max_rank: int, pin_memory: bool) -> HostAdapter:
    config = read_config(folder)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        found = sorted(p.name for p in folder.iterdir())
        raise AdapterRefused(f"no adapter_model.safetensors (files: {', '.join(found)})")
    buffer, tensors = read_safetensors(weights, pin_memory)
    spec = build_spec(config, {k: tuple(t.shape) for k, t in tensors.items()}, num_layers, dims, max_rank)
    _check_finite(tensors)
    a = {pair: tensors[keys[0]] for pair, keys in spec.keys.items()}
    b = {pair: tensors[keys[1]] for pair, keys in spec.keys.items()}
    magnitude = None if spec.magnitudes is None else {pair: tensors[k] for pair, k in spec.magnitudes.items()}
    copies = None if spec.base_copies is None else {m: tensors[k] for m, k in spec.base_copies.items()}
    head = None if spec.head is None else tensors[spec.head]
    return HostAdapter(digest=digest, ref=ref, spec=spec, buffer=buffer, a=a, b=b,
                       ranks={m: spec.module_rank(m) for m in spec.targets}, magnitude=magnitude,
                       base_copies=copies, head=head, labels=None if head is None else read_labels(folder, head.shape[0]))


def read_labels(folder: Path, count: int) -> tuple[str, ...]:
    """The names of a classification adapter's ``count`` labels: ``labels.json`` (a list of distinct
    strings, class 0 first) when the folder has one, else transformers' default names."""
    path = folder / "labels.json"
    if not path.is_file():
        return tuple(f"LABEL_{i}" for i in range(count))
    try:
        names = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterRefused(f"labels.json is not valid JSON: {exc}") from None
    if (not isinstance(names, list) or len(names) != count or not all(isinstance(n, str) and n for n in names)
            or len(set(names)) != count):
        raise AdapterRefused(f"labels.json must list {count} distinct non-empty names (one per row of the "
                             f"classification head), not {str(names)[:80]}")
    return tuple(names)


def drop_base_copies(adapter: HostAdapter, base_weight) -> HostAdapter:
    """Check the copies of edge base weights that PEFT saves beside an embed_tokens or lm_head LoRA
    against the base (``base_weight(module)``, in the dtype it is served in) and keep only the LoRA
    tensors: the host tier then holds the adapter's own bytes, not another copy of the vocabulary.
    A copy that differs (a resized or retrained vocabulary) is refused: only the LoRA is served."""
    for module, copy in (adapter.base_copies or {}).items():
        weight = base_weight(module)
        if not torch.equal(copy.to(weight.device, weight.dtype), weight):
            raise AdapterRefused(f"its copy of the base's {module} weight differs from the base's (a resized or "
                                 f"retrained vocabulary?); only a LoRA update of {module} can be served")
    kept = [*adapter.a.values(), *adapter.b.values(), *(adapter.magnitude or {}).values(),
            *(() if adapter.head is None else (adapter.head,))]
    offsets, size = [], 0
    for t in kept:
        size = -(-size // t.element_size()) * t.element_size()  # each tensor aligned to its element size
        offsets.append(size)
        size += t.nbytes
    buffer = torch.empty(size, dtype=torch.uint8, pin_memory=adapter.buffer.is_pinned())
    views = []
    for t, offset in zip(kept, offsets):
        view = buffer[offset:offset + t.nbytes].view(t.dtype).view(t.shape)
        views.append(view.copy_(t))
    found = iter(views)
    a = {pair: next(found) for pair in adapter.a}
    b = {pair: next(found) for pair in adapter.b}
    magnitude = None if adapter.magnitude is None else {pair: next(found) for pair in adapter.magnitude}
    return HostAdapter(digest=adapter.digest, ref=adapter.ref, spec=adapter.spec, buffer=buffer, a=a, b=b,
                       ranks=adapter.ranks, magnitude=magnitude, head=next(found, None), labels=adapter.labels)


def dora_scales(adapter: HostAdapter, base_weight, base_norm_sq,
                rows_dtype: torch.dtype = torch.float32) -> dict[tuple[int, str], Tensor]:
    """DoRA's per-output scales, ``magnitude / ||W + s B A||`` over each output row, as PEFT defines
    them (float32). ``base_weight(layer, module)`` is the base's ``[out, in]`` weight and
    ``base_norm_sq(layer, module)`` its squared row norms (the same for every adapter, so computed
    once). The norm is expanded, ``||W||^2 + 2 s (W A^T . B) + s^2 ||B A||^2``, so that no ``[out, in]``
    matrix is formed: one product with W per module instead of three passes. Kept on the host like
    the file. A DoRA layer's output is then ``scales * (W x + s B A x)``. ``rows_dtype``: what the pool
    stores A and B in; the norm is of the values it holds, rounded as it rounds them."""
    found = {}
    for pair, magnitude in (adapter.magnitude or {}).items():
        w, s = base_weight(*pair), adapter.spec.scales[pair]
        # fresh copies either way: a view into the file's buffer may sit unaligned, and the matrix
        # products below then sum in another order, so equal values would give unequal scales
        a, b = (t.to(w.device, rows_dtype).to(torch.float32, copy=True) for t in (adapter.a[pair], adapter.b[pair]))
        cross = ((w.float() @ a.T) * b).sum(1)
        lora_sq = ((b @ (a @ a.T)) * b).sum(1)
        norm = (base_norm_sq(*pair) + 2 * s * cross + s * s * lora_sq).clamp_min(0).sqrt()
        found[pair] = (magnitude.to(w.device, torch.float32) / norm).cpu()
    return found
