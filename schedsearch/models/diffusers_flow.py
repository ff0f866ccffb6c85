"""Flow-matching text-to-image models through diffusers — SD3/SD3.5 (``StableDiffusion3Pipeline``,
MMDiT, three text encoders, CFG) and FLUX.1 (``FluxPipeline``, guidance-distilled: the guidance is
an input of the transformer, one call per NFE) — as a denoiser D(y; σ) (see docs/flow.md).

The solver state is the VE latent y = x_t/(1−t) at σ = t/(1−t); ``denoise`` feeds the transformer
x_t = y/(1+σ) at timestep 1000·t (at σ = ∞ the state is ε = x_t at t = 1) and returns
D = x_t − t·v. FLUX's packed 2×2 latent tokens are an internal layout: the state keeps the VAE's
(C, H/8, W/8) shape, packed and unpacked around each transformer call. There is no UNet, so FreeU
does not apply (``unet = None``).

Loading is the Stable Diffusion backend's (``diffusers_load``): a diffusers folder, a hub id (the
local cache when offline), or a single ``.safetensors`` file holding the transformer, whose other
components and configs come from ``config=FOLDER`` (or a hub id). Batch invariance as there: the
transformer always sees ``eval_batch`` images (padded), prompts are encoded one at a time, the VAE
decodes one image at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..noise import FlowTable
from ..solvers import NonFiniteError
from .diffusers_load import (_check_safetensors_file, _extra_components, _header_checkpoint,
                             _load_vae, _offline, _pipeline_class, _read_model_index,
                             _wrap_load_error, check_eval_batch, checkpoint_keys,
                             load_pipeline, pipeline_class_name, weights_digest)
from .flow import flow_denoised, flow_input, guided

FLOW_SUPPORTED = ("StableDiffusion3Pipeline", "FluxPipeline")
FAMILY = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
# What a pipeline folder must declare (text_encoder_3, SD3's T5, may be left out: null)
_NEEDED = {"StableDiffusion3Pipeline": ("transformer", "vae", "text_encoder", "text_encoder_2",
                                        "scheduler"),
           "FluxPipeline": ("transformer", "vae", "text_encoder", "text_encoder_2", "scheduler")}
_MAX_SEQUENCE = {"sd3": 256, "flux": 512}   # the pipelines' defaults for the T5 prompt length


# -- conditioning ---------------------------------------------------------------------------------

@dataclass
class FlowConditioning:
    """Per-image text conditioning: T5+CLIP states (B, L, C) and pooled CLIP embeddings (B, P);
    the unconditional pair for SD3's CFG (None for FLUX), FLUX's text position ids (L, 3)."""

    states: torch.Tensor
    pooled: torch.Tensor
    uncond_states: Optional[torch.Tensor] = None
    uncond_pooled: Optional[torch.Tensor] = None
    text_ids: Optional[torch.Tensor] = None
    _cache: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return self.states.shape[0]

    def rows(self, idx: tuple) -> "FlowConditioning":
        """A fixed-size chunk of rows (built once per batch, reused at every step)."""
        if idx not in self._cache:
            sel = torch.tensor(idx, device=self.states.device)
            pick = (lambda t: None if t is None else t[sel])
            self._cache[idx] = FlowConditioning(pick(self.states), pick(self.pooled),
                                                pick(self.uncond_states),
                                                pick(self.uncond_pooled), self.text_ids)
        return self._cache[idx]

    def for_call(self, guided_call: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not guided_call:
            return self.states, self.pooled
        key = "both"
        if key not in self._cache:
            self._cache[key] = (torch.cat([self.uncond_states, self.states]),
                                torch.cat([self.uncond_pooled, self.pooled]))
        return self._cache[key]


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → FLUX's (B, H/2·W/2, 4C) tokens (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of ``pack`` for a (C, h, w) latent."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


# -- the model ------------------------------------------------------------------------------------

class FlowDiffusion:
    """The Model protocol (see ``schedsearch.models``) over a diffusers SD3 or FLUX pipeline."""

    unet = None   # no UNet: FreeU does not apply

    def __init__(self, pipe, *, name: str, height: int, width: int, device: torch.device,
                 dtype: torch.dtype, eval_batch: int, source: str = "",
                 max_sequence_length: Optional[int] = None,
                 native_size: Optional[tuple[int, int]] = None):
        self.pipe, self.transformer, self.vae = pipe, pipe.transformer, pipe.vae
        # the resolution with no --height/--width (a resumed study compares the two as one)
        self.native_size = native_size or (height, width)
        self.family = FAMILY[type(pipe).__name__]
        self.name, self.source = name, source
        self.device, self.dtype = torch.device(device), dtype
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        cfg = self.transformer.config
        step = self.vae_scale * (2 if self.family == "flux" else cfg.patch_size)
        for side, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % step:
                raise ValueError(f"{side} must be a positive multiple of {step} (the VAE's "
                                 f"downscaling × the transformer's patch), got {v!r}")
        self.height, self.width = height, width
        h, w = height // self.vae_scale, width // self.vae_scale
        channels = cfg.in_channels // 4 if self.family == "flux" else cfg.in_channels
        self.latent_shape = (channels, h, w)
        tokens = (h // 2) * (w // 2) if self.family == "flux" else \
            (h // cfg.patch_size) * (w // cfg.patch_size)
        self.table = FlowTable.from_config(pipe.scheduler.config, image_seq_len=tokens,
                                           grid="flux" if self.family == "flux" else "scheduler")
        self.eval_batch = check_eval_batch(eval_batch)
        self.max_sequence_length = max_sequence_length or _MAX_SEQUENCE[self.family]
        self._prompts: dict[str, tuple] = {}
        self._img_ids = None
        self._fingerprint: Optional[str] = None
        self.text_encoder_calls = 0

    def __repr__(self) -> str:
        return (f"FlowDiffusion({self.name!r}, family={self.family}, {self.height}x{self.width}, "
                f"{self.table.name}, {self.dtype}, {self.device})")

    # -- identity ---------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """A digest of the loaded weights (names, shapes, dtypes and 64 values spread over every
        tensor of every component), the flow table and the resolution."""
        if self._fingerprint is None:
            head = f"{self.table.fingerprint()}|{self.height}x{self.width}"
            digest = weights_digest(self.pipe, ("transformer", "vae", "text_encoder", "text_encoder_2",
                                            "text_encoder_3"), head)
            self._fingerprint = f"{self.name}-{digest}"
        return self._fingerprint

    def describe(self) -> dict:
        return {"name": self.name, "family": self.family, "source": self.source,
                "fingerprint": self.fingerprint(), "height": self.height, "width": self.width,
                "prediction_type": "flow", "noise_table": self.table.fingerprint(),
                "shift": self.table.shift, "mu": self.table.mu,
                "guidance": "distilled" if self.family == "flux" else "cfg",
                "dtype": str(self.dtype), "vae_dtype": str(self.vae.dtype),
                "device": str(self.device), "eval_batch": self.eval_batch}

    # -- conditioning -----------------------------------------------------------------------------
    @torch.no_grad()
    def _encode(self, text: str) -> tuple:
        # one prompt per call: a cached embedding must not depend on its first batch's neighbours
        self.text_encoder_calls += 1
        if self.family == "flux":
            states, pooled, ids = self.pipe.encode_prompt(
                prompt=text, prompt_2=None, device=self.device, num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length)
            return states.cpu(), pooled.cpu(), ids.cpu()
        states, _, pooled, _ = self.pipe.encode_prompt(
            prompt=text, prompt_2=None, prompt_3=None, device=self.device,
            num_images_per_prompt=1, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return states.cpu(), pooled.cpu(), None

    def _embedding(self, text: str) -> tuple:
        if text not in self._prompts:
            self._prompts[text] = self._encode(text)
        return self._prompts[text]

    def condition(self, prompts: Sequence) -> FlowConditioning:
        texts = []
        for p in prompts:
            if p is not None and not isinstance(p, str):
                raise ValueError(f"the {self.family} backend takes text prompts, got {p!r} (class "
                                 f"labels are for the testbeds)")
            texts.append(p or "")
        if not texts:
            raise ValueError("no prompts to condition on")
        rows = [self._embedding(t) for t in texts]
        dev, dt = self.device, self.transformer.dtype
        states = torch.cat([r[0] for r in rows]).to(dev, dt)
        pooled = torch.cat([r[1] for r in rows]).to(dev, dt)
        if self.family == "flux":
            return FlowConditioning(states, pooled, text_ids=rows[0][2].to(dev, dt))
        # SD3's pipeline encodes the empty negative prompt with all three encoders, not zeros
        un = self._embedding("")
        return FlowConditioning(states, pooled, un[0].expand(len(texts), -1, -1).to(dev, dt),
                                un[1].expand(len(texts), -1).to(dev, dt))

    # -- the denoiser -----------------------------------------------------------------------------
    def denoise(self, x: torch.Tensor, sigma, cond: FlowConditioning, guidance: float
                ) -> torch.Tensor:
        """D(y; σ), σ = ∞ allowed, as one transformer call per chunk of ``eval_batch`` images."""
        b, k = x.shape[0], self.eval_batch
        if k == 0 or b == k:
            return self._denoise(x, sigma, cond, guidance)
        sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        sig = sig.expand(b) if sig.numel() == 1 else sig
        out = []
        for start in range(0, b, k):
            n = min(k, b - start)
            idx = tuple(range(start, start + n)) + (start + n - 1,) * (k - n)
            sel = torch.tensor(idx, device=x.device)
            out.append(self._denoise(x[sel], sig[list(idx)], cond.rows(idx), guidance)[:n])
        return torch.cat(out)

    def _denoise(self, x: torch.Tensor, sigma, cond: FlowConditioning, guidance: float
                 ) -> torch.Tensor:
        x_t, t = flow_input(x, sigma)
        # the pipelines' own timestep arithmetic: 1000·t in float32
        steps = t.float() * self.table.num_train_timesteps
        if self.family == "flux":
            return flow_denoised(x_t, t, self._flux_velocity(x_t, steps, cond, guidance))
        g = guidance != 1.0
        states, pooled = cond.for_call(g)
        x_in = x_t.to(self.transformer.dtype)
        if g:
            x_in, steps, x_t, t = (torch.cat([a, a]) for a in (x_in, steps, x_t, t))
        v = self.transformer(hidden_states=x_in, timestep=steps, encoder_hidden_states=states,
                             pooled_projections=pooled, return_dict=False)[0]
        d = flow_denoised(x_t, t, v.float())
        return guided(d, guidance) if g else d

    def _flux_velocity(self, x_t: torch.Tensor, steps: torch.Tensor, cond: FlowConditioning,
                       guidance: float) -> torch.Tensor:
        tr = self.transformer
        _, h, w = self.latent_shape
        if self._img_ids is None:
            self._img_ids = self.pipe._prepare_latent_image_ids(1, h // 2, w // 2, self.device,
                                                                tr.dtype)
        g = None
        if tr.config.guidance_embeds:
            g = torch.full((x_t.shape[0],), float(guidance), device=x_t.device,
                           dtype=torch.float32)
        states, pooled = cond.for_call(False)
        v = tr(hidden_states=pack(x_t).to(tr.dtype), timestep=(steps / 1000).to(tr.dtype),
               guidance=g, pooled_projections=pooled, encoder_hidden_states=states,
               txt_ids=cond.text_ids, img_ids=self._img_ids, return_dict=False)[0]
        return unpack(v.float(), h, w)

    # -- decoding ---------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode of the final y (at σ = 0 it is x0 itself) to images in [0, 1], one at a
        time; the latents are unscaled by the VAE's scaling and shift factors, as the pipelines
        do."""
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        out = []
        for i in range(latents.shape[0]):
            z = latents[i:i + 1].to(self.device, torch.float32) / cfg.scaling_factor + shift
            img = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].float()
            if not bool(torch.isfinite(img).all()):
                raise NonFiniteError(f"the VAE produced non-finite pixels (VAE in "
                                     f"{self.vae.dtype}); try --dtype fp32")
            out.append((img / 2 + 0.5).clamp(0, 1))
        return torch.cat(out)


