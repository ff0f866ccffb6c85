"""Core parity on a tiny offline diffusers UNet: DPM++2M vs diffusers, FreeU plans vs enable_freeu."""

import numpy as np
import pytest
import torch

from schedsearch import solvers
from schedsearch.freeu import DEFAULTS, FreeU, FreeUPlan, set_freeu
from schedsearch.models.unet import Conditioning, unet_denoise
from schedsearch.noise import SD
from tiny import tiny_unet


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def conditioning(b, seed=1, dim=32):
    g = torch.Generator().manual_seed(seed)
    return Conditioning(cond=torch.randn(b, 7, dim, generator=g),
                        uncond=torch.randn(b, 7, dim, generator=g))


def test_dpmpp_2m_matches_diffusers_multistep_scheduler(unet):
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, solver_order=2,
        algorithm_type="dpmsolver++", final_sigmas_type="zero", lower_order_final=True)
    ts = [999, 850, 650, 420, 230, 90]
    sched.set_timesteps(timesteps=ts)
    cond, w = conditioning(2), 4.0
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g) * sched.init_noise_sigma
    x = latents.clone()
    states = torch.cat([cond.uncond, cond.cond])
    with torch.no_grad():
        for t in sched.timesteps:
            eps = unet(torch.cat([x, x]), t, encoder_hidden_states=states).sample
            e_u, e_c = eps.chunk(2)
            x = sched.step(e_u + w * (e_c - e_u), t, x).prev_sample
    ours_sigmas = torch.tensor([*SD.sigmas[ts], 0.0], dtype=torch.float64)
    torch.testing.assert_close(sched.sigmas.double(), ours_sigmas, rtol=1e-5, atol=0)  # float32
    # VP latent → VE latent: x_ve = x_vp · sqrt(1 + σ²)
    x0 = latents * float(np.sqrt(1 + ours_sigmas[0] ** 2))
    ours = solvers.dpmpp_2m(lambda x_, s: unet_denoise(unet, SD, x_, s, cond, w), x0, ours_sigmas)
    rel = (ours - x).norm() / x.norm()
    print(f"relative difference {rel:.2e}")
    assert rel < 1e-4, f"relative difference {rel:.2e}"


def run_plan(unet, plan, sigmas, cond, x0, w=3.0):
    seen = []
    hook = solvers.chain(plan.hook(unet) if plan is not None else None,
                         lambda i, s, sn, x, d: seen.append(d.clone()))
    try:
        out = solvers.dpmpp_1s(lambda x, s: unet_denoise(unet, SD, x, s, cond, w), x0, sigmas, hook)
    finally:
        set_freeu(unet, None)
    return out, seen


def test_freeu_diffusers_variant_equals_enable_freeu(unet):
    setting = FreeU(1.3, 1.4, 0.9, 0.2)
    cond = conditioning(2)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 3
    plan = FreeUPlan.from_start(1, 0, setting, "diffusers")
    set_freeu(unet, plan.at(0), plan.variant)
    ours = unet_denoise(unet, SD, x, 3.0, cond, 2.0)
    set_freeu(unet, None)
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.3, b2=1.4)
    ref = unet_denoise(unet, SD, x, 3.0, cond, 2.0)
    unet.disable_freeu()
    plain = unet_denoise(unet, SD, x, 3.0, cond, 2.0)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert (ours - plain).abs().max() > 1e-3  # FreeU did something


@pytest.mark.parametrize("variant", ["diffusers", "original"])
def test_freeu_changes_nothing_before_t_aug(unet, variant):
    sigmas = torch.tensor([14.6, 6.0, 2.5, 1.0, 0.4, 0.0], dtype=torch.float64)
    cond = conditioning(2)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)) * 14.6
    _, off = run_plan(unet, None, sigmas, cond, x0)
    _, on = run_plan(unet, FreeUPlan.from_start(5, 2, DEFAULTS["sd15"], variant), sigmas, cond, x0)
    for i in range(2):
        torch.testing.assert_close(on[i], off[i], rtol=0, atol=0)
    assert (on[2] - off[2]).abs().max() > 1e-3
    # and the UNet is left clean afterwards
    _, again = run_plan(unet, None, sigmas, cond, x0)
    torch.testing.assert_close(again[-1], off[-1], rtol=0, atol=0)


