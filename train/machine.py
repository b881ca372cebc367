"""A one-line description of the machine a measurement ran on, for reports."""

from __future__ import annotations

import os

import torch


def describe_machine(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    threads = torch.get_num_threads()
    return f"a {os.cpu_count()}-core CPU (fp32, torch threads: {threads}), torch {torch.__version__}"
