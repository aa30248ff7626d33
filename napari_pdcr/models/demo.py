"""Small demo models that ship with napari-pdcr: brain extraction and the lesion task.

Each is a MONAI network (or, for ``shallow2d``, a tiny local CNN) trained on Colin27 by
``sample_data/train_demo_models.py`` (``vit2d``, a small transformer from
:mod:`napari_pdcr.models.vit`, by ``sample_data/train_comparison_models.py`` on the same
data); held-out Dice is in ``docs/demo_models.md``. The temperature series
``unet2d_T0.5`` ... ``unet2d_T4`` is ``unet2d`` trained with its loss on
``sigmoid(z / T_train)`` (``docs/temperature.md``); their descriptions carry ``T_train``
as the temperature of soft outcomes. All
take one channel in [0, 1] (the bundled samples as loaded) and output one channel of
brain-foreground logits (``activation="sigmoid"``).

The lesion models (:func:`lesion_model_names`, trained by
``sample_data/train_classifiers.py`` on :mod:`napari_pdcr.lesions`; results in
``docs/classifiers.md``) run on the ``lesion_slices`` sample: classifiers (``kind
"classifier"``, two class logits, class 1 = lesion present) and U-Nets of the lesion mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from monai.networks.nets import SegResNet, UNet
from torch import nn

from napari_pdcr._resources import demo_weights_dir
from napari_pdcr.models.base import CLASSIFIER, SEGMENTATION, SegmentationModel
from napari_pdcr.models.classifiers import LesionCNN, TWClassifier
from napari_pdcr.models.description import ModelDescription
from napari_pdcr.models.vit import ViTSegNet


class ShallowCNN(nn.Module):
    """Four 3x3 convolutions (receptive field 9x9 pixels): a deliberately local model.

    ``(N, 1, H, W)`` -> ``(N, 1, H, W)`` logits.
    """

    def __init__(self, width: int = 16):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 1, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@dataclass(frozen=True)
class DemoModelSpec:
    """How to build one demo model and what it expects.

    ``build`` returns the untrained network; ``divisible_by`` is the spatial multiple it
    needs; ``sample`` names the bundled sample (``napari_pdcr.samples``) it runs on;
    ``training_temperature`` is the T of ``sigmoid(z / T)`` in its training loss;
    ``kind`` is ``"segmentation"`` (scores per pixel) or ``"classifier"`` (class scores
    ``(N, K)``); ``activation`` turns its scores into probabilities and ``channel`` is
    the class explained by default, of ``out_channels``.
    """

    build: Callable[[], nn.Module]
    spatial_dims: int
    divisible_by: int
    sample: str
    description: str
    training_temperature: float = 1.0
    kind: str = SEGMENTATION
    activation: str = "sigmoid"
    out_channels: int = 1
    channel: int | None = None


DEMO_MODELS: dict[str, DemoModelSpec] = {
    "unet2d": DemoModelSpec(
        build=lambda: UNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            channels=(8, 16, 32, 64, 128),
            strides=(2, 2, 2, 2),
            num_res_units=1,
            norm="batch",
        ),
        spatial_dims=2,
        divisible_by=16,
        sample="colin27_slice",
        description="MONAI 2D U-Net (5 levels, 8-128 channels): brain mask of an axial T1 slice at 1 mm.",
    ),
    "unet3d": DemoModelSpec(
        build=lambda: UNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=1,
            channels=(8, 16, 32, 64),
            strides=(2, 2, 2),
            num_res_units=1,
            norm="batch",
        ),
        spatial_dims=3,
        divisible_by=8,
        sample="colin27_volume",
        description="MONAI 3D U-Net (4 levels, 8-64 channels): brain mask of a T1 head volume at 2 mm.",
    ),
    "segresnet2d": DemoModelSpec(
        build=lambda: SegResNet(
            spatial_dims=2,
            init_filters=8,
            in_channels=1,
            out_channels=1,
            blocks_down=(1, 2, 2, 2),
            blocks_up=(1, 1, 1),
            norm="batch",
        ),
        spatial_dims=2,
        divisible_by=8,
        sample="colin27_slice",
        description="MONAI 2D SegResNet (8 initial filters): brain mask of an axial T1 slice at 1 mm.",
    ),
    "shallow2d": DemoModelSpec(
        build=ShallowCNN,
        spatial_dims=2,
        divisible_by=1,
        sample="colin27_slice",
        description="Four 3x3 convolutions (9x9 receptive field): a deliberately local 2D model.",
    ),
    "vit2d": DemoModelSpec(
        build=ViTSegNet,
        spatial_dims=2,
        divisible_by=16,
        sample="colin27_slice",
        description="UNETR-style 2D transformer (global self-attention over 16x16 patches, 4 layers, "
        "conv decoder): brain mask of an axial T1 slice at 1 mm.",
    ),
}


#: the lesion task (:mod:`napari_pdcr.lesions`, trained by ``sample_data/train_classifiers.py``)
_LESION_CLASSIFIER = dict(spatial_dims=2, divisible_by=32, sample="lesion_slices", kind=CLASSIFIER,
                          activation="softmax", out_channels=2, channel=1)
_TW = "TW-style classifier (LesionCNN encoder; its decoder is the unrolled LRP-epsilon pass through the encoder's weights)"
DEMO_MODELS.update(
    {
        "lesion_cnn": DemoModelSpec(
            build=LesionCNN, **_LESION_CLASSIFIER,
            description="Plain CNN classifier (5 conv-batchnorm-ReLU-maxpool stages, 245k parameters): lesion present "
            "(class 1) in a 2 mm T1 slice, trained on image labels only.",
        ),
        "tw_lesion": DemoModelSpec(
            build=TWClassifier, **_LESION_CLASSIFIER,
            description=f"{_TW}: lesion present (class 1), trained on image labels only.",
        ),
        "tw_lesion_px5": DemoModelSpec(
            build=TWClassifier, **_LESION_CLASSIFIER,
            description=f"{_TW}: lesion present (class 1), image labels + the lesion masks of 5 images.",
        ),
        "tw_lesion_px20": DemoModelSpec(
            build=TWClassifier, **_LESION_CLASSIFIER,
            description=f"{_TW}: lesion present (class 1), image labels + the lesion masks of 20 images.",
        ),
        **{
            f"unet_lesion_px{n}": DemoModelSpec(
                build=lambda: UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16, 32, 64),
                                   strides=(2, 2, 2), num_res_units=1, norm="batch"),
                spatial_dims=2, divisible_by=8, sample="lesion_slices",
                description=f"MONAI 2D U-Net (8-64 channels): lesion mask of a 2 mm T1 slice, trained on the "
                f"masks of {n} lesion images only (the comparison for tw_lesion_px{n}).",
            )
            for n in (5, 20)
        },
    }
)


#: the temperature series: ``unet2d`` trained at each training temperature
TEMPERATURE_SERIES: dict[str, float] = {f"unet2d_T{t:g}": t for t in (0.5, 1.0, 2.0, 4.0)}
DEMO_MODELS.update(
    {
        name: replace(
            DEMO_MODELS["unet2d"],
            training_temperature=t,
            description=f"MONAI 2D U-Net as unet2d, trained at temperature T_train = {t:g} (loss on sigmoid(z / {t:g})).",
        )
        for name, t in TEMPERATURE_SERIES.items()
    }
)


def demo_model_names() -> list[str]:
    """Names accepted by :func:`load_demo_model`."""
    return list(DEMO_MODELS)


def lesion_model_names() -> list[str]:
    """Names of the demo models of the lesion task (classifiers and few-mask U-Nets)."""
    return [name for name, spec in DEMO_MODELS.items() if spec.sample == "lesion_slices"]


def demo_weights_path(name: str):
    """Path of the shipped state dict of demo model ``name`` (may not exist yet)."""
    return demo_weights_dir() / f"{name}.pt"


def load_demo_model(name: str, device="cpu") -> SegmentationModel:
    """Build demo model ``name``, load its shipped weights and wrap it.

    Raises ``KeyError`` listing the available names for an unknown name, and
    ``FileNotFoundError`` when the weights were not trained/shipped.
    """
    if name not in DEMO_MODELS:
        raise KeyError(f"unknown demo model {name!r}; available: {', '.join(DEMO_MODELS)}")
    spec = DEMO_MODELS[name]
    path = demo_weights_path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights of demo model {name!r} are missing ({path}); "
            f"run sample_data/{'train_classifiers.py' if spec.sample == 'lesion_slices' else 'train_demo_models.py'}"
        )
    network = spec.build()
    network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))  # float16 -> float32 too
    description = None
    if name in TEMPERATURE_SERIES or spec.kind == CLASSIFIER:  # T_train of soft outcomes; a classifier's class
        description = ModelDescription(
            spatial_dims=spec.spatial_dims, in_channels=1, out_channels=spec.out_channels, preprocess="none",
            activation=spec.activation,
            divisible_by=spec.divisible_by, input_range=(0.0, 1.0), temperature=spec.training_temperature, name=name,
            kind=spec.kind, channel=spec.channel,
        )
    model = SegmentationModel(
        network=network,
        spatial_dims=spec.spatial_dims,
        in_channels=1,
        activation=spec.activation,
        divisible_by=spec.divisible_by,
        preprocess="none",
        input_range=(0.0, 1.0),
        name=name,
        source=f"demo:{name}",
        description=description,
        kind=spec.kind,
    )
    return model.to(device)
