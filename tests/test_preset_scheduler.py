"""PresetScheduler and freeu_plan: presets inside stock diffusers pipelines (tiny, offline, CPU).

Parity: a text-to-image pipeline with PresetScheduler, given the same unit noise draws, reproduces
``schedsearch.generate`` — bit for bit without guidance, and to ~1e-6 with CFG, where the pipeline
mixes the two branches in ε-space and our denoiser in D-space (the same affine map, rounded
differently; measured below, printed with -s). The batch the UNet sees does not matter at this
tolerance: generate runs one image per UNet call here, the pipeline both at once (~3e-7 more).
"""

import contextlib
import time

import pytest
import torch

import schedsearch
from schedsearch import schedules, solvers
from schedsearch.diffusers import PresetScheduler, PresetSchedulerOutput, freeu_plan
from schedsearch.freeu import FreeU, FreeUPlan
from schedsearch.models.diffusers_sd import from_pipeline
from schedsearch.presets import Preset
from schedsearch.sampler import initial_noise
from tiny import tiny_controlnet, tiny_sd2_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

LATENT = (4, 8, 8)                       # tiny pipelines: 64×64 images, 8×8 latents
SOLVERS = list(solvers.SOLVERS)          # whatever is registered, Heun (2 calls per step) included
PROMPTS, SEEDS = ["a red cat", "a dog on the moon"], [3, 11]
A, B = FreeU(1.3, 1.4, 0.9, 0.2), FreeU(1.1, 1.2, 0.8, 0.5)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def pipes():
    out = {"sd": tiny_sd_pipeline(), "sd2": tiny_sd2_pipeline(), "sdxl": tiny_sdxl_pipeline()}
    for pipe in out.values():
        pipe.set_progress_bar_config(disable=True)
    return out


def make_preset(solver="dpmpp_2m", end="zero", freeu=None, guidance=5.0):
    """Karras to 0, or the paper's sd15-5 list, which stops at σ = 0.13."""
    sigmas = schedules.karras(5) if end == "zero" else schedules.paper_preset("sd15-5")
    return Preset(name=f"test-{solver}-{end}", family="any", sigmas=sigmas, solver=solver,
                  freeu=freeu, guidance=guidance)


def use(pipe, preset) -> PresetScheduler:
    pipe.scheduler = PresetScheduler.from_preset(preset, pipe.scheduler.config)
    return pipe.scheduler


def pipeline_latents(pipe, preset, prompts=PROMPTS, seeds=SEEDS, **kwargs):
    """The pipeline on the preset, started from our sampler's draws: unit noise, which it scales
    by init_noise_sigma = σ_max as our sampler does."""
    use(pipe, preset)
    with freeu_plan(pipe, preset):
        return pipe(prompt=prompts, latents=initial_noise(LATENT, seeds, 1.0),
                    num_inference_steps=preset.nfe, guidance_scale=preset.guidance,
                    output_type="latent", **kwargs).images


@contextlib.contextmanager
def counting(*modules):
    """How many times each module is called inside the block."""
    counts = [[] for _ in modules]
    handles = [m.register_forward_hook(lambda *_, c=c: c.append(1))
               for m, c in zip(modules, counts)]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


# -- the scheduler alone, on a synthetic model: every solver, exactly -----------------------------

def fake_eps(x_in, t):
    """A deterministic nonlinear stand-in for a UNet's ε-prediction."""
    return torch.tanh(0.7 * x_in + t / 1000.0) + 0.1 * x_in.roll(1, -1)


def fake_denoiser(table, edit=None):
    """D(x; σ) through fake_eps with the UNet's float32 conditioning; ``edit(call, x)`` changes
    the solver's x in place before a call, as a pipeline editing its latents would."""
    calls = [0]

    def denoise(x, sigma):
        if edit is not None and calls[0] > 0:
            x.copy_(edit(calls[0], x))
        calls[0] += 1
        s = torch.tensor(sigma, dtype=torch.float32)
        t = table.sigma_to_t(s.double().reshape(1)).float()[0]
        return x - s * fake_eps(x * (s.square() + 1).rsqrt(), t)
    return denoise


