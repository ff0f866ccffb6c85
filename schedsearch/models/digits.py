"""The built-in ``digits`` testbed: a class-conditional diffusion model with the Stable Diffusion
UNet architecture, trained on scikit-learn's 8×8 digits, and a small classifier whose penultimate
features are this testbed's FID feature space.

The UNet is a diffusers ``UNet2DConditionModel`` fed the class as a one-token
``encoder_hidden_states`` (a learned embedding; index 10 is the null class of classifier-free
guidance), trained with ε-prediction on the SD noise table, so every SD schedule, solver and FreeU
plan applies to it unchanged. There is no VAE: it works in pixel space, values in [-1, 1].

The weights ship with the package (``weights/``); ``python -m schedsearch.models.digits_train``
regenerates them. Only safetensors files are read.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from ..noise import SD
from .unet import Conditioning, unet_denoise

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
UNET_FILE = "digits_unet.safetensors"
CLASSIFIER_FILE = "digits_classifier.safetensors"
CONFIG_FILE = "digits.json"

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the label-embedding row that stands for "no class" (CFG's uncond)
SPLIT_SEED = 0
HELDOUT_FRACTION = 0.2

# Two distinct widths give FreeU its two stages (b1/s1 on the 64-channel, b2/s2 on the 32-channel
# up-block); cross-attention on the 4×4 level is where the class token enters. Kept small because
# the search samples thousands of images: one CFG call on 256 images takes about 0.26 s on two CPU
# cores (docs/digits.md).
UNET_CONFIG = dict(
    sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
    block_out_channels=[32, 64], norm_num_groups=16,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    cross_attention_dim=64, attention_head_dim=16,  # diffusers reads this as the number of heads
)
CLASSIFIER_CONFIG = dict(width=32, feature_channels=32)

TRAIN_COMMAND = "python -m schedsearch.models.digits_train"


class WeightsError(RuntimeError):
    """The testbed's weight files are missing, corrupt or do not match their config."""


# -- data -------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sklearn_digits  # scikit-learn: heavy

    bunch = sklearn_digits()
    return bunch.images.astype(np.float64), bunch.target.astype(np.int64)


@lru_cache(maxsize=4)
def split_indices(seed: int = SPLIT_SEED, heldout_fraction: float = HELDOUT_FRACTION
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices into the 1,797 digits: per class, a seeded permutation whose
    first round(fraction · n_class) entries are held out. Our own code rather than sklearn's
    splitter, so the split cannot move with the sklearn version."""
    _, labels = _all_digits()
    rng = np.random.default_rng(seed)
    train, heldout = [], []
    for c in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(heldout_fraction * len(members)))
        heldout.append(members[:k])
        train.append(members[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(heldout))


def split_fingerprint(seed: int = SPLIT_SEED, heldout_fraction: float = HELDOUT_FRACTION) -> str:
    train, heldout = split_indices(seed, heldout_fraction)
    h = hashlib.sha256(train.tobytes() + b"|" + heldout.tobytes())
    return h.hexdigest()[:16]


def digits_data(split: str, seed: int = SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 8, 8) float32 in [-1, 1] (pixel value v in 0..16 → v/8 − 1) and int64
    labels of the ``"train"`` or ``"heldout"`` split."""
    train, heldout = split_indices(seed)
    if split == "train":
        rows = train
    elif split == "heldout":
        rows = heldout
    else:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    images, labels = _all_digits()
    x = torch.from_numpy(images[rows] / 8.0 - 1.0).float().unsqueeze(1)
    return x, torch.from_numpy(labels[rows].copy())


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1], clamped: the testbed's "decoder" and the classifier's input range."""
    return ((images.float() + 1) / 2).clamp(0, 1)


# -- networks ---------------------------------------------------------------------------------------
def build_unet(config: Optional[dict] = None):
    from diffusers import UNet2DConditionModel  # diffusers: heavy

    return UNet2DConditionModel(**(config or UNET_CONFIG))


def build_label_embedding(cross_attention_dim: int) -> nn.Embedding:
    return nn.Embedding(NUM_CLASSES + 1, cross_attention_dim)


class DigitsCNN(nn.Module):
    """Three 3×3 conv layers, 8×8 → 2×2, then one linear layer to the 10 logits.

    The penultimate layer, the FID feature space, is the flattened last conv map
    (``feature_channels`` × 2 × 2), as Inception's pool features are the conv output under a linear
    head. A hidden fully connected layer there would encode little but class confidence: guidance
    sharpens exactly that, and the Fréchet distance then measured the guidance scale more than the
    samples' quality.
    """

    def __init__(self, width: int = 32, feature_channels: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, feature_channels, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_channels * 4, NUM_CLASSES)

    def features(self, x01: torch.Tensor) -> torch.Tensor:
        # centred input: the network sees [-1, 1] whatever range the caller works in
        return self.body(x01 * 2 - 1)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x01)))


# -- weight files -----------------------------------------------------------------------------------
def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class _Testbed:
    """Where a testbed's weights are described and how to regenerate them: digits and digits-flow
    share the loading code and differ only in these."""
    name: str
    config_file: str
    unet_file: str
    train_command: str
    per_part: bool  # whether the training script takes --what unet|classifier|all

    def hint(self, what: str, weights_dir: Path) -> str:
        part = f" --what {what}" if self.per_part else ""
        out = "" if weights_dir == WEIGHTS_DIR else f" --out {shlex.quote(str(weights_dir))}"
        return f"regenerate them with `{self.train_command}{part}{out}`"


_DIGITS = _Testbed("digits", CONFIG_FILE, UNET_FILE, TRAIN_COMMAND, per_part=True)


def read_config(weights_dir: Path | str | None = None, *, testbed: _Testbed = _DIGITS) -> dict:
    weights_dir = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    path = weights_dir / testbed.config_file
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise WeightsError(f"the {testbed.name} testbed config {path} is missing; "
                           f"{testbed.hint('all', weights_dir)}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"the {testbed.name} testbed config {path} is unreadable ({exc}); "
                           f"{testbed.hint('all', weights_dir)}") from None


def _load_state(weights_dir: Path, section: str, filename: str,
                testbed: _Testbed = _DIGITS) -> tuple[dict, dict, str]:
    """(tensors, config section, sha256) of one weight file, checked against the config's hash."""
    what = "unet" if section == "unet" else "classifier"
    config = read_config(weights_dir, testbed=testbed)
    if section not in config:
        raise WeightsError(f"{weights_dir / testbed.config_file} has no '{section}' entry; "
                           f"{testbed.hint(what, weights_dir)}")
    path = weights_dir / filename
    if not path.is_file():
        raise WeightsError(f"the {testbed.name} testbed weights {path} are missing; "
                           f"{testbed.hint(what, weights_dir)}")
    digest = _file_sha256(path)
    expected = config[section].get("sha256")
    if expected is not None and digest != expected:
        raise WeightsError(f"{path} does not match the sha256 recorded in {testbed.config_file} "
                           f"(corrupt or replaced); {testbed.hint(what, weights_dir)}")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for truncated/garbled files
        raise WeightsError(f"cannot read {path} ({exc}); "
                           f"{testbed.hint(what, weights_dir)}") from None
    return tensors, config[section], digest


