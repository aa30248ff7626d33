"""Skip connections and encoder / decoder stages found from a traced forward pass.

A *join* is a concatenation along the channel axis (``torch.cat(..., dim=1)``) or an
addition of two channels-first feature maps of the same shape. One forward pass is
traced with a :class:`~torch.overrides.TorchFunctionMode` (every torch function call)
and forward hooks on every module (every module output). An argument of a join is a
**skip** when it was computed before the network produced a feature map coarser than
the join's output, and another argument of the join was computed after it: the tensor
was kept aside while the network went deeper, and comes back in the decoder. Residual
additions inside a block never leave their resolution and are not skips. A gated skip
(attention gates: ``x * psi``) keeps the age of ``x``. Nothing depends on module or
attribute names, so MONAI's ``BasicUNet``, ``AttentionUnet``, ``SegResNet``, ``UNETR``
and ``SwinUNETR`` (2D and 3D) are covered alike (``docs/components.md``).

The encoder stage of a skip is the module whose output the skip tensor is (the
outermost one below the network); its decoder stage is the module that runs the join
(or, for joins written in the network's own ``forward``, the module that consumes the
join's result).

:class:`JoinTaps` records or replaces join arguments in later passes: joins are counted
in execution order, which does not depend on the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

#: torch functions that join two feature maps (cat along channels, out-of-place addition)
_CATS = (torch.cat, torch.concat)
_ADDS = (torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__)
#: functions whose output keeps the age of its oldest input (gating: attention gates)
_GATES = (torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__)


def _join_arguments(func, args, kwargs) -> list[torch.Tensor] | None:
    """The joined tensors of a join call, or None if the call is no join."""
    if func in _CATS:
        tensors = args[0] if args else kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if isinstance(tensors, (list, tuple)) and len(tensors) >= 2 and all(isinstance(t, torch.Tensor) for t in tensors):
            if tensors[0].ndim >= 3 and dim in (1, 1 - tensors[0].ndim):
                return list(tensors)
        return None
    if func in _ADDS and len(args) >= 2 and all(isinstance(a, torch.Tensor) for a in args[:2]):
        a, b = args[0], args[1]
        if a.ndim >= 3 and a.ndim == b.ndim and a.shape[1:] == b.shape[1:]:  # batch may broadcast
            return [a, b]
    return None


def resolution_factor(shape, spatial: tuple[int, ...]) -> float | None:
    """Downsampling factor of a channels-first feature map ``(N, C, *S')`` of an image of
    size ``spatial``: ``S[0] / S'[0]`` when every axis is downsampled by about that factor
    (within 20%: padding to a multiple), else None (tokens, channels-last maps,
    attention scores)."""
    if len(shape) != len(spatial) + 2 or min(shape[2:], default=0) < 1:
        return None
    factor = spatial[0] / shape[2]
    if all(abs(n / s / factor - 1) < 0.2 for n, s in zip(spatial, shape[2:], strict=True)):
        return factor
    return None


@dataclass(frozen=True)
class Join:
    """One skip argument of one join.

    ``index``: the join's position among all joins of a forward pass; ``argument``: the
    skip's position among the joined tensors; ``channels``: its channel range in a
    concatenation's output (None for an addition); ``factor``: its resolution;
    ``encoder``: the module path it came from; ``decoder``: the module path that uses it.
    """

    index: int
    argument: int
    channels: tuple[int, int] | None
    factor: float
    encoder: str
    decoder: str
    shape: tuple[int, ...]


class _Tracer(TorchFunctionMode):
    def __init__(self, network: nn.Module, spatial: tuple[int, ...]):
        super().__init__()
        self.spatial, self.time = spatial, 0
        self.names = {id(m): path for path, m in network.named_modules()}
        self.born: dict[int, tuple[int, str, torch.Tensor]] = {}  # id -> (time, producer, tensor kept alive)
        self.coarse: list[tuple[int, float]] = []  # (time, factor) of module outputs
        self.stack: list[str] = []
        self.joins: list[tuple[int, str, list[torch.Tensor], torch.Tensor]] = []  # (time, module, args, output)
        self.consumers: dict[int, str] = {}  # id(join output) -> module that took it as input
        self.gated: set[int] = set()  # outputs of gates: they keep the producer of their oldest input

    def note_resolution(self, tensor: torch.Tensor) -> None:
        factor = resolution_factor(tensor.shape, self.spatial)
        if factor is not None:
            self.coarse.append((self.time, factor))

    def age(self, tensor) -> tuple[int, str]:
        time, producer, _ = self.born.get(id(tensor), (self.time, self.stack[-1] if self.stack else "", None))
        return time, producer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.time += 1
        if isinstance(out, torch.Tensor) and id(out) not in self.born:
            here = self.stack[-1] if self.stack else ""
            birth = (self.time, here)
            if func in _GATES:
                birth = min((self.age(a) for a in args if isinstance(a, torch.Tensor)), default=birth)
                self.gated.add(id(out))
            self.born[id(out)] = (*birth, out)
            self.note_resolution(out)
        joined = _join_arguments(func, args, kwargs)
        if joined is not None and isinstance(out, torch.Tensor) and self.stack:  # inside the network
            self.joins.append((self.time, self.stack[-1] if self.stack else "", joined, out))
        return out

    def pre_hook(self, module, args):
        path = self.names.get(id(module))
        if path is None:
            return
        if args and isinstance(args[0], torch.Tensor):
            self.consumers.setdefault(id(args[0]), path)
        self.stack.append(path)

    def hook(self, module, args, output):
        path = self.names.get(id(module))
        if path is None:
            return
        self.stack.pop()
        if isinstance(output, torch.Tensor):
            self.time += 1
            if path and id(output) not in self.gated:  # the outermost module below the network names it
                time, _, _ = self.born.get(id(output), (self.time, path, None))
                self.born[id(output)] = (time, path, output)
            self.note_resolution(output)


def trace_joins(network: nn.Module, example: torch.Tensor, run=None) -> list[Join]:
    """The skip arguments of every join in ``network``'s forward pass on ``example`` ``(1, C, *S)``.

    ``run``: what is called on ``example`` (default ``network``; e.g. the
    SegmentationModel around it, whose padding then counts as part of the pass).
    """
    spatial = tuple(example.shape[2:])
    tracer = _Tracer(network, spatial)
    handles = [
        nn.modules.module.register_module_forward_pre_hook(tracer.pre_hook),
        nn.modules.module.register_module_forward_hook(tracer.hook),
    ]
    try:
        with torch.inference_mode(), tracer:
            (run or network)(example)
    finally:
        for handle in handles:
            handle.remove()
    found = []
    for index, (time, module, joined, out) in enumerate(tracer.joins):
        factor = resolution_factor(out.shape, spatial)
        if factor is None:
            continue
        ages = [tracer.age(t) for t in joined]
        newest = max(t for t, _ in ages)
        offset = 0
        for argument, (tensor, (born, producer)) in enumerate(zip(joined, ages, strict=True)):
            width = tensor.shape[1]
            went_deeper = any(born < t < time and f > factor * 1.01 for t, f in tracer.coarse)
            if went_deeper and born < newest and producer:
                decoder = module or tracer.consumers.get(id(out), "")
                channels = (offset, offset + width) if out.shape[1] != tensor.shape[1] else None
                found.append(Join(index, argument, channels, factor, producer, decoder, tuple(tensor.shape[1:])))
            offset += width
    return found


class JoinTaps(TorchFunctionMode):
    """Record or replace skip arguments of joins during forward passes of ``network``.

    Joins are counted from the start of every call of ``network`` (so what runs around
    it, e.g. sliding-window batching, does not shift the count). ``record``: join keys
    ``(index, argument)`` whose argument is collected into ``recorded[key]`` (a tensor
    ``(N, *A)``). ``replace``: key -> list of ``(rows, component, replacements)``: the
    component's part (``component.index``) of the argument's ``rows`` is overwritten by
    ``replacements`` before the join runs.
    """

    def __init__(self, network: nn.Module, record=(), replace=None):
        super().__init__()
        self.network, self.keys, self.replace = network, set(record), replace or {}
        self.recorded: dict[tuple[int, int], torch.Tensor] = {}
        self.count, self.depth, self.handles = 0, 0, []

    def __enter__(self):
        def started(module, args):
            self.depth += 1
            if self.depth == 1:
                self.count = 0

        def finished(module, args, output):
            self.depth -= 1

        self.handles = [self.network.register_forward_pre_hook(started), self.network.register_forward_hook(finished)]
        return super().__enter__()

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        joined = _join_arguments(func, args, kwargs) if self.depth else None
        if joined is None:
            return func(*args, **kwargs)
        index, self.count = self.count, self.count + 1
        for argument, tensor in enumerate(joined):
            if (index, argument) in self.keys:
                self.recorded[(index, argument)] = tensor.clone()
        changes = {a: plan for (i, a), plan in self.replace.items() if i == index}
        if not changes:
            return func(*args, **kwargs)
        joined = list(joined)
        for argument, plan in changes.items():
            tensor = joined[argument].clone()
            for rows, component, replacements in plan:
                tensor[(rows, *component.index(tensor, tensor))] = replacements.to(tensor.dtype)
            joined[argument] = tensor
        if func in _CATS:
            return func(joined, *args[1:], **{k: v for k, v in kwargs.items() if k != "tensors"})
        return func(joined[0], joined[1], *args[2:], **kwargs)