# -- loading --------------------------------------------------------------------------------------

def _flow_kind(keys) -> Optional[str]:
    """'sd3' or 'flux' from a checkpoint's tensor names (original or diffusers layout), else
    None."""
    names = [k.removeprefix("model.diffusion_model.").removeprefix("transformer.") for k in keys]
    if any(n.startswith("joint_blocks.") for n in names):
        return "sd3"
    if any(n.startswith(("double_blocks.", "single_transformer_blocks.")) for n in names):
        return "flux"
    if any(n.startswith("context_embedder.") for n in names) and \
            any(n.startswith("pos_embed.") for n in names):
        return "sd3"
    return None


def is_flow_pipeline(spec: str, *, local_files_only: Optional[bool] = None,
                     revision=None) -> bool:
    """Whether a model spec names an SD3/FLUX pipeline (folder, hub id) or transformer (file)."""
    spec = os.path.expanduser(str(spec))
    if os.path.isfile(spec) and spec.lower().endswith(".safetensors"):
        try:
            return _flow_kind(checkpoint_keys(spec)) is not None
        except Exception:  # unreadable: the SD loader says why
            return False
    local_only = _offline() if local_files_only is None else bool(local_files_only)
    return pipeline_class_name(spec, local_only, revision) in FLOW_SUPPORTED


