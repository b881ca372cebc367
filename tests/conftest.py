"""Fixtures shared by every package's tests: tiny randomly initialised Llama bases."""

from __future__ import annotations

import os

# Tests never reach a network hub, and keep torch to the few cores this machine has.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels (the GPU decode LoRA) run in Triton's CPU interpreter, which must be
# chosen before Triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def embedded_home(tmp_path_factory) -> Path:
    """A registry holding the embedded base (`smollm2`, imported once per test session: ~1 min).

    For `@pytest.mark.integration` tests only; open it with `Registry(embedded_home)`."""
    from hotswap.hub import Registry
    from hotswap.hub.importers import import_base

    home = tmp_path_factory.mktemp("embedded-home")
    registry = Registry(home)
    import_base(registry, "smollm2")
    registry.close()
    return home
