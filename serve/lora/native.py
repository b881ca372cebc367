"""The optional CPU kernels: the LoRA math (``bgmv.c``) and the copy of an adapter into its pool
rows (``activate.c``), built with the system C compiler on first use, then loaded with ctypes
from a per-machine cache.

Decode steps on CPU read every adapter's rows once per step; done as a dozen small ``bmm`` calls
per layer, that read runs at a fraction of the memory bandwidth, and prefill first gathers each
block's rows. The kernel does the same math in one call per module group straight from the stacked
pools, reusing each row across a run of tokens of one adapter (see ``bgmv.c`` for its semantics).
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
# -march=native: the library is built on, and cached for, the machine that runs it
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


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
    parts = [*(source.read_text() for source in SOURCES), " ".join(FLAGS), platform.machine(), flags, _compiler() or ""]
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
    lib.hotswap_lora.restype = ctypes.c_int
    lib.hotswap_lora.argtypes = [_I64, _I64, _PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR,
                                 _I64, _PTR, _PTR]
    lib.hotswap_activate.restype = None
    lib.hotswap_activate.argtypes = [_I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR]
    return CpuKernels(lib)


class CpuKernels:
    def __init__(self, lib) -> None:
        self._lora, self._activate = lib.hotswap_lora, lib.hotswap_activate

    def lora(self, x: Tensor, y: Tensor, a_pool: Tensor, rows_a: Tensor, b_pools: "PoolPointers",
                 rows_b: Tensor, tok: Tensor | None, scratch: Tensor) -> None:
        """``y[tok] += LoRA(x[tok])`` for one module group of one layer, adapters per token.

        ``x [T, in]``, ``y [T, out]`` (row-contiguous float32 on CPU); ``a_pool [rows, in]``;
        ``rows_a [n, nk]``; ``rows_b [nmod, n, k]`` (tokens with equal ``rows_a`` rows have equal
        ``rows_b`` rows: both come from the token's adapter); ``tok [n]`` (None: tokens 0..n-1);
        ``scratch``: at least ``n * nk`` floats."""
        n, nk = rows_a.shape
        nmod, _, k = rows_b.shape
        assert x.stride(1) == 1 and y.stride(1) == 1 and x.dtype == y.dtype == torch.float32
        assert scratch.numel() >= n * nk and nmod == b_pools.count and rows_b.shape[1] == n
        if self._lora(n, x.shape[1], x.data_ptr(), x.stride(0), a_pool.data_ptr(), rows_a.data_ptr(), nk,
                    nmod, k, b_pools.pointers, rows_b.data_ptr(), b_pools.dout.data_ptr(),
                    y.data_ptr(), y.stride(0), None if tok is None else tok.data_ptr(), scratch.data_ptr()):
            raise MemoryError("the LoRA kernel could not allocate its block list")


    def activate(self, items: list[tuple[Tensor | None, Tensor | None, Tensor, Tensor, float, list[int]]]) -> None:
        """Copy one adapter into its pool rows, every layer and module in one call.

        Per item (one layer of one module): ``(lora_A [r, in] or None, lora_B [out, r] or None,
        A pool [R, in], B pool [R, out], scale, rows)``: ``A pool[rows[j]] = lora_A[j]`` and
        ``B pool[rows[j]] = scale * lora_B[:, j]`` for ``j < r``, zeros in the rows beyond ``r``.
        Every tensor float32, contiguous, on CPU (see ``activate.c``)."""
        n = len(items)
        ptrs = [(_PTR * n)() for _ in range(4)]
        shape = [(_I64 * n)() for _ in range(4)]
        scales, row_ptrs = (ctypes.c_float * n)(), (_PTR * n)()
        row_arrays: dict[int, ctypes.Array] = {}  # one C array per distinct row list, alive for the call
        for i, (a, b, a_pool, b_pool, scale, rows) in enumerate(items):
            r = 0 if a is None else a.shape[0]
            assert a_pool.is_contiguous() and b_pool.is_contiguous() and a_pool.dtype == b_pool.dtype == torch.float32
            assert r <= len(rows) and (r == 0 or (a.is_contiguous() and b.is_contiguous()
                                                  and a.dtype == b.dtype == torch.float32))
            ptrs[0][i], ptrs[1][i] = (a.data_ptr(), b.data_ptr()) if r else (None, None)
            ptrs[2][i], ptrs[3][i] = a_pool.data_ptr(), b_pool.data_ptr()
            shape[0][i], shape[1][i], shape[2][i], shape[3][i] = r, a_pool.shape[1], b_pool.shape[1], len(rows)
            scales[i] = scale
            array = row_arrays.get(id(rows))
            if array is None:
                array = row_arrays[id(rows)] = (_I64 * len(rows))(*rows)
            row_ptrs[i] = ctypes.addressof(array)
        self._activate(n, *ptrs, *shape[:3], scales, row_ptrs, shape[3])


class PoolPointers:
    """The B pools of one group in one layer, as the kernel takes them (made once; pools never move)."""

    def __init__(self, pools: list[Tensor]) -> None:
        assert all(p.is_contiguous() and p.dtype == torch.float32 for p in pools)
        self.keep = pools  # the tensors must outlive the pointers
        self.count = len(pools)
        self.pointers = ctypes.cast((_PTR * len(pools))(*[p.data_ptr() for p in pools]), _PTR)
        self.dout = torch.tensor([p.shape[1] for p in pools], dtype=torch.long)
