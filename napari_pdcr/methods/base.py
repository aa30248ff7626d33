"""The base of every explanation method, in the spirit of Captum's ``Attribution``.

A method is constructed with the model and its settings, and explains one input with
one call::

    method = SomeMethod(model, **settings)
    explanation = method.attribute(image, target_region, ...)     # an Explanation

``iter_attribute`` is the same computation as a generator that yields
:class:`~napari_pdcr.engine.Progress` and returns the explanation: the napari widgets run
it in a worker, a Dask task or a script drives it with :meth:`Method.attribute`, and
closing the generator cancels the run with nothing half-made. What every method shares
(device, seed, batch sizing, provenance, preparing the image and the masks) is written
here once.
"""

from __future__ import annotations

import platform
from abc import ABC, abstractmethod
from collections.abc import Generator
from datetime import datetime, timezone
from typing import ClassVar

import numpy as np
import torch

from napari_pdcr.engine.estimator import Progress, drive
from napari_pdcr.models.base import SegmentationModel
from napari_pdcr.models.devices import resolve_device
from napari_pdcr.regions import validate_reference, validate_region
from napari_pdcr.validation import non_negative_int, optional_positive_int, positive_float


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a result, for provenance."""
    import monai

    from napari_pdcr import __version__

    return {
        "napari_pdcr": __version__,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def run_provenance(seed: int) -> dict:
    """Provenance of one run: package versions, creation time (UTC) and seed."""
    return {
        "versions": package_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
    }


def default_batch_size(device: torch.device, item_bytes: int, memory_budget_mb: float) -> int:
    """Items per forward batch: bounded by a memory budget (activations ~64x the input)."""
    by_memory = int(memory_budget_mb * 2**20 // max(1, 64 * item_bytes))
    cap = 32 if device.type == "cpu" else 512
    return max(1, min(cap, by_memory))


class Method(ABC):
    """An explanation method for a segmentation model.

    Parameters
    ----------
    model
        The :class:`~napari_pdcr.models.SegmentationModel` to explain.
    seed
        Seed of every random draw; a run is reproducible on CPU whatever the batch size.
    device
        ``"auto"`` (cuda, mps, cpu), or a device. The model is moved there when a run starts.
    batch_size, memory_budget_mb
        Items per forward pass; by default chosen from the memory budget (MiB).

    Subclasses set :attr:`name`, implement :meth:`settings` (their own parameters, JSON
    values) and :meth:`iter_attribute`.
    """

    #: the method's name in results' parameters
    name: ClassVar[str]

    def __init__(
        self,
        model: SegmentationModel,
        *,
        seed: int = 0,
        device: str | torch.device | None = "auto",
        batch_size: int | None = None,
        memory_budget_mb: float = 1024,
    ):
        if not isinstance(model, SegmentationModel):
            raise TypeError(
                f"model must be a SegmentationModel (from load_model or load_demo_model); got {type(model).__name__}"
            )
        self.model = model
        self.seed = non_negative_int("seed", seed)
        self.device = resolve_device(device)
        self.batch_size = optional_positive_int("batch_size", batch_size)
        self.memory_budget_mb = positive_float("memory_budget_mb", memory_budget_mb)

    # ------------------------------------------------------------------ provenance
    @abstractmethod
    def method_parameters(self) -> dict:
        """The method's own parameters, JSON-serialisable."""

    def parameters(self) -> dict:
        """Every parameter of the method, JSON-serialisable (for provenance)."""
        return {"method": self.name, **self.method_parameters(), "seed": self.seed, "device": str(self.device)}

    def provenance(self) -> dict:
        """Versions, creation time and seed of a run, and the model's temperature (fitted or given)."""
        description = self.model.description
        return {
            **run_provenance(self.seed),
            "model_temperature": getattr(description, "temperature", 1.0),
            "calibration": getattr(description, "calibration", None),
        }

    def choose_batch_size(self, item_bytes: int) -> int:
        """The batch size given, or one from the memory budget for items of ``item_bytes``."""
        return self.batch_size or default_batch_size(self.device, item_bytes, self.memory_budget_mb)

    # ------------------------------------------------------------------ inputs
    def check_inputs(self, image, target_region, reference=None):
        """Check the image and the masks, before the model moves or runs.

        ``image``: ``(C, H, W)`` or ``(C, D, H, W)`` raw intensities (the model's
        preprocessing is applied). ``target_region``: bool mask of the image's spatial
        shape ``S``, where the outcome is measured; optional for a classifier, whose
        output is global (given, it is only shown with the result; None: an empty mask).
        ``reference``: optional binary mask (ground truth) of shape ``S``, for Dice
        outcomes (``None`` uses the model's own unperturbed prediction); for a
        classifier, the mask its heatmaps are scored against.

        Returns ``(x, region, reference)``: ``x`` the ``(C, *S)`` float32 tensor in model
        input space (on the CPU), ``region`` bool ``S``, ``reference`` bool ``S`` or None.
        """
        x = self.model.prepare_image(image)
        spatial = tuple(x.shape[1:])
        if target_region is None and not self.model.is_classifier:
            raise ValueError(
                f"model {self.model.name!r} segments, so its outcome is measured in a target region: "
                f"give target_region, a mask of the image's spatial shape {spatial}"
            )
        if target_region is None:
            region = np.zeros(spatial, dtype=bool)
        else:
            region = validate_region(target_region, spatial, "target region", allow_empty=self.model.is_classifier)
        ref = None if reference is None else validate_reference(reference, spatial)
        return x, region, ref

    def to_device(self, x: torch.Tensor) -> tuple[SegmentationModel, torch.Tensor]:
        """The model and ``x`` on the method's device (once every input is checked)."""
        return self.model.to(self.device), x.to(self.device)

    # ------------------------------------------------------------------ running
    @abstractmethod
    def iter_attribute(self, image, target_region, *args, **kwargs) -> Generator[Progress, None, object]:
        """The explanation as a generator: yields progress, returns the Explanation."""

    def attribute(self, *args, progress=None, **kwargs):
        """Run :meth:`iter_attribute` to completion and return its Explanation.

        ``progress(Progress)`` is called after every forward batch; returning False
        cancels the run (:class:`~napari_pdcr.engine.Cancelled` is raised).
        """
        return drive(self.iter_attribute(*args, **kwargs), progress)
