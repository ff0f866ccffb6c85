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

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..noise import FLOW, FlowTable
from . import digits as D
from .flow import flow_denoised, flow_input, guided
from .unet import Conditioning

UNET_FILE = "digits_flow_unet.safetensors"
CONFIG_FILE = "digits_flow.json"
TRAIN_COMMAND = "python -m schedsearch.models.digits_flow_train"


def _hint(weights_dir: Path) -> str:
    out = "" if weights_dir == D.WEIGHTS_DIR else f" --out {weights_dir}"
    return f"regenerate them with `{TRAIN_COMMAND}{out}`"


def read_config(weights_dir: Path | str | None = None) -> dict:
    weights_dir = Path(weights_dir) if weights_dir is not None else D.WEIGHTS_DIR
    path = weights_dir / CONFIG_FILE
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise D.WeightsError(f"the digits-flow testbed config {path} is missing; "
                             f"{_hint(weights_dir)}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise D.WeightsError(f"the digits-flow testbed config {path} is unreadable ({exc}); "
                             f"{_hint(weights_dir)}") from None


def _load_state(weights_dir: Path) -> tuple[dict, dict, str]:
    from safetensors.torch import load_file

    section = read_config(weights_dir).get("unet")
    path = weights_dir / UNET_FILE
    if section is None:
        raise D.WeightsError(f"{weights_dir / CONFIG_FILE} has no 'unet' entry; "
                             f"{_hint(weights_dir)}")
    if not path.is_file():
        raise D.WeightsError(f"the digits-flow testbed weights {path} are missing; "
                             f"{_hint(weights_dir)}")
    digest = D._file_sha256(path)
    if section.get("sha256") not in (None, digest):
        raise D.WeightsError(f"{path} does not match the sha256 recorded in {CONFIG_FILE} (corrupt "
                             f"or replaced); {_hint(weights_dir)}")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for truncated files
        raise D.WeightsError(f"cannot read {path} ({exc}); {_hint(weights_dir)}") from None
    return tensors, section, digest


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


class DigitsFlowModel:
    """The ``digits-flow`` testbed as a denoiser (the Model protocol of ``schedsearch.models``)."""

    name = "digits-flow"
    family = "digits-flow"
    table = FLOW
    latent_shape = (1, 8, 8)

    def __init__(self, unet, labels: nn.Embedding, digest: str, device: torch.device,
                 dtype: torch.dtype):
        unet = unet.to(device)
        if dtype != torch.float32:  # diffusers warns on any dtype cast, even a no-op one
            unet = unet.to(dtype)
        self.unet = unet.eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype
        self._embeddings = labels.weight.detach().to(device, dtype)
        self._digest = digest

    def fingerprint(self) -> str:
        return f"digits-flow-{self._digest[:16]}"

    def describe(self) -> dict:
        return {"name": self.name, "family": self.family, "fingerprint": self.fingerprint(),
                "device": str(self.device), "dtype": str(self.dtype),
                "latent_shape": list(self.latent_shape), "noise_table": self.table.fingerprint()}

    def condition(self, prompts: Sequence) -> Conditioning:
        ids = torch.tensor([D.DigitsModel.label_of(p) for p in prompts], dtype=torch.long,
                           device=self.device)
        cond = self._embeddings[ids].unsqueeze(1)
        return Conditioning(cond=cond, uncond=self._embeddings[D.NULL_CLASS].expand_as(cond))

    def denoise(self, x: torch.Tensor, sigma, cond: Conditioning, guidance: float) -> torch.Tensor:
        b = x.shape[0]
        if b >= D.MIN_BATCH:  # small batches padded for batch invariance, as in digits
            return flow_unet_denoise(self.unet, self.table, x, sigma, cond, guidance)
        x, sigma, cond = D._pad_batch(x, sigma, cond, D.MIN_BATCH)
        return flow_unet_denoise(self.unet, self.table, x, sigma, cond, guidance)[:b]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        # pixel space: y at σ = 0 is the image itself; a leftover σ > 0 is left in, as for digits
        return D.to_unit(latents)


def load_digits_flow(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     weights_dir: Path | str | None = None) -> DigitsFlowModel:
    """The shipped digits-flow testbed (or the one trained into ``weights_dir``)."""
    weights_dir = Path(weights_dir) if weights_dir is not None else D.WEIGHTS_DIR
    tensors, section, digest = _load_state(weights_dir)
    unet = D.build_unet(section["architecture"])
    labels = D.build_label_embedding(unet.config.cross_attention_dim)
    for module, prefix in ((unet, "unet."), (labels, "labels.")):
        state = {k: v.float() for k, v in D._split_prefix(tensors, prefix).items()}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise D.WeightsError(f"{weights_dir / UNET_FILE} does not fit the architecture in "
                                 f"{CONFIG_FILE} ({exc}); {_hint(weights_dir)}") from None
    return DigitsFlowModel(unet, labels, digest, torch.device(device), dtype)
