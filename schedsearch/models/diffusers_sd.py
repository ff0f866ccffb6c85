"""Stable Diffusion (SD1.x, SD2.x, SDXL) through diffusers, as a denoiser D(x; σ)
(see docs/conventions.md).

A model spec is a local diffusers folder, a hub id (read from the local Hugging Face cache when
offline), or a single ``.safetensors`` checkpoint (``from_single_file``; offline it needs a local
diffusers folder of the same architecture for its configs: ``config=FOLDER``). Only safetensors are
read: pickled checkpoints (.ckpt, .bin, .pt) can run code when loaded and are refused.

Reproducibility: an image depends on its own prompt and seed only, never on the batch it is sampled
in. CPU convolution and small-matrix kernels pick their algorithm by the batch size, so the same
image computed alone and inside a batch of 8 differs in the last bits (~1e-6 per UNet call here).
The backend therefore never lets the batch size reach a kernel: the UNet always sees exactly
``eval_batch`` images (the last chunk of a batch is padded with copies of its last row, which are
thrown away), prompts are encoded one at a time, and the VAE decodes one image at a time. With a
fixed shape, a row's result does not depend on its position or its neighbours (checked bitwise in
the tests). ``eval_batch`` defaults to 1 on CPU (no padding; at SD's 64×64 latent size a
320-channel convolution or linear layer costs the same per image at 2 rows as at 16) and to 8 on
CUDA, 4 above 768² (small batches leave a GPU idle, so padding a lone image costs little time,
while larger batches stay efficient).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from safetensors import safe_open

from ..noise import NoiseTable
from ..solvers import NonFiniteError
from .diffusers_load import (  # noqa: F401  (the loading helpers live there, shared with SD3/FLUX)
    _HUB_ID, PICKLE_SUFFIXES, _check_safetensors_file, _extra_components, _header_checkpoint,
    _load_vae, _offline, _pipeline_class, _read_model_index, _wrap_load_error, check_eval_batch,
    load_pipeline, weights_digest)
from .unet import Conditioning, unet_denoise

SUPPORTED = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


# -- the model ------------------------------------------------------------------------------------

@dataclass
class _Embedding:
    states: torch.Tensor                 # (1, L, C) encoder hidden states, stored on the CPU
    pooled: Optional[torch.Tensor]       # (1, P) SDXL pooled text embeds, else None


class _ChunkedConditioning(Conditioning):
    """Conditioning that hands out fixed-size row chunks (padded with the last row), built once
    per batch and reused at every step."""

    def rows(self, idx: tuple) -> Conditioning:
        cache = self.__dict__.setdefault("_row_cache", {})
        if idx not in cache:
            sel = torch.tensor(idx, device=self.cond.device)
            pick = (lambda d: None if d is None else {k: v[sel] for k, v in d.items()})
            cache[idx] = Conditioning(self.cond[sel], self.uncond[sel], pick(self.added),
                                      pick(self.uncond_added))
        return cache[idx]


class StableDiffusion:
    """The Model protocol (see ``schedsearch.models``) over a diffusers SD / SDXL pipeline."""

    def __init__(self, pipe, *, name: str, family: str, height: int, width: int,
                 device: torch.device, dtype: torch.dtype, eval_batch: int,
                 prediction_type: Optional[str] = None, source: str = "",
                 native_size: Optional[tuple[int, int]] = None):
        self.pipe = pipe
        # the resolution with no --height/--width (a resumed study compares the two as one)
        self.native_size = native_size or (height, width)
        self.unet, self.vae = pipe.unet, pipe.vae
        self.is_xl = hasattr(pipe, "text_encoder_2")
        self.name, self.family, self.source = name, family, source
        self.device, self.dtype = torch.device(device), dtype
        cfg = dict(pipe.scheduler.config)
        if prediction_type is not None:
            cfg["prediction_type"] = prediction_type
        self.table = NoiseTable.from_config(cfg)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        for side, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % self.vae_scale:
                raise ValueError(f"{side} must be a positive multiple of {self.vae_scale} (the "
                                 f"VAE's downscaling factor), got {v!r}")
        self.height, self.width = height, width
        self.latent_shape = (self.unet.config.in_channels, height // self.vae_scale,
                             width // self.vae_scale)
        self.eval_batch = check_eval_batch(eval_batch)
        self._prompts: dict[str, _Embedding] = {}
        self._uncond: Optional[_Embedding] = None
        self._fingerprint: Optional[str] = None
        self.text_encoder_calls = 0      # prompt encodings (cache misses), for tests and logs

    def __repr__(self) -> str:
        return (f"StableDiffusion({self.name!r}, family={self.family}, {self.height}x{self.width}, "
                f"{self.table.prediction_type}, {self.dtype}, {self.device})")

    # -- identity ---------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """A digest of the loaded weights (names, shapes, dtypes and 64 values spread over every
        tensor of every component), the noise table and the resolution. Independent of where the
        files were loaded from; changes with fine-tunes, merges, a swapped VAE and the dtype."""
        if self._fingerprint is None:
            head = f"{self.table.fingerprint()}|{self.height}x{self.width}"
            digest = weights_digest(self.pipe, ("unet", "vae", "text_encoder", "text_encoder_2"), head)
            self._fingerprint = f"{self.name}-{digest}"
        return self._fingerprint

    def describe(self) -> dict:
        """JSON-able facts for provenance."""
        return {"name": self.name, "family": self.family, "source": self.source,
                "fingerprint": self.fingerprint(), "height": self.height, "width": self.width,
                "prediction_type": self.table.prediction_type, "dtype": str(self.dtype),
                "vae_dtype": str(self.vae.dtype), "device": str(self.device),
                "eval_batch": self.eval_batch}

    # -- conditioning -----------------------------------------------------------------------------
    @staticmethod
    def _text(prompt) -> str:
        if prompt is None:
            return ""
        if not isinstance(prompt, str):
            raise ValueError(f"the Stable Diffusion backend takes text prompts, got {prompt!r} "
                             f"(class labels are for the digits and gmm testbeds)")
        return prompt

    @torch.no_grad()
    def _encode(self, text: str) -> _Embedding:
        # One prompt per text-encoder call: an embedding must not depend on which prompts
        # happened to share its first batch, since it is cached and reused everywhere after.
        self.text_encoder_calls += 1
        if self.is_xl:
            states, _, pooled, _ = self.pipe.encode_prompt(
                text, device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=False)
            return _Embedding(states.cpu(), pooled.cpu())
        states, _ = self.pipe.encode_prompt(text, self.device, 1, False)
        return _Embedding(states.cpu(), None)

    def _uncond_embedding(self, ref: _Embedding) -> _Embedding:
        if self._uncond is None:
            if self.is_xl and self.pipe.config.get("force_zeros_for_empty_prompt", False):
                # what SDXL was trained with for the unconditional branch (its pipeline does so too)
                self._uncond = _Embedding(torch.zeros_like(ref.states),
                                          torch.zeros_like(ref.pooled))
            else:
                self._uncond = self._prompts.get("") or self._encode("")
                self._prompts.setdefault("", self._uncond)
        return self._uncond

    def condition(self, prompts: Sequence) -> Conditioning:
        """Encoder states for a batch (embeddings are computed once per distinct prompt, kept on
        the CPU — 10k SDXL prompts are ~3 GB in fp16, which a GPU should not hold — and moved to
        the device per batch)."""
        texts = [self._text(p) for p in prompts]
        if not texts:
            raise ValueError("no prompts to condition on")
        for t in texts:
            if t not in self._prompts:
                self._prompts[t] = self._encode(t)
        un = self._uncond_embedding(self._prompts[texts[0]])
        dev, dt = self.device, self.unet.dtype
        cond = torch.cat([self._prompts[t].states for t in texts]).to(dev, dt)
        uncond = un.states.expand(len(texts), -1, -1).to(dev, dt)
        added = uncond_added = None
        if self.is_xl:
            # SDXL micro-conditioning: original size, crop (0, 0), target size — the real resolution
            ids = torch.tensor([[self.height, self.width, 0, 0, self.height, self.width]],
                               dtype=dt, device=dev).expand(len(texts), -1)
            added = {"text_embeds": torch.cat([self._prompts[t].pooled for t in texts]).to(dev, dt),
                     "time_ids": ids}
            uncond_added = {"text_embeds": un.pooled.expand(len(texts), -1).to(dev, dt),
                            "time_ids": ids}
        return _ChunkedConditioning(cond, uncond, added, uncond_added)

    # -- the denoiser -----------------------------------------------------------------------------
    def denoise(self, x: torch.Tensor, sigma, cond: Conditioning, guidance: float) -> torch.Tensor:
        """D(x; σ) with CFG as one batched UNet call per chunk of ``eval_batch`` images."""
        b, k = x.shape[0], self.eval_batch
        if k == 0 or b == k:
            return unet_denoise(self.unet, self.table, x, sigma, cond, guidance)
        sig = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        sig = sig.expand(b) if sig.numel() == 1 else sig
        if not isinstance(cond, _ChunkedConditioning):
            cond = _ChunkedConditioning(cond.cond, cond.uncond, cond.added, cond.uncond_added)
        out = []
        for start in range(0, b, k):
            n = min(k, b - start)
            idx = tuple(range(start, start + n)) + (start + n - 1,) * (k - n)
            sel = torch.tensor(idx, device=x.device)
            d = unet_denoise(self.unet, self.table, x[sel], sig[sel], cond.rows(idx), guidance)
            out.append(d[:n])
        return torch.cat(out)

    # -- decoding ---------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode to float images in [0, 1], (N, 3, H, W), one image per VAE call (a fixed
        shape keeps images batch-independent, and bounds memory at 1024²)."""
        vae, cfg = self.vae, self.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        shift = getattr(cfg, "shift_factor", None)
        out = []
        for i in range(latents.shape[0]):
            z = latents[i:i + 1].to(self.device, torch.float32)
            if mean is not None and std is not None:
                c = z.shape[1]
                z = z * torch.tensor(std, device=z.device).view(1, c, 1, 1) / cfg.scaling_factor \
                    + torch.tensor(mean, device=z.device).view(1, c, 1, 1)
            else:
                z = z / cfg.scaling_factor
                if shift is not None:
                    z = z + shift
            img = vae.decode(z.to(vae.dtype), return_dict=False)[0].float()
            if not bool(torch.isfinite(img).all()):
                raise NonFiniteError(
                    f"the VAE produced non-finite pixels (VAE in {vae.dtype}); an fp16 VAE that "
                    f"overflows needs fp32 (--dtype fp32) or an fp16-fix VAE (vae=FOLDER)")
            out.append((img / 2 + 0.5).clamp(0, 1))
        return torch.cat(out)


