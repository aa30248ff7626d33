"""Train the lesion classifiers and the few-mask U-Nets, reproducibly, on one CPU thread.

Data: :func:`napari_pdcr.lesions.lesion_split` (Colin27 slices with and without one
synthetic lesion, 2 mm, 112x96); the second subject is never used here. Each batch is
randomly flipped left-right, shifted by up to 6 pixels and given a random gamma.

- ``lesion_cnn``: :class:`~napari_pdcr.models.classifiers.LesionCNN`, image labels only.
- ``tw_lesion``: :class:`~napari_pdcr.models.classifiers.TWClassifier`, image labels only
  (the same objective as ``lesion_cnn``: an independent run from another seed).
- ``tw_lesion_px5`` / ``tw_lesion_px20``: TW-style, image labels plus the pixel labels of
  5 / 20 lesion images: cross-entropy of the class logits plus, on the labelled images'
  brain pixels, cross-entropy of the decoder's class relevance maps as segmentation
  logits (the paper's heatmap loss, as ``TWClassifier.segment``); batch norm runs
  on its running statistics in that pass (:func:`running_batch_norm`).
- ``unet_lesion_px5`` / ``unet_lesion_px20``: a small MONAI U-Net trained on the same
  5 / 20 masks only (Dice + cross-entropy), the encoder-decoder comparison.

The pixel-labelled images are the first 5 / 20 of a seeded permutation of the training
lesion images (:func:`labelled_positions`; the 5 are among the 20).

    PYTHONPATH=. OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python sample_data/train_classifiers.py
    PYTHONPATH=. python sample_data/train_classifiers.py --models lesion_cnn   # a subset

Writes ``napari_pdcr/models/weights/<name>.pt`` (float16 state dicts, cast back to
float32 on loading).
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from napari_pdcr.lesions import LesionSet, lesion_split
from napari_pdcr.models.classifiers import HEATMAP_SCALE
from napari_pdcr.models.demo import DEMO_MODELS, demo_weights_path, load_demo_model

SEED = 0
#: pixel-labelled images per step (beside the batch of image-labelled ones)
HEATMAP_BATCH = 4


@dataclass(frozen=True)
class ClassifierTraining:
    """Adam at ``lr`` with cosine decay for ``steps`` batches of ``batch_size`` images.

    ``pixel_labels``: how many training lesion images come with their mask (0: none);
    ``seed``: the run's seed; ``segmentation_only``: train on the masks alone (U-Net);
    ``heatmap_weight``: weight of the heatmap loss beside the classification loss;
    ``init_from``: start from that model's shipped weights (trained first) instead of a
    random initialisation.
    """

    steps: int
    batch_size: int
    lr: float
    pixel_labels: int = 0
    seed: int = SEED
    segmentation_only: bool = False
    heatmap_weight: float = 1.0
    init_from: str | None = None


TRAINING: dict[str, ClassifierTraining] = {
    "lesion_cnn": ClassifierTraining(steps=400, batch_size=16, lr=2e-3),
    "tw_lesion": ClassifierTraining(steps=400, batch_size=16, lr=2e-3, seed=1),
    "tw_lesion_px5": ClassifierTraining(steps=200, batch_size=16, lr=5e-4, pixel_labels=5, heatmap_weight=3e-4,
                                        init_from="tw_lesion"),
    "tw_lesion_px20": ClassifierTraining(steps=200, batch_size=16, lr=5e-4, pixel_labels=20, heatmap_weight=1e-3,
                                         init_from="tw_lesion"),
    "unet_lesion_px5": ClassifierTraining(steps=300, batch_size=5, lr=3e-3, pixel_labels=5, segmentation_only=True),
    "unet_lesion_px20": ClassifierTraining(steps=300, batch_size=8, lr=3e-3, pixel_labels=20, segmentation_only=True),
}


def labelled_positions(train: LesionSet, count: int, seed: int = SEED) -> np.ndarray:
    """Positions in ``train`` of the ``count`` pixel-labelled lesion images (nested in ``count``)."""
    lesion_images = np.flatnonzero(train.labels == 1)
    return np.random.default_rng([seed, 15]).permutation(lesion_images)[:count]


def augment(images: torch.Tensor, masks: torch.Tensor, brains: torch.Tensor, gen: torch.Generator):
    """Random left-right flip, shift (up to 6 px per axis, zero fill) and gamma in [0.8, 1.25] of a batch ``(B, 1, H, W)``."""
    flip = torch.rand(len(images), generator=gen) < 0.5
    stacked = torch.cat([images, masks, brains], dim=1)
    stacked[flip] = stacked[flip].flip(-1)
    shifted = torch.zeros_like(stacked)
    h, w = stacked.shape[2:]
    for i, (dy, dx) in enumerate(torch.randint(-6, 7, (len(images), 2), generator=gen).tolist()):
        shifted[i, :, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = stacked[i, :, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    gamma = 0.8 + 0.45 * torch.rand(len(images), 1, 1, 1, generator=gen)
    return shifted[:, :1].clamp(0, 1) ** gamma, shifted[:, 1:2], shifted[:, 2:3]


@contextmanager
def running_batch_norm(network: torch.nn.Module):
    """Batch norm on its running statistics (as at inference) inside the block: the few
    labelled images of the heatmap pass neither set nor update the statistics."""
    norms = [m for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d) and m.training]
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


def heatmap_loss(maps: torch.Tensor, masks: torch.Tensor, brains: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``HEATMAP_SCALE * maps`` ``(B, K, H, W)`` as logits against ``masks`` on brain pixels."""
    per_pixel = F.cross_entropy(HEATMAP_SCALE * maps, masks[:, 0].long(), reduction="none")
    return (per_pixel * brains[:, 0]).sum() / brains.sum().clamp(min=1)