def loop(sched, x, begin=None, edit=None, in_place=False):
    """What a pipeline does with a scheduler (the begin index is what img2img sets; ``edit``
    changes the latents between steps, into a new tensor or into the one step returned)."""
    sched.set_timesteps(sched.nfe)
    timesteps = sched.timesteps
    if begin is not None:
        sched.set_begin_index(begin)
        timesteps = timesteps[begin:]
    for i, t in enumerate(timesteps):
        eps = fake_eps(sched.scale_model_input(x, t), t)
        assert torch.equal(sched.scale_model_input(x, t), sched.scale_model_input(x, t))
        x = sched.step(eps, t, x).prev_sample
        if edit is not None and i < len(timesteps) - 1:
            x = x.copy_(edit(i + 1, x)) if in_place else edit(i + 1, x)
    return x


@pytest.mark.parametrize("end", ["zero", "above"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_step_replays_the_solver_exactly(solver, end):
    preset = make_preset(solver, end)
    sched = PresetScheduler.from_preset(preset, {"prediction_type": "epsilon"})
    noise = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(0))
    ours = solvers.get(solver)(fake_denoiser(sched.table), noise * float(preset.sigmas[0]),
                               preset.sigmas)
    assert torch.equal(loop(sched, noise * sched.init_noise_sigma), ours)
    assert sched.nfe == preset.nfe == len(sched.timesteps) == len(sched.sigmas) - 1


@pytest.mark.parametrize("solver", SOLVERS)
def test_samples_edited_between_steps_are_continued_from(solver):
    """Inpainting pastes the known region back after every step; the solver must go on from the
    edited sample with its history, as a live run whose x is edited in place does."""
    preset = make_preset(solver, "zero")
    sched = PresetScheduler.from_preset(preset)
    g = torch.Generator().manual_seed(1)
    noise, known = torch.randn(1, *LATENT, generator=g), torch.randn(1, *LATENT, generator=g)
    mask = (torch.arange(8) < 4).float().view(1, 1, 1, 8)

    def edit(call, x):
        return mask * (known + float(sched.sigmas[call]) * noise) + (1 - mask) * x

    ours = solvers.get(solver)(fake_denoiser(sched.table, edit), noise * sched.init_noise_sigma,
                               preset.sigmas)
    edited = loop(sched, noise * sched.init_noise_sigma, edit=edit)
    assert torch.equal(edited, ours)
    assert torch.equal(loop(sched, noise * sched.init_noise_sigma, edit=edit, in_place=True), ours)
    assert not torch.equal(edited, loop(sched, noise * sched.init_noise_sigma))
    if solver == "dpmpp_1s":   # first order: each step is x ← lerp(D, x_edited, σ_next/σ)
        x, s = noise * sched.init_noise_sigma, preset.sigmas.tolist()
        den = fake_denoiser(sched.table)
        for i in range(len(s) - 1):
            x = torch.lerp(den(x, s[i]), x, s[i + 1] / s[i])
            x = edit(i + 1, x) if i < len(s) - 2 else x
        torch.testing.assert_close(edited, x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_later_start_runs_the_tail_of_the_sigma_list(solver):
    """img2img: begin at call b; the solver starts afresh on the σ list from that call's σ."""
    preset = make_preset(solver, "above")
    sched = PresetScheduler.from_preset(preset)
    begin, j = (4, 2) if solver == "heun" else (2, 2)   # Heun: call 4 opens step 2
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(1, *LATENT, generator=g), torch.randn(1, *LATENT, generator=g)
    sched.set_timesteps(sched.nfe)
    sched.set_begin_index(begin)
    start = sched.add_noise(x0, noise, sched.timesteps[begin:begin + 1])
    assert torch.equal(start, x0 + noise * sched.sigmas[begin])
    assert float(sched.sigmas[begin]) == pytest.approx(float(preset.sigmas[j]), rel=1e-6)
    tail = preset.sigmas[j:]
    ours = solvers.get(solver)(fake_denoiser(sched.table), start.clone(), tail)
    assert torch.equal(loop(sched, start, begin=begin), ours)
    if solver == "heun":   # call 3 is the corrector of step 1: no solver run starts there
        with pytest.raises(ValueError, match="not the start of a heun step .*another strength"):
            loop(sched, start, begin=3)


def test_v_prediction_and_outputs():
    preset = make_preset("unipc", "above")
    sched = PresetScheduler.from_preset(preset, {"prediction_type": "v_prediction"})
    sched.set_timesteps(preset.nfe)
    x = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(3)) * 14.6
    v = torch.randn_like(x)
    s = sched.sigmas[0]
    out = sched.step(v, sched.timesteps[0], x)
    assert isinstance(out, PresetSchedulerOutput)
    torch.testing.assert_close(out.pred_original_sample,
                               x / (s * s + 1) - v * s / (s * s + 1).sqrt())
    again = sched.step(v, sched.timesteps[1], out.prev_sample, return_dict=False)
    assert isinstance(again, tuple) and again[0].shape == x.shape
    assert sched.step_index == 2


def test_timesteps_and_sigmas_are_the_presets(pipes):
    preset = make_preset("dpmpp_2m", "above")
    sched = use(pipes["sd"], preset)
    sched.set_timesteps(preset.nfe, device="cpu")
    assert sched.timesteps.dtype == torch.float32
    torch.testing.assert_close(sched.timesteps.double(), schedules.timesteps(preset.sigmas),
                               rtol=0, atol=1e-3)
    torch.testing.assert_close(sched.sigmas.double(), preset.sigmas, rtol=1e-6, atol=0)
    assert sched.init_noise_sigma == float(preset.sigmas[0]) and sched.order == 1
    assert sched.begin_index is None and sched.step_index is None
    heun = PresetScheduler.from_preset(make_preset("heun", "zero"))
    assert heun.nfe == 9 and heun.freeu_steps == [0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_replay_overhead_is_small():
    """20 steps of an SD-sized latent (4×64×64): the replays in all of them together, per solver.
    Printed with -s; the bound only catches a blow-up (model calls or worse than quadratic)."""
    shape = (1, 4, 64, 64)
    for solver in SOLVERS:
        preset = Preset(name="t", family="any", sigmas=schedules.karras(20), solver=solver)
        sched = PresetScheduler.from_preset(preset)
        sched.set_timesteps(preset.nfe)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g) * sched.init_noise_sigma
        outputs = [torch.randn(shape, generator=g) for _ in range(preset.nfe)]
        t0 = time.perf_counter()
        for k, t in enumerate(sched.timesteps):
            x = sched.step(outputs[k], t, x).prev_sample
        spent = time.perf_counter() - t0
        print(f"{solver}: {preset.nfe} steps of {shape}, replays {spent * 1e3:.1f} ms in all")
        assert torch.isfinite(x).all() and spent < 5.0


# -- text-to-image pipelines: equal to schedsearch.generate ---------------------------------------

@pytest.mark.parametrize("end", ["zero", "above"])
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("kind", ["sd", "sd2", "sdxl"])
def test_pipeline_equals_generate(pipes, kind, solver, end):
    pipe, preset = pipes[kind], make_preset(solver, end)
    ours = schedsearch.generate(pipe, preset, PROMPTS, SEEDS, output="samples")
    lat = pipeline_latents(pipe, preset)
    r = rel(lat, ours.latents)
    print(f"{kind} {solver} ends {end}: relative difference {r:.2e}")
    assert lat.shape == ours.latents.shape == (2, *LATENT) and r < 1e-4


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("kind", ["sd", "sd2", "sdxl"])
def test_without_guidance_the_pipeline_is_bitwise_generate(pipes, kind, solver):
    """No CFG, one image: the UNet sees identical inputs on both paths and the solver the same
    D's, so nothing is left to round differently."""
    pipe, preset = pipes[kind], make_preset(solver, "above", guidance=1.0)
    ours = schedsearch.generate(pipe, preset, PROMPTS[:1], SEEDS[:1], output="samples")
    assert torch.equal(pipeline_latents(pipe, preset, PROMPTS[:1], SEEDS[:1]), ours.latents)


def test_the_unets_batch_does_not_matter_at_this_tolerance(pipes):
    """generate runs the UNet one image at a time (eval_batch=1 on the CPU), the pipeline both
    images at once; with eval_batch=0 generate batches like the pipeline. Both are ~1e-6."""
    pipe, preset = pipes["sd"], make_preset("dpmpp_2m", "zero")
    lat = pipeline_latents(pipe, preset)
    alone = schedsearch.generate(pipe, preset, PROMPTS, SEEDS, output="samples").latents
    batched = schedsearch.generate(from_pipeline(pipe, eval_batch=0), preset, PROMPTS, SEEDS,
                                   output="samples").latents
    print(f"one image per UNet call {rel(lat, alone):.2e}, both at once {rel(lat, batched):.2e}")
    assert rel(lat, alone) < 1e-5 and rel(lat, batched) < 1e-5


# -- FreeU plans ----------------------------------------------------------------------------------

PLAN_CASES = [("sd", "diffusers", "dpmpp_2m"), ("sd", "original", "dpmpp_2m"),
              ("sd2", "diffusers", "unipc"), ("sd2", "original", "unipc"),
              ("sdxl", "diffusers", "dpmpp_3m"), ("sdxl", "original", "dpmpp_3m"),
              ("sd", "original", "heun")]


@pytest.mark.parametrize("kind,variant,solver", PLAN_CASES)
def test_freeu_plan_in_the_pipeline_equals_generate(pipes, kind, variant, solver):
    pipe = pipes[kind]
    plan = FreeUPlan.per_step([None, A, A, None, B], variant)
    preset = make_preset(solver, "zero", freeu=plan)
    ours = schedsearch.generate(pipe, preset, PROMPTS, SEEDS, output="samples")
    lat = pipeline_latents(pipe, preset)
    plain = pipeline_latents(pipe, make_preset(solver, "zero"))
    print(f"{kind} {variant} FreeU, {solver}: relative difference {rel(lat, ours.latents):.2e} "
          f"(the plan itself moves the sample by {rel(plain, ours.latents):.2e})")
    assert rel(lat, ours.latents) < 1e-4 and rel(plain, ours.latents) > 1e-3
    assert all(getattr(b, "b1", None) is None for b in pipe.unet.up_blocks)
    assert getattr(pipe.unet, "_schedsearch_freeu", None) is None


def live_setting(unet, variant):
    if variant == "original":
        return unet._schedsearch_freeu
    b = unet.up_blocks[0]
    values = [getattr(b, k, None) for k in ("b1", "b2", "s1", "s2")]
    return None if values[0] is None else FreeU(*values)


@pytest.mark.parametrize("variant", ["diffusers", "original"])
def test_every_unet_call_runs_its_steps_setting(pipes, variant):
    """Heun spends two calls per step (the corrector runs with the next step's setting, as in our
    sampler); img2img starts at a later call, which must get that call's setting, not step 0's."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = pipes["sd"]
    plan = FreeUPlan.per_step([A, None, B, A, None], variant)
    preset = make_preset("heun", "zero", freeu=plan)
    seen = []
    handle = pipe.unet.register_forward_hook(
        lambda m, *_: seen.append(live_setting(m, variant)))
    try:
        pipeline_latents(pipe, preset, PROMPTS[:1], SEEDS[:1])
        assert seen == [plan.at(i) for i in [0, 1, 1, 2, 2, 3, 3, 4, 4]]
        seen.clear()
        i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
        i2i.set_progress_bar_config(disable=True)
        with freeu_plan(i2i, preset):   # int(9 · 0.56) = 5 calls: from call 4, step 2's predictor
            i2i(prompt=PROMPTS[0], image=torch.randn(1, *LATENT), strength=0.56,
                num_inference_steps=preset.nfe, guidance_scale=5.0, output_type="latent")
        assert seen == [plan.at(i) for i in [2, 3, 3, 4, 4]]
    finally:
        handle.remove()


def test_freeu_plan_puts_the_unet_back_even_when_the_pipeline_raises(pipes):
    pipe = pipes["sd"]
    unet = pipe.unet
    preset = make_preset("dpmpp_2m", "zero", freeu=FreeUPlan.per_step([A] * 5, "original"))
    use(pipe, preset)
    unet.enable_freeu(s1=0.7, s2=0.6, b1=1.2, b2=1.3)   # the user's own diffusers FreeU
    hooks = len(unet._forward_pre_hooks)
    seen = []

    def boom(p, i, t, kwargs):
        seen.append(live_setting(unet, "original"))
        if i == 2:
            raise RuntimeError("stopped by the user's callback")
        return kwargs

    try:
        with pytest.raises(RuntimeError, match="stopped by the user's callback"):
            with freeu_plan(pipe, preset):
                pipe(prompt="a cat", num_inference_steps=preset.nfe, guidance_scale=5.0,
                     output_type="latent", callback_on_step_end=boom)
        assert seen == [A, A, A]   # the user's callback ran untouched, with the plan in force
        assert all((b.s1, b.s2, b.b1, b.b2) == (0.7, 0.6, 1.2, 1.3) for b in unet.up_blocks)
        assert unet._schedsearch_freeu is None and len(unet._forward_pre_hooks) == hooks
    finally:
        unet.disable_freeu()


def test_freeu_plan_refuses_a_scheduler_on_another_preset(pipes):
    pipe = pipes["sd"]
    use(pipe, make_preset("dpmpp_2m", "zero"))
    with pytest.raises(ValueError, match="runs preset test-dpmpp_2m-zero, not test-unipc-above"):
        with freeu_plan(pipe, make_preset("unipc", "above", freeu=FreeUPlan.off(5))):
            pass


# -- img2img, inpainting, ControlNet --------------------------------------------------------------

@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc", "ipndm"])
def test_img2img_runs_the_presets_tail(pipes, solver):
    """strength 0.6 of 5 calls starts at call 2 from x0 + σ_2·noise; the result is our solver on
    σ_2, σ_3, ... from there, through the same UNet (image given as latents: no VAE encode)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = pipes["sd"]
    preset = make_preset(solver, "zero")
    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    sched = use(i2i, preset)
    x0 = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(5))
    with counting(i2i.unet) as (calls,):
        lat = i2i(prompt=PROMPTS[0], image=x0, strength=0.6, num_inference_steps=preset.nfe,
                  guidance_scale=5.0, output_type="latent",
                  generator=torch.Generator().manual_seed(7)).images
    assert len(calls) == 3 and sched.begin_index == 2
    noise = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(7))
    model = from_pipeline(pipe)   # the text-to-image pipeline of the same UNet and encoder
    cond = model.condition(PROMPTS[:1])
    ref = solvers.get(solver)(lambda x, s: model.denoise(x, s, cond, 5.0),
                              x0 + noise * sched.sigmas[2], preset.sigmas[2:])
    print(f"img2img {solver}: relative difference {rel(lat, ref):.2e}")
    assert rel(lat, ref) < 1e-4


