"""Loading diffusers pipelines for the Stable Diffusion and flow backends: from a local folder, a
hub id (read from the local Hugging Face cache when offline) or a single ``.safetensors`` file,
with errors that say what to do. Only safetensors are read: pickled checkpoints (.ckpt, .bin, .pt)
can run code when loaded and are refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import warnings
from typing import Callable, Sequence

import torch
from safetensors import safe_open

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# -- errors that say what to do -------------------------------------------------------------------

def _offline() -> bool:
    from huggingface_hub import constants  # comes with diffusers: heavy

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(constants.HF_HUB_OFFLINE)


def _cache_dir() -> str:
    from huggingface_hub import constants  # comes with diffusers: heavy

    return constants.HF_HUB_CACHE


def _not_cached_message(repo_id: str, why: str, flag: str = "--model") -> str:
    what = "model" if flag == "--model" else "VAE"
    return (f"{what} {repo_id!r} is not a local folder or file, and as a Hugging Face hub id it "
            f"{why}. On a machine with internet run `hf download {repo_id}` (older clients: "
            f"`huggingface-cli download {repo_id} --local-dir DIR`), copy the folder here and pass "
            f"it with {flag} DIR; or copy a whole Hugging Face cache and set HF_HOME to it "
            f"(searched now: {_cache_dir()})")


def _fetch_failure(exc: BaseException) -> str:
    """Why a hub fetch failed. diffusers reports an unreachable hub as "does not appear to have a
    file named model_index.json"; the chain below it says what happened."""
    chain = []
    while exc is not None and len(chain) < 20:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    network = [c for c in chain if isinstance(c, (ConnectionError, TimeoutError, socket.gaierror))
               or {"NetworkError", "TimeoutException"} & {k.__name__ for k in type(c).__mro__}]
    if network:   # the socket's own error, or httpx's (huggingface_hub's HTTP client)
        return (f"is not in the local cache and the hub could not be reached "
                f"({str(network[-1]).splitlines()[0]}; on a machine without internet set "
                f"HF_HUB_OFFLINE=1 to skip the retries)")
    return f"could not be fetched ({str(chain[0]).splitlines()[0]})"


