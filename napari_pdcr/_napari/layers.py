"""Explanations as napari LayerData ``(data, kwargs, type)``: region maps, attribution maps and component results.

The ATE map is an Image layer with a diverging colormap centred on 0 (negative effects
red, positive blue, zero transparent), symmetric contrast limits, translucent over the
explained image and with its scale and translate. An attribution map (Seg-Grad-CAM,
integrated gradients, RISE, ...) follows the same colour convention, **supporting red,
hurting blue**: its values are shown as the method gives them (the status bar and the
colour bar read the method's own units) and the colormap is flipped for a map whose
positive sign supports the region. Every layer made here carries the
explanation (and its parameters, provenance, model identity and summary) in
``layer.metadata["napari_pdcr"]`` so it can be saved again (see :mod:`.writer`).

No Qt here: works with a ``napari.components.ViewerModel`` too.
"""

from __future__ import annotations

import numpy as np
from matplotlib.colors import to_rgba
from napari.utils.colormaps import Colormap, DirectLabelColormap
from scipy import ndimage

from napari_pdcr.engine.estimator import NodeStatus
from napari_pdcr.explanations import (
    AttributionMap,
    ComponentExplanation,
    Explanation,
    RegionExplanation,
)
from napari_pdcr.explanations.attribution import POSITIVE_SUPPORTS
from napari_pdcr.plotting.style import (
    CENTRE_COLOR,
    NEGATIVE_COLOR,
    NEGATIVE_LIGHT,
    POSITIVE_COLOR,
    POSITIVE_LIGHT,
    symmetric_limit,
)

#: Key of napari-pdcr's entry in ``layer.metadata``.
METADATA_KEY = "napari_pdcr"

#: Name of the ATE colormap (the RdBu colours with a transparent centre), and of its flipped twin.
EFFECT_COLORMAP_NAME = "pdcr effect (RdBu)"
FLIPPED_COLORMAP_NAME = "pdcr effect flipped (BuRd)"
#: Suffix of the names of the colormaps for 3D rendering (``effect_colormap(volume=True)``).
VOLUME_SUFFIX = " 3D"
#: Opacity of one sample of a 3D map at the contrast limit (``effect_colormap(volume=True)``).
VOLUME_ALPHA = 0.8
#: Roles (``layer.metadata["napari_pdcr"]["role"]``) of the signed maps (colour bar; 3D colormap).
MAP_ROLES = ("ate", "attribution")


def effect_colormap(flipped: bool = False, volume: bool = False) -> Colormap:
    """Diverging colormap for ATE maps: -m red, 0 transparent, +m blue (the plots' ``RdBu`` colours).

    ``flipped``: +m red, -m blue, for maps whose positive values support the region.
    ``volume``: for 3D rendering, the opacity grows with |value|, from 0 next to the
    transparent centre to :data:`VOLUME_ALPHA` at the limit. napari's translucent volume
    rendering composites every sample along a ray over those behind it, so the 2D
    colormap's 0.6-1.0 opacity is opaque after 2-3 voxels and a map of blocks shows only
    the outer faces of its blocks (flat rectangles hiding the region); with the ramp weak
    blocks stay see-through and strong ones stand out.

    The published figures colour negative effects (the block supported the outcome) red
    and positive ones blue. Zero is fully transparent so that the image shows through
    where nothing was found (values within 1 % of the limit are transparent too); small
    effects stay clearly coloured (light red / blue at 60 % opacity) and darken to full
    opacity at the contrast limit.
    """
    # The transparent band around 0 is a plateau, not a point: GPU colormap lookups are
    # tables of ~1000 entries with linear filtering, and a single transparent control
    # point would still give zero a visible alpha (a grey fog in 3D volume rendering).
    controls = [0.0, 0.49, 0.495, 0.505, 0.51, 1.0]
    colors = [NEGATIVE_COLOR, NEGATIVE_LIGHT, CENTRE_COLOR, CENTRE_COLOR, POSITIVE_LIGHT, POSITIVE_COLOR]
    if volume:  # linear in |value| outside the transparent plateau (|0.49 - 0.5| / 0.5 = 0.02)
        alphas = [VOLUME_ALPHA, 0.02 * VOLUME_ALPHA, 0.0, 0.0, 0.02 * VOLUME_ALPHA, VOLUME_ALPHA]
    else:
        alphas = [1.0, 0.6, 0.0, 0.0, 0.6, 1.0]
    rgba = [to_rgba(c, a) for c, a in zip(colors, alphas, strict=True)]
    suffix = VOLUME_SUFFIX if volume else ""
    if flipped:
        return Colormap(colors=rgba[::-1], controls=controls, name=FLIPPED_COLORMAP_NAME + suffix)
    return Colormap(colors=rgba, controls=controls, name=EFFECT_COLORMAP_NAME + suffix)