def _check_components(folder: str) -> None:
    index = _read_model_index(folder)
    cls = index.get("_class_name", "")
    if cls not in _NEEDED:
        return
    missing = [c for c in _NEEDED[cls]
               if not isinstance(index.get(c), list) or index.get(c)[0] is None]
    if missing:
        raise ValueError(f"{folder} holds a {cls}; schedsearch samples text-to-image Stable "
                         f"Diffusion, SD3 and FLUX models, but this folder's model_index.json "
                         f"lacks {', '.join(missing)} (a partial download, or another pipeline)")


# the base model to fetch configs from when diffusers cannot name one for a transformer file
_BASE_REPO = {"flux": "black-forest-labs/FLUX.1-dev", "sd3": "stabilityai/stable-diffusion-3.5-medium"}


def _config_source(path: str, config, local_only: bool, kind: str = "flux") -> str:
    """Where a transformer-only file takes its other components from: ``config`` (a folder or a
    hub id), else the base model diffusers names for the checkpoint, if it is in the cache."""
    from .diffusers_load import _HUB_ID

    if config is not None and os.path.isdir(config):
        return config
    if config is not None and not _HUB_ID.match(str(config)):
        raise FileNotFoundError(f"config={config!r} is not a folder; give the diffusers folder "
                                f"(model_index.json, transformer/config.json, ...) of the same "
                                f"model as the checkpoint")
    repo = config
    if repo is None:
        from diffusers.loaders.single_file_utils import fetch_diffusers_config  # diffusers: heavy

        try:
            repo = fetch_diffusers_config(_header_checkpoint(path))["pretrained_model_name_or_path"]
        except Exception:  # diffusers cannot name the base model from these keys
            repo = None
        # for keys it does not know, diffusers answers with its SD1.5 default, silently
        if not repo or ("flux" if kind == "flux" else "stable-diffusion-3") not in repo.lower():
            repo = _BASE_REPO[kind]
    if pipeline_class_name(repo, local_only) is None:
        raise FileNotFoundError(
            f"{path}: a single-file SD3/FLUX checkpoint holds the transformer only; its text "
            f"encoders, VAE and configs come from config=FOLDER (CLI: --model-config FOLDER): a "
            f"diffusers folder of the same model, e.g. {repo} (on a machine with internet "
            f"`hf download {repo}`), or a hub id in the local cache")
    return repo


