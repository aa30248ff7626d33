"""A small UNETR-style 2D transformer for the model comparison (pure PyTorch, no einops).

Global self-attention over 16x16-pixel patches, a convolutional decoder to half
resolution, bilinear upsampling, and one full-resolution convolution stem concatenated
before a 1x1 head (as UNETR's first encoder). Every stage is a module returning one tensor, so component
effects can address the stem, each transformer layer and each decoder stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class UpStage(nn.Module):
    """2x transposed-convolution upsampling followed by a 3x3 convolution."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.conv = _conv_bn_relu(out_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.up(x))


class ViTSegNet(nn.Module):
    """UNETR-style segmentation network: ``(N, 1, H, W)`` -> ``(N, 1, H, W)`` logits (H, W multiples of 16).

    16x16 patches are embedded to ``dim`` channels, given a convolutional
    (size-independent) position encoding, and mixed by ``depth`` pre-norm transformer
    encoder layers with global self-attention; three upsampling stages reach half
    resolution, bilinear upsampling full resolution, where the 3x3 ``stem`` features are
    concatenated before the 1x1 ``head``.
    """

    def __init__(self, dim: int = 64, depth: int = 4, heads: int = 4, mlp_dim: int = 128, width: int = 8):
        super().__init__()
        patch = 16
        self.stem = _conv_bn_relu(1, width)
        self.patch_embedding = nn.Conv2d(1, dim, patch, stride=patch)
        self.position_encoding = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.transformer = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, heads, mlp_dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.decoder = nn.ModuleList([UpStage(dim, 32), UpStage(32, 16), UpStage(16, width)])
        self.head = nn.Sequential(nn.Conv2d(2 * width, width, 1), nn.ReLU(), nn.Conv2d(width, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.stem(x)
        patches = self.patch_embedding(x)
        patches = patches + self.position_encoding(patches)
        n, dim, h, w = patches.shape
        tokens = patches.flatten(2).transpose(1, 2)
        for layer in self.transformer:
            tokens = layer(tokens)
        y = self.norm(tokens).transpose(1, 2).reshape(n, dim, h, w)
        for stage in self.decoder:
            y = stage(y)
        y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
        return self.head(torch.cat([local, y], dim=1))
