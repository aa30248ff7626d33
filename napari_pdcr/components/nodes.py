"""Network components as nodes of the effect estimator.

One forward batch evaluates many (component, draw) items: every row of the batch is the
explained image, and a forward hook on each targeted module overwrites, for the rows
that target it, the component's part of the module's output with that row's
replacement. Rows that target another component pass through unchanged, so channels of
one layer, or different stages, share a forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from napari_pdcr.components.enumerate import Component, network_of
from napari_pdcr.components.graph import JoinTaps
from napari_pdcr.components.interventions import ActivationIntervention
from napari_pdcr.engine.estimator import NodeSet
from napari_pdcr.engine.scoring import RegionScoring
from napari_pdcr.models.base import SegmentationModel
from napari_pdcr.outcomes import Outcome


class ComponentNodes(NodeSet):
    """The ``components`` of ``model`` as intervention nodes for one image and target region.

    Parameters
    ----------
    model
        A SegmentationModel whose network is an ``nn.Module``.
    image
        ``(C, *S)`` float32 tensor in model input space, on the model's device.
    components
        What to intervene on (from :func:`~napari_pdcr.components.enumerate_components`).
    target_region
        Bool ``S``: where the outcome is measured.
    outcome, intervention
        What is measured and what replaces a component's activation.
    reference
        Bool ``S`` reference mask for Dice outcomes; ``None``: the model's own prediction.
    bank
        ``(R, C, *S)`` other images in model input space (required by interventions
        with ``needs_bank``); their activations are computed once here.
    bank_batch_size
        Bank images per forward pass while their activations are recorded.
    """

    def __init__(
        self,
        model: SegmentationModel,
        image: torch.Tensor,
        components: Sequence[Component],
        target_region: np.ndarray,
        outcome: Outcome,
        intervention: ActivationIntervention,
        reference: np.ndarray | None = None,
        bank: torch.Tensor | None = None,
        bank_batch_size: int = 8,
    ):
        if not components:
            raise ValueError("no components to explain")
        if intervention.needs_bank and (bank is None or len(bank) == 0):
            raise ValueError(f"the {intervention.name!r} intervention needs bank images (other images of the same kind)")
        self.model, self.image, self.components = model, image, list(components)
        self.outcome, self.intervention = outcome, intervention
        self.deterministic = intervention.deterministic
        modules = dict(network_of(model).named_modules())
        missing = [c.path for c in self.components if c.path not in modules]
        if missing:
            raise KeyError(f"the network has no module(s) {', '.join(missing)}")
        self._modules = {c.path: modules[c.path] for c in self.components}
        self.scoring = RegionScoring(model, np.flatnonzero(target_region), outcome)

        self.activations = [a[0] for a in self._record(image[None])]
        self.bank_activations = None
        if intervention.needs_bank:
            parts = [self._record(bank[i : i + bank_batch_size]) for i in range(0, len(bank), bank_batch_size)]
            self.bank_activations = [torch.cat(per_node) for per_node in zip(*parts, strict=True)]
        #: images run to record activations and the base outcome
        self.setup_passes = 2 + (0 if bank is None or not intervention.needs_bank else len(bank))
        largest = max(a.numel() * a.element_size() for a in self.activations)
        self.item_bytes = image.numel() * image.element_size() + largest

        base_scores = self.scoring.region_scores(image[None])
        self.scoring.set_base(base_scores, self.scoring.region_reference(reference))

    # ------------------------------------------------------------------ NodeSet
    @property
    def n_nodes(self) -> int:
        return len(self.components)

    def base_outcome(self) -> float:
        return self.scoring.base

    def sample(self, node: int, n_draws: int, rng: np.random.Generator) -> torch.Tensor:
        bank = None if self.bank_activations is None else self.bank_activations[node]
        return self.intervention.sample(self.activations[node], bank, n_draws, rng)

    def outcomes(self, nodes: Sequence[int], replacements: Sequence[torch.Tensor]) -> torch.Tensor:
        nodes_array = np.asarray(nodes)
        plan: dict[str, list] = {}
        for node in np.unique(nodes_array):
            rows = np.flatnonzero(nodes_array == node)
            reps = torch.stack([replacements[i] for i in rows]).to(self.image.device)
            component = self.components[int(node)]
            plan.setdefault(component.path, []).append((torch.from_numpy(rows).to(self.image.device), component, reps))
        batch = self.image.expand(len(nodes), *self.image.shape)
        with self._intervening(plan):
            scores = self.scoring.region_scores(batch)
        return self.scoring(scores)

    # ------------------------------------------------------------------ forward passes
    def _record(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """Each component's activation ``(N, *A)`` on ``batch``; checks each module runs once."""
        seen: dict[str, list] = {path: [] for path in self._modules}

        def hook_for(path):
            def hook(module, args, output):
                seen[path].append((args[0] if args else None, output))
            return hook

        handles = [m.register_forward_hook(hook_for(p)) for p, m in self._modules.items()]
        taps = JoinTaps(network_of(self.model), record=[(c.join, c.argument) for c in self.components if c.part == "join"])
        try:
            with torch.inference_mode(), taps:
                self.model(batch)
        finally:
            for h in handles:
                h.remove()
        out = []
        for c in self.components:
            if c.part == "join":  # a skip found by tracing: the joined tensor itself
                joined = taps.recorded[(c.join, c.argument)]
                out.append(joined[(slice(None), *c.index(joined, joined))].clone())
                continue
            calls = seen[c.path]
            if len(calls) != 1 or not isinstance(calls[0][1], torch.Tensor):
                raise ValueError(
                    f"component {c.name!r} ({c.path}) must run exactly once per forward pass and return one "
                    f"tensor; it ran {len(calls)} time(s)"
                )
            module_input, output = calls[0]
            out.append(output[(slice(None), *c.index(module_input, output))].clone())
        return out

    @contextmanager
    def _intervening(self, plan: dict[str, list]):
        """Forward hooks that write each row's replacement into its component's output."""

        def hook_for(path):
            def hook(module, args, output):
                output = output.clone()
                for rows, component, reps in plan[path]:
                    if component.part != "join":
                        output[(rows, *component.index(args[0], output))] = reps.to(output.dtype)
                return output
            return hook

        joins = {
            (c.join, c.argument): [(rows, c, reps)] for entries in plan.values() for rows, c, reps in entries if c.part == "join"
        }
        hooked = [p for p, entries in plan.items() if any(c.part != "join" for _, c, _ in entries)]
        handles = [self._modules[p].register_forward_hook(hook_for(p)) for p in hooked]
        try:
            with JoinTaps(network_of(self.model), replace=joins) if joins else nullcontext():
                yield
        finally:
            for h in handles:
                h.remove()