def _from_single_file(path: str, dtype, vae, config, local_only: bool):
    import diffusers  # heavy: only when a model is loaded

    _check_safetensors_file(path)
    kind = _flow_kind(checkpoint_keys(path))
    if kind is None:
        raise ValueError(f"{path}: not an SD3 or FLUX transformer checkpoint")
    source = _config_source(path, config, local_only, kind)
    if os.path.isdir(source):
        _check_components(source)
    cls = _pipeline_class(pipeline_class_name(source, local_only) or "", source, FLOW_SUPPORTED)
    if (cls.__name__ == "FluxPipeline") != (kind == "flux"):   # else a deep KeyError/IndexError
        raise ValueError(f"{path} is {'a FLUX' if kind == 'flux' else 'an SD3'} transformer but "
                         f"{source} holds a {cls.__name__}: give the diffusers folder of the same "
                         f"model as the checkpoint")
    model_cls = diffusers.FluxTransformer2DModel if kind == "flux" else \
        diffusers.SD3Transformer2DModel
    local = local_only or os.path.isdir(source)
    try:
        transformer = model_cls.from_single_file(path, config=source, subfolder="transformer",
                                                 dtype=dtype, local_files_only=local)
        return cls.from_pretrained(source, transformer=transformer, dtype=dtype,
                                   use_safetensors=True, local_files_only=local,
                                   **_extra_components(cls, vae))
    except Exception as exc:  # safetensors, transformers and diffusers each raise their own types
        raise _wrap_load_error(f"{path} with config {source}", exc) from exc