def _split_prefix(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _load_into(module: nn.Module, state: dict, path: Path, what: str,
               testbed: _Testbed = _DIGITS) -> None:
    try:
        module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path} does not fit the architecture in {testbed.config_file} "
                           f"({exc}); {testbed.hint(what, path.parent)}") from None


def _load_unet(weights_dir: Path, testbed: _Testbed) -> tuple:
    """(UNet, label embedding, sha256) of a testbed's UNet file."""
    tensors, section, digest = _load_state(weights_dir, "unet", testbed.unet_file, testbed)
    unet = build_unet(section["architecture"])
    labels = build_label_embedding(unet.config.cross_attention_dim)
    path = weights_dir / testbed.unet_file
    _load_into(unet, _split_prefix(tensors, "unet."), path, "unet", testbed)
    _load_into(labels, _split_prefix(tensors, "labels."), path, "unet", testbed)
    return unet, labels, digest


# -- the model --------------------------------------------------------------------------------------
# CPU kernels pick their algorithm by batch size: at batch 1 PyTorch runs convolutions natively
# rather than through oneDNN, 1×1 convolutions on one thread switch to oneDNN only from batch 16,
# and a linear layer on fewer than 8 rows (the time embedding, the one-token class projections)
# takes a GEMV/small-GEMM path. Each regime rounds differently, so an image sampled alone would not
# match the same image sampled in a batch. From 16 rows on every layer stays in one regime, so
# smaller batches are padded to 16 rows (tests/test_digits.py checks an image sampled alone against
# batches of 8, 17 and 256, bitwise).
MIN_BATCH = 16


def _pad_batch(x: torch.Tensor, sigma, cond: Conditioning, rows: int):
    """Repeat the first image (its σ and conditioning) until the batch has ``rows`` rows."""
    extra = rows - x.shape[0]

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t[:1].expand(extra, *t.shape[1:])])

    if isinstance(sigma, torch.Tensor) and sigma.numel() > 1:
        sigma = pad(sigma.reshape(-1))
    return pad(x), sigma, Conditioning(cond=pad(cond.cond), uncond=pad(cond.uncond))


