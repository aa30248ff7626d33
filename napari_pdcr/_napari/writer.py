"""npe2 writer: save the explanation behind a result layer as a zarr store."""

from __future__ import annotations

from pathlib import Path

from napari_pdcr._napari.layers import METADATA_KEY
from napari_pdcr.explanations import Explanation
from napari_pdcr.io.results import save_explanation


def write_explanation(path: str, data, meta: dict) -> list[str]:
    """Write the explanation kept in a result layer's metadata to ``path`` (``.zarr`` added if missing).

    Only layers made by napari-pdcr (ATE, standard error, prediction, target, of any kind of
    result) carry one;
    any other layer raises ``ValueError``. A previous napari-pdcr result store at the path is
    replaced (napari's save dialog has asked); anything else there is left untouched and
    raises ``FileExistsError``.
    """
    entry = (meta.get("metadata") or {}).get(METADATA_KEY) or {}
    explanation = entry.get("explanation")
    if not isinstance(explanation, Explanation):
        raise ValueError(
            f"layer {meta.get('name', '')!r} is not a napari-pdcr result: save an ATE map layer "
            "made by napari-pdcr (or use the widget's 'Save result...')"
        )
    target = Path(path)
    if target.suffix != ".zarr":
        target = target.with_name(target.name + ".zarr")
    return [str(save_explanation(explanation, target))]