def load_flow_pipeline(spec: str, device: torch.device, dtype: torch.dtype, *,
                       height: Optional[int] = None, width: Optional[int] = None,
                       config: Optional[str] = None, vae=None, eval_batch: Optional[int] = None,
                       variant: Optional[str] = None, revision: Optional[str] = None,
                       local_files_only: Optional[bool] = None,
                       max_sequence_length: Optional[int] = None) -> FlowDiffusion:
    """Load an SD3/SD3.5 or FLUX.1 model; ``spec`` and the options as for Stable Diffusion
    (``diffusers_sd.load_stable_diffusion``). ``max_sequence_length``: T5 prompt tokens (default
    the pipeline's: 256 for SD3, 512 for FLUX)."""
    device = torch.device(device)
    local_only = _offline() if local_files_only is None else bool(local_files_only)
    spec = os.path.expanduser(str(spec))
    if os.path.isdir(spec):
        _check_components(spec)
    vae_model = _load_vae(vae, dtype, local_only)
    pipe, source, name = load_pipeline(
        spec, dtype=dtype, vae=vae_model, variant=variant, revision=revision,
        local_only=local_only, supported=FLOW_SUPPORTED,
        single_file=lambda path: _from_single_file(path, dtype, vae_model, config, local_only))
    return _prepare(pipe, name=name, source=source, device=device, dtype=dtype, height=height,
                    width=width, eval_batch=eval_batch, max_sequence_length=max_sequence_length)


def from_flow_pipeline(pipe, *, device=None, dtype: Optional[torch.dtype] = None,
                       height: Optional[int] = None, width: Optional[int] = None,
                       eval_batch: Optional[int] = None, name: Optional[str] = None,
                       max_sequence_length: Optional[int] = None) -> FlowDiffusion:
    """Wrap an SD3 or FLUX pipeline you already loaded; its scheduler is only read for its
    flow table (shift), its step() is never used."""
    if type(pipe).__name__ not in FLOW_SUPPORTED:
        raise ValueError(f"{type(pipe).__name__} is not supported; use one of "
                         f"{', '.join(FLOW_SUPPORTED)}")
    device = torch.device(device) if device is not None else pipe.transformer.device
    name = name or getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path") \
        or "pipeline"
    return _prepare(pipe, name=os.path.basename(str(name).rstrip("/")) or "pipeline",
                    source="pipeline", device=device, dtype=dtype or pipe.transformer.dtype,
                    height=height, width=width, eval_batch=eval_batch,
                    max_sequence_length=max_sequence_length)


def _prepare(pipe, *, name, source, device, dtype, height, width, eval_batch,
             max_sequence_length) -> FlowDiffusion:
    pipe.to(device)
    for comp in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, comp, None)
        if module is not None:
            module.eval().requires_grad_(False)
    size = getattr(pipe, "default_sample_size", 128) * pipe.vae_scale_factor
    height = size if height is None else height
    width = size if width is None else width
    if eval_batch is None:
        big = isinstance(height, int) and isinstance(width, int) and height * width > 768 * 768
        eval_batch = (4 if big else 8) if device.type == "cuda" else 1
    return FlowDiffusion(pipe, name=name, height=height, width=width, device=device,
                         dtype=dtype, eval_batch=eval_batch, source=source,
                         max_sequence_length=max_sequence_length, native_size=(size, size))
