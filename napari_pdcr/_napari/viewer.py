"""Results in a viewer: any :class:`~napari_pdcr.explanations.Explanation` as layers, a
classifier's heatmap as a segmentation scored against its ground truth, and several
models' or methods' maps side by side.

:meth:`Explanation.add_to_viewer <napari_pdcr.explanations.Explanation.add_to_viewer>`
reaches :func:`add_to_viewer` lazily, so the core never imports napari.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import numpy as np
from napari.experimental import link_layers
from napari.layers import Layer
from napari.utils.colormaps import DirectLabelColormap
from napari.utils.notifications import show_info, show_warning

from napari_pdcr._napari.layers import (
    MAP_ROLES,
    METADATA_KEY,
    colour_bar_limit,
    default_name,
    explanation_from_layer,
    explanation_layer_data,
    layer_metadata,
    on_recorded_slice,
    placement,
    supporting_red_colormap,
)
from napari_pdcr.explanations import AttributionMap, Explanation, RegionExplanation
from napari_pdcr.metrics.segmentation import OTSU, score_heatmap
from napari_pdcr.models.base import CLASSIFIER
from napari_pdcr.studies.comparison import ModelComparison
from napari_pdcr.studies.methods import MethodComparison


def add_to_viewer(viewer, explanation: Explanation, **options) -> list[Layer]:
    """Add an explanation's layers to ``viewer`` and return them.

    ``options`` are those of :func:`~napari_pdcr._napari.layers.explanation_layer_data`
    for the explanation's kind; ``source_layer`` is the explained image layer, whose scale
    and translate the new layers copy. A classifier's explanation with a ground-truth
    mask also gets its heatmap's mask and score (:func:`add_heatmap_mask`).
    """
    if isinstance(explanation, (AttributionMap, RegionExplanation)) and not explanation.target_region.any():
        options = {"show_target_region": False, **options}  # a classifier's run without a region: nothing to outline
    layers = [viewer.add_layer(Layer.create(*item)) for item in explanation_layer_data(explanation, **options)]
    follow_ndisplay(viewer)
    return layers + add_heatmap_mask(viewer, explanation, options.get("source_layer"))


#: colour of a heatmap's mask (its outline; the ground truth is the user's own layer)
HEATMAP_MASK_COLOR = "cyan"


def heatmap_mask_layer_data(explanation: Explanation, source_layer=None, threshold: str | float = OTSU):
    """A classifier's heatmap as a segmentation: ``(LayerData, SegmentationScore)``, or None.

    None unless the explanation is of a classifier and holds a non-empty ground-truth
    mask (its ``reference``). The Labels layer (:data:`HEATMAP_MASK_COLOR`) is the map's mask (:func:`~napari_pdcr.metrics.segmentation.score_heatmap`), named with
    its Dice, IoU and pointing-game hit; ``metadata["napari_pdcr"]["segmentation_score"]``
    holds the score. ``ValueError`` for a map that gives no mask (constant, no supporting value).
    """
    reference = getattr(explanation, "reference", None)
    if explanation.model_identity.get("kind") != CLASSIFIER or reference is None or not np.any(reference):
        return None
    mask, score = score_heatmap(explanation, threshold=threshold)
    metadata = layer_metadata(explanation, "heatmap_mask")
    metadata[METADATA_KEY]["segmentation_score"] = score.describe()
    kwargs = {
        "name": f"{default_name(explanation)} mask ({score.label()})",
        "colormap": DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", 1: HEATMAP_MASK_COLOR}),
        "opacity": 0.9,
        "metadata": metadata,
        **placement(explanation, source_layer),
    }
    return on_recorded_slice([(mask.astype(np.uint8), kwargs, "labels")], explanation)[0], score


def add_heatmap_mask(viewer, explanation: Explanation, source_layer=None, threshold: str | float = OTSU) -> list[Layer]:
    """Add a classifier's heatmap mask beside its map and notify its score against the ground truth.

    Returns the added layer in a list (empty when the explanation is not a classifier's
    with a ground-truth mask, or when its map gives no mask: the user is told why).
    """
    try:
        made = heatmap_mask_layer_data(explanation, source_layer, threshold)
    except ValueError as error:
        show_warning(f"No heatmap mask for {default_name(explanation)}: {error}")
        return []
    if made is None:
        return []
    data, score = made
    layer = viewer.add_layer(Layer.create(*data))
    layer.contour = 1  # its outline, so that the map shows inside it
    show_info(f"{default_name(explanation)} as a segmentation of the ground truth ({score.threshold_rule} "
              f"threshold): {score.label()}")
    return [layer]


#: Camera angles (degrees, napari's Euler angles) of :func:`view_in_3d`: obliquely from the front and above.
OBLIQUE_ANGLES = (15.0, -30.0, 80.0)
#: The smallest box :func:`view_in_3d` shows, in multiples of the target region's size.
REGION_CONTEXT = 4.0


def view_in_3d(viewer, explanation, image_layer=None, margin: float = 1.6) -> None:
    """Show a 3D result in 3D rendering around its target region.

    The maps get their 3D colormap (:func:`restyle_map`: weak blocks see-through); the
    explained image (``image_layer``, else the image layers of the result's shape that are
    not results) and the prediction's outline are shown as the axial plane through the
    region's centre, so the anatomy and the prediction's border show without hiding the
    map; both outlines are drawn over the image and the map. The camera is centred on the
    box around the target region and the blocks with an effect (world coordinates, from
    the result's scale and translate), zoomed so that this box (at least
    :data:`REGION_CONTEXT` region sizes) grown by ``margin`` fills the view, and seen at
    :data:`OBLIQUE_ANGLES`. A 2D result is left as it is (``ValueError``).
    """
    if explanation.target_region.ndim != 3:
        raise ValueError("the result is 2D: 3D rendering needs a 3D result (a volume explained by a 3D model)")
    geometry = placement(explanation)
    scale, translate = np.asarray(geometry["scale"]), np.asarray(geometry["translate"])

    def world_box(mask):
        corners = np.array([[axis.min(), axis.max() + 1] for axis in np.nonzero(mask)], dtype=float)
        return corners[:, 0] * scale + translate, corners[:, 1] * scale + translate

    low, high = world_box(explanation.target_region | (explanation.ate != 0))
    region_low, region_high = world_box(explanation.target_region)
    # at least REGION_CONTEXT times the region's size, so that the image around it shows
    size = max((high - low).max(), REGION_CONTEXT * (region_high - region_low).max())
    follow_ndisplay(viewer)
    viewer.dims.ndisplay = 3
    centre = tuple(float(np.mean(axis)) for axis in np.nonzero(explanation.target_region))  # voxels
    images = [image_layer] if image_layer is not None else [
        layer for layer in viewer.layers
        if layer._type_string == "image" and explanation_from_layer(layer) is None
        and tuple(layer.data.shape) == explanation.target_region.shape]
    outlines = {role: [layer for layer in viewer.layers if explanation_from_layer(layer) is explanation
                       and layer.metadata[METADATA_KEY]["role"] == role] for role in ("prediction", "target_region")}
    for layer in [*images, *outlines["prediction"]]:
        layer.depiction = "plane"
        layer.plane.update({"position": centre, "normal": (1.0, 0.0, 0.0), "thickness": 1.0})
    for layer in [*outlines["prediction"], *outlines["target_region"]]:
        layer.blending = "translucent_no_depth"  # drawn over the image plane and the map, not hidden in them
    viewer.reset_view()  # zoom for the whole scene, then zoom in to the box
    scene = np.ptp(np.asarray(viewer.layers.extent.world)[:, -3:], axis=0).max()
    camera = viewer.scene.camera
    camera.center = tuple((low + high) / 2)
    camera.zoom *= scene / (margin * size)
    camera.angles = OBLIQUE_ANGLES


def restyle_map(layer, ndisplay: int) -> None:
    """Give a napari-pdcr signed map the colormap of a ``ndisplay``-D display: the 2D one, or in 3D
    rendering the one whose opacity grows with |effect|
    (:func:`~napari_pdcr._napari.layers.effect_colormap`, ``volume=True``); other layers are left alone."""
    explanation = explanation_from_layer(layer)
    if explanation is not None and layer.metadata[METADATA_KEY]["role"] in MAP_ROLES:
        colormap = supporting_red_colormap(explanation, volume=ndisplay == 3)
        if layer.colormap.name != colormap.name:
            layer.colormap = colormap


#: Viewers whose maps follow the display (:func:`follow_ndisplay`).
_FOLLOWING: weakref.WeakSet = weakref.WeakSet()


def follow_ndisplay(viewer) -> None:
    """Restyle the maps (:func:`restyle_map`) now, whenever ``viewer`` switches between 2D and 3D
    (napari's own 2D/3D button included) and as maps are added; connected once per viewer."""
    viewer = getattr(viewer, "__wrapped__", viewer)  # napari hands plugins a public-only proxy
    if viewer not in _FOLLOWING:
        _FOLLOWING.add(viewer)
        viewer.dims.events.ndisplay.connect(
            lambda event: [restyle_map(layer, viewer.dims.ndisplay) for layer in viewer.layers])
        viewer.layers.events.inserted.connect(lambda event: restyle_map(event.value, viewer.dims.ndisplay))
    for layer in viewer.layers:
        restyle_map(layer, viewer.dims.ndisplay)


def show_in_grid(viewer, maps: Mapping[str, Explanation], image_layer=None, link_limits: bool = True) -> list:
    """Show maps over the image in napari's grid mode, one cell per map (name -> explanation).

    Each cell holds a copy of ``image_layer`` (the explained image layer, which gives the
    geometry; none when None), the map named by its key (supporting sign red) and the
    target region's outline. ``link_limits``: the maps share symmetric contrast limits,
    linked so that changing one changes all (maps in one unit); else each keeps its own
    (maps in different units) and only opacity is linked. The new layers are moved to the
    bottom of the layer list so that each grid cell holds one map (other layers get cells
    after them). Returns the added layers.
    """
    added, shown = [], []
    for name, explanation in maps.items():
        if image_layer is not None:
            added.append(viewer.add_image(
                image_layer.data, name=f"{name} image", colormap="gray",
                scale=image_layer.scale, translate=image_layer.translate,
            ))
        data = explanation_layer_data(explanation, source_layer=image_layer, name=name,
                                      show_prediction=False, show_target_region=True)
        layers = [viewer.add_layer(Layer.create(*item)) for item in data]
        shown.append(layers[0])
        added += layers
    if link_limits:
        limit = colour_bar_limit(np.concatenate([layer.data.ravel() for layer in shown]))
        for layer in shown:
            layer.contrast_limits = (-limit, limit)
    if len(shown) > 1:
        link_layers(shown, ("contrast_limits", "opacity", "colormap") if link_limits else ("opacity",))
    # grid cells are filled from the bottom of the layer list: put the maps' layers there
    viewer.layers.move_multiple([viewer.layers.index(layer) for layer in added], 0)
    grid = viewer.canvas.grid if hasattr(viewer, "canvas") else viewer.grid
    grid.stride = len(added) // max(1, len(maps))
    grid.enabled = True
    return added


def show_comparison(viewer, comparison: ModelComparison, image_layer=None) -> list:
    """Show each model's ATE map over the image in grid mode, one cell per model, limits linked
    (see :func:`show_in_grid`). Returns the added layers."""
    return show_in_grid(viewer, {f"{p.model} ATE": p.explanation for p in comparison.profiles}, image_layer)


def show_method_comparison(viewer, comparison: MethodComparison, image_layer=None) -> list:
    """Show each method's map over the image in grid mode, one cell per method.

    One colour convention (the supporting sign red, hurting blue, zero transparent);
    each map keeps its own symmetric limits, since the methods' units differ (Dice
    points, logit gradients, mask-weighted scores). Returns the added layers.
    """
    return show_in_grid(viewer, comparison.maps, image_layer, link_limits=False)
