"""Choosing the device a model runs on, and CPU threads."""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager

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


def why_unavailable(device_type: str) -> str:
    """A user-facing reason why ``device_type`` cannot be used here."""
    if device_type == "cuda":
        if torch.version.cuda is None:
            return f"this PyTorch build ({torch.__version__}) has no CUDA support"
        return "PyTorch has CUDA support but sees no GPU (driver missing, or CUDA_VISIBLE_DEVICES hides it)"
    if device_type == "mps":
        return "Apple MPS needs macOS 12.3+ on Apple silicon and a PyTorch build with MPS"
    return f"{device_type!r} devices are not supported by napari-pdcr"


def resolve_device(choice: str | torch.device | None = "auto", fallback: bool = False) -> torch.device:
    """``"auto"`` (cuda, then mps, then cpu) or an explicit device such as ``"cuda:1"``.

    An unavailable explicit device raises ``RuntimeError`` saying why, or with
    ``fallback=True`` warns and returns the CPU. An unknown name raises ``ValueError``.
    """
    if choice is None or str(choice) == "auto":
        return torch.device(available_devices()[0])
    try:
        device = torch.device(choice)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"unknown device {str(choice)!r}; choose one of {', '.join(DEVICE_CHOICES)} (or e.g. 'cuda:1')"
        ) from None
    problem = None
    if device.type not in ("cpu", "cuda", "mps"):
        problem = why_unavailable(device.type)
    elif device.type != "cpu" and device.type not in available_devices():
        problem = why_unavailable(device.type)
    elif device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        problem = f"there are {torch.cuda.device_count()} CUDA device(s); index {device.index} does not exist"
    if problem is None:
        return device
    message = f"device {str(choice)!r} is not available: {problem}"
    if not fallback:
        raise RuntimeError(f"{message}; use device='cpu' or 'auto' (available: {', '.join(available_devices())})")
    warnings.warn(f"{message}; running on the CPU instead", RuntimeWarning, stacklevel=2)
    return torch.device("cpu")


def set_cpu_threads(n: int | None) -> int:
    """Use ``n`` CPU threads for PyTorch's operators (``None``: leave as is); returns the previous count.

    More threads than cores slows things down; ``torch.set_num_threads`` is process-wide.
    """
    previous = torch.get_num_threads()
    if n is not None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"the number of CPU threads must be a positive integer, got {n!r}")
        torch.set_num_threads(n)
    return previous


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def worker_cpu_threads() -> int:
    """PyTorch threads for a run beside a GUI: every core.

    Measured on 2 cores (``benchmarks/bench_widget_vs_console.py``, docs/benchmarks.md):
    with OpenMP's passive wait (set by the plugin) a worker on every core kept the longest
    event-loop stall where one core left free did (about 150 ms), and ran 1.12x the
    console's time against 1.30x with one thread.
    """
    return cpu_cores()


@contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` PyTorch CPU threads, then restore the previous count.

    Call it in the thread that runs the model: OpenMP keeps the thread count per thread.
    """
    previous = set_cpu_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
