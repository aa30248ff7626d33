"""Choosing the device a model runs on."""

from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")


def available_devices() -> list[str]:
    """Device names usable on this machine, best first."""
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return [*found, "cpu"]


def resolve_device(choice: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (cuda, then mps, then cpu) or an explicit device; a clear error if unavailable."""
    if choice is None or str(choice) == "auto":
        return torch.device(available_devices()[0])
    device = torch.device(choice)
    if device.type != "cpu" and device.type not in available_devices():
        raise RuntimeError(
            f"device {str(choice)!r} is not available on this machine; available: {', '.join(available_devices())}"
        )
    return device
