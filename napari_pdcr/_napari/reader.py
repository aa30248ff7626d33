"""npe2 reader: open a saved result store (``*.zarr``) of any kind, or one task of a study store, as layers."""

from __future__ import annotations

from pathlib import Path

from napari_pdcr._napari.layers import explanation_layer_data, placement
from napari_pdcr.explanations import RegionExplanation
from napari_pdcr.io.results import is_explanation_store, load_explanation
from napari_pdcr.studies.store import is_study_store


def get_reader(path):
    """Return :func:`read_explanation` when ``path`` is a napari-pdcr explanation store, else None.

    A damaged store is claimed too, so that opening it reports what is wrong with it.
    """
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if is_study_store(path):
        return read_study
    return read_explanation if is_explanation_store(path) else None


def read_study(path) -> list[tuple]:
    """A study store holds one result per task: open one of them (``<store>/tasks/<task id>``).

    Raises ``ValueError`` saying so, with the path of the first finished task.
    """
    path = Path(path[0] if isinstance(path, list) else path)
    tasks_dir = path / "tasks"
    tasks = sorted(p.name for p in tasks_dir.iterdir() if is_explanation_store(p)) if tasks_dir.is_dir() else []
    example = f", e.g. {path / 'tasks' / tasks[0]}" if tasks else ""
    raise ValueError(f"{path} is a napari-pdcr study store with {len(tasks)} finished tasks: open one task's "
                     f"folder{example} (napari_pdcr.studies.load lists them)")


def read_explanation(path) -> list[tuple]:
    """LayerData of a saved result: the explained image when the store keeps it, then for a
    region explanation the ATE map, the prediction and
    target-region outlines; for an attribution map the map (supporting sign red) and the
    target-region outline; for a component explanation the target-region outline carrying it.

    Raises :class:`~napari_pdcr.io.results.DamagedStoreError` ("this result store is damaged:
    ...") for a damaged store; napari shows that message.
    """
    path = path[0] if isinstance(path, list) else path
    explanation = load_explanation(path)
    image = image_layer_data(explanation)
    if isinstance(explanation, RegionExplanation):
        return image + explanation_layer_data(explanation, show_prediction=True, show_target_region=True)
    return image + explanation_layer_data(explanation)


def image_layer_data(explanation) -> list[tuple]:
    """The explained image kept in the store (``extras["image"]``, ``S`` or ``(C, *S)``) as a grey layer, or nothing.

    A multi-channel image shows its first channel.
    """
    image = explanation.extras.get("image")
    if image is None:
        return []
    spatial = explanation.target_region.ndim
    image = image if image.ndim == spatial else image[0]
    name = (explanation.provenance.get("source_layer") or {}).get("name") or "explained image"
    return [(image, {"name": name, "colormap": "gray", **placement(explanation)}, "image")]
