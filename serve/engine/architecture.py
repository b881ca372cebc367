"""Which checkpoints the engine's own forward (model.py) reproduces exactly; the rest are refused at
load with the reason, never served approximately."""

from __future__ import annotations

from .errors import IncompatibleAdapter


def check_architecture(config) -> None:
    """Refuse checkpoints this forward would not reproduce exactly."""
    problems = []
    if getattr(config, "model_type", None) != "llama":
        problems.append(f"model_type {getattr(config, 'model_type', None)!r} is not 'llama'")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config.hidden_act!r} is not 'silu'")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("attention/MLP biases are not supported")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and (rope.get("rope_type") or rope.get("type")) == "longrope":
        # transformers picks its long or short factors by the longest position in each forward, so a
        # sequence's rotations would depend on what it is batched with
        problems.append("rope_type 'longrope' is not supported")
    if problems:
        raise IncompatibleAdapter("cannot serve this checkpoint: " + "; ".join(problems))
