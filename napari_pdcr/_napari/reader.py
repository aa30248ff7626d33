"""npe2 reader: open a saved explanation store (``*.zarr``) as result layers."""

from __future__ import annotations

from napari_pdcr._napari.layers import explanation_layer_data
from napari_pdcr.io.results import is_explanation_store, load_explanation


def get_reader(path):
    """Return :func:`read_explanation` when ``path`` is a napari-pdcr explanation store, else None.

    A damaged store is claimed too, so that opening it reports what is wrong with it.
    """
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    return read_explanation if is_explanation_store(path) else None


def read_explanation(path) -> list[tuple]:
    """LayerData of a saved explanation: the ATE map, the prediction and target-region outlines.

    Raises :class:`~napari_pdcr.io.results.DamagedStoreError` ("this result store is damaged:
    ...") for a damaged store; napari shows that message.
    """
    path = path[0] if isinstance(path, list) else path
    explanation = load_explanation(path)
    return explanation_layer_data(explanation, show_prediction=True, show_target_region=True)
