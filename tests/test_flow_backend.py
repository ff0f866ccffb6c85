"""The SD3 and FLUX backends on tiny pipelines saved to disk (offline, CPU).

Parity: our σ-space sampler with Euler from σ = ∞ reproduces diffusers' own StableDiffusion3Pipeline
and FluxPipeline (FlowMatchEulerDiscreteScheduler, their default shifted schedules) on the same
initial noise. Everything loads through ``schedsearch.models.load(path)``, the path users take.
"""

import json
import math
import os
import shutil

import pytest
import torch

from schedsearch import schedules
from schedsearch.freeu import FreeU, FreeUPlan
from schedsearch.models import load
from schedsearch.models.diffusers_flow import FlowDiffusion, pack, unpack
from schedsearch.sampler import initial_noise, sample
from tiny import save_pipeline, tiny_flux_pipeline, tiny_sd3_pipeline

CPU = torch.device("cpu")
PROMPTS, SEEDS = ["a red cat", "a dog on a hill"], [3, 11]


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return save_pipeline(tiny_sd3_pipeline(), tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return save_pipeline(tiny_flux_pipeline(), tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="module")
def sd3(sd3_dir):
    return load(sd3_dir, device="cpu")


@pytest.fixture(scope="module")
def flux(flux_dir):
    return load(flux_dir, device="cpu", height=64, width=64)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def reference(model, steps, guidance, latents=None, output_type="latent"):
    """diffusers' own pipeline on our initial noise (FLUX: packed, as its pipeline keeps it)."""
    eps = initial_noise(model.latent_shape, SEEDS, math.inf) if latents is None else latents
    lat = pack(eps) if model.family == "flux" else eps
    out = model.pipe(PROMPTS, height=model.height, width=model.width, num_inference_steps=steps,
                     guidance_scale=guidance, latents=lat.clone(), output_type=output_type).images
    if output_type == "latent" and model.family == "flux":
        out = unpack(out, *model.latent_shape[1:])
    return out


def test_loaded_models_follow_the_protocol(sd3, flux, sd3_dir, flux_dir):
    assert isinstance(sd3, FlowDiffusion) and (sd3.family, flux.family) == ("sd3", "flux")
    assert sd3.unet is None and flux.unet is None
    assert (sd3.height, sd3.width, sd3.latent_shape) == (64, 64, (16, 8, 8))
    assert flux.latent_shape == (16, 8, 8)
    assert sd3.table.kind == "flow" and sd3.table.shift == 3.0 and sd3.table.sigma_max == math.inf
    # FLUX's μ from its 4×4 = 16 packed tokens (calculate_shift), on FluxPipeline's own grid
    assert flux.table.mu == pytest.approx(0.5 + (16 - 256) * 0.65 / 3840)
    assert flux.table.grid == "flux" and flux.table.dynamic
    assert sd3.fingerprint() == load(sd3_dir, device="cpu").fingerprint()
    assert sd3.fingerprint() != flux.fingerprint()
    assert load(flux_dir, device="cpu", height=128, width=64).table.mu != flux.table.mu
    assert sd3.describe()["guidance"] == "cfg" and flux.describe()["guidance"] == "distilled"


@pytest.mark.parametrize("steps, guidance", [(4, 4.0), (6, 1.0)])
def test_sd3_euler_equals_the_diffusers_pipeline(sd3, steps, guidance):
    sigmas = schedules.build({"name": "flow", "steps": steps}, sd3.table)
    assert sigmas[0] == math.inf
    ours = sample(sd3, sigmas, PROMPTS, SEEDS, solver="euler", guidance=guidance)
    assert ours.nfe == steps
    assert rel(ours.latents, reference(sd3, steps, guidance)) < 1e-5
    images = reference(sd3, steps, guidance, output_type="pt")
    assert float((ours.images - images).abs().max()) < 1e-5
    if guidance != 1.0:   # the comparison can tell a wrong guidance scale apart
        other = sample(sd3, sigmas, PROMPTS, SEEDS, solver="euler", guidance=guidance + 0.5)
        assert rel(other.latents, reference(sd3, steps, guidance)) > 1e-3


@pytest.mark.parametrize("steps", [3, 5])
def test_flux_euler_equals_the_diffusers_pipeline(flux, steps):
    sigmas = schedules.build({"name": "flow", "steps": steps}, flux.table)
    ours = sample(flux, sigmas, PROMPTS, SEEDS, solver="euler", guidance=3.5)
    assert ours.nfe == steps   # guidance-distilled: one transformer call per step, no CFG batch
    assert rel(ours.latents, reference(flux, steps, 3.5)) < 1e-5
    images = reference(flux, steps, 3.5, output_type="pt")
    assert float((ours.images - images).abs().max()) < 1e-5
    other = sample(flux, sigmas, PROMPTS, SEEDS, solver="euler", guidance=5.0)
    assert rel(other.latents, reference(flux, steps, 3.5)) > 1e-3


def test_flux_without_a_guidance_embedding(tmp_path):
    model = load(save_pipeline(tiny_flux_pipeline(guidance_embeds=False), tmp_path / "schnell"),
                 device="cpu", height=64, width=64)
    sigmas = schedules.build({"name": "flow", "steps": 2}, model.table)
    ours = sample(model, sigmas, PROMPTS, SEEDS, solver="euler", guidance=0.0)
    assert rel(ours.latents, reference(model, 2, 0.0)) < 1e-5


def test_conditioning_is_the_pipelines_own(sd3, flux):
    c = sd3.condition(PROMPTS)
    states, neg, pooled, neg_pooled = sd3.pipe.encode_prompt(
        PROMPTS, None, None, device=CPU, do_classifier_free_guidance=True)
    torch.testing.assert_close(c.states, states, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c.pooled, pooled, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c.uncond_states, neg, rtol=1e-6, atol=1e-6)   # "" by all three
    torch.testing.assert_close(c.uncond_pooled, neg_pooled, rtol=1e-6, atol=1e-6)
    f = flux.condition(PROMPTS)
    states, pooled, ids = flux.pipe.encode_prompt(PROMPTS, None, device=CPU)
    torch.testing.assert_close(f.states, states, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(f.pooled, pooled, rtol=1e-6, atol=1e-6)
    assert f.uncond_states is None and torch.equal(f.text_ids, ids)
    with pytest.raises(ValueError, match="takes text prompts"):
        sd3.condition([3])


def test_the_first_call_sees_t_equal_one_and_the_noise(sd3, flux):
    for model, scale in ((sd3, 1.0), (flux, 1000.0)):   # FLUX's transformer takes t, SD3's 1000·t
        seen = []
        handle = model.transformer.register_forward_pre_hook(
            lambda mod, args, kw: seen.append((kw["hidden_states"].clone(),
                                               kw["timestep"].clone())), with_kwargs=True)
        try:
            sample(model, [math.inf, 0.0], PROMPTS[:1], SEEDS[:1], solver="euler", guidance=2.0)
        finally:
            handle.remove()
        hidden, timestep = seen[0]
        assert bool((timestep * scale == 1000.0).all())
        eps = initial_noise(model.latent_shape, SEEDS[:1], math.inf)
        expected = pack(eps) if model.family == "flux" else torch.cat([eps, eps])
        assert torch.equal(hidden, expected)


def test_images_do_not_depend_on_their_batch(sd3, flux):
    for model in (sd3, flux):
        sigmas = schedules.build({"name": "flow", "steps": 3}, model.table)
        both = sample(model, sigmas, PROMPTS, SEEDS, solver="dpmpp_2m", guidance=3.0)
        alone = sample(model, sigmas, PROMPTS[1:], SEEDS[1:], solver="dpmpp_2m", guidance=3.0)
        assert torch.equal(both.latents[1:], alone.latents)


def test_every_solver_runs_from_infinity_and_freeu_is_refused(sd3):
    from schedsearch import solvers

    sigmas = schedules.build({"name": "flow", "steps": 4}, sd3.table)
    for name in solvers.SOLVERS:
        if name == "unipc_bh1":   # undefined from σ = ∞ (docs/flow.md): refused, not run
            with pytest.raises(ValueError, match="unipc_bh1 cannot start at σ = ∞"):
                sample(sd3, sigmas, PROMPTS[:1], SEEDS[:1], solver=name, guidance=3.0)
            continue
        out = sample(sd3, sigmas, PROMPTS[:1], SEEDS[:1], solver=name, guidance=3.0)
        assert out.nfe == solvers.model_calls(name, sigmas)
        assert bool(torch.isfinite(out.images).all())
    plan = FreeUPlan.from_start(4, 0, FreeU(1.1, 1.1, 0.9, 0.2))
    with pytest.raises(ValueError, match="FreeU needs a UNet"):
        sample(sd3, sigmas, PROMPTS[:1], SEEDS[:1], freeu=plan)


def test_single_transformer_file_with_a_config_folder(flux, flux_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants
    from safetensors.torch import save_file

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "flux-transformer.safetensors"
    save_file({k: v.contiguous() for k, v in flux.transformer.state_dict().items()}, str(path))
    single = load(str(path), device="cpu", config=flux_dir, height=64, width=64)
    assert single.family == "flux" and single.source == "single_file"
    assert single.fingerprint().split("-")[-1] == flux.fingerprint().split("-")[-1]
    with pytest.raises(FileNotFoundError, match="holds the transformer only.*config=FOLDER"):
        load(str(path), device="cpu")


def test_a_flow_folder_missing_its_components_is_refused(sd3_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sd3_dir, broken)
    index = json.loads((broken / "model_index.json").read_text())
    index["transformer"] = [None, None]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="holds a StableDiffusion3Pipeline; .* lacks transformer"):
        load(str(broken), device="cpu")
    with pytest.raises(ValueError, match="height must be a positive multiple of 16"):
        load(sd3_dir, device="cpu", height=40)
    assert not os.path.exists(broken / "transformer" / "missing")


def test_a_vae_of_another_latent_space_is_refused_at_load(sd3_dir, flux_dir, tmp_path):
    """An SD VAE (4 channels) for SD3 or FLUX (16) failed when the first image was decoded,
    after all the sampling; a VAE of the model's own kind still loads (FLUX packs 2×2 patches,
    so its transformer takes 4 × 16 channels)."""
    from tiny import save_pipeline, tiny_sd_pipeline

    sd_dir = save_pipeline(tiny_sd_pipeline(), tmp_path / "sd")
    for spec, size in ((sd3_dir, {}), (flux_dir, {"height": 64, "width": 64})):
        with pytest.raises(ValueError, match=r"the replacement VAE makes 4-channel latents but "
                                             r".* denoises 16-channel ones"):
            load(spec, device="cpu", vae=os.path.join(sd_dir, "vae"), **size)
        own = load(spec, device="cpu", vae=os.path.join(spec, "vae"), **size)
        assert own.pipe.vae.config.latent_channels == 16
    with pytest.raises(ValueError, match=r"makes 16-channel latents but sd denoises 4-channel"):
        load(sd_dir, device="cpu", vae=os.path.join(sd3_dir, "vae"))


def test_a_transformer_file_is_told_its_own_base_model_and_a_mismatched_config(
        sd3, flux, sd3_dir, flux_dir, tmp_path, monkeypatch):
    """An SD3 transformer file offline was told to fetch SD1.5 (diffusers' default for keys it
    does not know); a FLUX file with an SD3 folder failed with 'list index out of range'."""
    from huggingface_hub import constants
    from safetensors.torch import save_file

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = {}
    for kind, model in (("sd3", sd3), ("flux", flux)):
        files[kind] = str(tmp_path / f"{kind}-transformer.safetensors")
        save_file({k: v.contiguous() for k, v in model.transformer.state_dict().items()},
                  files[kind])
    with pytest.raises(FileNotFoundError, match=r"e\.g\. stabilityai/stable-diffusion-3\.5-medium "
                                                r"\(on a machine with internet"):
        load(files["sd3"], device="cpu")
    with pytest.raises(ValueError, match=r"is a FLUX transformer but .* holds a "
                                         r"StableDiffusion3Pipeline: give the diffusers folder"):
        load(files["flux"], device="cpu", config=sd3_dir)
    with pytest.raises(ValueError, match=r"is an SD3 transformer but .* holds a FluxPipeline"):
        load(files["sd3"], device="cpu", config=flux_dir)
    assert load(files["sd3"], device="cpu", config=sd3_dir).family == "sd3"


def test_an_sd3_folder_saved_without_t5_loads(sd3_dir, tmp_path):
    """SD3 runs without its T5 encoder (model_index.json: null); diffusers refused the folder
    unless told so, and so did we, though the docs said it may be absent."""
    from diffusers import StableDiffusion3Pipeline

    from schedsearch.models.diffusers_flow import from_flow_pipeline

    no_t5 = tmp_path / "no-t5"
    shutil.copytree(sd3_dir, no_t5, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    index = json.loads((no_t5 / "model_index.json").read_text())
    index.update(text_encoder_3=[None, None], tokenizer_3=[None, None])
    (no_t5 / "model_index.json").write_text(json.dumps(index))
    model = load(str(no_t5), device="cpu")
    assert model.pipe.text_encoder_3 is None
    ref = from_flow_pipeline(StableDiffusion3Pipeline.from_pretrained(
        str(no_t5), text_encoder_3=None, tokenizer_3=None), device="cpu")
    sigmas = schedules.build({"name": "flow", "steps": 3}, model.table)
    mine, theirs = (sample(m, sigmas, PROMPTS, SEEDS, solver="euler").images for m in (model, ref))
    assert torch.isfinite(mine).all() and torch.equal(mine, theirs)
