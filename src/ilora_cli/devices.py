"""Which torch device a command runs on: ``auto`` picks the GPU when there is one."""

from __future__ import annotations

import re

from .errors import UserError

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device(device: str) -> str:
    """Refuse anything but auto, cpu, cuda and cuda:N with one sentence."""
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise UserError(f"device must be auto, cpu, cuda or cuda:N; got {device!r}.")
    return device


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is available, else ``cpu``; a GPU that was asked for must exist."""
    import torch

    check_device(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"The device {device} was requested but no CUDA GPU is available.")
    return device
