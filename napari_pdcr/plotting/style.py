"""The one plot style: effect colours, symmetric colour limits and the dock's font sizes.

Colours follow the published convention: negative effects (the block or component
*supported* the outcome) red, positive effects (it *hurt* the outcome) blue. They are the
ColorBrewer ``RdBu`` colours, so bar charts, matplotlib maps (:data:`EFFECT_CMAP`) and
napari's ATE colormap agree.
"""

from __future__ import annotations

import numpy as np

#: Diverging matplotlib colormap with negative = red, positive = blue.
EFFECT_CMAP = "RdBu"
#: Strong and light red (negative effects), strong and light blue (positive effects).
NEGATIVE_COLOR, NEGATIVE_LIGHT = "#b2182b", "#d6604d"
POSITIVE_COLOR, POSITIVE_LIGHT = "#2166ac", "#4393c3"
#: The centre of :data:`EFFECT_CMAP` (no effect on a map) and the grey of zero effects in charts.
CENTRE_COLOR, ZERO_COLOR = "#f7f7f7", "#999999"

#: Small fonts for the dock widgets' plots (the dock is ~350 px wide).
DOCK_STYLE = {
    "font.size": 7, "axes.titlesize": 8, "axes.labelsize": 7, "xtick.labelsize": 6.5, "ytick.labelsize": 6.5
}


def symmetric_limit(values) -> float:
    """``m`` for colour limits ``(-m, m)``: the largest finite ``|value|``.

    A map without a non-zero finite value (all zero, empty, or only NaN / inf) gets 1.0,
    so that it shows as "no effect" on a valid scale instead of a degenerate one.
    """
    values = np.abs(np.asarray(values, dtype=np.float64))
    finite = values[np.isfinite(values)]
    m = float(finite.max()) if finite.size else 0.0
    return m if m > 0 else 1.0


def dock_style():
    """Context manager applying :data:`DOCK_STYLE` to the figures drawn inside it."""
    import matplotlib

    return matplotlib.rc_context(DOCK_STYLE)