# -- loading --------------------------------------------------------------------------------------

def _checkpoint_kind(path: str) -> str:
    """'sdxl' or 'sd' from the checkpoint's key names (read from the header, no weights loaded)."""
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "sd"
    raise ValueError(f"{path}: not a Stable Diffusion checkpoint (no model.diffusion_model.* UNet "
                     f"weights); a file holding only a UNet, a VAE or a LoRA cannot be sampled "
                     f"alone")


def _from_single_file(path: str, dtype, vae, config, local_only: bool):
    import diffusers  # heavy: only when an SD model is loaded

    _check_safetensors_file(path)
    if config is not None:
        if not os.path.isdir(config):
            raise FileNotFoundError(f"config={config!r} is not a folder; give the diffusers folder "
                                    f"(model_index.json, unet/config.json, ...) of the same "
                                    f"architecture as the checkpoint")
        cls = _pipeline_class(_read_model_index(config).get("_class_name", ""), config, SUPPORTED)
    else:
        kind = _checkpoint_kind(path)
        cls = diffusers.StableDiffusionXLPipeline if kind == "sdxl" else \
            diffusers.StableDiffusionPipeline
        from diffusers.loaders.single_file import (  # diffusers: heavy
            _download_diffusers_model_config_from_hub)
        from diffusers.loaders.single_file_utils import fetch_diffusers_config

        repo = fetch_diffusers_config(_header_checkpoint(path))["pretrained_model_name_or_path"]
        # diffusers would fall back to downloading these configs (even with local_files_only),
        # so look in the cache ourselves and stop with advice when they are not there.
        try:
            config = _download_diffusers_model_config_from_hub(repo, None, None, None,
                                                               local_files_only=True)
        except (OSError, ValueError):
            if local_only:
                raise FileNotFoundError(
                    f"{path}: a single-file checkpoint carries weights but no configs, and offline "
                    f"they cannot be fetched. Pass config=FOLDER (CLI: --model-config FOLDER): a "
                    f"diffusers folder of the same architecture, e.g. {repo} — on a machine with "
                    f"internet `hf download {repo} --include '*.json' --include '*.txt'` "
                    f"fetches only its configs and tokenizer — or set HF_HOME to a cache that "
                    f"holds them") from None
            config = repo
    try:
        return cls.from_single_file(path, config=config, dtype=dtype,
                                    local_files_only=local_only or os.path.isdir(config),
                                    **_extra_components(cls, vae))
    except Exception as exc:  # safetensors, transformers and diffusers each raise their own types
        raise _wrap_load_error(f"{path} with config {config}", exc) from exc


