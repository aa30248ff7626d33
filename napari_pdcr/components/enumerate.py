"""A network's components at a chosen granularity, with readable names.

A :class:`Component` is the output activation of one ``torch.nn.Module`` (or a part of
it: the skip half of a concatenating skip connection, or one channel). Granularities:

``"stages"``
    The network's top-level stages. For a MONAI ``UNet`` (whose ``model`` nests
    ``Sequential(down, SkipConnection(Sequential(down, SkipConnection(...), up)), up)``
    one level per resolution) these are "encoder k", "bottleneck" and "decoder k";
    for other networks the top-level children (containers that are never called, such
    as ``ModuleList``, are opened; parameter-free modules are left out).
``"blocks"``
    Every block: MONAI / torch building blocks (``Convolution``, ``ResidualUnit``,
    ``ResBlock``, transformer blocks, ...) and layers with weights outside them.
``"skips"``
    Skip connections: every concatenating MONAI ``SkipConnection`` (for a ``UNet``,
    "skip k" carries encoder k's output to decoder k); only the concatenated input
    (the skip half of the output) is intervened on, not the deeper path. Networks
    without ``SkipConnection`` modules (BasicUNet, AttentionUnet, SegResNet, UNETR,
    SwinUNETR, ...) get their skips from a traced forward pass
    (:mod:`napari_pdcr.components.graph`): the tensor a decoder concatenates or adds
    after the network went deeper; only that argument of the join is intervened on.
    With an example, the modules those skips leave and enter are among the stages
    (nested ones, as in AttentionUnet, are added).
``"channels"``
    The channels (axis 1) of one chosen layer's output, e.g. ``layer="encoder 2"``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch
from torch import nn

from napari_pdcr.components.graph import Join, resolution_factor, trace_joins

GRANULARITIES = ("stages", "blocks", "skips", "channels")

#: Module classes counted as one block (their parts are not listed separately).
BLOCK_TYPES = frozenset({
    "Convolution", "ResidualUnit", "ResBlock", "UnetBasicBlock", "UnetResBlock", "UnetUpBlock",
    "UnetOutBlock", "UnetrBasicBlock", "UnetrUpBlock", "UnetrPrUpBlock", "PatchEmbeddingBlock",
    "TransformerBlock", "SwinTransformerBlock", "PatchMerging", "PatchMergingV2",
    "TransformerEncoderLayer", "TransformerDecoderLayer", "BasicBlock", "Bottleneck",
})
#: Leaf layers with weights that are not blocks of their own (they rescale, not compute features).
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class Component:
    """One intervenable part of a network.

    ``path`` is the module's name in ``network.named_modules()``; ``part`` says which
    part of its output is replaced: ``"output"`` (all of it), ``"skip"`` (the
    concatenated input of a ``SkipConnection``, the first channels of its output) or
    ``"join"`` (argument ``argument`` of join ``join`` of the forward pass, found by
    :func:`~napari_pdcr.components.graph.trace_joins`; ``path`` is the module that uses
    it); ``channel`` narrows that to one channel (axis 1). ``shape`` is the replaced
    activation's shape without the batch axis, known after a probe forward pass.
    ``channels_last``: the module's output is ``(N, *S, C)`` (Swin blocks), so its
    channels are the last axis (channel components replace ``[..., k]``).
    """

    name: str
    path: str
    kind: str  #: "stage", "block", "skip", "channel" or "module" (chosen by path)
    module_type: str
    part: str = "output"
    channel: int | None = None
    depth: int = 0
    shape: tuple[int, ...] | None = None
    join: int | None = None
    argument: int | None = None
    channels_last: bool = False

    def channel_slice(self, module_input: torch.Tensor, output: torch.Tensor) -> slice:
        """Slice of the output's axis 1 that this component replaces."""
        start, stop = 0, output.shape[1]
        if self.part == "skip":
            stop = module_input.shape[1]
        if self.channel is not None:
            start, stop = start + self.channel, start + self.channel + 1
            if stop > output.shape[1]:
                raise IndexError(f"{self.name}: channel {self.channel} does not exist")
        return slice(start, stop)

    def index(self, module_input: torch.Tensor, output: torch.Tensor) -> tuple:
        """Index of the replaced part after the batch axis: ``output[(rows, *index)]``."""
        if self.channels_last:
            return (Ellipsis, self.channel_slice(module_input, output.movedim(-1, 1)))
        return (self.channel_slice(module_input, output),)

    def describe(self) -> dict:
        """JSON-serialisable record."""
        return {
            "name": self.name, "path": self.path, "kind": self.kind, "module_type": self.module_type,
            "part": self.part, "channel": self.channel, "depth": self.depth,
            "shape": list(self.shape) if self.shape is not None else None,
            "join": self.join, "argument": self.argument, "channels_last": self.channels_last,
        }

    @classmethod
    def from_record(cls, record: dict) -> Component:
        shape = record.get("shape")
        return cls(**{**record, "shape": tuple(shape) if shape is not None else None})


