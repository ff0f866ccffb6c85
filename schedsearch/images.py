"""Image grids and PNG files (images are float tensors in [0, 1], (N, C, H, W))."""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .sampler import to_uint8


def grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1, scale: int = 1) -> Image.Image:
    """Tile images into one PIL image (``nrow`` per row; nearest-neighbour upscaling by ``scale``,
    which keeps 8×8 testbed digits legible)."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h,
               pad + q * (w + pad): pad + q * (w + pad) + w] = arr[i]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def save_images(images: torch.Tensor, out_dir: str, names: Sequence[str]) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for arr, name in zip(to_uint8(images), names):
        path = os.path.join(out_dir, name)
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)
        paths.append(path)
    return paths