def test_per_step_plan_toggles_between_steps(unet):
    a, b = FreeU(1.1, 1.1, 0.9, 0.2), FreeU(1.3, 1.4, 0.9, 0.2)
    plan = FreeUPlan.per_step([None, a, a, a, None, b], "diffusers")
    sigmas = torch.tensor([14.6, 6.0, 2.5, 1.0, 0.6, 0.3, 0.13], dtype=torch.float64)
    cond = conditioning(1)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6)) * 14.6
    _, seen = run_plan(unet, plan, sigmas, cond, x0)
    # replay each step's input with the setting the plan names: same D at every step
    xs = [x0]
    for i, d in enumerate(seen[:-1]):
        xs.append(torch.lerp(d, xs[-1], float(sigmas[i + 1] / sigmas[i])))
    for i, x in enumerate(xs):
        set_freeu(unet, plan.at(i), "diffusers")
        torch.testing.assert_close(unet_denoise(unet, SD, x, float(sigmas[i]), cond, 3.0), seen[i],
                                   rtol=0, atol=0)
    set_freeu(unet, None)


def test_original_variant_is_keyed_on_channels_and_reaches_more_blocks(unet):
    """On this UNet (block_out_channels 32, 64) the original variant scales the 64-channel backbone
    by b1 wherever it enters an up-block resnet, including up_blocks[1]'s first resnet, which the
    diffusers variant (by block index) treats with b2."""
    cond = conditioning(1)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8)) * 2
    only_b2 = FreeU(1.0 + 1e-9, 1.6, 1.0, 1.0)
    set_freeu(unet, only_b2, "original")
    orig = unet_denoise(unet, SD, x, 2.0, cond, 1.0)
    set_freeu(unet, only_b2, "diffusers")
    diff = unet_denoise(unet, SD, x, 2.0, cond, 1.0)
    set_freeu(unet, None)
    plain = unet_denoise(unet, SD, x, 2.0, cond, 1.0)
    assert (orig - plain).abs().max() > 1e-4 and (diff - plain).abs().max() > 1e-4
    assert (orig - diff).abs().max() > 1e-4

    # Reference: the original patch written out by hand for this UNet's first up-block resnet.
    captured = {}
    block = unet.up_blocks[0]
    h = block.resnets[0].register_forward_pre_hook(lambda m, a: captured.update({"in": a[0]}))
    set_freeu(unet, FreeU(1.5, 1.0 + 1e-9, 0.5, 1.0), "original")
    unet_denoise(unet, SD, x, 2.0, cond, 1.0)
    set_freeu(unet, None)
    h.remove()
    h2 = block.resnets[0].register_forward_pre_hook(lambda m, a: captured.update({"plain": a[0]}))
    unet_denoise(unet, SD, x, 2.0, cond, 1.0)
    h2.remove()
    from diffusers.utils.torch_utils import fourier_filter
    p = captured["plain"]
    c = block.resnets[0].in_channels - 64  # hidden (64) + skip
    hid, res = p[:, :64].clone(), p[:, 64:]
    hid[:, :32] *= 1.5
    expected = torch.cat([hid, fourier_filter(res, 1, 0.5)], 1)
    assert c > 0
    torch.testing.assert_close(captured["in"], expected, rtol=1e-6, atol=1e-6)


def test_freeu_values_must_be_positive_and_plans_round_trip():
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match=r"FreeU b1 must be a finite number > 0"):
            FreeU(bad, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="FreeU s2 must be a finite number > 0, got 0"):
        FreeU(1.1, 1.1, 0.9, 0)
    with pytest.raises(ValueError, match="variant must be one of"):
        FreeUPlan.off(3).__class__((None,), "fancy")
    with pytest.raises(ValueError, match="t_aug must be an integer >= 0"):
        FreeUPlan.from_start(5, -1, DEFAULTS["sd15"])
    plan = FreeUPlan.per_step([None, FreeU(1.1, 1.1, 0.9, 0.2)], "original")
    assert FreeUPlan.from_json(plan.to_json()) == plan
    assert FreeUPlan.from_start(5, 5, DEFAULTS["sd15"]).active is False
    with pytest.raises(ValueError, match="exactly b1, b2, s1, s2"):
        FreeUPlan.from_json({"steps": [{"b1": 1.0}]})