class NotAModuleError(TypeError):
    """The model is not an ``nn.Module`` (TorchScript, exported program): no components to hook."""


def network_of(model) -> nn.Module:
    """The hookable ``nn.Module`` of a SegmentationModel or module; :class:`NotAModuleError` otherwise."""
    network = getattr(model, "network", model)
    if not isinstance(network, nn.Module) or isinstance(network, torch.jit.ScriptModule):
        kind = "a TorchScript module" if isinstance(network, torch.jit.ScriptModule) else type(network).__name__
        raise NotAModuleError(
            f"component effects need a torch.nn.Module whose submodules can be hooked; this model's "
            f"network is {kind}. Load the model as an nn.Module (Python class + state dict) to "
            "explain its components; region effects (RegionEffects) still work with this model."
        )
    return network


def humanize(path: str, network: nn.Module | None = None) -> str:
    """``"down_layers.0"`` -> ``"down layers 0"``, ``"convInit"`` -> ``"conv init"``,
    ``"swinViT.layers1.0.blocks.0"`` -> ``"swin vit layers 1 blocks 0"`` (with ``network``:
    indices into containers of one element are left out)."""
    parts = path.split(".") if path else []
    if network is not None:
        modules, kept = dict(network.named_modules()), []
        for i, part in enumerate(parts):
            parent = modules.get(".".join(parts[:i]))
            if not (part.isdigit() and isinstance(parent, (nn.ModuleList, nn.Sequential)) and len(parent) == 1):
                kept.append(part)
        parts = kept
    text = " ".join(parts)
    text = re.sub(r"(?<=[a-z])(?=[A-Z][a-z])|(?<=[a-z])(?=\d)", " ", text).replace("_", " ")
    return " ".join(text.lower().split()) or "network"


def _resolution(factor: float) -> str:
    if factor == 1:
        return "full res"
    return f"1/{factor:g} res" if factor > 1 else f"{1 / factor:g}x res"


