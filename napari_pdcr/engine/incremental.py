"""Incremental inference: rerun only the part of a network that a replaced input block can change.

In the spirit of Krypton (Nakandala, Kumar and Papakonstantinou, SIGMOD 2019): replacing
one input block of a convolutional network changes only a *cone* of activations, and
the target region reads only another cone (its receptive field). The network is traced
once with :func:`torch.fx.symbolic_trace`; the unperturbed activations of every layer are
computed once and kept. For a batch of intervened inputs each layer is then recomputed
only on the bounding box of what the replaced block can change **inside** what the
region needs, reading its inputs from the cached activations with the recomputed boxes
spliced in. Nothing else runs.

The boxes come from the geometry of each op: convolution and pooling (kernel, stride,
padding, dilation), transposed convolution, upsampling by an integer factor (nearest,
or linear without ``align_corners``), and pointwise ops (activations, batch norm and
dropout in eval mode, additions, channel concatenation). It is exact: the same numbers
as full inference up to floating-point summation order, and the first batch is checked
against full inference. A network with anything else (instance or group norm,
attention, reshapes, global pooling, TorchScript, a network that fx cannot trace) runs
with full inference, and :attr:`IncrementalForward.status` says why in one line.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from napari_pdcr.models.base import SegmentationModel
from napari_pdcr.regions import Box, union_box

logger = logging.getLogger(__name__)

# a box (napari_pdcr.regions.Box): ``(start, stop)`` per spatial axis, in the voxels of one feature map

_POINTWISE_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU,
    nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Sigmoid, nn.Tanh, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
_POINTWISE_FUNCTIONS = (
    operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div,
    torch.relu, torch.sigmoid, torch.tanh, F.relu, F.leaky_relu, F.gelu, F.silu, F.elu,
)
_POINTWISE_METHODS = ("add", "sub", "mul", "div", "relu", "sigmoid", "tanh", "contiguous", "clone")
_CATS = (torch.cat, torch.concat)


class Unsupported(Exception):
    """An op (or model) incremental inference does not know; the message says which."""


def _tuple(value, dims: int) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * dims


def _intersect(a: Box | None, b: Box | None) -> Box | None:
    if a is None or b is None:
        return None
    box = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b, strict=True))
    return None if any(lo >= hi for lo, hi in box) else box


def _whole(shape: Sequence[int]) -> Box:
    return tuple((0, int(n)) for n in shape)


def _slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(lo, hi) for lo, hi in box)


# ---------------------------------------------------------------------------- op geometry
class _Pointwise:
    """Each output voxel reads the same voxel of every spatial input."""

    fill, crops = 0.0, False

    def changed(self, boxes):
        return union_box(boxes)

    def receptive(self, box: Box, n_inputs: int) -> list[Box]:
        return [box] * n_inputs


class _Window:
    """Convolution or pooling: kernel ``k``, stride ``s``, padding ``p``, dilation ``d`` per axis;
    recomputed with no padding on inputs filled with ``fill`` outside the feature map."""

    crops = False

    def __init__(self, run, kernel, stride, padding, dilation, fill: float):
        self.run, self.fill = run, fill
        self.kernel, self.stride, self.padding, self.dilation = kernel, stride, padding, dilation

    def changed(self, boxes):
        (box,) = boxes
        out = []
        for (a, b), k, s, p, d in zip(box, self.kernel, self.stride, self.padding, self.dilation, strict=True):
            out.append((-(-(a + p - d * (k - 1)) // s), (b - 1 + p) // s + 1))
        return tuple(out)

    def receptive(self, box: Box, n_inputs: int) -> list[Box]:
        out = []
        for (c, e), k, s, p, d in zip(box, self.kernel, self.stride, self.padding, self.dilation, strict=True):
            start = c * s - p
            out.append((start, start + (e - c - 1) * s + d * (k - 1) + 1))
        return [tuple(out)]


class _Transposed:
    """Transposed convolution: run without bias on a zero-filled input box, cropped per item, bias added."""

    fill, crops = 0.0, True

    def __init__(self, module: nn.Module, dims: int):
        self.module, self.dims = module, dims
        self.kernel, self.stride = module.kernel_size, module.stride
        self.padding, self.dilation = module.padding, module.dilation

    def changed(self, boxes):
        (box,) = boxes
        return tuple(
            (a * s - p, (b - 1) * s - p + d * (k - 1) + 1)
            for (a, b), k, s, p, d in zip(box, self.kernel, self.stride, self.padding, self.dilation, strict=True)
        )

    def receptive(self, box: Box, n_inputs: int) -> list[Box]:
        out = []
        for (c, e), k, s, p, d in zip(box, self.kernel, self.stride, self.padding, self.dilation, strict=True):
            r = d * (k - 1)
            start = (c + p - r) // s
            out.append((start, start + (e - c + r + s - 2) // s + 1))
        return [tuple(out)]

    def offset(self, box: Box, input_box: Box) -> tuple[int, ...]:
        return tuple(c + p - i0 * s for (c, _), (i0, _), s, p in zip(box, input_box, self.stride, self.padding, strict=True))

    def run(self, x):
        m = self.module
        return getattr(F, f"conv_transpose{self.dims}d")(x, m.weight, None, m.stride, 0, 0, m.groups, m.dilation)

    def finish(self, y):
        bias = self.module.bias
        return y if bias is None else y + bias.view(1, -1, *([1] * self.dims))


class _Upsample:
    """Upsampling by an integer factor: nearest, or (bi/tri)linear without ``align_corners``
    (one input voxel of halo each side, replicated at the border as the op clamps)."""

    crops = True

    def __init__(self, scale: tuple[int, ...], mode: str):
        self.scale, self.mode = scale, mode
        self.linear = "linear" in mode
        self.fill = "replicate" if self.linear else 0.0
        self.halo = 1 if self.linear else 0

    def changed(self, boxes):
        (box,) = boxes
        h = self.halo
        return tuple(((a - h) * s, (b + h) * s) for (a, b), s in zip(box, self.scale, strict=True))

    def receptive(self, box: Box, n_inputs: int) -> list[Box]:
        h = self.halo
        return [tuple(
            (c // s - h, c // s - h + (e - c + s - 2) // s + 1 + 2 * h) for (c, e), s in zip(box, self.scale, strict=True)
        )]

    def offset(self, box: Box, input_box: Box) -> tuple[int, ...]:
        return tuple(c - i0 * s for (c, _), (i0, _), s in zip(box, input_box, self.scale, strict=True))

    def run(self, x):
        align = False if self.linear else None
        return F.interpolate(x, scale_factor=self.scale, mode=self.mode, align_corners=align)

    def finish(self, y):
        return y


def _window_rule(module: nn.Module, dims: int) -> _Window:
    """The :class:`_Window` of a convolution or pooling module, or :class:`Unsupported`."""
    name = type(module).__name__
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.padding_mode != "zeros":
            raise Unsupported(f"{name} with padding_mode={module.padding_mode!r}")
        kernel, dilation = _tuple(module.kernel_size, dims), _tuple(module.dilation, dims)
        if module.padding == "same":
            padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
        elif module.padding == "valid":
            padding = (0,) * dims
        else:
            padding = _tuple(module.padding, dims)
        conv = getattr(F, f"conv{dims}d")
        stride = _tuple(module.stride, dims)

        def run(x):
            return conv(x, module.weight, module.bias, stride, 0, dilation, module.groups)

        return _Window(run, kernel, stride, padding, dilation, 0.0)
    if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
        if module.return_indices:
            raise Unsupported(f"{name} with return_indices")
        kernel = _tuple(module.kernel_size, dims)
        stride, dilation = _tuple(module.stride or module.kernel_size, dims), _tuple(module.dilation, dims)
        pool = getattr(F, f"max_pool{dims}d")
        return _Window(lambda x: pool(x, kernel, stride, 0, dilation), kernel, stride,
                       _tuple(module.padding, dims), dilation, float("-inf"))
    if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        if module.ceil_mode or not module.count_include_pad or getattr(module, "divisor_override", None):
            raise Unsupported(f"{name} with ceil_mode, count_include_pad=False or divisor_override")
        kernel = _tuple(module.kernel_size, dims)
        stride = _tuple(module.stride or module.kernel_size, dims)
        pool = getattr(F, f"avg_pool{dims}d")
        return _Window(lambda x: pool(x, kernel, stride, 0), kernel, stride, _tuple(module.padding, dims), (1,) * dims, 0.0)
    raise Unsupported(f"op {name} is not one it knows to be local")


# ---------------------------------------------------------------------------- the traced network
class IncrementalForward:
    """Incremental inference of ``model`` around one unperturbed input.

    Parameters
    ----------
    model
        The :class:`~napari_pdcr.models.SegmentationModel` (an ``nn.Module`` network in
        eval mode, no sliding window).
    base_input
        The unperturbed input ``(C, *S)`` float32 on the model's device.
    needed
        Slices over ``S``: the part of the output that is read (e.g. the bounding box of
        the target region). :meth:`forward` is exact inside it.

    When the model or one of its ops is not supported, :attr:`supported` is False,
    :attr:`status` says why (also logged in one line), and :meth:`forward` runs full
    inference.
    """

    def __init__(self, model: SegmentationModel, base_input: torch.Tensor, needed: tuple[slice, ...]):
        self.model, self.base_input = model, base_input
        self.spatial = tuple(base_input.shape[1:])
        self.dims = len(self.spatial)
        if len(needed) != self.dims:
            raise ValueError(f"needed has {len(needed)} slices for a {self.dims}D input: give one slice per spatial axis")
        self.needed_output = tuple((int(s.start or 0), int(n if s.stop is None else s.stop))
                                   for s, n in zip(needed, self.spatial, strict=True))
        if any(not 0 <= lo < hi <= n for (lo, hi), n in zip(self.needed_output, self.spatial, strict=True)):
            raise ValueError(f"needed {needed} is empty or leaves the input's spatial shape {self.spatial}: "
                             "give non-empty slices inside it")
        self.checked = False
        try:
            self._build()
            self.supported, self.status = True, "on"
        except Unsupported as reason:
            self._turn_off(f"{reason}")

    def _turn_off(self, reason: str) -> None:
        self.supported = False
        self.status = f"off: {reason}; full inference is used"
        self._values = {}  # free the cached activations
        logger.info("incremental inference for model %r %s", self.model.name, self.status)

    # ------------------------------------------------------------------ building
    def _build(self) -> None:
        model = self.model
        if model.sliding_window is not None:
            raise Unsupported("the model runs by sliding windows")
        if not model.is_module:
            raise Unsupported("the network is not a traceable nn.Module (e.g. TorchScript)")
        if self.base_input.dtype != torch.float32:
            raise Unsupported("only float32 inputs are supported")
        try:
            self.graph_module = torch.fx.symbolic_trace(model.network)
        except Exception as error:  # noqa: BLE001 - any tracing failure means: not supported
            raise Unsupported(f"torch.fx cannot trace the network ({type(error).__name__})") from error
        pads = [(-s) % d for s, d in zip(self.spatial, model._divisors(), strict=True)]
        x = self.base_input[None].to(model.device)
        if any(pads):
            x = F.pad(x, [p for pad in reversed(pads) for p in (0, pad)])
        self._nodes = list(self.graph_module.graph.nodes)
        values, spatial_nodes = {}, set()  # node -> base value (batch 1); nodes that carry the input's change
        self._rules = {}
        with torch.inference_mode():
            for node in self._nodes:
                if node.op == "placeholder":
                    if node is not self._nodes[0]:
                        raise Unsupported("the network takes more than one input")
                    values[node], self.input_node = x, node
                    spatial_nodes.add(node)
                elif node.op == "output":
                    self.output_node = self._output_source(node)
                else:
                    try:
                        values[node] = self._call(node, values)
                    except Exception as error:  # noqa: BLE001 - a graph that does not run is not supported
                        raise Unsupported(f"the traced network fails at {self._describe(node)} ({type(error).__name__})") from error
                    inputs = [a for a in node.all_input_nodes if a in spatial_nodes]
                    if inputs:
                        self._rules[node] = self._rule(node, values, inputs)
                        spatial_nodes.add(node)
        if self.output_node not in spatial_nodes:
            raise Unsupported("the output does not depend on the input")
        self._values, self._spatial_nodes = values, spatial_nodes
        out = values[self.output_node]
        if not isinstance(out, torch.Tensor) or tuple(out.shape[2:]) != tuple(x.shape[2:]):
            raise Unsupported("the output is not of the input's spatial size")
        with torch.inference_mode():
            expected = model.forward_network(self.base_input[None])
        if expected.shape != out[(slice(None), slice(None), *(slice(0, s) for s in self.spatial))].shape or not torch.allclose(
            expected, out[(slice(None), slice(None), *(slice(0, s) for s in self.spatial))], rtol=1e-4, atol=1e-4
        ):
            raise Unsupported("the traced graph does not reproduce the network (control flow that fx cannot trace)")
        #: the nodes to recompute, in order, with their rule and spatial inputs
        self._steps = [(node, self._rules[node], self._spatial_inputs(node)) for node in self._nodes if node in self._rules]
        self._needed = self._needed_boxes()
        self._tight_cache: dict[Box, dict] = {}

    def _output_source(self, node: torch.fx.Node) -> torch.fx.Node:
        """The node whose value is the scores (the first of a tuple, as forward_network takes)."""
        out = node.args[0]
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.fx.Node):
            raise Unsupported("the network returns something that is not a tensor")
        return out

    def _call(self, node: torch.fx.Node, env: dict, substitute: dict | None = None):
        """Run ``node`` on the values in ``env`` (``substitute`` replaces some of them)."""
        substitute = substitute or {}
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: substitute[n] if n in substitute else env[n])
        if node.op == "call_module":
            return self.graph_module.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            value = self.graph_module
            for name in node.target.split("."):
                value = getattr(value, name)
            return value
        raise Unsupported(f"fx op {node.op}")

    def _rule(self, node: torch.fx.Node, values: dict, inputs: list[torch.fx.Node]):
        """The geometry of a node that depends on the input, or :class:`Unsupported`."""
        out = values[node]
        ndim = self.dims + 2
        for n in [node, *inputs]:
            if not isinstance(values[n], torch.Tensor) or values[n].ndim != ndim:
                raise Unsupported(f"{self._describe(node)} (its values are not (N, C, *S) feature maps)")
        for arg in node.all_input_nodes:  # constants of a pointwise op may only broadcast over space
            v = values[arg]
            if arg not in inputs and isinstance(v, torch.Tensor) and v.ndim >= ndim and max(v.shape[2:], default=1) > 1:
                raise Unsupported(f"{self._describe(node)} (it adds a spatial constant)")
        if node.op == "call_module":
            module = self.graph_module.get_submodule(node.target)
            if module.training and isinstance(module, _POINTWISE_MODULES):
                raise Unsupported(f"{type(module).__name__} in training mode")
            if isinstance(module, _POINTWISE_MODULES):
                if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) and module.running_mean is None:
                    raise Unsupported(f"{type(module).__name__} without running statistics")
                return _Pointwise()
            if isinstance(module, (nn.Softmax, nn.LogSoftmax)) and module.dim in (1, 1 - ndim):
                return _Pointwise()
            if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                if module.padding_mode != "zeros":
                    raise Unsupported(f"{type(module).__name__} with padding_mode={module.padding_mode!r}")
                return _Transposed(module, self.dims)
            if isinstance(module, nn.Upsample):
                return self._upsample_rule(module.mode, module.align_corners, values[inputs[0]], out)
            try:
                return _window_rule(module, self.dims)
            except Unsupported as reason:
                raise Unsupported(f"{reason} ({node.target})") from None
        if node.op == "call_function" and node.target in _CATS:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if dim not in (1, 1 - ndim):
                raise Unsupported("concatenation along a spatial or batch axis")
            return _Pointwise()
        if (node.op == "call_function" and node.target in _POINTWISE_FUNCTIONS) or (
            node.op == "call_method" and node.target in _POINTWISE_METHODS
        ):
            if any(tuple(values[n].shape[2:]) != tuple(out.shape[2:]) for n in inputs):
                raise Unsupported(f"{self._describe(node)} broadcasts over space")
            return _Pointwise()
        if node.op == "call_function" and node.target is F.interpolate:
            mode = node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest")
            align = node.kwargs.get("align_corners", node.args[4] if len(node.args) > 4 else None)
            return self._upsample_rule(mode, align, values[inputs[0]], out)
        raise Unsupported(f"{self._describe(node)} is not one it knows to be local")

    def _upsample_rule(self, mode, align_corners, x: torch.Tensor, out: torch.Tensor) -> _Upsample:
        scale = [o / i for o, i in zip(out.shape[2:], x.shape[2:], strict=True)]
        if any(s != int(s) or s < 1 for s in scale):
            raise Unsupported("upsampling by a non-integer factor")
        if mode not in ("nearest", "nearest-exact", "linear", "bilinear", "trilinear") or (
            "linear" in mode and align_corners
        ):
            raise Unsupported(f"upsampling mode {mode!r} with align_corners={align_corners}")
        return _Upsample(tuple(int(s) for s in scale), mode)

    def _describe(self, node: torch.fx.Node) -> str:
        if node.op == "call_module":
            return f"op {type(self.graph_module.get_submodule(node.target)).__name__} ({node.target})"
        return f"op {getattr(node.target, '__name__', node.target)}"

    def _shape(self, node) -> tuple[int, ...]:
        return tuple(self._values[node].shape[2:])

    def _needed_boxes(self) -> dict:
        """Per spatial node, the box of its values that the needed output box reads (or None)."""
        needed = {node: None for node in self._spatial_nodes}
        needed[self.output_node] = _intersect(self.needed_output, _whole(self._shape(self.output_node)))
        for node in reversed(self._nodes):
            rule, box = self._rules.get(node), needed.get(node)
            if rule is None or box is None:
                continue
            inputs = self._spatial_inputs(node)
            for arg, reads in zip(inputs, rule.receptive(box, len(inputs)), strict=True):
                needed[arg] = union_box([needed[arg], _intersect(reads, _whole(self._shape(arg)))])
        return needed

    def _spatial_inputs(self, node) -> list[torch.fx.Node]:
        return [a for a in node.all_input_nodes if a in self._spatial_nodes]

    # ------------------------------------------------------------------ running
    def forward(self, batch: torch.Tensor, changed: Sequence[tuple[slice, ...]]) -> torch.Tensor:
        """Scores ``(N, K, *S)`` of ``batch`` ``(N, C, *S)``, where item ``i`` equals the base
        input outside the slices ``changed[i]``.

        Exact inside ``needed``; elsewhere the unperturbed scores (not recomputed). Full
        inference when not :attr:`supported`. The first call also runs full inference on
        its first item and turns incremental inference off (with a log line) if they differ.
        """
        if len(changed) != len(batch):
            raise ValueError(f"{len(changed)} changed boxes for a batch of {len(batch)}: give one per item")
        if not self.supported:
            return self.model(batch)
        batch = batch.to(self.model.device)
        with torch.inference_mode():
            scores = self._incremental(batch, changed)
        if not self.checked:
            self.checked = True
            full = self.model.forward_network(batch[:1])[(slice(None), slice(None), *_slices(self.needed_output))]
            part = scores[:1][(slice(None), slice(None), *_slices(self.needed_output))]
            scale = float(full.abs().max().clamp_min(1.0))
            if not bool(((full - part).abs().max() <= 1e-4 * scale).item()):
                self._turn_off("its first batch did not reproduce full inference")
                return self.model(batch)
        return scores

    def _incremental(self, batch: torch.Tensor, changed: Sequence[tuple[slice, ...]]) -> torch.Tensor:
        """:meth:`forward` by recomputing boxes (see the module docstring)."""
        n = len(batch)
        boxes = [tuple((int(s.start), int(s.stop)) for s in where) for where in changed]
        # items with the same changed box share every box downstream: one group each
        keys: dict = {}
        for i, box in enumerate(boxes):
            keys.setdefault(box, []).append(i)
        groups = [(box, _items(members, batch.device)) for box, members in keys.items()]
        tight = [self._tight_boxes(box) for box, _ in groups]
        state: dict = {}  # node -> (patches (N, C, *L), placed box per group) for nodes that changed
        source = self._place(self.input_node, [t[self.input_node] for t in tight])
        if source is not None:
            state[self.input_node] = (self._gather_input(batch, groups, source), source)
        for node, rule, inputs in self._steps:
            placed = self._place(node, [t[node] for t in tight])
            if placed is None:
                continue
            reads = [rule.receptive(box, len(inputs)) for box in placed]
            xs = [self._gather(a, state.get(a), [r[k] for r in reads], groups, rule.fill, n) for k, a in enumerate(inputs)]
            y = rule.run(*xs) if not isinstance(rule, _Pointwise) else self._call(node, self._values, dict(zip(inputs, xs, strict=True)))
            if rule.crops:
                y = rule.finish(self._crop(y, groups, placed, [r[0] for r in reads], rule))
            if tuple(y.shape[2:]) != tuple(hi - lo for lo, hi in placed[0]) or len(y) != n:
                raise RuntimeError(f"incremental inference computed a box of shape {tuple(y.shape)} for {node}")
            state[node] = (y, placed)
        base = self._values[self.output_node]
        scores = base.expand(n, *base.shape[1:]).clone()
        if self.output_node in state:
            patches, placed = state[self.output_node]
            for (_, items), box in zip(groups, placed, strict=True):
                scores[(items, slice(None), *_slices(box))] = patches[items]
        return scores[(slice(None), slice(None), *(slice(0, s) for s in self.spatial))]

    def _tight_boxes(self, changed: Box) -> dict:
        """Per spatial node, the box that a change of the input inside ``changed`` can change
        inside the node's needed box (None: nothing); cached per box."""
        if changed not in self._tight_cache:
            tight = {self.input_node: _intersect(changed, self._needed[self.input_node])}
            for node, rule, inputs in self._steps:
                boxes = [tight[a] for a in inputs]
                tight[node] = _intersect(rule.changed(boxes), self._needed[node]) if any(b is not None for b in boxes) else None
            self._tight_cache[changed] = tight
        return self._tight_cache[changed]

    def _place(self, node, tight: list[Box | None]) -> list[Box] | None:
        """Boxes of one common size (the largest tight box per axis), one per group, each
        inside the node's needed box and containing the group's tight box; None when no
        group changed the node."""
        present = [b for b in tight if b is not None]
        if not present:
            return None
        size = [max(b[axis][1] - b[axis][0] for b in present) for axis in range(self.dims)]
        needed = self._needed[node]
        placed = []
        for box in tight:
            box = box or needed
            placed.append(tuple(
                (min(lo, n_hi - s), min(lo, n_hi - s) + s) for (lo, _), (_, n_hi), s in zip(box, needed, size, strict=True)
            ))
        return placed

    def _gather_input(self, batch, groups, placed) -> torch.Tensor:
        """The batch's values on each group's placed box of the (unpadded) input, ``(N, C, *L)``."""
        size = [hi - lo for lo, hi in placed[0]]
        out = batch.new_zeros((len(batch), batch.shape[1], *size))  # padding voxels stay 0, as in the model
        for (_, items), box in zip(groups, placed, strict=True):
            inside = _intersect(box, _whole(self.spatial))
            if inside is None:
                continue
            local = tuple(slice(lo - b0, hi - b0) for (lo, hi), (b0, _) in zip(inside, box, strict=True))
            out[(items, slice(None), *local)] = batch[(items, slice(None), *_slices(inside))]
        return out

    def _gather(self, node, node_state, reads: list[Box], groups, fill, n: int) -> torch.Tensor:
        """Values of ``node`` on each group's box ``reads[g]`` (all one size) ``(N, C, *L)``:
        the cached base values with the node's recomputed patches spliced in, ``fill``
        (a number, or ``"replicate"``) outside the feature map."""
        base = self._values[node]
        whole = _whole(base.shape[2:])
        if node_state is not None and node_state[1] == reads:
            return node_state[0]  # the same boxes: the patches as they are
        size = [hi - lo for lo, hi in reads[0]]
        out = base.new_empty((n, base.shape[1], *size))
        if fill != "replicate" and any(_intersect(r, whole) != r for r in reads):
            out.fill_(fill)
        for g, ((_, items), box) in enumerate(zip(groups, reads, strict=True)):
            inside = _intersect(box, whole)
            local = tuple(slice(lo - b0, hi - b0) for (lo, hi), (b0, _) in zip(inside, box, strict=True))
            where = (items, slice(None), *local)
            out[where] = base[(slice(0, 1), slice(None), *_slices(inside))]
            if node_state is not None:
                patches, placed = node_state
                overlap = _intersect(placed[g], inside)
                if overlap is not None:
                    into = tuple(slice(lo - b0, hi - b0) for (lo, hi), (b0, _) in zip(overlap, box, strict=True))
                    src = tuple(slice(lo - p0, hi - p0) for (lo, hi), (p0, _) in zip(overlap, placed[g], strict=True))
                    out[(items, slice(None), *into)] = patches[(items, slice(None), *src)]
            if fill == "replicate" and inside != box:
                pads = []
                for (lo, hi), (b0, b1) in reversed(list(zip(inside, box, strict=True))):
                    pads += [lo - b0, b1 - hi]
                out[(items, slice(None))] = F.pad(out[where], pads, mode="replicate")
        return out

    def _crop(self, y: torch.Tensor, groups, placed: list[Box], reads: list[Box], rule) -> torch.Tensor:
        """Each group's placed box out of the raw output ``y`` of an op that crops (zeros
        where ``y`` has no value: only the bias, added after)."""
        size = [hi - lo for lo, hi in placed[0]]
        out = y.new_zeros((len(y), y.shape[1], *size))
        for (_, items), box, read in zip(groups, placed, reads, strict=True):
            offset = rule.offset(box, read)
            stops = [min(o + s, n) for o, s, n in zip(offset, size, y.shape[2:], strict=True)]
            out[(items, slice(None), *(slice(0, z - o) for o, z in zip(offset, stops, strict=True)))] = y[
                (items, slice(None), *(slice(o, z) for o, z in zip(offset, stops, strict=True)))
            ]
        return out


def _items(members: list[int], device: torch.device) -> slice | torch.Tensor:
    """Batch rows of a group: a slice when they are consecutive, else an index tensor."""
    if members == list(range(members[0], members[-1] + 1)):
        return slice(members[0], members[-1] + 1)
    return torch.tensor(members, device=device)
