"""Strategy profiles: how several models explain the same image and target region.

For each model: the region ATE map (:class:`~napari_pdcr.RegionEffects`), how local its
strategy is (the *locality curve*: share of the total absolute block effect within
distance d of the region, and one number, the share within ``locality_distance``), the
fractions of positive / negative / zero blocks, and optionally its component profile
(:class:`~napari_pdcr.methods.ComponentEffects`). :meth:`ModelComparison.figure`
draws one matplotlib figure comparing the models (no Qt needed) and
:meth:`ModelComparison.to_markdown` a table.

    comparison = compare_models({"unet2d": unet, "vit2d": vit}, image, region,
                                region_effects={"intervention": bank}, bank_images=others)
    comparison.figure(image[0]).savefig("comparison.png")
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from dataclasses import dataclass, replace

import numpy as np

from napari_pdcr.engine.estimator import NodeStatus, Progress, drive, relay
from napari_pdcr.explanations import ComponentExplanation, RegionExplanation
from napari_pdcr.methods import ComponentEffects, RegionEffects
from napari_pdcr.models.base import SegmentationModel
from napari_pdcr.plotting import EFFECT_CMAP


@dataclass
class StrategyProfile:
    """The numbers that describe one model's strategy for one image and region.

    Distances are in the explanation's spacing units (mm for the samples), measured from
    each block's centre to the nearest target-region voxel; blocks touching the region
    are excluded (as in the published counts).
    """

    model: str
    explanation: RegionExplanation
    components: ComponentExplanation | None
    distances: np.ndarray  #: (D,) distances of the locality curve
    locality_curve: np.ndarray  #: (D,) share of the total |ATE| in blocks within each distance
    locality_distance: float
    locality: float  #: share of the total |ATE| within ``locality_distance`` (NaN if no effect)
    half_effect_distance: float  #: smallest distance holding half of the total |ATE| (NaN if none)
    fractions: dict[str, float]  #: positive / negative / zero shares of the explained blocks
    total_abs_effect: float  #: sum of |ATE| over the blocks (outcome units)

    @property
    def top_component(self) -> tuple[str, float, float] | None:
        """``(name, ATE, share of the total |component ATE|)`` of the largest component."""
        return None if self.components is None else top_component(self.components)

    def row(self) -> dict:
        """One table row (JSON-serialisable)."""
        top = self.top_component
        return {
            "model": self.model,
            "base_outcome": self.explanation.base_outcome,
            f"locality@{self.locality_distance:g}": self.locality,
            "half_effect_distance": self.half_effect_distance,
            "positive": self.fractions["positive"],
            "negative": self.fractions["negative"],
            "zero": self.fractions["zero"],
            "total_abs_effect": self.total_abs_effect,
            "top_component": top[0] if top else None,
            "top_component_ate": top[1] if top else None,
            "top_component_share": top[2] if top else None,
            "forward_passes": self.explanation.forward_passes
            + (self.components.forward_passes if self.components else 0),
            "seconds": self.explanation.timings.get("total_s", 0.0)
            + (self.components.timings.get("total_s", 0.0) if self.components else 0.0),
        }


def top_component(components: ComponentExplanation) -> tuple[str, float, float]:
    """``(name, ATE, share of the total |component ATE|)`` of the component with the largest |ATE|
    (the share is the model's component concentration; NaN when no component has an effect)."""
    magnitude = np.abs(components.ate)
    i = int(components.order()[0])
    share = float(magnitude[i] / magnitude.sum()) if magnitude.sum() > 0 else float("nan")
    return components.components[i].name, float(components.ate[i]), share


def strategy_profile(
    model: str,
    explanation: RegionExplanation,
    components: ComponentExplanation | None = None,
    locality_distance: float = 16.0,
    n_distances: int = 64,
) -> StrategyProfile:
    """Summarise ``explanation`` (and ``components``) as a :class:`StrategyProfile`."""
    explained = explanation.block_status != NodeStatus.TARGET
    distance = explanation.block_distances()[explained]
    magnitude = np.abs(explanation.block_effects[explained]).astype(np.float64)
    total = magnitude.sum()
    distances = np.linspace(0.0, float(distance.max()) if distance.size else 1.0, n_distances)
    if total > 0:
        order = np.argsort(distance, kind="stable")
        cumulative = np.cumsum(magnitude[order]) / total
        curve = np.array([magnitude[distance <= d].sum() / total for d in distances])
        half = float(distance[order][np.searchsorted(cumulative, 0.5)])
    else:
        curve, half = np.full(n_distances, np.nan), float("nan")
    counts = explanation.counts()
    n = max(1, sum(counts.values()))
    return StrategyProfile(
        model=model,
        explanation=explanation,
        components=components,
        distances=distances,
        locality_curve=curve,
        locality_distance=float(locality_distance),
        locality=explanation.locality(locality_distance),
        half_effect_distance=half,
        fractions={k: v / n for k, v in counts.items()},
        total_abs_effect=float(total),
    )


@dataclass
class ModelComparison:
    """Strategy profiles of several models on one image and target region."""

    profiles: list[StrategyProfile]

    def table(self) -> list[dict]:
        return [p.row() for p in self.profiles]

    def to_markdown(self) -> str:
        """The table as GitHub markdown (fractions and shares as percentages)."""
        d = self.profiles[0].locality_distance if self.profiles else 16.0
        unit = "mm" if self.profiles and self.profiles[0].explanation.spacing else "px"
        header = (
            f"| model | base outcome | \\|ATE\\| within {d:g} {unit} | half of \\|ATE\\| within ({unit}) | "
            "negative | zero | positive | total \\|ATE\\| | largest component (ATE, share of \\|ATE\\|) | "
            "forward passes | seconds |"
        )
        lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
        for p in self.profiles:
            r = p.row()
            top = "n/a" if r["top_component"] is None else (
                f"{r['top_component']} ({r['top_component_ate']:+.1f}, {100 * r['top_component_share']:.0f}%)"
            )
            lines.append(
                f"| `{p.model}` | {r['base_outcome']:.1f} | {_percent(p.locality)} | {p.half_effect_distance:.1f} | "
                f"{_percent(r['negative'])} | {_percent(r['zero'])} | {_percent(r['positive'])} | "
                f"{r['total_abs_effect']:.1f} | {top} | {r['forward_passes']} | {r['seconds']:.0f} |"
            )
        return "\n".join(lines)

    def figure(self, image: np.ndarray, top_components: int = 10):
        """One figure: ATE maps (shared colour scale), component profiles, locality curves, fractions.

        ``image``: the explained 2D image ``(H, W)`` (or one channel of it) shown under the maps.
        """
        import matplotlib.pyplot as plt
        from matplotlib.gridspec import GridSpec

        n = len(self.profiles)
        has_components = any(p.components is not None for p in self.profiles)
        rows = [3.2, 3.4, 2.8] if has_components else [3.2, 2.8]
        fig = plt.figure(figsize=(3.4 * max(n, 2), sum(rows) + 0.6))
        grid = GridSpec(len(rows), 2 * n, figure=fig, height_ratios=rows, hspace=0.55, wspace=1.2)
        limit = max((np.abs(p.explanation.ate).max() for p in self.profiles), default=1.0) or 1.0
        for i, p in enumerate(self.profiles):
            ax = fig.add_subplot(grid[0, 2 * i : 2 * i + 2])
            shown = _map_for(image, p.explanation)
            ax.imshow(shown[0], cmap="gray")
            im = ax.imshow(np.ma.masked_equal(shown[1], 0), cmap=EFFECT_CMAP, vmin=-limit, vmax=limit, alpha=0.8)
            ax.contour(shown[2], levels=[0.5], colors="gold", linewidths=1)
            ax.set_title(f"{p.model}\nbase {p.explanation.base_outcome:.1f}", fontsize=9)
            ax.set_axis_off()
        fig.colorbar(im, ax=fig.axes[:n], fraction=0.02, pad=0.01, label="ATE (red: supports, blue: hurts)")
        if has_components:
            for i, p in enumerate(self.profiles):
                ax = fig.add_subplot(grid[1, 2 * i + 1 : 2 * i + 2])
                if p.components is None:
                    ax.set_axis_off()
                    continue
                p.components.plot(ax, top=top_components)
                ax.tick_params(axis="y", labelsize=6.5)
                ax.xaxis.label.set_fontsize(7)
                ax.set_title(f"{p.model}: components", fontsize=8)
        curves = fig.add_subplot(grid[-1, :n])
        for p in self.profiles:
            curves.plot(p.distances, p.locality_curve, label=p.model)
        d = self.profiles[0].locality_distance if self.profiles else 16.0
        curves.axvline(d, color="#777777", linestyle=":", linewidth=1)
        unit = "mm" if self.profiles and self.profiles[0].explanation.spacing else "px"
        curves.set_xlabel(f"distance from the target region ({unit})")
        curves.set_ylabel("share of total |ATE| within")
        curves.set_ylim(0, 1.02)
        curves.legend(fontsize=7)
        curves.set_title("locality curves", fontsize=9)
        bars = fig.add_subplot(grid[-1, n:])
        x = np.arange(n)
        bottom = np.zeros(n)
        for kind, color in (("negative", "#c0392b"), ("zero", "#bbbbbb"), ("positive", "#2166ac")):
            values = np.array([p.fractions[kind] for p in self.profiles])
            bars.bar(x, values, bottom=bottom, color=color, label=kind, width=0.6)
            bottom += values
        bars.set_xticks(x, [p.model for p in self.profiles], fontsize=8)
        bars.set_ylabel("fraction of blocks")
        bars.set_ylim(0, 1)
        bars.legend(fontsize=7, loc="upper right", framealpha=0.9)
        bars.set_title("block effect signs", fontsize=9)
        return fig


def _percent(value: float) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{100 * value:.0f}%"


def _map_for(image: np.ndarray, explanation: RegionExplanation) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image, ATE, region)`` 2D arrays for display (the region's central slice in 3D)."""
    ate, region, image = explanation.ate, explanation.target_region, np.asarray(image)
    if ate.ndim == 3:
        z = int(np.argwhere(region)[:, 0].mean())
        ate, region, image = ate[z], region[z], image[z] if image.ndim == 3 else image
    return image, ate, region


def iter_compare_models(
    models: Mapping[str, SegmentationModel],
    image,
    target_region,
    reference=None,
    region_effects: dict | None = None,
    component_effects: dict | None = None,
    bank_images=None,
    spacing=None,
    locality_distance: float = 16.0,
) -> Generator[Progress, None, ModelComparison]:
    """:func:`compare_models` as a generator of progress (stages prefixed with the model's name)."""
    profiles = []
    for name, model in models.items():
        method = RegionEffects(model, **(region_effects or {}))
        explanation = yield from relay(method.iter_attribute(image, target_region, reference, spacing), _prefixed(name))
        components = None
        if component_effects is not None and model.is_module:
            method = ComponentEffects(model, **component_effects)
            components = yield from relay(
                method.iter_attribute(image, target_region, reference, bank_images), _prefixed(f"{name} components")
            )
        profiles.append(strategy_profile(name, explanation, components, locality_distance))
    return ModelComparison(profiles)


def compare_models(models, image, target_region, reference=None, progress=None, **options) -> ModelComparison:
    """Region effects (and component effects) of every model on one image and target region.

    Parameters
    ----------
    models
        ``{name: SegmentationModel}``; every model takes the same image.
    image, target_region, reference, spacing
        As for :meth:`~napari_pdcr.RegionEffects.iter_attribute`.
    region_effects
        Keyword arguments of :class:`~napari_pdcr.RegionEffects` (intervention,
        block_shape, n_estimate, mode, seed, ...), the same for every model.
    component_effects
        Keyword arguments of :class:`~napari_pdcr.methods.ComponentEffects`; None
        skips component profiles (models that are not ``nn.Module`` are skipped anyway).
    bank_images
        Other images for the ``resample`` / ``mean`` component interventions.
    locality_distance
        Distance (spacing units) of the one-number locality summary.
    progress
        ``progress(Progress)``; returning False cancels.
    """
    return drive(iter_compare_models(models, image, target_region, reference, **options), progress)


def _prefixed(name: str):
    """A progress transform that puts ``name`` before the stage."""
    return lambda progress: replace(progress, stage=f"{name}: {progress.stage}")
