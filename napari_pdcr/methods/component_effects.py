"""Component effects: the ATE of network components on a model's outcome in a target region.

Usage::

    from napari_pdcr import ComponentEffects
    method = ComponentEffects(model, intervention="resample", granularity="stages")
    result = method.attribute(image, target_region, bank_images=other_slices)
    result.table()[:3]       # the components with the largest |ATE|
    result.plot()            # sorted bar chart with 95% error bars

``ATE(c) = E_{a ~ P_c}[Y(f with c's output := a, on x)] - Y(x)``, estimated by the same
estimator as region effects (screen, full estimate, tau; progress; cancel).
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence

import numpy as np
import torch

from napari_pdcr.components.enumerate import (
    GRANULARITIES,
    Component,
    enumerate_components,
    find_component,
    network_of,
    probe,
)
from napari_pdcr.components.interventions import (
    ActivationIntervention,
    make_activation_intervention,
)
from napari_pdcr.components.nodes import ComponentNodes
from napari_pdcr.engine.estimator import (
    BatchRunner,
    EstimatorSettings,
    Progress,
    estimate_effects,
)
from napari_pdcr.explanations.components import ComponentExplanation
from napari_pdcr.methods.base import Method
from napari_pdcr.models.base import SegmentationModel
from napari_pdcr.outcomes import Outcome, outcome_for
from napari_pdcr.validation import shown


class ComponentEffects(Method):
    """Causal effects of network components on a segmentation model's output in a target region.

    Parameters
    ----------
    model
        A :class:`~napari_pdcr.models.SegmentationModel` whose network is an
        ``nn.Module``; a TorchScript / exported model raises
        :class:`~napari_pdcr.components.NotAModuleError` (a ``TypeError``).
    intervention
        What replaces a component's activation: ``"resample"`` (default; its activation
        on a bank image, drawn with replacement), ``"zero"``, ``"mean"`` (mean over the
        bank) or ``"noise"``, or an :class:`~napari_pdcr.components.ActivationIntervention`.
    outcome
        An :class:`~napari_pdcr.outcomes.Outcome` or its kind (``"dice"`` default); the
        channel of the model's description is used where it gives none.
    granularity, layer
        Which components (see :func:`~napari_pdcr.components.enumerate_components`):
        ``"stages"``, ``"blocks"``, ``"skips"`` or ``"channels"`` of ``layer``.
    components
        Explicit components instead (Component objects, display names or module paths).
    n_screen, n_estimate, tau, seed
        As for :class:`~napari_pdcr.RegionEffects`: ``n_screen`` draws screen each
        component, survivors get ``n_estimate`` fresh draws, ``|ATE| < tau`` is reported
        as 0; deterministic interventions use one draw. Seeded draws are reproducible
        whatever the batch size.
    device, batch_size, memory_budget_mb
        Where to run and how many (component, draw) items go into one forward pass.
    """

    def __init__(
        self,
        model: SegmentationModel,
        intervention: ActivationIntervention | str = "resample",
        outcome: Outcome | str = "dice",
        granularity: str = "stages",
        layer: str | None = None,
        components: Sequence[Component | str] | None = None,
        n_screen: int = 3,
        n_estimate: int = 50,
        tau: float = 0.02,
        seed: int = 0,
        device: str | torch.device | None = "auto",
        batch_size: int | None = None,
        memory_budget_mb: float = 1024,
    ):
        super().__init__(model, seed=seed, device=device, batch_size=batch_size, memory_budget_mb=memory_budget_mb)
        network_of(model)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}; got {shown(granularity)}")
        self.settings = EstimatorSettings(n_screen=n_screen, n_estimate=n_estimate, tau=tau, seed=self.seed)
        self.intervention = (
            make_activation_intervention(intervention) if isinstance(intervention, str) else intervention
        )
        self.outcome = outcome_for(outcome, model)
        self.granularity, self.layer = granularity, layer
        self.chosen = list(components) if components is not None else None

    name = "component_effects"

    def method_parameters(self) -> dict:
        s = self.settings
        return {
            "intervention": self.intervention.describe(),
            "outcome": self.outcome.describe(),
            "granularity": self.granularity if self.chosen is None else "chosen",
            "layer": self.layer,
            "n_screen": s.n_screen,
            "n_estimate": s.n_estimate,
            "tau": s.tau,
        }

    def components(self, image=None) -> list[Component]:
        """The components this method explains; probed on ``image`` ``(C, *S)`` (raw) when given."""
        example = None if image is None else self.model.prepare_image(image).to(self.model.device)
        if self.chosen is None:
            return enumerate_components(self.model, self.granularity, self.layer, example)
        network = network_of(self.model)
        listed = enumerate_components(self.model, "stages") + enumerate_components(self.model, "skips")
        listed += enumerate_components(self.model, "blocks")
        chosen = [c if isinstance(c, Component) else find_component(listed, c, network) for c in self.chosen]
        if example is None:
            return chosen
        probed = probe(self.model, chosen, example)
        kept = {_key(c) for c in probed}
        dropped = [c.name for c in chosen if _key(c) not in kept]
        if dropped:
            raise ValueError(f"cannot intervene on {', '.join(dropped)}: each must run once and return one tensor")
        return probed

    def iter_attribute(
        self, image, target_region, reference=None, bank_images=None
    ) -> Generator[Progress, None, ComponentExplanation]:
        """Component effects as a generator of progress.

        ``image``, ``target_region``, ``reference``: see :meth:`Method.check_inputs`.

        bank_images
            Other images ``(R, C, *S)`` (or a sequence of ``(C, *S)``) of the image's
            shape, for the ``resample`` and ``mean`` interventions; each is preprocessed
            like the image. Their activations are kept in memory.
        """
        t_start = time.perf_counter()
        # every input is checked here, before the model moves or runs
        x, region, ref = self.check_inputs(image, target_region, reference)
        window = getattr(self.model, "sliding_window", None)
        if window is not None and window.layout(tuple(x.shape[1:])).n_windows > 1:
            raise ValueError(
                "component effects need the whole image in one forward pass, but this model runs "
                f"window-wise (sliding_window) and this image needs {window.layout(tuple(x.shape[1:])).n_windows} "
                f"windows: each component would run once per window; explain an image of at most the window "
                f"size {window.window_size(tuple(x.shape[1:]))}"
            )
        bank = None
        if bank_images is not None and len(bank_images):
            prepared = [self.model.prepare_image(b, f"bank image {i}") for i, b in enumerate(bank_images)]
            shapes = {tuple(b.shape) for b in prepared}
            if shapes != {tuple(x.shape)}:
                raise ValueError(
                    f"bank images must have the image's shape {tuple(x.shape)}; "
                    f"got {', '.join(map(str, sorted(shapes)))}"
                )
            bank = torch.stack(prepared).to(self.device)
        model, x = self.to_device(x)
        components = self.components(image)
        nodes = ComponentNodes(model, x, components, region, self.outcome, self.intervention, ref, bank)
        timings = {"prepare_s": time.perf_counter() - t_start}
        yield Progress("prepare", 0, 1, 0, timings["prepare_s"])

        batch_size = self.choose_batch_size(nodes.item_bytes)
        runner = BatchRunner(batch_size)
        estimates = yield from estimate_effects(nodes, np.arange(nodes.n_nodes), self.settings, runner)
        timings["estimate_s"] = estimates.elapsed_s
        timings["total_s"] = time.perf_counter() - t_start
        parameters = self.parameters()
        parameters.update(
            batch_size=batch_size,
            n_bank_images=0 if bank is None else len(bank),
            reference="given" if ref is not None else "model prediction",
        )
        return ComponentExplanation(
            components=components,
            ate=estimates.ate,
            standard_error=estimates.standard_error,
            raw_mean=estimates.raw_mean,
            n_draws=estimates.n_draws,
            status=estimates.status,
            base_outcome=estimates.base_outcome,
            target_region=region,
            parameters=parameters,
            model_identity=model.identity(),
            provenance=self.provenance(),
            timings=timings,
            forward_passes=estimates.forward_passes + nodes.setup_passes + 1,
            log=estimates.log,
        )


def _key(component: Component) -> tuple:
    return component.path, component.part, component.channel