def supporting_red_colormap(explanation: Explanation, volume: bool = False) -> Colormap:
    """The effect colormap that shows ``explanation``'s supporting sign red (flipped for positive-supports maps);
    ``volume``: its 3D-rendering variant."""
    return effect_colormap(flipped=isinstance(explanation, AttributionMap) and explanation.sign == POSITIVE_SUPPORTS,
                           volume=volume)


def default_name(explanation: Explanation) -> str:
    """``"<model> ATE"`` (``"<model> components"``, ``"<model> <method>"``) plus the target layer's name when
    the run recorded one."""
    model = explanation.model_identity.get("name", "model")
    what = ("components" if isinstance(explanation, ComponentExplanation)
            else explanation.method if isinstance(explanation, AttributionMap) else "ATE")
    target = explanation.provenance.get("target_layer")
    return f"{model} {what}: {target}" if target else f"{model} {what}"


def placement(explanation: Explanation, source_layer=None) -> dict:
    """``scale`` and ``translate`` for the result layers.

    From ``source_layer`` (its last spatial axes) when given, else from the source
    layer's geometry recorded in the explanation's provenance, else from its spacing.
    """
    n = explanation.target_region.ndim
    if source_layer is not None:
        return {"scale": tuple(source_layer.scale[-n:]), "translate": tuple(source_layer.translate[-n:])}
    recorded = explanation.provenance.get("source_layer") or {}
    scale = recorded.get("scale") or getattr(explanation, "spacing", None) or (1.0,) * n
    translate = recorded.get("translate") or (0.0,) * n
    return {"scale": tuple(float(s) for s in scale), "translate": tuple(float(t) for t in translate)}


def layer_metadata(explanation: Explanation, role: str) -> dict:
    """The ``metadata`` dict of a result layer (``role``: ate, attribution, standard_error, prediction,
    target_region, block_status)."""
    return {
        METADATA_KEY: {
            "role": role,
            "explanation": explanation,
            "parameters": explanation.parameters,
            "model_identity": explanation.model_identity,
            "provenance": explanation.provenance,
            "summary": explanation.summary(),
        }
    }


def explanation_from_layer(layer, kind: type[Explanation] = Explanation) -> Explanation | None:
    """The explanation (of class ``kind``) a result layer was made from, or None for any other layer."""
    entry = getattr(layer, "metadata", {}).get(METADATA_KEY)
    if isinstance(entry, dict) and isinstance(entry.get("explanation"), kind):
        return entry["explanation"]
    return None


def outline(mask: np.ndarray) -> np.ndarray:
    """The in-plane border of a mask (last two axes): a one-voxel outline on every slice."""
    mask = np.asarray(mask, dtype=bool)
    structure = np.zeros((3,) * mask.ndim, dtype=bool)
    structure[(1,) * (mask.ndim - 2)] = ndimage.generate_binary_structure(2, 1)
    return mask & ~ndimage.binary_erosion(mask, structure, border_value=0)


def _outline_layer(mask, explanation, name, role, color, geometry) -> tuple:
    colormap = DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", 1: color})
    kwargs = {
        "name": name,
        "colormap": colormap,
        "opacity": 0.9,
        "metadata": layer_metadata(explanation, role),
        **geometry,
    }
    return outline(mask).astype(np.uint8), kwargs, "labels"


def outline_layers(explanation, base: str, geometry: dict, prediction: bool, target_region: bool) -> list[tuple]:
    """On request the outlines of the model's prediction (yellow) and of the target region (green)."""
    layers = []
    if prediction:
        layers.append(_outline_layer(explanation.prediction, explanation, f"{base} prediction", "prediction", "yellow", geometry))
    if target_region:
        layers.append(_outline_layer(explanation.target_region, explanation, f"{base} target", "target_region", "lime", geometry))
    return layers