def test_sdxl_img2img_and_inpainting_run(pipes):
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLImg2ImgPipeline

    preset = make_preset("unipc", "above")
    xl = StableDiffusionXLImg2ImgPipeline(**pipes["sdxl"].components)
    xl.set_progress_bar_config(disable=True)
    use(xl, preset)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with counting(xl.unet) as (calls,):
        out = xl(prompt="a cat", image=image, strength=0.6, num_inference_steps=preset.nfe,
                 guidance_scale=5.0, output_type="latent").images
    assert out.shape == (1, *LATENT) and torch.isfinite(out).all() and len(calls) == 3

    # a 4-channel UNet: the pipeline pastes the known region back after every step
    inpaint = StableDiffusionInpaintPipeline(**pipes["sd"].components)
    inpaint.set_progress_bar_config(disable=True)
    use(inpaint, preset)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 32:] = 1
    with counting(inpaint.unet) as (calls,):
        out = inpaint(prompt="a cat", image=image, mask_image=mask,
                      num_inference_steps=preset.nfe, guidance_scale=5.0, output_type="pt").images
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all() and len(calls) == preset.nfe


def test_controlnet_pipeline_runs(pipes):
    from diffusers import StableDiffusionControlNetPipeline

    sd = pipes["sd"]
    pipe = StableDiffusionControlNetPipeline(
        vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
        controlnet=tiny_controlnet(sd.unet), scheduler=sd.scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    plan = FreeUPlan.per_step([None, A, A, None, B], "diffusers")
    preset = make_preset("dpmpp_3m", "zero", freeu=plan)
    control = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    results = []
    with counting(pipe.unet, pipe.controlnet) as (unet_calls, control_calls):
        # guess mode scales the model input twice per step (ControlNet's and the UNet's)
        for scale, guess_mode in ((1.0, False), (0.0, False), (1.0, True)):
            results.append(pipeline_latents(pipe, preset, PROMPTS[:1], SEEDS[:1], image=control,
                                            controlnet_conditioning_scale=scale,
                                            guess_mode=guess_mode))
    assert len(unet_calls) == len(control_calls) == 3 * preset.nfe
    for lat in results:
        assert lat.shape == (1, *LATENT) and torch.isfinite(lat).all()
    assert rel(results[0], results[1]) > 1e-2   # the ControlNet's residuals reach the sample


# -- configuration --------------------------------------------------------------------------------

def test_save_and_load_round_trip(pipes, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = pipes["sd2"]
    plan = FreeUPlan.per_step([None, A, A, None, B], "original")
    preset = make_preset("unipc", "above", freeu=plan)
    sched = use(pipe, preset)
    sched.save_pretrained(str(tmp_path / "sched"))
    back = PresetScheduler.from_pretrained(str(tmp_path / "sched"))
    assert back.config.preset == preset.to_json() == sched.config.preset
    assert back.preset.freeu == plan and back.config.prediction_type == "v_prediction"
    assert torch.equal(back.timesteps, sched.timesteps) and back.nfe == sched.nfe

    pipe.save_pretrained(str(tmp_path / "pipe"), safe_serialization=True)
    loaded = StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe"))
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, PresetScheduler)
    assert loaded.scheduler.config.preset == preset.to_json()
    assert torch.equal(pipeline_latents(loaded, preset, PROMPTS[:1], SEEDS[:1]),
                       pipeline_latents(pipe, preset, PROMPTS[:1], SEEDS[:1]))


def test_wrong_step_counts_and_overrides_are_refused(pipes):
    pipe = pipes["sd"]
    preset = make_preset("dpmpp_2m", "above")
    sched = use(pipe, preset)
    with pytest.raises(ValueError, match=r"makes 5 model calls \(NFE 5\): call the pipeline with "
                                         r"num_inference_steps=5, not 4"):
        sched.set_timesteps(4)
    with pytest.raises(ValueError, match="num_inference_steps=5, not 50"):
        pipe(prompt="a cat", output_type="latent")          # the pipeline's default of 50
    with pytest.raises(ValueError, match="do not pass timesteps= or sigmas="):
        pipe(prompt="a cat", sigmas=[14.6, 1.0, 0.1], output_type="latent")
    with pytest.raises(ValueError, match="do not pass timesteps= or sigmas="):
        sched.set_timesteps(timesteps=[999, 500, 1])
    sched.set_timesteps(5, device="cpu", mu=0.5)            # other schedulers' options: ignored
    x = torch.zeros(1, *LATENT)
    for t in sched.timesteps:
        x = sched.step(torch.zeros_like(x), t, x).prev_sample
    with pytest.raises(RuntimeError, match="all 5 model calls of preset .* are done"):
        sched.step(torch.zeros_like(x), sched.timesteps[-1], x)
    with pytest.raises(ValueError, match="begin_index must be in"):
        sched.set_begin_index(5)
    with pytest.raises(ValueError, match="needs a preset"):
        PresetScheduler()
    with pytest.raises(ValueError, match="zero terminal SNR"):
        PresetScheduler.from_preset(preset, {"rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        PresetScheduler.from_preset(preset, {"prediction_type": "sample"})
    assert PresetScheduler.from_preset("sd15-5").preset.name == "sd15-5"   # by name


def test_swapping_back_restores_the_pipelines_scheduler(tmp_path):
    """SDXL's "leading" spacing and steps offset survive PresetScheduler and back (and its
    save_pretrained), as they survive a swap between stock schedulers: [751, 501, 251, 1] at 4
    steps, not the [999, 666, 333, 0] of the defaults."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    original = EulerDiscreteScheduler.from_config(tiny_sd_pipeline().scheduler.config,
                                                  timestep_spacing="leading")
    original.set_timesteps(4)
    assert original.timesteps.tolist() == [751, 501, 251, 1]
    sched = PresetScheduler.from_preset(make_preset(), original.config)
    sched.save_pretrained(str(tmp_path))
    for cls in (EulerDiscreteScheduler, DPMSolverMultistepScheduler):
        direct = cls.from_config(original.config)   # the stock swap, for the stock answer
        direct.set_timesteps(4)
        for config in (sched.config, PresetScheduler.from_pretrained(str(tmp_path)).config):
            back = cls.from_config(config)
            back.set_timesteps(4)
            assert back.timesteps.tolist() == direct.timesteps.tolist(), cls.__name__
    assert direct.timesteps.tolist() == [801, 601, 401, 201]   # DPM-Solver's own "leading"
    # a preset swapped for another keeps them too, and the new preset's own keys win
    again = PresetScheduler.from_preset(make_preset("unipc"), sched.config)
    assert again.config.timestep_spacing == "leading" and again.preset.solver == "unipc"


@pytest.mark.parametrize("stock", ["DPMSolverMultistepScheduler", "DDIMScheduler"])
def test_freeu_plan_counts_each_pipeline_call_from_its_start(pipes, stock):
    """With a stock scheduler (no step index before its first step, or none at all) the plan
    counts UNet calls: a second pipeline call in the same block starts again at step 0."""
    import diffusers

    pipe = pipes["sd"]
    original = pipe.scheduler
    plan = FreeUPlan.per_step([A, None, B, None, None], "original")
    preset = make_preset(freeu=plan)
    seen = []
    handle = pipe.unet.register_forward_hook(lambda m, *_: seen.append(m._schedsearch_freeu))
    try:
        pipe.scheduler = getattr(diffusers, stock).from_config(original.config)
        with freeu_plan(pipe, preset):
            for _ in range(2):
                pipe(prompt=PROMPTS[0], num_inference_steps=5, guidance_scale=5.0,
                     output_type="latent")
    finally:
        handle.remove()
        pipe.scheduler = original
    assert seen == [A, None, B, None, None] * 2
