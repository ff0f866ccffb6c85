"""The Stable Diffusion backend on tiny SD1.x / SDXL pipelines saved to disk (offline, CPU).

Parity: our σ-space sampler with Euler reproduces diffusers' own pipelines with
EulerDiscreteScheduler(sigmas=...) on the same initial noise. Everything loads through
``schedsearch.models.load(path)``, the path users take.
"""

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch

from schedsearch import schedules
from schedsearch.models import load
from schedsearch.models.diffusers_sd import load_stable_diffusion
from schedsearch.models.unet import Conditioning
from schedsearch.sampler import initial_noise, sample
from tiny import (save_pipeline, save_single_file, tiny_sd_pipeline, tiny_sdxl_pipeline,
                  tiny_vae)

CPU = torch.device("cpu")



@pytest.fixture(scope="module")
def sd_pipe():
    return tiny_sd_pipeline()


@pytest.fixture(scope="module")
def sd_dir(sd_pipe, tmp_path_factory):
    return save_pipeline(sd_pipe, tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return save_pipeline(tiny_sdxl_pipeline(), tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="module")
def sd(sd_dir):
    return load(sd_dir, device="cpu")


@pytest.fixture(scope="module")
def sdxl(sdxl_dir):
    return load(sdxl_dir, device="cpu")


@pytest.fixture
def empty_hf_cache(monkeypatch, tmp_path):
    """No model in the Hugging Face cache, whatever this machine holds."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# -- loading and conditioning ---------------------------------------------------------------------

def test_loaded_models_follow_the_protocol(sd, sdxl, sd_dir):
    assert (sd.family, sdxl.family) == ("sd15", "sdxl")
    assert sd.name == os.path.basename(sd_dir)
    for m in (sd, sdxl):
        # the VAE has 4 blocks: latents are 1/8 of the image; UNet sample_size 8 → 64 px
        assert (m.height, m.width, m.latent_shape) == (64, 64, (4, 8, 8))
        assert m.table.prediction_type == "epsilon" and m.table.name == "sd"
        assert m.table.sigma_max == pytest.approx(14.6146412, abs=1e-6)
        assert m.unet is m.pipe.unet and m.device == CPU and m.dtype == torch.float32
    assert sd.fingerprint() != sdxl.fingerprint()
    assert sd.fingerprint() == load(sd_dir, device="cpu").fingerprint()  # stable across loads


def test_sd_conditioning_is_the_pipelines_own(sd):
    c = sd.condition(["a red cat", "a dog"])
    assert isinstance(c, Conditioning) and c.added is None
    assert c.cond.shape == (2, 77, 32) and c.uncond.shape == (2, 77, 32)
    ref, neg = sd.pipe.encode_prompt(["a red cat", "a dog"], CPU, 1, True, negative_prompt=None)
    torch.testing.assert_close(c.cond, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c.uncond, neg, rtol=1e-6, atol=1e-6)   # the embedding of ""
    assert float(c.uncond.abs().max()) > 0.1


def test_sdxl_conditioning_zero_uncond_pooled_and_time_ids(sdxl, sdxl_dir):
    c = sdxl.condition(["a red cat", "a dog"])
    assert c.cond.shape == (2, 77, 64)                  # two encoders' penultimate states, 32 + 32
    assert c.added["text_embeds"].shape == (2, 32)
    assert torch.equal(c.added["time_ids"], torch.tensor([[64., 64, 0, 0, 64, 64]] * 2))
    assert torch.equal(c.uncond_added["time_ids"], c.added["time_ids"])
    # force_zeros_for_empty_prompt=True (the SDXL config): the unconditional branch is zeros
    assert float(c.uncond.abs().max()) == 0
    assert float(c.uncond_added["text_embeds"].abs().max()) == 0
    ref, _, pooled, _ = sdxl.pipe.encode_prompt(["a red cat", "a dog"], device=CPU,
                                                do_classifier_free_guidance=False)
    torch.testing.assert_close(c.cond, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c.added["text_embeds"], pooled, rtol=1e-6, atol=1e-6)

    tall = load(sdxl_dir, device="cpu", height=128, width=64)
    assert tall.latent_shape == (4, 16, 8)
    assert tall.condition(["x"]).added["time_ids"].tolist() == [[128, 64, 0, 0, 128, 64]]


def test_sdxl_without_forced_zeros_uses_the_empty_prompt(tmp_path):
    folder = save_pipeline(tiny_sdxl_pipeline(force_zeros_for_empty_prompt=False), tmp_path / "p")
    m = load(folder, device="cpu")
    c = m.condition(["a cat"])
    empty, _, pooled, _ = m.pipe.encode_prompt("", device=CPU, do_classifier_free_guidance=False)
    torch.testing.assert_close(c.uncond, empty, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c.uncond_added["text_embeds"], pooled, rtol=1e-6, atol=1e-6)
    assert float(c.uncond.abs().max()) > 0.1


def test_prompt_embeddings_are_computed_once_per_prompt(sd_dir, sdxl_dir):
    for folder, encoders in ((sd_dir, ("text_encoder",)),
                             (sdxl_dir, ("text_encoder", "text_encoder_2"))):
        m = load(folder, device="cpu")
        calls = {name: 0 for name in encoders}
        for name in encoders:
            getattr(m.pipe, name).register_forward_hook(
                lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        m.condition(["a", "b", "a"])
        # SD encodes "" for its unconditional branch once; SDXL uses zeros
        first = 3 if m.family == "sd15" else 2
        assert calls == {name: first for name in encoders}
        assert m.text_encoder_calls == first
        m.condition(["b", "a", "", "b"])
        sigmas = schedules.karras(3)
        sample(m, sigmas, ["a", "b"], [0, 1], solver="euler", guidance=3.0)
        sample(m, sigmas, ["b"], [7], solver="dpmpp_2m", guidance=5.0)
        expected = first + (1 if m.family == "sdxl" else 0)   # SDXL had not yet encoded ""
        assert calls == {name: expected for name in encoders}
        sample(m, sigmas, ["c"], [0], solver="euler", guidance=3.0)
        assert calls == {name: expected + 1 for name in encoders}


def test_non_text_prompts_are_refused(sd):
    with pytest.raises(ValueError, match="takes text prompts, got 3 .class labels are for the "
                                         "digits and gmm testbeds"):
        sd.condition([3])


# -- parity with diffusers' pipelines -------------------------------------------------------------

def pipeline_latents_and_images(cls, folder, prompts, seeds, sigmas, guidance, shape, **kw):
    """diffusers' pipeline with EulerDiscreteScheduler on the same σ list and initial noise.

    The pipeline multiplies the latents it is given by the scheduler's init_noise_sigma, which is
    σ_max for "linspace"/"trailing" spacing but sqrt(σ_max² + 1) for "leading" (SDXL's config); we
    start at x = σ_max·ε, so it gets ε·σ_max / init_noise_sigma."""
    pipe = cls.from_pretrained(folder, **kw)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(sigmas=sigmas, device="cpu")
    init = float(pipe.scheduler.init_noise_sigma)
    latents = initial_noise(shape, seeds, 1.0) * (sigmas[0] / init)
    h, w = shape[1] * 8, shape[2] * 8
    args = dict(prompt=prompts, sigmas=sigmas, guidance_scale=guidance, height=h, width=w)
    lat = pipe(latents=latents.clone(), output_type="latent", **args).images
    img = pipe(latents=latents.clone(), output_type="pt", **args).images
    return lat, img, init


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_euler_reproduces_the_diffusers_pipeline(kind, sd_dir, sdxl_dir):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if kind == "sd":
        folder, cls, size, kw = sd_dir, StableDiffusionPipeline, {}, {}
    else:  # not square, so a swapped (H, W) in the time ids would show
        folder, cls, size, kw = sdxl_dir, StableDiffusionXLPipeline, dict(height=64, width=128), \
            dict(add_watermarker=False)
    model = load(folder, device="cpu", **size)
    # float32-representable σ, so both sides step on identical values; ends in 0
    sigmas = [float(s) for s in schedules.karras(6).float()]
    prompts, seeds, w = ["a red cat", "a dog on the moon"], [3, 11], 5.0
    ours = sample(model, sigmas, prompts, seeds, solver="euler", guidance=w)
    lat, img, init = pipeline_latents_and_images(cls, folder, prompts, seeds, sigmas, w,
                                                 model.latent_shape, **kw)
    if kind == "sdxl":
        assert init == pytest.approx((sigmas[0] ** 2 + 1) ** 0.5)   # "leading" spacing
    r_lat, r_img = rel(ours.latents, lat), rel(ours.images, img)
    print(f"{kind}: relative difference latents {r_lat:.2e}, images {r_img:.2e}")
    assert r_lat < 1e-4 and r_img < 1e-4
    assert ours.images.shape == img.shape == (2, 3, model.height, model.width)
    assert ours.nfe == 6
    # the comparison can tell a wrong guidance scale apart
    lat_other, _, _ = pipeline_latents_and_images(cls, folder, prompts, seeds, sigmas, 4.0,
                                                  model.latent_shape, **kw)
    assert rel(ours.latents, lat_other) > 1e-3


def test_v_prediction_model(tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = save_pipeline(tiny_sd_pipeline(prediction_type="v_prediction"), tmp_path / "v")
    model = load(folder, device="cpu")
    assert model.table.prediction_type == "v_prediction"
    sigmas = [float(s) for s in schedules.karras(5).float()]
    ours = sample(model, sigmas, ["a red cat"], [5], solver="euler", guidance=4.0)
    lat, img, _ = pipeline_latents_and_images(StableDiffusionPipeline, folder, ["a red cat"], [5],
                                              sigmas, 4.0, model.latent_shape)
    print(f"v-prediction: relative difference latents {rel(ours.latents, lat):.2e}")
    assert rel(ours.latents, lat) < 1e-4 and rel(ours.images, img) < 1e-4
    # read as ε-prediction, the same weights give another sample
    eps = load(folder, device="cpu", prediction_type="epsilon")
    assert eps.table.prediction_type == "epsilon"
    other = sample(eps, sigmas, ["a red cat"], [5], solver="euler", guidance=4.0)
    assert rel(other.latents, lat) > 1e-2


def test_decode_is_the_vae_formula(sd):
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = sd.decode(z)
    with torch.no_grad():
        ref = (sd.vae.decode(z / sd.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert images.shape == (3, 3, 64, 64) and images.dtype == torch.float32
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    torch.testing.assert_close(images, ref, rtol=1e-5, atol=1e-5)


# -- batch invariance -----------------------------------------------------------------------------

PROMPTS8 = ["a red cat", "a dog", "a tree", "a red cat", "the sea", "a dog", "", "a tree"]


def run_batches(model, batch_size, sigmas, solver="dpmpp_2m"):
    return sample(model, sigmas, PROMPTS8, list(range(8)), solver=solver, guidance=5.0,
                  batch_size=batch_size)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_an_image_does_not_depend_on_its_batch(kind, sd_dir, sdxl_dir):
    """Bitwise: each image sampled alone, in a batch of 8, and in batches of 3 (whose last batch
    is short) — with the CPU default eval_batch=1 and with eval_batch=4, whose chunks are padded."""
    folder = sd_dir if kind == "sd" else sdxl_dir
    sigmas = schedules.karras(3)
    for eval_batch in (None, 4):
        model = load(folder, device="cpu", **({} if eval_batch is None else
                                              {"eval_batch": eval_batch}))
        assert model.eval_batch == (eval_batch or 1)
        together = run_batches(model, 8, sigmas)
        for bs in (1, 3):
            other = run_batches(model, bs, sigmas)
            assert torch.equal(other.latents, together.latents), (eval_batch, bs)
            assert torch.equal(other.images, together.images), (eval_batch, bs)


def test_without_fixed_shapes_cpu_kernels_see_the_batch(sd_dir):
    """The finding behind eval_batch: with eval_batch=0 the UNet runs on whatever batch the sampler
    hands it, and oneDNN convolutions / small GEMMs pick their blocking by batch size, so an image
    alone and the same image in a batch of 8 differ in the last bits (seen here: ~1e-6 relative on
    the final latents of a 3-step run). Harmless for scores, but not reproducible bit for bit."""
    model = load(sd_dir, device="cpu", eval_batch=0)
    sigmas = schedules.karras(3)
    together = run_batches(model, 8, sigmas)
    alone = run_batches(model, 1, sigmas)
    r = rel(alone.latents, together.latents)
    print(f"eval_batch=0: batch of 8 vs one at a time, relative difference {r:.2e}")
    assert r < 1e-5


# -- dtype paths ----------------------------------------------------------------------------------

def test_fp16_upcasts_a_force_upcast_vae_and_keeps_a_fp16_fix_vae(sdxl_dir, tmp_path, recwarn):
    """fp16 weights on the CPU (PyTorch runs them, slowly; schedsearch.models.load refuses fp16 on
    the CPU, so this calls the backend directly): the UNet and text encoders in fp16, the VAE —
    whose config says force_upcast — in fp32, the solver state in fp32."""
    half = load_stable_diffusion(sdxl_dir, device=CPU, dtype=torch.float16)
    assert half.unet.dtype == torch.float16 and half.pipe.text_encoder_2.dtype == torch.float16
    assert half.vae.dtype == torch.float32
    full = load(sdxl_dir, device="cpu")
    sigmas = schedules.karras(4)
    a = sample(half, sigmas, ["a cat"], [0], guidance=5.0)
    b = sample(full, sigmas, ["a cat"], [0], guidance=5.0)
    assert a.latents.dtype == torch.float32
    assert 0 < rel(a.latents, b.latents) < 1e-2 and rel(a.images, b.images) < 1e-2
    assert half.fingerprint() != full.fingerprint()     # the dtype changes the weights' bytes

    # an fp16-fix VAE (force_upcast False) passed as vae= stays in fp16
    fixed = tiny_vae(seed=9, force_upcast=False)
    fixed.save_pretrained(str(tmp_path / "vae-fix"))
    m = load_stable_diffusion(sdxl_dir, device=CPU, dtype=torch.float16,
                              vae=str(tmp_path / "vae-fix"))
    assert m.vae.dtype == torch.float16 and not m.vae.config.force_upcast
    assert m.fingerprint() != half.fingerprint()
    assert m.decode(a.latents).shape == (1, 3, 64, 64)


# -- the single-file path -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def single_file(sd_pipe, tmp_path_factory):
    return save_single_file(sd_pipe, tmp_path_factory.mktemp("single") / "tiny-sd.safetensors")


def test_single_file_checkpoint_loads_the_same_weights(single_file, sd_dir, sd, tmp_path):
    from safetensors import safe_open

    with safe_open(single_file, framework="pt") as f:
        keys = set(f.keys())
    # the original layout: what diffusers converts from (nothing of its own naming left)
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys
    assert not any(k.startswith(("unet.", "down_blocks", "vae.")) for k in keys)

    # the config folder needs no weights: what `hf download ... --include "*.json" --include
    # "*.txt"` gives
    configs = tmp_path / "configs-only"
    shutil.copytree(sd_dir, configs, ignore=shutil.ignore_patterns("*.safetensors"))
    m = load(single_file, device="cpu", config=str(configs))
    assert m.name == "tiny-sd" and m.source == "single_file" and m.family == "sd15"
    for comp in ("unet", "vae", "text_encoder"):
        mine, ref = getattr(m.pipe, comp).state_dict(), getattr(sd.pipe, comp).state_dict()
        assert mine.keys() == ref.keys()
        for k in ref:
            assert torch.equal(mine[k], ref[k]), f"{comp}.{k}"
    assert m.fingerprint().split("-")[-1] == sd.fingerprint().split("-")[-1]
    sigmas = schedules.karras(3)
    assert torch.equal(sample(m, sigmas, ["a cat"], [1]).images,
                       sample(sd, sigmas, ["a cat"], [1]).images)


def test_single_file_offline_without_config_says_what_to_do(single_file, empty_hf_cache):
    with pytest.raises(FileNotFoundError) as e:
        load(single_file, device="cpu")
    msg = str(e.value)
    assert "carries weights but no configs" in msg and "config=FOLDER" in msg
    assert "--model-config FOLDER" in msg
    # diffusers' own choice of default configs for an SD1.x checkpoint
    assert "hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --include" in msg


# -- errors ---------------------------------------------------------------------------------------

def test_missing_and_unreadable_models(tmp_path, sd_dir):
    with pytest.raises(FileNotFoundError, match="no such folder or file"):
        load(str(tmp_path / "nowhere" / "model"), device="cpu")
    with pytest.raises(FileNotFoundError, match="model file .*missing.safetensors' does not exist"):
        load(str(tmp_path / "missing.safetensors"), device="cpu")
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline folder .no model_index"):
        load(str(tmp_path), device="cpu")

    broken = tmp_path / "broken"
    shutil.copytree(sd_dir, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ValueError, match="could not load the model from .*broken.*partial "
                                         "download"):
        load(str(broken), device="cpu")
    partial = tmp_path / "partial"   # a copy that lost a component: named, not "config.json"
    shutil.copytree(sd_dir, partial, ignore=shutil.ignore_patterns("unet"))
    with pytest.raises(FileNotFoundError, match=r"partial: its model_index.json names unet/ but "
                                                r"the folder has no such subfolder"):
        load(str(partial), device="cpu")

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load(str(bad), device="cpu", config=sd_dir)

    index = json.loads((broken / "model_index.json").read_text())
    index["_class_name"] = "FluxPipeline"
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="holds a FluxPipeline; schedsearch samples text-to-image "
                                         "Stable Diffusion"):
        load(str(broken), device="cpu")


def test_pickles_are_never_loaded(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not even read")
    for path in (ckpt, tmp_path / "other.bin"):
        with pytest.raises(ValueError, match="pickled checkpoints .* are not read; use the model's "
                                             ".safetensors"):
            load(str(path), device="cpu")


def test_hub_id_from_the_local_cache_offline(sd_dir, sd, empty_hf_cache):
    """A hub id resolves through the Hugging Face cache layout (models--org--name/snapshots/REV,
    refs/main naming REV), with no network."""
    from huggingface_hub import constants

    repo = os.path.join(constants.HF_HUB_CACHE, "models--tiny-org--tiny-sd")
    rev = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(sd_dir, os.path.join(repo, "snapshots", rev))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(rev)
    m = load("tiny-org/tiny-sd", device="cpu")
    assert (m.name, m.source, m.family) == ("tiny-org/tiny-sd", "hub", "sd15")
    assert m.fingerprint().split("-")[-1] == sd.fingerprint().split("-")[-1]
    # a pipeline repo as --vae takes its vae/ (a folder --vae did; a hub id said "not cached")
    with_vae = load("tiny-org/tiny-sd", device="cpu", vae="tiny-org/tiny-sd")
    assert with_vae.fingerprint().split("-")[-1] == sd.fingerprint().split("-")[-1]
    with pytest.raises(FileNotFoundError, match=r"^VAE 'tiny-org/no-vae' is not .* pass it with "
                                                r"--vae DIR"):
        load("tiny-org/tiny-sd", device="cpu", vae="tiny-org/no-vae")


def test_unknown_hub_id_offline(empty_hf_cache):
    with pytest.raises(FileNotFoundError) as e:
        load("someorg/no-such-model", device="cpu")
    msg = str(e.value)
    assert "not in the local cache and this machine is offline" in msg
    assert "hf download someorg/no-such-model" in msg
    assert "huggingface-cli download someorg/no-such-model --local-dir DIR" in msg
    assert "--model DIR" in msg and "HF_HOME" in msg


class _Hub404(http.server.BaseHTTPRequestHandler):
    """A hub endpoint that knows no model: every request is answered 404 and recorded."""
    seen: list = []

    def _missing(self):
        type(self).seen.append(self.path)
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _missing

    def log_message(self, *args):
        pass


def test_an_unknown_hub_id_online_is_asked_for_once_and_said_in_one_line(tmp_path):
    """The flow/SD dispatch and the load both read model_index.json: a failed fetch is asked once
    (an unreachable hub costs ~25 s of retries per ask), and diffusers' deprecation warning for
    huggingface_hub does not print above the error."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub404)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
           "HF_HOME": str(tmp_path / "hf"), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("HF_HUB_OFFLINE", None)
    try:
        proc = subprocess.run([sys.executable, "-m", "schedsearch", "sample", "--model",
                               "someorg/no-such-model", "--device", "cpu", "--prompt", "a cat",
                               "--out", str(tmp_path / "out")],
                              env=env, capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("schedsearch sample: error: model "
                                                   "'someorg/no-such-model'"), proc.stderr
    assert "could not be fetched" in lines[0] and "hf download someorg/no-such-model" in lines[0]
    assert [p for p in _Hub404.seen if p.endswith("/model_index.json")] == [
        "/someorg/no-such-model/resolve/main/model_index.json"], _Hub404.seen


def test_an_unreachable_hub_is_named_as_such():
    """diffusers reports a failed connection as a model without model_index.json; the chain
    under its error (huggingface_hub's LocalEntryNotFoundError, then the socket's) says what
    happened."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    from schedsearch.models.diffusers_load import _fetch_failure

    def raised():
        try:
            try:
                try:
                    raise ConnectionRefusedError(111, "Connection refused")
                except ConnectionRefusedError as exc:
                    raise LocalEntryNotFoundError("cannot find the requested files") from exc
            except LocalEntryNotFoundError as exc:
                raise OSError("org/m does not appear to have a file named model_index.json.") \
                    from exc
        except OSError as exc:
            return exc

    why = _fetch_failure(raised())
    assert why.startswith("is not in the local cache and the hub could not be reached "
                          "([Errno 111] Connection refused; ")
    assert "HF_HUB_OFFLINE=1" in why and "model_index.json" not in why
    assert _fetch_failure(OSError("401 Client Error\nmore")) == "could not be fetched (401 " \
                                                                "Client Error)"


def test_bad_options(sd_dir, single_file, tmp_path):
    with pytest.raises(ValueError, match="height must be a positive multiple of 8"):
        load(sd_dir, device="cpu", height=100)
    with pytest.raises(ValueError, match="eval_batch must be an integer >= 1"):
        load(sd_dir, device="cpu", eval_batch=-1)
    with pytest.raises(ValueError, match="family must be sd15, sd2 or sdxl"):
        load(sd_dir, device="cpu", family="sd3")
    with pytest.raises(FileNotFoundError, match="config=.* is not a folder"):
        load(single_file, device="cpu", config=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="vae=.* holds no config.json"):
        load(sd_dir, device="cpu", vae=str(tmp_path))

    zero_snr = tmp_path / "zsnr"
    shutil.copytree(sd_dir, zero_snr)
    cfg_path = zero_snr / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rescale_betas_zero_snr"] = True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="zero terminal SNR .* not supported"):
        load(str(zero_snr), device="cpu")


def test_every_command_takes_a_single_file_with_its_config_folder(offline_sd, tmp_path, monkeypatch,
                                                                  empty_hf_cache, capsys):
    """score, teacher and run took --model FILE but not --model-config, which the error told
    them to pass; so offline a single-file checkpoint worked in sample only. Same numbers as
    the folder it came from."""
    from diffusers import StableDiffusionPipeline
    from tiny import save_single_file

    from schedsearch.cli import main

    monkeypatch.setenv("SCHEDSEARCH_CACHE", str(tmp_path / "cache"))
    single = save_single_file(StableDiffusionPipeline.from_pretrained(offline_sd.model),
                              tmp_path / "tiny.safetensors")
    configs = tmp_path / "configs-only"
    shutil.copytree(offline_sd.model, configs, ignore=shutil.ignore_patterns("*.safetensors"))
    common = ["--prompts", str(offline_sd.prompts), "--ref-stats", str(offline_sd.ref),
              "--inception", str(offline_sd.inception), "--device", "cpu"]
    fids = []
    for model in (["--model", single, "--model-config", str(configs)],
                  ["--model", offline_sd.model]):
        assert main(["score", *model, *common, "--n", "4", "--steps", "3", "--checkpoints", "4",
                     "--kid-subsets", "0", "--no-progress"]) == 0
        fids.append(json.loads(capsys.readouterr().out)["fid"])
    assert fids[0] == fids[1]
    assert main(["teacher", "--model", single, "--model-config", str(configs), "--prompts",
                 str(offline_sd.prompts), "--n", "2", "--teacher-steps", "4", "--no-cache",
                 "--no-progress"]) == 0
    out = tmp_path / "run"
    assert main(["run", "--model", single, "--model-config", str(configs), *common,
                 "--budget", "3", "--trials", "2", "--n-search", "4", "--n-heldout", "4",
                 "--baselines", "karras", "--no-user-preset", "--no-artifacts", "--no-progress",
                 "--out", str(out)]) == 0
    import optuna

    study = optuna.load_study(study_name="tiny-3nfe", storage=f"sqlite:///{out / 'study.db'}")
    assert study.user_attrs["config"]["model_config"] == str(configs)
    assert study.user_attrs["identity"]["vae"] is None   # another VAE is another study
    # the testbeds refuse what only a pipeline takes, in a config file too
    assert main(["run", "--model", "gmm", "--vae", str(configs), "--no-user-preset"]) == 2
    assert "vae: for Stable Diffusion models only, not the gmm testbed" in capsys.readouterr().err
    from schedsearch.config import StudyConfig

    assert StudyConfig(model=single, eval_batch=0).eval_batch == 0   # 0: batch as given
    with pytest.raises(ValueError, match=r"eval_batch must be an integer >= 0 \(0: off\)"):
        StudyConfig(model=single, eval_batch=-1)