@contextlib.contextmanager
def hub_calls():
    """diffusers passes huggingface_hub an argument (``local_dir_use_symlinks``) it deprecated; its
    warning would print above our own output on every hub load. ``models.load``, which every load
    goes through, holds it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        yield


_FAILED_FETCHES: dict = {}   # (repo_id, revision) → why: the flow/SD dispatch and the load both ask


def hub_model_index(repo_id: str, revision, local_only: bool) -> tuple[dict, bool]:
    """(a hub id's model_index.json, whether it came from the local cache). The cache first: it
    works offline and does not touch the network when the model is there. A fetch that failed is
    not tried again in this process (huggingface_hub retries an unreachable hub for ~25 s)."""
    from diffusers import DiffusionPipeline  # diffusers: heavy

    try:
        return DiffusionPipeline.load_config(repo_id, local_files_only=True,
                                             revision=revision), True
    except (OSError, ValueError):
        if local_only:
            raise FileNotFoundError(_not_cached_message(
                repo_id, "is not in the local cache and this machine is offline "
                         "(HF_HUB_OFFLINE)")) from None
    why = _FAILED_FETCHES.get((repo_id, revision))
    if why is None:
        try:
            return DiffusionPipeline.load_config(repo_id, revision=revision), False
        except (OSError, ValueError) as exc:
            why = _FAILED_FETCHES[repo_id, revision] = _fetch_failure(exc)
    raise FileNotFoundError(_not_cached_message(repo_id, why))


def _check_safetensors_file(path: str) -> None:
    low = path.lower()
    if low.endswith(PICKLE_SUFFIXES):
        raise ValueError(
            f"{path}: pickled checkpoints ({', '.join(PICKLE_SUFFIXES)}) can run code when loaded "
            f"and are not read; use the model's .safetensors file, or convert it once on a trusted "
            f"machine (load it with diffusers, then save_pretrained(..., "
            f"safe_serialization=True))")
    if not low.endswith(".safetensors"):
        raise ValueError(f"{path}: a single-file model must be a .safetensors checkpoint")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file {path!r} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except Exception as exc:  # the safetensors parser raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({exc}); the download may be "
                         f"incomplete — fetch it again") from None


def _wrap_load_error(where: str, exc: Exception) -> ValueError:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ValueError(f"could not load the model from {where}: {text}. A diffusers folder needs "
                      f"model_index.json and, per component, its config and .safetensors weights "
                      f"(a partial download or a folder of another format gives this error)")


# -- loading --------------------------------------------------------------------------------------

def _pipeline_class(class_name: str, where: str, supported: Sequence[str]):
    import diffusers  # heavy: only when a model is loaded

    if class_name not in supported:
        raise ValueError(f"{where} holds a {class_name or 'pipeline of unknown type'}; schedsearch "
                         f"samples text-to-image Stable Diffusion models ({', '.join(supported)})")
    return getattr(diffusers, class_name)


def _read_model_index(folder: str) -> dict:
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{folder!r} is not a diffusers pipeline folder (no model_index.json). Pass the folder "
            f"that holds model_index.json, unet/, vae/, text_encoder/ ..., or a single "
            f".safetensors checkpoint")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON ({exc})") from None


def _extra_components(cls, vae) -> dict:
    extra = {"vae": vae} if vae is not None else {}
    if cls.__name__ == "StableDiffusionPipeline":
        # the NSFW classifier is 1.2 GB, blanks images, and plays no part in a schedule search
        extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif cls.__name__ == "StableDiffusionXLPipeline":
        extra["add_watermarker"] = False   # the invisible watermark perturbs pixels (and FID)
    return extra


def _load_vae(vae, dtype, local_only: bool):
    """A replacement VAE (e.g. madebyollin/sdxl-vae-fp16-fix): a diffusers folder or a hub id."""
    from diffusers import AutoencoderKL  # diffusers: heavy

    if vae is None or not isinstance(vae, str):
        return vae
    if os.path.isfile(vae):
        raise ValueError(f"vae={vae!r}: pass the VAE as a diffusers folder (config.json and "
                         f"diffusion_pytorch_model.safetensors), not a single file")
    kwargs = dict(dtype=dtype, use_safetensors=True)
    if os.path.isdir(vae):
        sub = "vae" if os.path.isfile(os.path.join(vae, "vae", "config.json")) else None
        if sub is None and not os.path.isfile(os.path.join(vae, "config.json")):
            raise FileNotFoundError(f"vae={vae!r} holds no config.json (nor vae/config.json)")
        try:
            return AutoencoderKL.from_pretrained(vae, subfolder=sub, **kwargs)
        except Exception as exc:  # safetensors and diffusers raise their own types
            raise _wrap_load_error(vae, exc) from exc
    if not _HUB_ID.match(vae):
        raise FileNotFoundError(f"vae={vae!r} is neither a folder nor a hub id")
    try:
        return AutoencoderKL.from_pretrained(vae, local_files_only=local_only, **kwargs)
    except (OSError, ValueError) as exc:
        try:   # a whole pipeline's repo, as a folder --vae may be: its vae/ subfolder
            return AutoencoderKL.from_pretrained(vae, subfolder="vae", local_files_only=local_only,
                                                 **kwargs)
        except (OSError, ValueError):
            pass
        if local_only:
            raise FileNotFoundError(_not_cached_message(vae, "is not in the local cache and this "
                                                             "machine is offline",
                                                        "--vae")) from None
        raise _wrap_load_error(vae, exc) from None


def _from_folder(folder: str, dtype, vae, variant, supported: Sequence[str]):
    index = _read_model_index(folder)
    cls = _pipeline_class(index.get("_class_name", ""), folder, supported)
    # a partial copy: diffusers said "no file named config.json found in directory FOLDER"
    gone = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v
            and v[0] is not None and not os.path.isdir(os.path.join(folder, k))
            and not (k == "vae" and vae is not None)]
    if gone:
        raise FileNotFoundError(f"{folder}: its model_index.json names "
                                f"{', '.join(g + '/' for g in gone)} but the folder has no such "
                                f"subfolder (a partial download or copy); copy the whole folder")
    try:
        return cls.from_pretrained(folder, dtype=dtype, use_safetensors=True, variant=variant,
                                   local_files_only=True,
                                   **{**_left_out(index), **_extra_components(cls, vae)})
    except Exception as exc:  # safetensors, transformers and diffusers each raise their own types
        raise _wrap_load_error(folder, exc) from exc


def _left_out(index: dict) -> dict:
    """The optional components a folder's model_index.json sets to null (SD3 without its T5
    text encoder, an SD model saved without its safety checker), passed as None: diffusers
    refuses to load the folder it saved itself otherwise."""
    return {k: None for k, v in index.items()
            if k in _OPTIONAL and isinstance(v, list) and v and v[0] is None}


# what a pipeline runs without (a null denoiser, VAE or CLIP stays an error that names it)
_OPTIONAL = ("text_encoder_3", "tokenizer_3", "safety_checker", "feature_extractor",
             "image_encoder")


def _from_hub(repo_id: str, dtype, vae, variant, local_only: bool, revision,
              supported: Sequence[str]):
    index, cached = hub_model_index(repo_id, revision, local_only)
    cls = _pipeline_class(index.get("_class_name", ""), repo_id, supported)
    try:
        return cls.from_pretrained(repo_id, dtype=dtype, use_safetensors=True, variant=variant,
                                   revision=revision, local_files_only=local_only or cached,
                                   **_extra_components(cls, vae))
    except (OSError, ValueError) as exc:
        err = exc
        if cached and not local_only:  # the cache holds only part of it: let diffusers download
            try:
                return cls.from_pretrained(repo_id, dtype=dtype, use_safetensors=True,
                                           variant=variant, revision=revision,
                                           **_extra_components(cls, vae))
            except (OSError, ValueError) as exc2:
                err = exc2
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FileNotFoundError(_not_cached_message(
            repo_id, f"is only partly usable from the cache ({why})")) from None


def _header_checkpoint(path: str) -> dict:
    """The checkpoint's keys with empty tensors of the right shapes (for diffusers' model-type
    inference, which only looks at key names and shapes)."""
    with safe_open(path, framework="pt") as f:
        return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}


def load_pipeline(spec: str, *, dtype, vae, variant, revision, local_only: bool,
                  supported: Sequence[str], single_file: Callable[[str], object]
                  ) -> tuple[object, str, str]:
    """(pipeline, source, name) from a folder, a single file (``single_file(path)``) or a hub id;
    ``vae`` is an already loaded replacement VAE or None."""
    if os.path.isdir(spec):
        name = os.path.basename(os.path.normpath(spec))
        found = _from_folder(spec, dtype, vae, variant, supported), "folder", name
    elif os.path.isfile(spec) or spec.lower().endswith((".safetensors",) + PICKLE_SUFFIXES):
        found = single_file(spec), "single_file", os.path.splitext(os.path.basename(spec))[0]
    elif _HUB_ID.match(spec) and not spec.startswith("."):
        found = _from_hub(spec, dtype, vae, variant, local_only, revision, supported), "hub", spec
    else:
        raise FileNotFoundError(f"model {spec!r}: no such folder or file (a model is 'digits', "
                                f"'gmm', 'digits-flow', 'gmm-flow', a diffusers folder, a "
                                f".safetensors file or a hub id like org/name)")
    if vae is not None:
        _check_vae_fits(found[0], found[2])
    return found


def _check_vae_fits(pipe, name: str) -> None:
    """A replacement VAE of another latent space (an SD/SDXL VAE, 4 channels, for SD3 or FLUX,
    16) failed only when the first image was decoded, after all the sampling."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    want = getattr(getattr(denoiser, "config", None), "in_channels", None)
    got = getattr(pipe.vae.config, "latent_channels", None)
    if want is None or got is None:
        return
    if type(pipe).__name__.startswith("Flux"):   # FLUX packs 2×2 latent patches: 4 × channels
        want //= 4
    if got != want:
        raise ValueError(f"the replacement VAE makes {got}-channel latents but {name} denoises "
                         f"{want}-channel ones: it is another architecture's VAE (SD1.x, SD2.x "
                         f"and SDXL use 4 channels, SD3 and FLUX 16); pass one made for this "
                         f"model, or leave --vae out")


