"""npe2 sample-data commands (File > Open Sample > napari-pdcr)."""

from __future__ import annotations

from napari_pdcr.samples import sample_layers_2d, sample_layers_3d, sample_layers_lesions


def colin27_slice() -> list[tuple]:
    """Colin27 T1 axial slice (1 mm) with its brain mask."""
    return sample_layers_2d()


def colin27_volume() -> list[tuple]:
    """Colin27 T1 head volume (2 mm) with its brain mask."""
    return sample_layers_3d()


def lesion_slices() -> list[tuple]:
    """Held-out subject's T1 slices (2 mm) with and without a synthetic lesion, with the lesion masks."""
    return sample_layers_lesions()
