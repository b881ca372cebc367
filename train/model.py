"""The model side of a run: load the base from its folder, check the recipe's target modules
against it, make the trainable part (PEFT LoRA/DoRA, or every weight), and save the result in
the shape the registry stores (an adapter folder, or a full checkpoint folder)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import RecipeError
from .recipe import LoraSettings

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True, slots=True)
class Placement:
    """Where the run computes: weights stay fp32; on CUDA with bf16 support, autocast to bf16."""

    device: torch.device
    autocast_dtype: torch.dtype | None

    @classmethod
    def pick(cls) -> Placement:
        if torch.cuda.is_available():
            bf16 = torch.cuda.is_bf16_supported()
            return cls(torch.device("cuda"), torch.bfloat16 if bf16 else None)
        return cls(torch.device("cpu"), None)

    def autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def load_base(folder: Path, device: torch.device):
    """(model in fp32 on `device`, tokenizer) from an HF-format folder such as a registry snapshot."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.to(device)
    model.config.use_cache = False  # training never reuses a KV cache
    return model, tokenizer


def linear_module_names(model: nn.Module) -> set[str]:
    """Leaf names of the linear layers inside the transformer blocks (q_proj, up_proj, ...)."""
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] != "lm_head"}


def check_targets(model: nn.Module, targets: list[str] | str, base_ref: str) -> None:
    if targets == "all-linear":
        return
    have = linear_module_names(model)
    missing = [t for t in targets if t not in have]
    if missing:
        raise RecipeError(f"lora.target_modules: {', '.join(map(repr, missing))} not in base {base_ref} "
                          f"(its linear modules: {', '.join(sorted(have))})")


def make_trainable(model: nn.Module, method: str, lora: LoraSettings, base_source: str | None,
                   classifier: bool = False) -> nn.Module:
    """LoRA/DoRA: a PEFT model with only the adapter trainable (and a classifier's new head, which
    PEFT keeps in the adapter: task_type SEQ_CLS). full: every weight trainable."""
    if method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        use_rslora=lora.rslora, use_dora=method == "dora", bias="none",
        task_type="SEQ_CLS" if classifier else "CAUSAL_LM",
    )
    # PEFT records the model's name_or_path as base_model_name_or_path, and the registry matches an
    # adapter to its base by it: make it the base's source id, not the folder it was loaded from.
    model.name_or_path = base_source or ""
    return get_peft_model(model, config)


def load_adapter(model: nn.Module, folder: Path, what: str) -> nn.Module:
    """PEFT's model of ``model`` with the adapter in ``folder``; an adapter made for another base (its
    shapes or modules differ) is a `RecipeError` naming ``what`` and the first misfit, not a traceback."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, folder)
    except (RuntimeError, ValueError) as exc:  # torch's size mismatches; PEFT's modules not found
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = next((line for line in lines if line.startswith("size mismatch")), lines[0] if lines else "")
        raise RecipeError(f"{what} does not fit the base it is scored on: {detail}") from None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a run changes, by parameter name (CPU copies)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise RecipeError(f"saved state lacks {len(missing)} trainable tensors, e.g. {missing[0]}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device))


def save_result(model: nn.Module, tokenizer, method: str, folder: Path, base_source: str | None) -> Path:
    """Write what the registry stores: adapter files, or config + safetensors + tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    if method == "full":
        model.config.use_cache = True
        if base_source:
            model.config._name_or_path = base_source
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        model.config.use_cache = False
    else:
        # save_embedding_layers=False: PEFT would otherwise look the base id up on the network; we
        # never adapt the embeddings, so there is nothing to learn from it.
        model.save_pretrained(folder, safe_serialization=True, save_embedding_layers=False)
        (folder / "README.md").unlink(missing_ok=True)  # PEFT's empty model card; the registry keeps the facts
        canonical_adapter_config(folder / "adapter_config.json")
    return folder


def canonical_adapter_config(path: Path) -> None:
    """PEFT writes target_modules from a set, in hash order: sort it so that the same training
    gives the same bytes (and so the same registry digest) in every process."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
