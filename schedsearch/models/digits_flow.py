"""The built-in ``digits-flow`` testbed: the digits testbed's UNet and data, trained by flow
matching instead of ε-prediction (see docs/flow.md and docs/digits.md).

Same network (a diffusers ``UNet2DConditionModel``, one class token, index 10 the null class of
classifier-free guidance), same 8×8 pixel space in [-1, 1], same classifier and FID feature space;
only the objective differs: the UNet predicts v = ε − x0 at x_t = (1−t)·x0 + t·ε and is fed the
timestep 1000·t, as diffusers' SD3 transformer is. Its noise table is plain rectified flow
(``noise.FLOW``, shift 1), so its σ lists start at ∞.

The weights ship with the package (``weights/``); ``python -m schedsearch.models.digits_flow_train``
regenerates them. Only safetensors files are read.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..noise import FLOW, FlowTable
from . import digits as D
from .flow import flow_denoised, flow_input, guided
from .unet import Conditioning

UNET_FILE = "digits_flow_unet.safetensors"
CONFIG_FILE = "digits_flow.json"
TRAIN_COMMAND = "python -m schedsearch.models.digits_flow_train"
_TESTBED = D._Testbed("digits-flow", CONFIG_FILE, UNET_FILE, TRAIN_COMMAND, per_part=False)


def flow_unet_denoise(unet, table: FlowTable, x: torch.Tensor, sigma, cond: Conditioning,
                      guidance: float) -> torch.Tensor:
    """D(y; σ) of a v-predicting UNet fed x_t and N·t, with CFG as one [uncond; cond] call."""
    x_t, t = flow_input(x, sigma)
    steps = t * table.num_train_timesteps
    g = guidance != 1.0
    states, _ = cond.for_call(g)
    x_in = x_t.to(unet.dtype)
    if g:
        x_in, steps, x_t, t = (torch.cat([a, a]) for a in (x_in, steps, x_t, t))
    v = unet(x_in, steps, encoder_hidden_states=states, return_dict=False)[0].float()
    d = flow_denoised(x_t, t, v)
    return guided(d, guidance) if g else d


class DigitsFlowModel(D.DigitsModel):
    """The ``digits-flow`` testbed as a denoiser (the Model protocol of ``schedsearch.models``):
    the digits model with a flow table and a v-predicting UNet."""

    name = "digits-flow"
    family = "digits-flow"
    table = FLOW
    _unet_denoise = staticmethod(flow_unet_denoise)


def load_digits_flow(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     weights_dir: Path | str | None = None) -> DigitsFlowModel:
    """The shipped digits-flow testbed (or the one trained into ``weights_dir``)."""
    weights_dir = Path(weights_dir) if weights_dir is not None else D.WEIGHTS_DIR
    unet, labels, digest = D._load_unet(weights_dir, _TESTBED)
    return DigitsFlowModel(unet, labels, digest, torch.device(device), dtype)
