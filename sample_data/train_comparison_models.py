"""Train the demo models added for the model comparison (``docs/model_comparison.md``).

The comparison needs 2D models of different families on one task: the MONAI U-Net,
SegResNet and the shallow CNN come from ``train_demo_models.py``; this script adds a
transformer, ``vit2d`` (:class:`napari_pdcr.models.vit.ViTSegNet`, UNETR-style), trained
by the same function on the same data, split, augmentation and seed:

    python sample_data/train_comparison_models.py

Writes ``napari_pdcr/models/weights/<name>.pt`` (a plain state dict). Held-out Dice:
``PYTHONPATH=. python sample_data/evaluate_demo_models.py`` (``docs/demo_models.md``).
"""

from __future__ import annotations

import argparse

import torch
from train_demo_models import TRAINING, TrainConfig, train

from napari_pdcr.models.demo import demo_weights_path

COMPARISON_TRAINING: dict[str, TrainConfig] = {
    "vit2d": TrainConfig(steps=300, batch_size=8, lr=2e-3),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(COMPARISON_TRAINING), default=list(COMPARISON_TRAINING))
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    TRAINING.update(COMPARISON_TRAINING)
    for name in args.models:
        network, seconds = train(name)
        path = demo_weights_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(network.state_dict(), path)
        n_params = sum(p.numel() for p in network.parameters())
        print(f"{name}: {n_params} parameters, {seconds:.0f} s, {path.stat().st_size / 1e3:.0f} kB -> {path}")


if __name__ == "__main__":
    main()
