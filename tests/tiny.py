"""Tiny, randomly initialised diffusers models built offline for tests (SPEC §7)."""

from __future__ import annotations

import torch


def tiny_unet(seed: int = 0, cross_attention_dim: int = 32, sample_size: int = 8, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = dict(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64), norm_num_groups=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()
