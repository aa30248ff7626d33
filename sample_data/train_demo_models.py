"""Train napari-pdcr's demo brain-extraction models, reproducibly, on 2 CPU threads.

2D models train on the training slices of ``colin27_slices`` (split:
``napari_pdcr.samples.colin27_split``), each slice randomly rotated, scaled, shifted and
flipped onto a zero 256x256 canvas (so the models also work on slices zero-padded to
256x256), with random blur, gamma and contrast. ``unet3d`` trains on the Colin27 2 mm
volume (the only training volume) with the same kinds of augmentation in 3D. The second
subject (ITK) is never used here.

    PYTHONPATH=. python sample_data/train_demo_models.py                 # all models
    PYTHONPATH=. python sample_data/train_demo_models.py --models unet2d # a subset

The temperature series ``unet2d_T0.5``, ``unet2d_T1``, ``unet2d_T2``, ``unet2d_T4``
(``docs/temperature.md``) is the ``unet2d`` architecture trained with the same data,
seed, steps and optimiser, but with the loss on ``sigmoid(z / T_train)``: the network's
logits ``z`` are divided by the model's training temperature before the loss. Their
weights are stored in float16 (half the size; loading casts them back to float32).

Writes ``napari_pdcr/models/weights/<name>.pt`` (a plain state dict). Fixed seeds, 2
threads, deterministic algorithms: the same machine and versions give the same weights.
On a busy shared machine set ``OMP_WAIT_POLICY=PASSIVE``: OpenMP threads then sleep
instead of spinning while waiting, which here made training steps ~6x faster under load
without changing any result.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from napari_pdcr.models.demo import DEMO_MODELS, TEMPERATURE_SERIES, demo_weights_path
from napari_pdcr.samples import colin27_split, load_sample

SEED = 0
CANVAS_2D = (256, 256)  # (H, W) pixels at 1 mm
CANVAS_3D = (96, 112, 96)  # (D, H, W) voxels at 2 mm


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings: Adam with cosine-decayed learning rate ``lr``.

    ``recalibrate_bn``: after training, set BatchNorm statistics to those of the
    un-augmented training images (see :func:`recalibrate_batch_norm`).
    ``float16_weights``: store floating-point weights in float16.
    """

    steps: int
    batch_size: int
    lr: float
    recalibrate_bn: bool = False
    float16_weights: bool = False


TRAINING: dict[str, TrainConfig] = {
    "unet2d": TrainConfig(steps=400, batch_size=8, lr=3e-3),
    "unet3d": TrainConfig(steps=300, batch_size=2, lr=3e-3, recalibrate_bn=True),
    "segresnet2d": TrainConfig(steps=250, batch_size=8, lr=3e-3),
    "shallow2d": TrainConfig(steps=200, batch_size=8, lr=3e-3),
}
# the temperature series: unet2d's settings, only the training temperature differs
TRAINING.update(
    {
        name: TrainConfig(steps=400, batch_size=8, lr=3e-3, float16_weights=True)
        for name in TEMPERATURE_SERIES
    }
)


def rotation_matrix(angles: torch.Tensor) -> torch.Tensor:
    """Rotation matrices from ``angles`` (radians): ``(B,)`` -> 2x2, ``(B, 3)`` -> 3x3."""
    if angles.ndim == 1:
        c, s = torch.cos(angles), torch.sin(angles)
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    matrices = []
    for axis in range(3):
        c, s = torch.cos(angles[:, axis]), torch.sin(angles[:, axis])
        m = torch.eye(3).repeat(len(angles), 1, 1)
        i, j = [a for a in range(3) if a != axis]
        m[:, i, i], m[:, i, j], m[:, j, i], m[:, j, j] = c, -s, s, c
        matrices.append(m)
    return matrices[0] @ matrices[1] @ matrices[2]