def explanation_layer_data(explanation: Explanation, **options) -> list[tuple]:
    """LayerData of any kind of explanation (see :func:`region_layer_data`, :func:`attribution_layer_data`,
    :func:`component_layer_data`); a 2D explanation of one slice of a stack is put on that slice
    (:func:`on_recorded_slice`)."""
    if isinstance(explanation, RegionExplanation):
        return on_recorded_slice(region_layer_data(explanation, **options), explanation)
    if isinstance(explanation, AttributionMap):
        return on_recorded_slice(attribution_layer_data(explanation, **options), explanation)
    if isinstance(explanation, ComponentExplanation):
        return on_recorded_slice(component_layer_data(explanation, **options), explanation)
    raise TypeError(f"no napari layers are defined for a {type(explanation).__name__}")


def on_recorded_slice(layer_data: list[tuple], explanation: Explanation) -> list[tuple]:
    """Layers of a 2D explanation of slice ``i`` of a stack (provenance ``source_layer["slice"]``, see
    :func:`~napari_pdcr._napari.inputs.slice_geometry`) as stacks of that one slice, placed at slice
    ``i`` of the stack: shown there, not on every slice. Other explanations' layers are returned as they are."""
    recorded = (explanation.provenance.get("source_layer") or {}).get("slice")
    if not recorded:
        return layer_data
    axis_translate = float(recorded["translate"]) + recorded["index"] * float(recorded["scale"])
    return [
        (np.asarray(data)[None], {**kwargs, "scale": (float(recorded["scale"]), *kwargs["scale"]),
                                  "translate": (axis_translate, *kwargs["translate"])}, kind)
        for data, kwargs, kind in layer_data
    ]


def component_layer_data(explanation: ComponentExplanation, source_layer=None, name: str | None = None) -> list[tuple]:
    """The target region's outline, carrying the component result (whose chart the Components dock shows)."""
    base = name or default_name(explanation)
    geometry = placement(explanation, source_layer)
    return [_outline_layer(explanation.target_region, explanation, f"{base} target", "target_region", "lime", geometry)]


#: Height of napari's colour bar in inches (its default 150 px at 96 dpi), for :func:`colour_bar_limit`.
COLOUR_BAR_INCHES = 150 / 96


def colour_bar_limit(values) -> float:
    """:func:`~napari_pdcr.plotting.style.symmetric_limit`, widened (by at most ~27 %) to napari's next
    colour-bar tick when no tick but 0 would be labelled.

    napari's colour bar labels the round ticks vispy picks (Talbot's algorithm) that lie
    inside the limits; limits just under a round number (+-1.9985, ticks at -2, 0, 2)
    would leave the single label "0". vispy's own tick function is used, so the limits
    fit the ticks napari draws (it is private to vispy: without it the limit is left as is).
    """
    m = symmetric_limit(values)
    try:
        from vispy.visuals.axis import _get_ticks_talbot
    except ImportError:
        return m
    for _ in range(4):
        ticks = np.asarray(_get_ticks_talbot(-m, m, COLOUR_BAR_INCHES, 2), dtype=float)
        if (ticks[np.abs(ticks) <= m * (1 + 1e-4)] > 0).any():
            break
        m = float(np.abs(ticks[np.abs(ticks) > m]).min())
    return m


def signed_map_layer(values: np.ndarray, explanation: Explanation, name: str, role: str, geometry: dict) -> tuple:
    """An Image LayerData of a signed map: symmetric limits, supporting sign red, translucent over the image."""
    m = colour_bar_limit(values)
    return (
        values,
        {
            "name": name,
            "colormap": supporting_red_colormap(explanation),
            "contrast_limits": (-m, m),
            "blending": "translucent",
            "opacity": 0.6,
            # 'mip' would hide negative values in 3D; 'translucent' composites both signs
            "rendering": "translucent",
            "interpolation2d": "nearest",
            "interpolation3d": "nearest",
            "metadata": layer_metadata(explanation, role),
            **geometry,
        },
        "image",
    )