def train(name: str, train_set: LesionSet) -> tuple[torch.nn.Module, float]:
    """Train model ``name`` from its seed; returns the network (eval mode) and seconds taken."""
    config = TRAINING[name]
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    images = torch.from_numpy(train_set.images)[:, None]
    labels = torch.from_numpy(train_set.labels)
    masks = torch.from_numpy(train_set.lesion_masks.astype(np.float32))[:, None]
    brains = torch.from_numpy(train_set.brain_masks.astype(np.float32))[:, None]
    labelled = torch.from_numpy(labelled_positions(train_set, config.pixel_labels))
    network = DEMO_MODELS[name].build()
    if config.init_from is not None:
        network.load_state_dict(load_demo_model(config.init_from).network.state_dict())
    optimizer = torch.optim.Adam(network.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    dice_ce = DiceCELoss(sigmoid=True, batch=True)
    network.train()
    start = time.perf_counter()
    for step in range(config.steps):
        if config.segmentation_only:
            pick = labelled[torch.randint(len(labelled), (config.batch_size,), generator=gen)]
            x, y, _ = augment(images[pick], masks[pick], brains[pick], gen)
            loss = dice_ce(network(x), y)
        else:
            pick = torch.randint(len(images), (config.batch_size,), generator=gen)
            x, _, _ = augment(images[pick], masks[pick], brains[pick], gen)
            loss = F.cross_entropy(network(x), labels[pick])
            if len(labelled):
                few = labelled[torch.randperm(len(labelled), generator=gen)[:HEATMAP_BATCH]]
                x, y, brain = augment(images[few], masks[few], brains[few], gen)
                with running_batch_norm(network):
                    maps = network.heatmaps(x)[1]
                loss = loss + config.heatmap_weight * heatmap_loss(maps, y, brain)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == config.steps - 1:
            print(f"  {name} step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f} s", flush=True)
    return network.eval(), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(TRAINING), default=list(TRAINING))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)  # max_unpool2d (the TW decoder) has no flagged kernel
    train_set, _ = lesion_split()
    for name in args.models:
        network, seconds = train(name, train_set)
        path = demo_weights_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.half() if v.is_floating_point() else v for k, v in network.state_dict().items()}
        torch.save(state, path)
        n_params = sum(p.numel() for p in network.parameters())
        print(f"{name}: {n_params} parameters, {seconds:.0f} s, {path.stat().st_size / 1e3:.0f} kB -> {path}")


if __name__ == "__main__":
    main()