def random_affine_resample(images, masks, out_shape, max_angle, max_shift, gen):
    """Randomly rotate, scale, flip (last axis) and shift a batch onto a zero canvas.

    ``images``, ``masks``: float ``(B, 1, *S)``; ``out_shape``: canvas ``S'``; angles up
    to ``max_angle`` radians, scale in [0.85, 1.15], shifts up to ``max_shift`` voxels
    per axis (order of ``S``). Returns ``(B, 1, *S')`` image and binary mask tensors.
    """
    batch, ndim = images.shape[0], images.ndim - 2
    angle_shape = (batch,) if ndim == 2 else (batch, 3)
    rotation = rotation_matrix((torch.rand(angle_shape, generator=gen) * 2 - 1) * max_angle)
    scale = 0.85 + 0.3 * torch.rand(batch, 1, 1, generator=gen)
    flip = torch.ones(batch, ndim)
    flip[:, 0] = torch.where(torch.rand(batch, generator=gen) < 0.5, -1.0, 1.0)  # x = last axis
    shift = (torch.rand(batch, ndim, generator=gen) * 2 - 1) * torch.tensor(
        max_shift[::-1], dtype=torch.float32
    )
    # grid_sample works in normalised (x, y[, z]) = reversed axis order; half sizes in voxels
    half_in = torch.tensor(images.shape[2:][::-1], dtype=torch.float32) / 2
    half_out = torch.tensor(out_shape[::-1], dtype=torch.float32) / 2
    linear = (
        torch.diag(1 / half_in) @ (rotation / scale) @ torch.diag_embed(flip) @ torch.diag(half_out)
    )
    theta = torch.cat([linear, (shift / half_in)[..., None]], dim=-1)
    grid = F.affine_grid(theta, (batch, 1, *out_shape), align_corners=False)
    warped_image = F.grid_sample(
        images, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    warped_mask = F.grid_sample(
        masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return warped_image, (warped_mask > 0.5).float()


def random_blur(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Gaussian blur with one random sigma in [0, 1.5] voxels per spatial axis (batch-wide)."""
    ndim = images.ndim - 2
    for axis in range(ndim):
        sigma = 1.5 * float(torch.rand(1, generator=gen))
        if sigma < 0.3:
            continue
        radius = math.ceil(3 * sigma)
        taps = torch.exp(
            -0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2
        )
        kernel_shape = [1, 1] + [1] * ndim
        kernel_shape[2 + axis] = len(taps)
        kernel = (taps / taps.sum()).reshape(kernel_shape)
        padding = [0] * ndim
        padding[axis] = radius
        conv = F.conv2d if ndim == 2 else F.conv3d
        images = conv(images, kernel, padding=padding)
    return images


def random_intensity(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-image gamma in [0.7, 1.5] and contrast in [0.8, 1.2], clipped to [0, 1]."""
    shape = (images.shape[0],) + (1,) * (images.ndim - 1)
    gamma = 0.7 + 0.8 * torch.rand(shape, generator=gen)
    contrast = 0.8 + 0.4 * torch.rand(shape, generator=gen)
    return (images.clamp(0, 1) ** gamma * contrast).clamp(0, 1)


def augmented_batch(images, masks, config: TrainConfig, gen: torch.Generator):
    """One augmented training batch ``(B, 1, *canvas)`` from ``(N, *S)`` images/masks."""
    pick = torch.randint(len(images), (config.batch_size,), generator=gen)
    x, y = images[pick, None], masks[pick, None]
    if x.ndim == 4:
        canvas, angle = CANVAS_2D, math.radians(15)
        max_shift = tuple((c - s) / 2 + 8 for c, s in zip(CANVAS_2D, x.shape[2:], strict=True))
    else:
        canvas, angle, max_shift = CANVAS_3D, math.radians(10), (6, 6, 6)
    x, y = random_affine_resample(x, y, canvas, angle, max_shift, gen)
    return random_intensity(random_blur(x, gen), gen), y


def training_data(spatial_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training images and masks, float ``(N, *S)``: Colin27 training slices or volume."""
    if spatial_dims == 2:
        sample = load_sample("colin27_slices")
        train, _ = colin27_split()
        images, masks = sample["image"][train], sample["mask"][train]
    else:
        sample = load_sample("colin27_volume")
        images, masks = sample["image"][None], sample["mask"][None]
    return torch.from_numpy(images), torch.from_numpy(masks.astype(np.float32))


def recalibrate_batch_norm(network: torch.nn.Module, images: torch.Tensor, multiple: int) -> None:
    """Replace BatchNorm running statistics by the exact statistics of ``images`` ``(N, *S)``.

    Each image is zero-padded at the high end to a multiple of ``multiple`` (as
    ``SegmentationModel`` does) and run once in training mode with a cumulative average.
    With batches of two augmented volumes, ``unet3d`` learns to lean on per-batch
    statistics, and the running averages over augmented batches left it at Dice ~0.80 in
    eval mode even on its training volume; the statistics of the un-augmented training
    volume restore the per-batch behaviour (Dice 0.96 there, 0.92 on the held-out subject).
    """
    batch_norms = [
        m for m in network.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d))
    ]
    for batch_norm in batch_norms:
        batch_norm.reset_running_stats()
        batch_norm.momentum = None  # cumulative moving average over the passes below
    network.train()
    with torch.no_grad():
        for image in images:
            pads = [(-size) % multiple for size in image.shape]
            network(F.pad(image[None, None], [p for pad in reversed(pads) for p in (0, pad)]))
    network.eval()


def train(name: str) -> tuple[torch.nn.Module, float]:
    """Train demo model ``name`` from a fixed seed; returns the network and seconds taken.

    The loss sees the logits divided by the model's training temperature (1 but for the
    temperature series).
    """
    spec, config = DEMO_MODELS[name], TRAINING[name]
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    images, masks = training_data(spec.spatial_dims)
    network = spec.build()
    optimizer = torch.optim.Adam(network.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    loss_fn = DiceCELoss(sigmoid=True, batch=True)
    network.train()
    start = time.perf_counter()
    for step in range(config.steps):
        with torch.no_grad():
            x, y = augmented_batch(images, masks, config, gen)
        loss = loss_fn(network(x) / spec.training_temperature, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == config.steps - 1:
            print(
                f"  {name} step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f} s",
                flush=True,
            )
    if config.recalibrate_bn:
        recalibrate_batch_norm(network, images, spec.divisible_by)
    return network.eval(), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(TRAINING), default=list(TRAINING))
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    for name in args.models:
        network, seconds = train(name)
        path = demo_weights_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = network.state_dict()
        if TRAINING[name].float16_weights:
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        torch.save(state, path)
        n_params = sum(p.numel() for p in network.parameters())
        print(
            f"{name}: {n_params} parameters, {seconds:.0f} s, {path.stat().st_size / 1e3:.0f} kB -> {path}"
        )


if __name__ == "__main__":
    main()