def checkpoint_keys(path: str) -> set:
    """The tensor names of a safetensors file (its header only; no weights are read)."""
    with safe_open(path, framework="pt") as f:
        return set(f.keys())


def pipeline_class_name(spec: str, local_only: bool, revision=None):
    """The ``_class_name`` a folder or hub id declares in its model_index.json, or None when it
    cannot be told without loading (a missing folder, an uncached hub id offline, ...)."""
    spec = os.path.expanduser(str(spec))
    try:
        if os.path.isdir(spec):
            return _read_model_index(spec).get("_class_name")
        if _HUB_ID.match(spec) and not spec.startswith(".") and not os.path.exists(spec):
            return hub_model_index(spec, revision, local_only)[0].get("_class_name")
    except (OSError, ValueError):
        return None
    return None


def weights_digest(pipe, components: Sequence[str], head: str) -> str:
    """16 hex digits over the named components' weights: names, shapes, dtypes and 64 values
    spread over every tensor. Sampling values rather than hashing every byte keeps this to a
    second on SDXL while still changing with fine-tunes, merges, a swapped VAE or the dtype;
    ``head`` adds what the weights do not say (noise table, resolution)."""
    h = hashlib.sha256()
    h.update(head.encode())
    for comp in components:
        module = getattr(pipe, comp, None)
        if module is None:
            continue
        h.update(comp.encode())
        for key, t in module.state_dict().items():
            flat = t.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
            h.update(f"{key}{tuple(t.shape)}{t.dtype}".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def check_eval_batch(eval_batch) -> int:
    if isinstance(eval_batch, bool) or not isinstance(eval_batch, int) or eval_batch < 0:
        raise ValueError(f"eval_batch must be an integer >= 1 (or 0: the sampler's batch as "
                         f"is, not batch-invariant), got {eval_batch!r}")
    return eval_batch
