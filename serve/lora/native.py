"""The optional CPU kernels: the LoRA math (``bgmv.c``) and the copy of an adapter into its pool
rows (``activate.c``), built with the system C compiler on first use, then loaded with ctypes
from a per-machine cache.

Decode steps on CPU read every adapter's rows once per step; done as a dozen small ``bmm`` calls
per layer, that read runs at a fraction of the memory bandwidth, and prefill first gathers each
block's rows. The kernel does the same math in one call per module group straight from the stacked
pools, reusing each row across a run of tokens of one adapter (see ``bgmv.c`` for its semantics).
Decode steps go one further: the base projection itself runs in the kernel (``CpuKernels.project``),
with the step's LoRA added in the same pass (``GroupCall.project``), one call per module group.
No compiler, a failed build, or ``HOTSWAP_NATIVE=0``: ``load()`` returns None and the engine keeps
the pure-torch paths, which compute the same values.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)
SOURCES = [Path(__file__).with_name("bgmv.c"), Path(__file__).with_name("activate.c")]
# included by the sources: part of what the build depends on
HEADERS = [Path(__file__).with_name("bgmv_rows.h"), Path(__file__).with_name("bf16.h")]
# -march=native: the library is built on, and cached for, the machine that runs it
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_F32 = torch.float32
POOL_DTYPES = (torch.float32, torch.bfloat16)  # the row types the kernels read (computing in float32 either way)


def cache_dir() -> Path:
    root = os.environ.get("HOTSWAP_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "hotswap" / "kernels"


def _cpu_key() -> str:
    """What the compiled code depends on: source, flags, compiler, and this CPU's instruction sets."""
    flags = ""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        pass
    parts = [*(source.read_text() for source in (*SOURCES, *HEADERS)), " ".join(FLAGS), platform.machine(), flags,
             _compiler() or ""]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(target: Path) -> None:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (cc, gcc or clang)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # build aside, then rename: never half a file
        out = Path(tmp) / target.name
        done = subprocess.run([compiler, *FLAGS, "-o", str(out), *map(str, SOURCES)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[:500]}")
        os.replace(out, target)


@cache
def load() -> "CpuKernels | None":
    """The kernels, or None when they are disabled or cannot be built here (the reason is logged)."""
    if os.environ.get("HOTSWAP_NATIVE", "1") == "0":
        return None
    try:
        target = cache_dir() / f"lora-{_cpu_key()}.so"
        if not target.exists():
            _build(target)
        lib = ctypes.CDLL(str(target))
    except Exception as exc:  # any failure leaves the exact pure-torch path in place
        log.warning("hotswap: CPU LoRA kernels unavailable, using torch ops (%s)", exc)
        return None
    lib.hotswap_lora_layer.restype = ctypes.c_int
    lib.hotswap_lora_layer.argtypes = [_PTR, _PTR, _PTR, _PTR]
    lib.hotswap_project.restype = None
    lib.hotswap_project.argtypes = [_I64, _PTR, _PTR, _PTR, _PTR, _PTR]
    lib.hotswap_activate.restype = None
    lib.hotswap_activate.argtypes = [_I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64]
    return CpuKernels(lib)


class CpuKernels:
    def __init__(self, lib) -> None:
        self._lora, self._activate, self._project = lib.hotswap_lora_layer, lib.hotswap_activate, lib.hotswap_project

    def project(self, base: "BaseLayers", layer: int, x: Tensor) -> Tensor:
        """``x [T, in] @ weight.T`` for ``base``'s weight in ``layer``: the base projection of a decode
        step (a few tokens), streaming each weight row once for all of them. ``GroupCall.project``
        adds a step's LoRA in the same call."""
        _check_input(x, base.din)
        y = torch.empty(x.shape[0], base.dout_total)
        self._project(x.shape[0], base.addresses[layer], x.data_ptr(), y.data_ptr(), None, None)
        return y

    def group_call(self, pools: "PoolLayers", rows_a: Tensor, rows_b: Tensor, tok: Tensor | None,
                   scratch: Tensor, num_tokens: int) -> "GroupCall":
        """One step's LoRA for one module group: ``call(layer, x, y)`` does ``y[tok] += LoRA(x[tok])``
        with that layer's pools, adapters per token.

        ``x [T, in]``, ``y [T, out]`` (contiguous float32 on CPU, T = num_tokens); ``rows_a [n, nk]`` into the
        A pool; ``rows_b [nmod, n, k]`` into each B pool (tokens with equal ``rows_a`` rows have
        equal ``rows_b`` rows: both come from the token's adapter); ``tok [n]`` (None: tokens
        0..n-1); ``scratch``: at least ``n * nk`` floats. Everything but x and y is checked and
        converted here, once per step: a decode step makes 4 calls per layer, each right after a
        base matmul has pushed the interpreter's state out of the caches, so each Python operation
        left in a call costs far more than it does in a loop."""
        return GroupCall(self._lora, self._project, pools, rows_a, rows_b, tok, scratch, num_tokens)

    def activate(self, items: list[tuple[Tensor | None, Tensor | None, Tensor, Tensor, float, list[int]]]) -> None:
        """Copy one adapter into its pool rows, every layer and module in one call.

        Per item (one layer of one module): ``(lora_A [r, in] or None, lora_B [out, r] or None,
        A pool [R, in], B pool [R, out], scale, rows)``: ``A pool[rows[j]] = lora_A[j]`` and
        ``B pool[rows[j]] = scale * lora_B[:, j]`` for ``j < r``, zeros in the rows beyond ``r``.
        Every tensor contiguous, on CPU; the adapter's float32 or bfloat16, every pool float32 or
        every pool bfloat16 (see ``activate.c``)."""
        n = len(items)
        ptrs = [(_PTR * n)() for _ in range(4)]
        shape = [(_I64 * n)() for _ in range(4)]
        scales, row_ptrs, src_bf16 = (ctypes.c_float * n)(), (_PTR * n)(), (_I64 * n)()
        pool_dtype = items[0][2].dtype if items else torch.float32
        row_arrays: dict[int, ctypes.Array] = {}  # one C array per distinct row list, alive for the call
        for i, (a, b, a_pool, b_pool, scale, rows) in enumerate(items):
            r = 0 if a is None else a.shape[0]
            assert pool_dtype in POOL_DTYPES and a_pool.is_contiguous() and b_pool.is_contiguous()
            assert a_pool.dtype == b_pool.dtype == pool_dtype
            assert r <= len(rows) and (r == 0 or (a.is_contiguous() and b.is_contiguous()
                                                  and a.dtype == b.dtype and a.dtype in POOL_DTYPES))
            src_bf16[i] = r > 0 and a.dtype == torch.bfloat16
            ptrs[0][i], ptrs[1][i] = (a.data_ptr(), b.data_ptr()) if r else (None, None)
            ptrs[2][i], ptrs[3][i] = a_pool.data_ptr(), b_pool.data_ptr()
            shape[0][i], shape[1][i], shape[2][i], shape[3][i] = r, a_pool.shape[1], b_pool.shape[1], len(rows)
            scales[i] = scale
            array = row_arrays.get(id(rows))
            if array is None:
                array = row_arrays[id(rows)] = (_I64 * len(rows))(*rows)
            row_ptrs[i] = ctypes.addressof(array)
        self._activate(n, *ptrs, *shape[:3], scales, row_ptrs, shape[3], src_bf16, pool_dtype == torch.bfloat16)


class _Step(ctypes.Structure):  # struct hotswap_lora_step in bgmv.c
    _fields_ = [("n", _I64), ("nk", _I64), ("nmod", _I64), ("k", _I64), ("rows_a", _PTR), ("rows_b", _PTR),
                ("tok", _PTR), ("h", _PTR)]


class _Pools(ctypes.Structure):  # struct hotswap_lora_pools in bgmv.c
    _fields_ = [("din", _I64), ("ldy", _I64), ("a", _PTR), ("b", _PTR), ("dout", _PTR), ("bf16", _I64)]


class GroupCall:
    """See ``CpuKernels.group_call``."""

    __slots__ = ("_fn", "_project", "_pools", "_step", "_address", "_keep", "_x_shape", "_y_shape")

    def __init__(self, fn, project, pools: "PoolLayers", rows_a: Tensor, rows_b: Tensor, tok: Tensor | None,
                 scratch: Tensor, num_tokens: int) -> None:
        n, nk = rows_a.shape
        nmod, _, k = rows_b.shape
        # the kernel follows raw pointers: anything that does not fit the pools is refused here
        _require(rows_a.dtype == rows_b.dtype == torch.long and rows_a.is_contiguous() and rows_b.is_contiguous()
                 and rows_b.shape[1] == n and nmod == len(pools.douts) and nk <= pools.a_rows, "row ids do not fit the pools")
        _require(n == 0 or (int(rows_a.max()) < pools.a_rows and int(rows_b.max()) < pools.b_rows
                            and int(min(rows_a.min(), rows_b.min())) >= 0), "a row id is outside the pools")
        _require(scratch.dtype == torch.float32 and scratch.is_contiguous() and scratch.numel() >= n * nk,
                 "scratch is too small")
        _require(n <= num_tokens if tok is None else
                 (tok.dtype == torch.long and tok.is_contiguous() and tok.numel() == n
                  and (n == 0 or 0 <= int(tok.min()) <= int(tok.max()) < num_tokens)), "token ids do not match the rows")
        self._fn, self._project, self._pools = fn, project, pools
        self._step = _Step(n, nk, nmod, k, rows_a.data_ptr(), rows_b.data_ptr(),
                           None if tok is None else tok.data_ptr(), scratch.data_ptr())
        self._address = ctypes.addressof(self._step)
        self._keep = (rows_a, rows_b, tok, scratch)  # alive as long as the pointers above
        self._x_shape, self._y_shape = (num_tokens, pools.din), (num_tokens, pools.dout_total)

    def __call__(self, layer: int, x: Tensor, y: Tensor) -> None:
        if (x.shape != self._x_shape or y.shape != self._y_shape or x.dtype is not _F32 or y.dtype is not _F32
                or not (x.is_contiguous() and y.is_contiguous()) or x.is_cuda):
            raise ValueError(f"LoRA kernel inputs: x {tuple(x.shape)} {x.dtype}, y {tuple(y.shape)} {y.dtype}; "
                             f"want {self._x_shape} and {self._y_shape}, contiguous float32 on CPU")
        if self._fn(self._address, self._pools.addresses[layer], x.data_ptr(), y.data_ptr()):
            raise MemoryError("the LoRA kernel could not allocate its block list")

    def project(self, base: "BaseLayers", layer: int, x: Tensor) -> Tensor:
        """``x @ weight.T`` plus this step's LoRA, in one pass (see ``CpuKernels.project``); ``base``
        holds the same modules, in the same order, as the pools."""
        if x.shape != self._x_shape or base.douts != self._pools.douts:
            raise ValueError(f"fused projection: x {tuple(x.shape)} and base modules {base.douts}; want "
                             f"{self._x_shape} and {self._pools.douts}")
        _check_input(x, base.din)
        y = torch.empty(x.shape[0], base.dout_total)
        self._project(x.shape[0], base.addresses[layer], x.data_ptr(), y.data_ptr(), self._address,
                      self._pools.addresses[layer])
        return y


def _check_input(x: Tensor, din: int) -> None:
    if x.dim() != 2 or x.shape[1] != din or x.dtype is not _F32 or not x.is_contiguous() or x.is_cuda:
        raise ValueError(f"projection input {tuple(x.shape)} {x.dtype}: want [T, {din}], contiguous float32 on CPU")


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise ValueError(f"LoRA kernel call: {what}")


class PoolLayers:
    """One module group's pools in every layer, as the kernel takes them: checked and converted
    once (the pools never move). Rows are float32 or bfloat16, the same in every pool."""

    def __init__(self, a_pools: list[Tensor], b_pools: list[list[Tensor]]) -> None:
        first_a, first_b = a_pools[0], b_pools[0]
        dtype = first_a.dtype
        assert dtype in POOL_DTYPES
        for a, bs in zip(a_pools, b_pools, strict=True):
            assert a.is_contiguous() and a.dtype == dtype and a.device.type == "cpu"
            assert a.shape == first_a.shape and [b.shape for b in bs] == [b.shape for b in first_b]
            assert all(b.is_contiguous() and b.dtype == dtype and b.device.type == "cpu" for b in bs)
        self.keep = (a_pools, b_pools)  # the tensors must outlive the pointers
        self.a_rows, self.din = first_a.shape
        self.b_rows = min(b.shape[0] for b in first_b)
        self.douts = tuple(b.shape[1] for b in first_b)
        self.dout_total = sum(self.douts)
        self._dout = torch.tensor(self.douts, dtype=torch.long)
        self._b_arrays = [(_PTR * len(bs))(*[b.data_ptr() for b in bs]) for bs in b_pools]
        self._structs = (_Pools * len(a_pools))(*[
            _Pools(self.din, self.dout_total, a.data_ptr(), ctypes.addressof(b), self._dout.data_ptr(),
                   dtype == torch.bfloat16)
            for a, b in zip(a_pools, self._b_arrays)])
        self.addresses = [ctypes.addressof(s) for s in self._structs]


class _Base(ctypes.Structure):  # struct hotswap_base in bgmv.c
    _fields_ = [("din", _I64), ("nmod", _I64), ("w", _PTR), ("dout", _PTR)]


class BaseLayers:
    """One module group's base weight in every layer (the modules' weights stacked by rows), as the
    projection kernel takes them: checked and converted once (the weights never move)."""

    def __init__(self, weights: list[Tensor], douts: tuple[int, ...]) -> None:
        first = weights[0]
        for w in weights:
            assert w.is_contiguous() and w.dtype == torch.float32 and w.device.type == "cpu"
            assert w.shape == first.shape and w.shape[0] == sum(douts)
        self.keep = weights  # the tensors must outlive the pointers
        self.din, self.douts, self.dout_total = first.shape[1], tuple(douts), first.shape[0]
        self._dout = torch.tensor(douts, dtype=torch.long)
        self._structs = (_Base * len(weights))(*[_Base(self.din, len(douts), w.data_ptr(), self._dout.data_ptr())
                                                 for w in weights])
        self.addresses = [ctypes.addressof(s) for s in self._structs]
