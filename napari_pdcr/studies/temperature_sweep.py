"""Temperature sweep: one region explanation per temperature, on the same draws.

The outcome's temperature only changes how the region's scores become a number
(``sigmoid(z / T)``), not what the model computes, so a sweep runs the interventions
once and scores every forward batch at every temperature: the sweep costs one set of
forward passes (a block that passes the screen at any temperature gets the full
estimate), and each map equals a separate run at that temperature with the same seed
(same screening, draws and tau rule per temperature).

    sweep = temperature_sweep(model, image, region, outcome="soft_dice")
    sweep.table()                       # mass, locality, sign fractions per T
    sweep.figure(image[0]).savefig("sweep.png")

Thresholded Dice is blind to T (at threshold 0.5, or with arg-max classes): its maps are
identical at every T; soft Dice and mean probability are not.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass

import numpy as np

from napari_pdcr.engine.estimator import Progress, drive
from napari_pdcr.explanations import RegionExplanation
from napari_pdcr.methods.region_effects import RegionEffects
from napari_pdcr.models.base import SegmentationModel
from napari_pdcr.plotting import EFFECT_CMAP
from napari_pdcr.studies.comparison import StrategyProfile, strategy_profile
from napari_pdcr.validation import positive_float

#: temperatures of a sweep unless given (the model's calibrated T is added when it has one)
DEFAULT_TEMPERATURES = (0.5, 1.0, 2.0, 4.0)


def calibrated_temperature(model: SegmentationModel) -> float | None:
    """The temperature fitted by :func:`napari_pdcr.calibration.calibrate`, or None."""
    description = model.description
    return None if description is None or description.calibration is None else description.temperature


def sweep_temperatures(model: SegmentationModel, temperatures: Sequence[float] | None) -> tuple[list[float], list[str]]:
    """Sorted temperatures and their labels; the calibrated T (if any) is added and labelled."""
    values = [positive_float("temperature", t) for t in (DEFAULT_TEMPERATURES if temperatures is None else temperatures)]
    if not values:
        raise ValueError("give at least one temperature for the sweep, e.g. temperatures=(0.5, 1, 2, 4)")
    calibrated = calibrated_temperature(model)
    if calibrated is not None and not any(np.isclose(calibrated, t) for t in values):
        values.append(calibrated)
    values = sorted(set(values))
    labels = [
        f"calibrated T = {t:.3g}" if calibrated is not None and np.isclose(t, calibrated) else f"T = {t:g}" for t in values
    ]
    return values, labels


@dataclass
class TemperatureSweep:
    """Region explanations of one image and region at several outcome temperatures."""

    temperatures: list[float]
    labels: list[str]
    explanations: list[RegionExplanation]
    profiles: list[StrategyProfile]  #: mass, locality (share of |ATE| within 16 mm), sign fractions
    forward_passes: int  #: forward passes of the whole sweep (shared by every temperature)

    def table(self) -> list[dict]:
        """One row per temperature: base outcome, total |ATE|, locality and sign fractions."""
        return [
            {
                "temperature": t,
                "label": label,
                "base_outcome": p.explanation.base_outcome,
                "total_abs_effect": p.total_abs_effect,
                f"locality@{p.locality_distance:g}": p.locality,
                **p.fractions,
            }
            for t, label, p in zip(self.temperatures, self.labels, self.profiles, strict=True)
        ]

    def figure(self, image: np.ndarray):
        """Maps per temperature (one colour scale) over ``image`` ``(H, W)``, and the profile against T."""
        import matplotlib.pyplot as plt

        n = len(self.explanations)
        fig, axes = plt.subplots(2, max(n, 3), figsize=(3.0 * max(n, 3), 6.4), squeeze=False, layout="constrained")
        limit = max((float(np.abs(e.ate).max()) for e in self.explanations), default=0.0) or 1.0
        for ax, label, e in zip(axes[0], self.labels, self.explanations, strict=False):
            ax.imshow(image, cmap="gray")
            im = ax.imshow(np.ma.masked_equal(e.ate, 0), cmap=EFFECT_CMAP, vmin=-limit, vmax=limit, alpha=0.8)
            ax.contour(e.target_region, levels=[0.5], colors="gold", linewidths=1)
            ax.set_title(f"{label}\nbase {e.base_outcome:.1f}", fontsize=9)
        for ax in axes[0]:
            ax.set_axis_off()
        fig.colorbar(im, ax=list(axes[0]), fraction=0.02, pad=0.01, label="ATE (red: supports, blue: hurts)")
        for ax in axes[1]:
            ax.set_visible(False)
        t = np.asarray(self.temperatures)
        mass, locality, signs = axes[1][0], axes[1][1], axes[1][2]
        for ax in (mass, locality, signs):
            ax.set_visible(True)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("outcome temperature T")
        mass.plot(t, [p.total_abs_effect for p in self.profiles], "o-")
        mass.set_ylabel("total |ATE| (outcome units)")
        mass.set_title("mass", fontsize=9)
        locality.plot(t, [p.locality for p in self.profiles], "o-")
        distance = self.profiles[0].locality_distance if self.profiles else 16.0
        locality.set_ylabel(f"share of |ATE| within {distance:g} mm")
        locality.set_ylim(0, 1.02)
        locality.set_title("locality", fontsize=9)
        for kind, color in (("positive", "#2166ac"), ("negative", "#c0392b"), ("zero", "#888888")):
            signs.plot(t, [p.fractions[kind] for p in self.profiles], "o-", color=color, label=kind)
        signs.set_ylabel("fraction of blocks")
        signs.set_ylim(0, 1.02)
        signs.legend(fontsize=7)
        signs.set_title("signs", fontsize=9)
        return fig


def iter_temperature_sweep(
    method: RegionEffects,
    image,
    target_region,
    temperatures: Sequence[float] | None = None,
    reference=None,
    spacing=None,
    locality_distance: float = 16.0,
) -> Generator[Progress, None, TemperatureSweep]:
    """:func:`temperature_sweep` for a configured :class:`RegionEffects` ``method``, as a generator."""
    values, labels = sweep_temperatures(method.model, temperatures)
    outcomes = [method.outcome.at_temperature(t) for t in values]
    explanations = yield from method.iter_attribute_outcomes(image, target_region, outcomes, reference, spacing)
    for e in explanations:
        e.parameters["temperature_sweep"] = {"temperatures": values, "shared_draws": True}
    return TemperatureSweep(
        temperatures=values,
        labels=labels,
        explanations=explanations,
        profiles=[strategy_profile(label, e, locality_distance=locality_distance) for label, e in zip(labels, explanations, strict=True)],
        forward_passes=explanations[0].forward_passes,
    )


def temperature_sweep(
    model: SegmentationModel, image, target_region, temperatures: Sequence[float] | None = None, reference=None,
    spacing=None, progress=None, **region_effects,
) -> TemperatureSweep:
    """Explain ``image`` in ``target_region`` at several outcome temperatures on shared draws.

    ``temperatures`` default to 0.5, 1, 2, 4 and the model's calibrated T (if fitted);
    ``region_effects`` are :class:`RegionEffects` options (``outcome="soft_dice"``, the
    intervention, ``seed``, ...; mode ``"exact"`` or ``"published"``). Returns a
    :class:`TemperatureSweep` with one :class:`RegionExplanation` per temperature.
    """
    method = RegionEffects(model, **region_effects)
    return drive(iter_temperature_sweep(method, image, target_region, temperatures, reference, spacing), progress)
