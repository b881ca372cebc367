"""The baselines of `hotswap bench` (serve/bench.py): HF ``generate`` on the base and PEFT's mixed batch."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .bench import BenchSettings


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class HFBaselines:
    """HF generate on the base, and PEFT's mixed batch (``generate(adapter_names=...)``), on the same requests.

    Both sides forbid EOS until the last token (min_new_tokens here, min_tokens in the engine), so
    their greedy outputs compare row for row."""

    def __init__(self, s: BenchSettings, base_dir, adapter_dirs, prompts, names, device, dtype) -> None:
        from peft import PeftModel
        from transformers import LlamaForCausalLM

        self.s, self.names, self.device = s, names, device
        self.model = LlamaForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device).eval()
        self.model.generation_config.pad_token_id = 0
        # PEFT wraps its model in place, so the base runs from a model of its own. Its adapters are
        # held and computed in the base's dtype, as the engine computes its rows: by default PEFT
        # would upcast bfloat16 and float16 adapters to float32 and compute them so under a bfloat16 base
        self.peft = PeftModel.from_pretrained(
            LlamaForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device).eval(), adapter_dirs[0],
            adapter_name="bench-a0", autocast_adapter_dtype=False)
        for i in range(1, s.adapters):
            self.peft.load_adapter(adapter_dirs[i], adapter_name=f"bench-a{i}", autocast_adapter_dtype=False)
        self.peft.eval()
        self.peft.generation_config.pad_token_id = 0
        self.ids = torch.tensor(prompts, device=device)
        self.mixed_outputs: list[list[int]] = []

    def _run(self, m, **kw) -> tuple[float, list[list[int]]]:
        sync_device(self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = m.generate(input_ids=self.ids, attention_mask=torch.ones_like(self.ids),
                             max_new_tokens=self.s.new_tokens, min_new_tokens=self.s.new_tokens, do_sample=False, **kw)
        sync_device(self.device)
        return time.perf_counter() - start, out[:, self.s.prompt:].tolist()

    def base_run(self) -> float:
        return self._run(self.model)[0]

    def mixed_run(self) -> float:
        elapsed, self.mixed_outputs = self._run(self.peft, adapter_names=self.names)
        return elapsed

    def load_ms(self, adapter_dir, name: str) -> float:
        sync_device(self.device)
        start = time.perf_counter()
        self.peft.load_adapter(adapter_dir, adapter_name=name)
        sync_device(self.device)
        return (time.perf_counter() - start) * 1000
