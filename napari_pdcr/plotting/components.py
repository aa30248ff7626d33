"""The bar chart of a component-effects result."""

from __future__ import annotations

import numpy as np

from napari_pdcr.engine.estimator import NodeStatus
from napari_pdcr.outcomes import outcome_unit
from napari_pdcr.plotting.style import NEGATIVE_COLOR, POSITIVE_COLOR, ZERO_COLOR


def plot_components(result, ax=None, top: int | None = 20, title: str | None = None):
    """Sorted horizontal bar chart of a ``ComponentExplanation``'s ATEs with 95% error bars (+-1.96 SE).

    The largest ``|ATE|`` is at the top; only the ``top`` largest are drawn (None: all).
    Zero effects (screened out or below tau) are grey outlines at their raw mean.
    Returns the matplotlib ``Axes``.
    """
    import matplotlib

    if ax is None:
        import matplotlib.pyplot as plt

        ax = plt.figure(figsize=(6, 0.3 * min(len(result.components), top or 10**6) + 1.2)).add_subplot()
    order = result.order()[:top] if top else result.order()
    y = np.arange(len(order))[::-1]
    zero = result.status[order] != NodeStatus.ESTIMATED
    shown = np.where(zero, np.nan_to_num(result.raw_mean[order]), result.ate[order])
    colors = [
        ZERO_COLOR if z else NEGATIVE_COLOR if v < 0 else POSITIVE_COLOR for z, v in zip(zero, shown, strict=True)
    ]
    ax.barh(y, shown, color=[c if not z else "none" for c, z in zip(colors, zero, strict=True)],
            edgecolor=colors, height=0.7)
    ink = matplotlib.rcParams["text.color"]  # the theme's text colour: visible on light and dark backgrounds
    ax.errorbar(shown, y, xerr=1.96 * result.standard_error[order], fmt="none", ecolor=ink,
                elinewidth=1, capsize=2)
    ax.axvline(0, color=ink, linewidth=0.8)
    ax.set_yticks(y, [result.components[i].name for i in order])
    ax.set_ylim(-0.6, len(order) - 0.4)
    unit = outcome_unit(result.parameters)
    intervention = result.parameters.get("intervention", {}).get("name", "")
    ax.set_xlabel(f"ATE ({unit}), {intervention}\nerror bars: 95% CI (±1.96 SE)")
    low, high = ax.get_xlim()
    pad = 0.08 * (high - low)
    ax.set_xlim(min(low, -pad), max(high, pad))
    if title is not None:
        ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return ax
