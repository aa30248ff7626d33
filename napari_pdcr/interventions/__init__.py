"""Intervention distributions for input blocks: what replaces a block's content."""

from napari_pdcr.interventions.base import CallableIntervention, Intervention
from napari_pdcr.interventions.patch_bank import PatchBank
from napari_pdcr.interventions.simple import Blur, Constant, ImageMean, Noise, Zero

INTERVENTION_NAMES = ("patch_bank", "zero", "constant", "mean", "blur", "noise")


def make_intervention(name: str, bank_sources=None, **params) -> Intervention:
    """Build an intervention by name (for the widget and the command line).

    ``bank_sources`` (other images in model input space) is required for
    ``"patch_bank"``; ``params`` go to the class (``size``/``seed``, ``value``,
    ``sigma``, ``mean``/``std``).
    """
    if name == "patch_bank":
        if bank_sources is None:
            raise ValueError("the patch_bank intervention needs other images to crop patches from")
        return PatchBank(bank_sources, **params)
    classes = {"zero": Zero, "constant": Constant, "mean": ImageMean, "blur": Blur, "noise": Noise}
    if name not in classes:
        raise ValueError(f"unknown intervention {name!r}; choose one of {', '.join(INTERVENTION_NAMES)}")
    return classes[name](**params)


__all__ = [
    "Blur",
    "CallableIntervention",
    "Constant",
    "INTERVENTION_NAMES",
    "ImageMean",
    "Intervention",
    "Noise",
    "PatchBank",
    "Zero",
    "make_intervention",
]