def _family(pipe) -> str:
    if hasattr(pipe, "text_encoder_2"):
        return "sdxl"
    # SD2.x: OpenCLIP ViT-H text states, 1024 wide (SD1.x: CLIP ViT-L, 768)
    return "sd2" if pipe.unet.config.cross_attention_dim == 1024 else "sd15"


def load_stable_diffusion(spec: str, device: torch.device, dtype: torch.dtype, *,
                          height: Optional[int] = None, width: Optional[int] = None,
                          config: Optional[str] = None, vae=None, family: Optional[str] = None,
                          prediction_type: Optional[str] = None,
                          eval_batch: Optional[int] = None, variant: Optional[str] = None,
                          revision: Optional[str] = None,
                          local_files_only: Optional[bool] = None) -> StableDiffusion:
    """Load an SD1.x / SD2.x / SDXL model; see the module docstring for ``spec``.

    ``height``/``width``: the resolution (default: the UNet's sample_size × the VAE factor, e.g.
    512 for SD1.5, 768 for SD2.x-768, 1024 for SDXL). ``config``: a diffusers folder giving the
    configs of a single-file checkpoint. ``vae``: a replacement VAE (folder or hub id), e.g. an
    fp16-fix SDXL VAE. ``prediction_type``: override the scheduler's (a v-prediction single file
    loaded with an epsilon config). ``eval_batch``: images per UNet call (see module docstring).
    ``variant``: weight file variant such as "fp16" when only those files were downloaded.
    """
    device = torch.device(device)
    local_only = _offline() if local_files_only is None else bool(local_files_only)
    if family is not None and family not in ("sd15", "sd2", "sdxl"):
        raise ValueError(f"family must be sd15, sd2 or sdxl, got {family!r}")
    if prediction_type is not None and prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be epsilon or v_prediction, "
                         f"got {prediction_type!r}")
    spec = os.path.expanduser(str(spec))
    vae_model = _load_vae(vae, dtype, local_only)
    pipe, source, name = load_pipeline(
        spec, dtype=dtype, vae=vae_model, variant=variant, revision=revision,
        local_only=local_only, supported=SUPPORTED,
        single_file=lambda path: _from_single_file(path, dtype, vae_model, config, local_only))
    return _prepare(pipe, name=name, source=source, device=device, dtype=dtype, height=height,
                    width=width, eval_batch=eval_batch, family=family,
                    prediction_type=prediction_type, what=spec)