def _has_weights(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


# ----------------------------------------------------------------- MONAI U-Net
def _unet_levels(network: nn.Module) -> list[tuple[str, str, str]] | None:
    """``[(down path, skip path, up path), ...]`` from the top level down for a MONAI-style
    U-Net, and the bottleneck path as the last entry's skip submodule; None otherwise."""
    from monai.networks.layers import SkipConnection

    seq, prefix, levels = getattr(network, "model", None), "model", []
    while isinstance(seq, nn.Sequential) and len(seq) == 3 and isinstance(seq[1], SkipConnection):
        levels.append((f"{prefix}.0", f"{prefix}.1", f"{prefix}.2"))
        seq, prefix = seq[1].submodule, f"{prefix}.1.submodule"
    return levels or None


def _unet_components(network: nn.Module, levels) -> tuple[list[Component], list[Component]]:
    """Stages (encoders, bottleneck, decoders; U-shaped depths) and skips of a MONAI U-Net."""
    modules = dict(network.named_modules())
    strides = list(getattr(network, "strides", [])) or [2] * len(levels)
    factor = [1]
    for s in strides:
        factor.append(factor[-1] * (s if isinstance(s, int) else s[0]))
    encoders, decoders, skips = [], [], []
    for k, (down, skip, up) in enumerate(levels, start=1):
        res = _resolution(factor[k])
        encoders.append(Component(f"encoder {k} ({res})", down, "stage", type(modules[down]).__name__, depth=k - 1))
        skips.append(Component(f"skip {k} ({res})", skip, "skip", "SkipConnection", part="skip", depth=k))
        out = "output, full res" if k == 1 else f"to {_resolution(factor[k - 1])}"
        decoders.append(Component(f"decoder {k} ({out})", up, "stage", type(modules[up]).__name__, depth=k - 1))
    bottom = f"{levels[-1][1]}.submodule"
    bottleneck = Component(
        f"bottleneck ({_resolution(factor[len(levels)])})", bottom, "stage", type(modules[bottom]).__name__,
        depth=len(levels),
    )
    return [*encoders, bottleneck, *reversed(decoders)], skips


# ----------------------------------------------------------------- generic
def _open_containers(network: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    out = []
    for name, child in network.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, _CONTAINERS):
            out += _open_containers(child, path + ".")
        elif _has_weights(child):
            out.append((path, child))
    return out


def _generic_stages(network: nn.Module) -> list[Component]:
    children, prefix = _open_containers(network), ""
    while len(children) == 1 and list(children[0][1].children()):
        prefix = children[0][0] + "."
        children = _open_containers(children[0][1], prefix)
    return [Component(humanize(path, network), path, "stage", type(m).__name__) for path, m in children]


def _skip_connections(network: nn.Module) -> list[Component]:
    from monai.networks.layers import SkipConnection

    return [
        Component(f"skip {humanize(path, network)}", path, "skip", "SkipConnection", part="skip")
        for path, m in network.named_modules()
        if isinstance(m, SkipConnection) and m.mode == "cat" and m.dim == 1
    ]


def _example_input(model, network: nn.Module) -> torch.Tensor | None:
    """A test input ``(C, *S)`` of the size the model's description was probed with, if known."""
    description = getattr(model, "description", None)
    shape = getattr(description, "example_shape", None)
    if shape is None:
        return None
    generator = torch.Generator().manual_seed(0)
    return torch.rand((model.in_channels, *shape), generator=generator)


def _traced_components(model, network: nn.Module, example: torch.Tensor) -> tuple[list[Component], list[Component]]:
    """Encoder / decoder stages and skips of ``network`` from a traced pass on ``example`` ``(C, *S)``.

    Skip k (finest first) is argument ``argument`` of join ``join``, named after the
    module the skip tensor leaves and the module that uses it; both are stages.
    """
    run = model if hasattr(model, "network") else network
    device = next(network.parameters()).device
    joins: list[Join] = sorted(trace_joins(network, example[None].to(device), run), key=lambda j: (j.factor, j.index))
    stages, skips, seen = [], [], set()
    for k, j in enumerate(joins, start=1):
        res = _resolution(2 ** round(math.log2(j.factor)))
        encoder, decoder = humanize(j.encoder, network), humanize(j.decoder, network)
        skips.append(Component(
            f"skip {k} ({res}): {encoder} -> {decoder}", j.decoder, "skip", "join", part="join", depth=k,
            shape=j.shape, join=j.index, argument=j.argument,
        ))
        for path in (j.encoder, j.decoder):
            if path not in seen:
                seen.add(path)
                stages.append(Component(humanize(path, network), path, "stage", type(network.get_submodule(path)).__name__))
    return stages, skips


def _blocks(network: nn.Module, stages: list[Component]) -> list[Component]:
    out: list[Component] = []
    inside_block: list[str] = []
    for path, module in network.named_modules():
        if not path or any(path.startswith(p + ".") for p in inside_block):
            continue
        is_block = type(module).__name__ in BLOCK_TYPES
        is_layer = not list(module.children()) and _has_weights(module) and not isinstance(module, _NORM_TYPES)
        if not (is_block or is_layer):
            continue
        inside_block.append(path)
        stage = max(
            (s for s in stages if path == s.path or path.startswith(s.path + ".")),
            key=lambda s: len(s.path), default=None,
        )
        if stage is None:
            name = humanize(path, network)
        elif stage.path == path:
            name = stage.name
        else:
            stage_module = network.get_submodule(stage.path) if stage.path else network
            name = f"{stage.name} / {humanize(path[len(stage.path) + 1:], stage_module)}"
        depth = stage.depth + (stage.path != path) if stage else 0
        out.append(Component(name, path, "block", type(module).__name__, depth=depth))
    return out


# ----------------------------------------------------------------- probing
def probe(model, components: list[Component], example: torch.Tensor) -> list[Component]:
    """Run ``example`` ``(C, *S)`` once and return ``components`` in execution order with shapes.

    Keeps only components whose module runs exactly once and returns one tensor (a module
    called twice, or returning a tuple, cannot be intervened on unambiguously), orders
    them by when their module starts, and adds the resolution to generic names.
    """
    network = network_of(model)
    modules = dict(network.named_modules())
    calls: dict[str, list] = {}

    def record(path):
        def hook(module, args, output):
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            calls.setdefault(path, []).append((first, output))
        return hook

    started: dict[str, int] = {}

    def start(path):
        def pre_hook(module, args):
            started.setdefault(path, len(started))
        return pre_hook

    paths = {c.path for c in components}
    handles = [modules[p].register_forward_hook(record(p)) for p in paths]
    handles += [modules[p].register_forward_pre_hook(start(p)) for p in paths]
    try:
        with torch.inference_mode():
            run = model if hasattr(model, "network") else network
            run(example[None].to(next(network.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    spatial = tuple(example.shape[1:])
    kept = []
    for c in components:
        if c.part == "join":  # found by a trace of the same pass: shape known
            kept.append(c)
            continue
        seen = calls.get(c.path, [])
        if len(seen) != 1 or not isinstance(seen[0][1], torch.Tensor) or seen[0][1].ndim < 2:
            continue
        module_input, output = seen[0]
        if c.part == "skip" and module_input is None:
            continue
        if resolution_factor(output.shape, spatial) is None and resolution_factor(output.movedim(-1, 1).shape, spatial):
            c = replace(c, channels_last=True)  # (N, *S, C): Swin blocks
        shape = tuple(output[(slice(None), *c.index(module_input, output))].shape[1:])
        name = c.name
        factor = resolution_factor(output.shape if not c.channels_last else output.movedim(-1, 1).shape, spatial)
        if c.kind in ("stage", "block") and "res)" not in name and factor:
            name = f"{name} ({_resolution(2 ** round(math.log2(factor)))})"
        kept.append(replace(c, name=name, shape=shape))
    return sorted(kept, key=lambda c: started[c.path])


# ----------------------------------------------------------------- public
def enumerate_components(model, granularity: str = "stages", layer: str | None = None, example=None) -> list[Component]:
    """List the components of ``model`` (a SegmentationModel or ``nn.Module``).

    Parameters
    ----------
    granularity
        ``"stages"``, ``"blocks"``, ``"skips"`` or ``"channels"`` (see the module docs).
    layer
        For ``"channels"``: the stage, block or skip whose output channels are listed, by
        display name (``"encoder 2 (1/4 res)"``, or just ``"encoder 2"``) or module path.
    example
        An input image ``(C, *S)`` in model input space. When given, components are
        probed (see :func:`probe`): execution order, shapes, and only those that can be
        intervened on. Required for ``"channels"`` (to count them).

    Raises :class:`NotAModuleError` (a ``TypeError``) for TorchScript / non-module models.
    """
    network = network_of(model)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    levels = _unet_levels(network)
    stages, skips = _unet_components(network, levels) if levels else (_generic_stages(network), _skip_connections(network))
    traced_on = example if example is not None else _example_input(model, network)
    if not levels and not skips and traced_on is not None:
        encoders_decoders, skips = _traced_components(model, network, torch.as_tensor(traced_on))
        paths = {c.path for c in encoders_decoders}
        stages = [*encoders_decoders, *(c for c in stages if c.path not in paths)]
    if granularity == "channels":
        if layer is None or example is None:
            raise ValueError("granularity 'channels' needs layer=... and an example image to count its channels")
        parent = find_component([*stages, *skips, *_blocks(network, stages)], layer, network)
        found = probe(model, [parent], torch.as_tensor(example))
        if not found:
            raise ValueError(f"{parent.name!r} does not run exactly once with one tensor output")
        parent = found[0]
        count, shape = (
            (parent.shape[-1], (*parent.shape[:-1], 1)) if parent.channels_last else (parent.shape[0], (1, *parent.shape[1:]))
        )
        return [
            replace(parent, name=f"{parent.name} ch {k}", kind="channel", channel=k, depth=parent.depth + 1, shape=shape)
            for k in range(count)
        ]
    chosen = {"stages": stages, "skips": skips, "blocks": None}[granularity]
    if chosen is None:
        chosen = _blocks(network, stages)
    if example is not None:
        chosen = probe(model, chosen, torch.as_tensor(example))
    return chosen


def find_component(candidates: list[Component], key: str, network: nn.Module | None = None) -> Component:
    """The component named ``key`` (display name, its part before `` (``, or module path).

    A module path that is not among ``candidates`` is accepted when it exists in
    ``network``: a component of kind ``"module"``.
    """
    for c in candidates:
        if key in (c.name, c.path) or c.name.split(" (")[0] == key:
            return c
    modules = dict(network.named_modules()) if network is not None else {}
    if key in modules and key:
        return Component(humanize(key), key, "module", type(modules[key]).__name__)
    names = ", ".join(repr(c.name.split(" (")[0]) for c in candidates)
    raise KeyError(f"no component {key!r}; choose one of {names} or a module path")


def format_components(components: list[Component]) -> str:
    """A readable indented listing: name, module type, shape and module path."""
    shapes = ["x".join(str(s) for s in c.shape) if c.shape else "" for c in components]
    name_width = max((2 * c.depth + len(c.name) for c in components), default=0) + 2
    type_width = max((len(c.module_type) for c in components), default=0) + 2
    shape_width = max((len(s) for s in shapes), default=0) + 2
    return "\n".join(
        f"{'  ' * c.depth + c.name:<{name_width}}{c.module_type:<{type_width}}{shape:<{shape_width}}{c.path}"
        for c, shape in zip(components, shapes, strict=True)
    )