def attribution_layer_data(
    explanation: AttributionMap,
    source_layer=None,
    name: str | None = None,
    show_prediction: bool = False,
    show_target_region: bool = True,
) -> list[tuple]:
    """napari LayerData of an attribution map, bottom first: the map (role ``attribution``, its own values, the
    supporting sign red) and on request the prediction (yellow) and target-region (green) outlines."""
    base = name or default_name(explanation)
    geometry = placement(explanation, source_layer)
    layers = [signed_map_layer(np.asarray(explanation.attribution, np.float32), explanation, base, "attribution",
                               geometry)]
    return layers + outline_layers(explanation, base, geometry, show_prediction, show_target_region)


#: Labels of the block-status layer: what a zero (or an estimate) of the map rests on.
SCREENED_OUT_LABEL, FEW_DRAWS_LABEL = 1, 2
STATUS_COLORS = {SCREENED_OUT_LABEL: "silver", FEW_DRAWS_LABEL: "orange"}
#: Period in voxels of the status layer's hatching.
HATCH_PERIOD = 4


def block_state_hatching(explanation: RegionExplanation) -> np.ndarray:
    """uint8 ``S``: diagonal hatching over blocks screened out (1; set to 0 after the screen's few draws, not
    tested) and anti-diagonal hatching over tested blocks whose estimate rests on few draws (2); 0 elsewhere.

    Blocks that were tested and found zero stay clear, so the map tells them from screened-out ones.
    """
    status = explanation.block_status
    not_tested = (status == NodeStatus.SCREENED_OUT) | (status == NodeStatus.PRUNED_COARSE)
    few = np.zeros_like(not_tested) if explanation.block_few_draws is None else explanation.block_few_draws
    few = few & np.isin(status, (NodeStatus.ESTIMATED, NodeStatus.BELOW_TAU))
    grid = explanation.grid
    rows, cols = np.indices(explanation.spatial_shape[-2:])
    diagonal, anti = (rows + cols) % HATCH_PERIOD == 0, (rows - cols) % HATCH_PERIOD == 0
    out = np.zeros(explanation.spatial_shape, np.uint8)
    out[grid.to_voxels(not_tested).astype(bool) & diagonal] = SCREENED_OUT_LABEL
    out[grid.to_voxels(few).astype(bool) & anti] = FEW_DRAWS_LABEL
    return out


def status_layer(explanation: RegionExplanation, base: str, geometry: dict) -> tuple:
    """Labels LayerData of :func:`block_state_hatching` (grey: screened out; orange: few draws)."""
    colormap = DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", **STATUS_COLORS})
    kwargs = {
        "name": f"{base} screened out / few draws",
        "colormap": colormap,
        "opacity": 0.8,
        "metadata": layer_metadata(explanation, "block_status"),
        **geometry,
    }
    return block_state_hatching(explanation), kwargs, "labels"


def region_layer_data(
    explanation: RegionExplanation,
    source_layer=None,
    name: str | None = None,
    show_standard_error: bool = False,
    show_prediction: bool = True,
    show_target_region: bool = False,
    show_block_status: bool = False,
) -> list[tuple]:
    """napari LayerData tuples ``(data, kwargs, type)`` for an explanation, bottom first.

    The ATE map always; on request the standard-error map (hidden until switched on),
    the outlines of the model's prediction (yellow) and of the target region (green)
    as Labels layers (``metadata[...]["explanation"]`` keeps the full masks), and on top the
    block-status hatching (:func:`block_state_hatching`: grey over screened-out blocks, orange
    over estimates resting on few draws).
    """
    base = name or default_name(explanation)
    geometry = placement(explanation, source_layer)
    layers = []
    if show_standard_error:
        se = explanation.standard_error
        layers.append((
            se,
            {
                "name": f"{base} SE",
                "colormap": "magma",
                "contrast_limits": (0.0, symmetric_limit(se)),
                "blending": "translucent",
                "opacity": 0.6,
                "visible": False,
                "rendering": "mip",
                "metadata": layer_metadata(explanation, "standard_error"),
                **geometry,
            },
            "image",
        ))
    layers.append(signed_map_layer(explanation.ate, explanation, base, "ate", geometry))
    layers += outline_layers(explanation, base, geometry, show_prediction, show_target_region)
    return layers + ([status_layer(explanation, base, geometry)] if show_block_status else [])
