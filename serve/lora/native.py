"""The optional CPU LoRA kernel (``bgmv.c``): built with the system C compiler on first use, then
loaded with ctypes from a per-machine cache.

Decode steps on CPU read every adapter's rows once per step; done as a dozen small ``bmm`` calls
per layer, that read runs at a fraction of the memory bandwidth, and prefill first gathers each
block's rows. The kernel does the same math in one call per module group straight from the stacked
pools, reusing each row across a run of tokens of one adapter (see ``bgmv.c`` for its semantics).
No compiler, a failed build, or ``HOTSWAP_NATIVE=0``: ``load()`` returns None and the engine keeps
the pure-torch path, which computes the same values.
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
SOURCE = Path(__file__).with_name("bgmv.c")
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
    parts = [SOURCE.read_text(), " ".join(FLAGS), platform.machine(), flags, _compiler() or ""]
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
        done = subprocess.run([compiler, *FLAGS, "-o", str(out), str(SOURCE)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[:500]}")
        os.replace(out, target)


@cache
def load() -> "Bgmv | None":
    """The kernel, or None when it is disabled or cannot be built here (the reason is logged)."""
    if os.environ.get("HOTSWAP_NATIVE", "1") == "0":
        return None
    try:
        target = cache_dir() / f"bgmv-{_cpu_key()}.so"
        if not target.exists():
            _build(target)
        lib = ctypes.CDLL(str(target))
    except Exception as exc:  # any failure leaves the exact pure-torch path in place
        log.warning("hotswap: CPU LoRA kernel unavailable, using torch ops (%s)", exc)
        return None
    lib.hotswap_lora.restype = ctypes.c_int
    lib.hotswap_lora.argtypes = [_I64, _I64, _PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR,
                                 _I64, _PTR, _PTR]
    return Bgmv(lib)


class Bgmv:
    """``y[tok] += LoRA(x[tok])`` for one module group of one layer, adapters per token."""

    def __init__(self, lib) -> None:
        self._fn = lib.hotswap_lora

    def __call__(self, x: Tensor, y: Tensor, a_pool: Tensor, rows_a: Tensor, b_pools: "PoolPointers",
                 rows_b: Tensor, tok: Tensor | None, scratch: Tensor) -> None:
        """``x [T, in]``, ``y [T, out]`` (row-contiguous float32 on CPU); ``a_pool [rows, in]``;
        ``rows_a [n, nk]``; ``rows_b [nmod, n, k]`` (tokens with equal ``rows_a`` rows have equal
        ``rows_b`` rows: both come from the token's adapter); ``tok [n]`` (None: tokens 0..n-1);
        ``scratch``: at least ``n * nk`` floats."""
        n, nk = rows_a.shape
        nmod, _, k = rows_b.shape
        assert x.stride(1) == 1 and y.stride(1) == 1 and x.dtype == y.dtype == torch.float32
        assert scratch.numel() >= n * nk and nmod == b_pools.count and rows_b.shape[1] == n
        if self._fn(n, x.shape[1], x.data_ptr(), x.stride(0), a_pool.data_ptr(), rows_a.data_ptr(), nk,
                    nmod, k, b_pools.pointers, rows_b.data_ptr(), b_pools.dout.data_ptr(),
                    y.data_ptr(), y.stride(0), None if tok is None else tok.data_ptr(), scratch.data_ptr()):
            raise MemoryError("the LoRA kernel could not allocate its block list")


class PoolPointers:
    """The B pools of one group in one layer, as the kernel takes them (made once; pools never move)."""

    def __init__(self, pools: list[Tensor]) -> None:
        assert all(p.is_contiguous() and p.dtype == torch.float32 for p in pools)
        self.keep = pools  # the tensors must outlive the pointers
        self.count = len(pools)
        self.pointers = ctypes.cast((_PTR * len(pools))(*[p.data_ptr() for p in pools]), _PTR)
        self.dout = torch.tensor([p.shape[1] for p in pools], dtype=torch.long)
