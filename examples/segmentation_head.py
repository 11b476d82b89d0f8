"""T2T-ViT as a backbone for dense prediction: its feature pyramid (strides 4, 8, 16) into a small FPN-like head.

    python examples/segmentation_head.py                  # tiny T2T-ViT-7, 40 steps on synthetic images, CPU
    python examples/segmentation_head.py --model t2t_vit_14 --img-size 224 --full-size --steps 200

`features_only=True` gives the maps of the two T2T stages (strides 4 and 8, `token_dim` channels) and of the last
block (stride 16, `embed_dim` channels); `dynamic_img_size=True` lets the backbone take any input size, as dense
tasks need. The same maps come from any classification model through `forward_intermediates`:

    final, (s4, s8, s16) = model.forward_intermediates(x, indices=[0, 1, len(model.blocks) + 1])

The data are synthetic: noise with coloured rectangles, one class per colour, background class 0. The head learns
them in a few dozen steps, which is the point: the script shows the wiring, not a benchmark.
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import t2tvit  # noqa: F401  (registers the T2T-ViT models with timm)

TINY = dict(embed_dim=64, depth=2, num_heads=2, token_dim=16)  # seconds per step on a CPU


class FPNHead(nn.Module):
    """Lateral 1x1 convs to one width, top-down upsample-and-add, a 3x3 conv, per-pixel class scores."""

    def __init__(self, in_channels: Sequence[int], width: int, num_classes: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.smooth = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.GELU())
        self.classify = nn.Conv2d(width, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor], size: Tuple[int, int]) -> torch.Tensor:
        x = self.lateral[-1](features[-1])  # coarsest map, stride 16
        for lateral, feature in zip(reversed(self.lateral[:-1]), reversed(features[:-1])):  # strides 8, then 4
            x = F.interpolate(x, size=feature.shape[-2:], mode='bilinear', align_corners=False) + lateral(feature)
        x = self.classify(self.smooth(x))  # (B, num_classes, H/4, W/4)
        return F.interpolate(x, size=size, mode='bilinear', align_corners=False)  # (B, num_classes, H, W)


class Segmenter(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int, width: int = 32):
        super().__init__()
        self.backbone = backbone
        self.head = FPNHead(backbone.feature_info.channels(), width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x), x.shape[-2:])


def fake_batch(generator: torch.Generator, palette: torch.Tensor, batch: int, size: int) -> Tuple[torch.Tensor, ...]:
    """Noise images with 1-3 rectangles each; a rectangle's colour (`palette[class]`) says its class, the
    background is class 0."""
    num_classes = palette.shape[0]
    images = torch.rand(batch, 3, size, size, generator=generator) * 0.3
    masks = torch.zeros(batch, size, size, dtype=torch.long)
    for b in range(batch):
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            c = int(torch.randint(1, num_classes, (1,), generator=generator))
            y0, x0 = (int(v) for v in torch.randint(0, size - 12, (2,), generator=generator))
            h, w = (int(v) for v in torch.randint(12, size // 2, (2,), generator=generator))
            images[b, :, y0:y0 + h, x0:x0 + w] = palette[c].view(3, 1, 1) + 0.1 * torch.randn(
                3, min(h, size - y0), min(w, size - x0), generator=generator)
            masks[b, y0:y0 + h, x0:x0 + w] = c
    return (images - 0.5) / 0.25, masks


def main(steps: int = 40, model: str = 't2t_vit_7', img_size: int = 64, batch_size: int = 8, num_classes: int = 4,
         lr: float = 1e-3, seed: int = 0, model_kwargs: Optional[Dict] = None, log_every: int = 10) -> List[float]:
    """Train backbone and head together for `steps` steps; returns the loss of every step."""
    torch.manual_seed(seed)
    backbone = timm.create_model(model, features_only=True, img_size=img_size, dynamic_img_size=True,
                                 **(TINY if model_kwargs is None else model_kwargs))
    print(f'{model} features: strides {backbone.feature_info.reduction()}, '
          f'channels {backbone.feature_info.channels()}')
    net = Segmenter(backbone, num_classes)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    palette = torch.rand(num_classes, 3, generator=generator)  # class -> colour, the same in every batch
    losses = []
    for step in range(1, steps + 1):
        images, masks = fake_batch(generator, palette, batch_size, img_size)
        loss = F.cross_entropy(net(images), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == 1:
            print(f'step {step:4d}  loss {loss.item():.4f}')
    return losses


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--steps', type=int, default=40)
    parser.add_argument('--model', default='t2t_vit_7')
    parser.add_argument('--img-size', type=int, default=64)
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--full-size', action='store_true', help="the model's own widths instead of a tiny one")
    args = parser.parse_args()
    main(args.steps, args.model, args.img_size, args.batch_size, model_kwargs={} if args.full_size else None)