def from_pipeline(pipe, *, device=None, dtype: Optional[torch.dtype] = None,
                  height: Optional[int] = None, width: Optional[int] = None,
                  eval_batch: Optional[int] = None, family: Optional[str] = None,
                  prediction_type: Optional[str] = None, name: Optional[str] = None
                  ) -> "StableDiffusion":
    """Wrap a diffusers pipeline you already loaded (``StableDiffusionPipeline`` or
    ``StableDiffusionXLPipeline``) so presets and schedsearch's sampler run on it. The pipeline's
    own scheduler is only read for its noise table; its step() is never used."""
    if type(pipe).__name__ not in SUPPORTED:
        raise ValueError(f"{type(pipe).__name__} is not supported; use one of {', '.join(SUPPORTED)}")
    device = torch.device(device) if device is not None else pipe.unet.device
    dtype = dtype or pipe.unet.dtype
    name = name or getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path") or "pipeline"
    return _prepare(pipe, name=os.path.basename(str(name).rstrip("/")) or "pipeline",
                    source="pipeline", device=device, dtype=dtype, height=height, width=width,
                    eval_batch=eval_batch, family=family, prediction_type=prediction_type,
                    what=type(pipe).__name__)


def _prepare(pipe, *, name, source, device, dtype, height, width, eval_batch, family,
             prediction_type, what) -> "StableDiffusion":
    """Device, eval mode, the fp16 VAE fix and the resolution, for a loaded or handed-in pipeline."""
    if pipe.scheduler.config.get("rescale_betas_zero_snr", False):
        # zero terminal SNR puts σ_max at infinity: no finite σ list starts there
        raise ValueError(f"{what}: the scheduler rescales betas to zero terminal SNR "
                         f"(rescale_betas_zero_snr), which σ-space sampling cannot start from; "
                         f"such models are not supported")
    pipe.to(device)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.eval().requires_grad_(False)
    if dtype == torch.float16 and pipe.vae.dtype == torch.float16 \
            and pipe.vae.config.get("force_upcast", False):
        # The SDXL VAE overflows in fp16 (black or NaN images); its config says so. The whole VAE
        # goes to fp32 (diffusers warns about any cast; this one is deliberate).
        from diffusers.utils import logging as dlogging  # diffusers: heavy

        level = dlogging.get_verbosity()
        dlogging.set_verbosity_error()
        try:
            pipe.vae.to(torch.float32)
        finally:
            dlogging.set_verbosity(level)
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = pipe.unet.config.sample_size
    default_h, default_w = (size, size) if isinstance(size, int) else tuple(size)
    height = default_h * scale if height is None else height
    width = default_w * scale if width is None else width
    if eval_batch is None:
        # CUDA: 8 images (16 UNet rows with CFG) up to 768², 4 above (SDXL at 1024² has 4× the
        # activations per image), so the default fits the GPUs these models usually run on.
        big = isinstance(height, int) and isinstance(width, int) and height * width > 768 * 768
        eval_batch = (4 if big else 8) if device.type == "cuda" else 1
    return StableDiffusion(pipe, name=name, family=family or _family(pipe),
                           height=height, width=width, device=device, dtype=dtype,
                           eval_batch=eval_batch, prediction_type=prediction_type, source=source,
                           native_size=(default_h * scale, default_w * scale))