class DigitsModel:
    """The ``digits`` testbed as a denoiser (the Model protocol of ``schedsearch.models``)."""

    name = "digits"
    family = "digits"
    table = SD
    latent_shape = (1, 8, 8)
    # D(y; σ) from the UNet's output: ε-prediction here, v-prediction in digits-flow
    _unet_denoise = staticmethod(unet_denoise)

    def __init__(self, unet, labels: nn.Embedding, digest: str, device: torch.device,
                 dtype: torch.dtype):
        unet = unet.to(device)
        if dtype != torch.float32:  # diffusers warns on any dtype cast, even a no-op one
            unet = unet.to(dtype)
        self.unet = unet.eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype
        self._embeddings = labels.weight.detach().to(device, dtype)  # (11, C), one row per label
        self._digest = digest

    def fingerprint(self) -> str:
        return f"{self.name}-{self._digest[:16]}"

    def describe(self) -> dict:
        return {"name": self.name, "family": self.family, "fingerprint": self.fingerprint(),
                "device": str(self.device), "dtype": str(self.dtype),
                "latent_shape": list(self.latent_shape), "noise_table": self.table.fingerprint()}

    @staticmethod
    def label_of(prompt) -> int:
        """A class label 0..9 from an int or a digit string; '' or None is the null class."""
        if prompt is None or (isinstance(prompt, str) and prompt.strip() == ""):
            return NULL_CLASS
        if isinstance(prompt, str) and prompt.strip().isdigit():
            prompt = int(prompt.strip())
        if isinstance(prompt, (int, np.integer)) and not isinstance(prompt, bool) \
                and 0 <= prompt < NUM_CLASSES:
            return int(prompt)
        raise ValueError(f"the digits testbed takes class labels 0..9 as prompts (an int or a digit "
                         f"string; '' or None for unconditional), got {prompt!r}")

    def condition(self, prompts: Sequence) -> Conditioning:
        ids = torch.tensor([self.label_of(p) for p in prompts], dtype=torch.long,
                           device=self.device)
        cond = self._embeddings[ids].unsqueeze(1)
        uncond = self._embeddings[NULL_CLASS].expand_as(cond)
        return Conditioning(cond=cond, uncond=uncond)

    def denoise(self, x: torch.Tensor, sigma, cond: Conditioning, guidance: float) -> torch.Tensor:
        b = x.shape[0]
        if b >= MIN_BATCH:
            return self._unet_denoise(self.unet, self.table, x, sigma, cond, guidance)
        x, sigma, cond = _pad_batch(x, sigma, cond, MIN_BATCH)
        return self._unet_denoise(self.unet, self.table, x, sigma, cond, guidance)[:b]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return to_unit(latents)


def load_digits(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                weights_dir: Path | str | None = None) -> DigitsModel:
    """The shipped testbed (or the one trained into ``weights_dir``)."""
    weights_dir = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    unet, labels, digest = _load_unet(weights_dir, _DIGITS)
    return DigitsModel(unet, labels, digest, torch.device(device), dtype)


# -- the classifier ---------------------------------------------------------------------------------
class DigitsClassifier:
    """Recognises generated digits and embeds them in the testbed's FID feature space."""

    def __init__(self, net: DigitsCNN, digest: str, device: torch.device):
        self.net = net.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.dim = net.head.in_features
        self._digest = digest

    def fingerprint(self) -> str:
        return f"digits-classifier-{self._digest[:16]}"

    def _input(self, images01: torch.Tensor) -> torch.Tensor:
        if images01.ndim != 4 or tuple(images01.shape[1:]) != (1, 8, 8):
            raise ValueError(f"the digits classifier takes (N, 1, 8, 8) images in [0, 1], "
                             f"got shape {tuple(images01.shape)}")
        return images01.to(self.device, torch.float32)

    @torch.no_grad()
    def features(self, images01: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
        """Penultimate-layer features (N, D), float32 on the CPU."""
        x = self._input(images01)
        return torch.cat([self.net.features(x[i:i + batch_size]).float().cpu()
                          for i in range(0, len(x), batch_size)])

    @torch.no_grad()
    def logits(self, images01: torch.Tensor) -> torch.Tensor:
        return self.net(self._input(images01)).float().cpu()

    def predict(self, images01: torch.Tensor) -> torch.Tensor:
        return self.logits(images01).argmax(1)


def load_classifier(device: str | torch.device = "cpu",
                    weights_dir: Path | str | None = None) -> DigitsClassifier:
    weights_dir = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    tensors, section, digest = _load_state(weights_dir, "classifier", CLASSIFIER_FILE)
    net = DigitsCNN(**section["architecture"])
    _load_into(net, tensors, weights_dir / CLASSIFIER_FILE, "classifier")
    return DigitsClassifier(net, digest, torch.device(device))
