"""The widget's operation as one function, for the napari console and scripts.

In napari's console (``viewer`` is defined there)::

    from napari_pdcr.console import explain
    result = explain("colin27_slice image", "target region", model="unet2d", viewer=viewer)
    result.counts(), result.locality(10)

Without napari, arrays work the same way and nothing is displayed::

    result = explain(image, mask, model="unet2d", intervention="zero", block_shape=16)

Importing this module imports neither napari nor Qt; explaining arrays without a
viewer never imports napari.
"""

from __future__ import annotations

import sys

import numpy as np

from napari_pdcr.engine.estimator import drive
from napari_pdcr.explanations.region import RegionExplanation
from napari_pdcr.jobs import ExplainJob

#: Keyword arguments passed on to :class:`~napari_pdcr.methods.region_effects.RegionEffects`.
METHOD_PARAMETERS = ("block_shape", "n_screen", "n_estimate", "tau", "mode", "seed", "device", "batch_size")


def _layer(obj, viewer):
    """A layer given by name (needs ``viewer``), else ``obj`` unchanged."""
    if isinstance(obj, str):
        if viewer is None:
            raise ValueError(f"{obj!r} looks like a layer name: pass viewer=... to look it up")
        if obj not in viewer.layers:
            raise ValueError(f"there is no layer named {obj!r}; layers: {', '.join(layer.name for layer in viewer.layers)}")
        return viewer.layers[obj]
    return obj


def _from_napari(obj) -> bool:
    """True for a napari layer (or a viewer's proxy of one), judged without importing napari."""
    return any(cls.__module__.partition(".")[0] == "napari" for cls in type(obj).__mro__)


def explain(
    image,
    target_region,
    model="unet2d",
    reference=None,
    viewer=None,
    *,
    label: int | None = None,
    point=None,
    reference_label: int | None = None,
    intervention: str = "patch_bank",
    bank=None,
    outcome: str = "dice",
    temperature: float = 1.0,
    spacing=None,
    trusted: bool = False,
    progress=None,
    name: str | None = None,
    show_cost: bool = True,
    each_label: bool = False,
    **parameters,
) -> RegionExplanation | dict:
    """Explain ``model``'s segmentation of ``target_region`` in ``image``; return the explanation.

    Parameters
    ----------
    image
        An Image layer (its data, scale and translate are used), a layer name (with
        ``viewer``), or an array ``S`` / ``(C, *S)``.
    target_region
        A Labels layer (voxels equal to ``label``, or all non-zero ones), a Shapes layer
        (its rectangles, drawn over the image layer), a layer name, or a mask array.
        ``point`` (data coordinates) keeps only the connected component containing it.
    model
        A demo model's name (``"unet2d"``, ``"unet3d"``, ...), a model file's path or a
        :class:`~napari_pdcr.models.SegmentationModel`.
    reference
        Reference mask for the Dice outcome (Labels layer, name or array; values equal to
        ``reference_label`` or all non-zero ones), or None for the model's own prediction.
    viewer
        If given, the result layers are added to it (over the image layer).
    intervention, bank
        What replaces a block: ``"patch_bank"`` (crops of other images; ``bank`` is an
        Image layer or array of other images, by default the bundled sample for the
        model's dimensionality), ``"zero"``, ``"mean"``, ``"blur"``, ``"noise"``.
    outcome, temperature
        The outcome measured in the region (``"dice"`` as published) and the softmax /
        sigmoid temperature of soft outcomes.
    spacing
        Voxel size for distances; by default the image layer's scale.
    progress
        Optional ``progress(Progress)`` callback; returning False cancels the run.
    show_cost
        Print the upper bound of the run's time first, on stderr (:meth:`RegionEffects.estimate_cost`).
    each_label
        Explain every label of ``target_region`` (a Labels layer or a label image) on one
        set of forward passes; returns ``{label: RegionExplanation}``.
    **parameters
        ``block_shape``, ``n_screen``, ``n_estimate``, ``tau``, ``mode``, ``seed``,
        ``device``, ``batch_size`` of :class:`~napari_pdcr.methods.region_effects.RegionEffects`.
    """
    unknown = set(parameters) - set(METHOD_PARAMETERS)
    if unknown:
        raise TypeError(f"unknown parameter(s) {', '.join(sorted(unknown))}; known: {', '.join(METHOD_PARAMETERS)}")
    image = _layer(image, viewer)
    target = _layer(target_region, viewer)
    reference = _layer(reference, viewer)
    bank = _layer(bank, viewer)
    if viewer is not None or any(_from_napari(obj) for obj in (image, target, reference, bank)):
        from napari_pdcr._napari.inputs import (
            image_array,
            layer_geometry,
            reference_mask,
            region_mask,
            region_name,
        )
    else:
        from napari_pdcr.jobs import (
            image_array,
            layer_geometry,
            reference_mask,
            region_mask,
            region_name,
        )
    geometry = layer_geometry(image)
    job = ExplainJob(
        image=image_array(image),
        target_region=np.asarray(getattr(target, "data", target)) if each_label else
        region_mask(target, image, label=label, point=point),
        model=model,
        reference=None if reference is None else reference_mask(reference, label=reference_label),
        intervention=intervention,
        outcome=outcome,
        temperature=temperature,
        bank=None if bank is None else image_array(bank),
        bank_description=getattr(bank, "name", ""),
        trusted=trusted,
        spacing=tuple(spacing) if spacing is not None else geometry.get("scale"),
        source_layer=geometry,
        target_name=region_name(target, label),
        parameters=parameters,
        each_label=each_label,
    )
    if show_cost:
        print(f"napari-pdcr: {cost_message(job)}", file=sys.stderr)
    result = drive(job.iter_run(), progress)
    if viewer is not None:
        for key, explanation in result.items() if each_label else [(None, result)]:
            label_name = name if key is None else f"{name or job.target_name or 'label'} {key}"
            explanation.add_to_viewer(viewer, source_layer=image if geometry else None, name=label_name)
    return result


def cost_message(job) -> str:
    """The upper bound of an :class:`~napari_pdcr.jobs.ExplainJob`'s run time, as one line
    (loads the model, which is cached for the run, and times one forward pass)."""
    from napari_pdcr.jobs import model_input, resolve_model

    job.check()
    model = resolve_model(job.model, trusted=job.trusted)
    image = model_input(np.asarray(job.image, dtype=np.float32), model, job.source_layer.get("name", "the image"))
    method, _ = job.method(model, image)
    return method.estimate_cost(image, job.target_region, job.reference).message()
