"""Per-model strategy profiles across a study's regions, and one figure comparing the models.

The per-task numbers come from :func:`napari_pdcr.studies.comparison.strategy_profile`
(locality, sign fractions) and :func:`~napari_pdcr.studies.comparison.top_component`
(component concentration), computed by the worker; here they are summarised per model
and method across every image and region: the mean with a 95% t-interval of the mean,
and the spread across inputs (the published "heterogeneity across models and inputs").
"""

from __future__ import annotations

import numpy as np

#: the per-task columns summarised per model (those present in the table)
PROFILE_COLUMNS = ("locality", "half_effect_distance", "fraction_positive", "fraction_negative", "fraction_zero",
                   "top_component_share", "summary_base_outcome")


def mean_interval(values) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of the finite ``values`` and its 95% t-interval (NaN where undefined)."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(values.mean())
    if values.size < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, values.size - 1) * stats.sem(values))
    return mean, mean - half, mean + half


def profiles(table):
    """One row per (model, method) of the finished tasks: ``n_tasks``, ``n_images`` and, for each
    column of :data:`PROFILE_COLUMNS`, ``<column>_mean``, ``_low``, ``_high`` (95% interval of the mean)
    and ``_sd`` (spread across regions and images)."""
    import pandas as pd

    done = table[table["status"] == "done"] if "status" in table else table
    rows = []
    for (model, method), group in done.groupby(["model", "method"], sort=False):
        row = {"model": model, "method": method, "n_tasks": len(group), "n_images": group["image"].nunique()}
        for column in PROFILE_COLUMNS:
            if column not in group or group[column].isna().all():
                continue
            values = pd.to_numeric(group[column], errors="coerce")
            mean, low, high = mean_interval(values)
            row.update({f"{column}_mean": mean, f"{column}_low": low, f"{column}_high": high,
                        f"{column}_sd": float(values.std(ddof=1)) if values.notna().sum() > 1 else float("nan")})
        rows.append(row)
    return pd.DataFrame(rows)


def figure(table, locality_distance: float = 16.0):
    """One matplotlib figure comparing the models of a study (no Qt needed).

    Panels: locality of every region (dots, one column per model and image) with the
    model's mean and 95% interval; the mean sign fractions of the blocks; the component
    concentration (share of the largest component's |ATE|) when component effects ran.
    """
    from matplotlib.figure import Figure

    done = table[table["status"] == "done"] if "status" in table else table
    regions = done[done["locality"].notna()] if "locality" in done else done.iloc[:0]
    components = done[done["top_component_share"].notna()] if "top_component_share" in done else done.iloc[:0]
    panels = 2 + (len(components) > 0)
    fig = Figure(figsize=(4.2 * panels + 1, 4.2), layout="tight")
    axes = fig.subplots(1, panels)
    models = list(dict.fromkeys(done["model"]))
    images = list(dict.fromkeys(done["image"]))
    x = np.arange(len(models))
    ax = axes[0]
    for j, image in enumerate(images):
        offset = (j - (len(images) - 1) / 2) * 0.18
        for i, model in enumerate(models):
            values = regions[(regions["model"] == model) & (regions["image"] == image)]["locality"]
            jitter = np.linspace(-0.05, 0.05, len(values)) if len(values) > 1 else np.zeros(len(values))
            ax.scatter(i + offset + jitter, values, s=10, alpha=0.6, color=f"C{j}",
                       label=image if i == 0 else None)
    for i, model in enumerate(models):
        mean, low, high = mean_interval(regions[regions["model"] == model]["locality"])
        if np.isfinite(mean):
            ax.errorbar(i, mean, yerr=[[mean - low if np.isfinite(low) else 0], [high - mean if np.isfinite(high) else 0]],
                        fmt="_", color="black", markersize=18, capsize=4, linewidth=1.5)
    ax.set_xticks(x, models, rotation=20, fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel(f"share of |ATE| within {locality_distance:g} of the region")
    ax.set_title("locality per region (bar: mean, 95% CI)", fontsize=9)
    ax.legend(fontsize=7, title="image", title_fontsize=7)
    ax = axes[1]
    bottom = np.zeros(len(models))
    for kind, color in (("negative", "#c0392b"), ("zero", "#bbbbbb"), ("positive", "#2166ac")):
        column = f"fraction_{kind}"
        values = np.array([regions[regions["model"] == m][column].mean() if column in regions else np.nan
                           for m in models])
        values = np.nan_to_num(values)
        ax.bar(x, values, bottom=bottom, color=color, label=kind, width=0.6)
        bottom += values
    ax.set_xticks(x, models, rotation=20, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean fraction of blocks")
    ax.set_title("block effect signs", fontsize=9)
    ax.legend(fontsize=7, loc="upper right", framealpha=0.9)
    if panels == 3:
        ax = axes[2]
        for i, model in enumerate(models):
            values = components[components["model"] == model]["top_component_share"]
            ax.scatter(np.full(len(values), i), values, s=12, alpha=0.6)
            mean, low, high = mean_interval(values)
            if np.isfinite(mean):
                ax.plot([i - 0.2, i + 0.2], [mean, mean], color="black")
        ax.set_xticks(x, models, rotation=20, fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("share of |ATE| of the largest component")
        ax.set_title("component concentration", fontsize=9)
    n_regions = regions.groupby(["image"])["region"].nunique().sum() if len(regions) else 0
    fig.suptitle(f"heterogeneity across models and inputs: {len(models)} models, {len(images)} images, "
                 f"{n_regions} regions", fontsize=10)
    return fig
