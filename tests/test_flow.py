"""Flow-matching models in the core: the flow noise table against diffusers'
FlowMatchEulerDiscreteScheduler, every solver from σ = ∞ (the limits of docs/flow.md, the limit of
finite starts, model calls, convergence order on the exact flow mixture), the sampler's start, the
gmm-flow testbed, and the schedule families on a flow table."""

import math

import numpy as np
import pytest
import torch

from schedsearch import schedules as S, solvers
from schedsearch.models import load
from schedsearch.models.gmm import GaussianMixture
from schedsearch.models.gmm_flow import FlowGaussianMixture
from schedsearch.noise import FLOW, FlowTable, calculate_shift, flow_sigma, flow_t
from schedsearch.sampler import initial_noise, sample
from test_solvers import counting

INF = math.inf


def scheduler(**cfg):
    from diffusers import FlowMatchEulerDiscreteScheduler
    return FlowMatchEulerDiscreteScheduler(**cfg)


# -- the table ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg, mu, grid", [
    ({"shift": 3.0}, None, "scheduler"),                                         # SD3 / SD3.5
    ({"shift": 1.0}, None, "scheduler"),
    ({"shift": 3.0, "shift_terminal": 0.02}, None, "scheduler"),
    ({"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}, 1.15, "flux"),   # FLUX
    ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, 2.0, "scheduler"),
])
def test_default_times_are_the_schedulers(cfg, mu, grid):
    for steps in (1, 4, 7, 28):
        if steps == 1 and "shift_terminal" in cfg:   # diffusers' stretch divides by zero there
            continue
        sch = scheduler(**cfg)
        kw = {} if mu is None else {"mu": mu}
        if grid == "flux":   # FluxPipeline's own grid, handed to set_timesteps as sigmas
            sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), **kw)
        else:
            sch.set_timesteps(steps, **kw)
        table = FlowTable.from_config(sch.config, mu=mu, grid=grid)
        # diffusers computes in float32
        np.testing.assert_allclose(table.default_t(steps), sch.sigmas[:-1].double().numpy(),
                                   rtol=2e-7, atol=1e-7)
        sig = S.flow_shifted(steps, table)
        assert sig[0] == INF and sig[-1] == 0 and len(sig) == steps + 1
        np.testing.assert_allclose(flow_t(sig.numpy()), sch.sigmas.double().numpy(), atol=1e-7)


def test_flux_mu_is_diffusers_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as theirs
    for n in (16, 256, 1024, 4096, 6000):
        assert calculate_shift(n) == pytest.approx(theirs(n), rel=1e-12)
    t = FlowTable.from_config({"use_dynamic_shifting": True}, image_seq_len=4096, grid="flux")
    assert t.mu == pytest.approx(1.15) and t.shift == pytest.approx(math.exp(1.15))
    with pytest.raises(ValueError, match="needs mu or image_seq_len"):
        FlowTable.from_config({"use_dynamic_shifting": True})


def test_conversions_and_facts():
    assert flow_t(INF) == 1.0 and flow_sigma(1.0) == INF and flow_sigma(0.0) == 0.0
    assert flow_t(1.0) == 0.5 and flow_sigma(0.75) == pytest.approx(3.0)
    assert FLOW.sigma_max == INF and FLOW.t_max == 1000.0 and FLOW.prediction_type == "flow"
    assert FLOW.sigma_to_t(INF) == 1000.0 and FLOW.t_to_sigma(1000.0) == INF
    assert FLOW.sigma_to_t(1.0) == 500.0 and FLOW.t_to_sigma(500.0) == 1.0
    s = torch.tensor([INF, 3.0, 0.5, 0.0], dtype=torch.float64)
    np.testing.assert_allclose(FLOW.sigma_to_t(s).numpy(), [1000, 750, 1000 / 3, 0])
    np.testing.assert_allclose(FLOW.sigma_to_t(s.numpy()), [1000, 750, 1000 / 3, 0])
    np.testing.assert_allclose(S.timesteps(s, FLOW).numpy(), [1000, 750, 1000 / 3])
    with pytest.raises(ValueError, match="t must lie in"):
        FLOW.t_to_sigma(1000.5)
    # the time shift multiplies σ by s; σ_min is the shifted lowest training time 1/N
    sd3 = FlowTable.from_config({"shift": 3.0})
    assert flow_sigma(sd3.shifted(0.3)) == pytest.approx(3 * flow_sigma(0.3), rel=1e-12)
    assert sd3.sigma_min == pytest.approx(3 / 999, rel=1e-12)
    assert FLOW.sigma_min == pytest.approx(1 / 999, rel=1e-12)
    assert len({FLOW.fingerprint(), sd3.fingerprint(),
                FlowTable.from_config({"use_dynamic_shifting": True}, mu=1.15).fingerprint()}) == 3
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        FlowTable.from_config({"use_karras_sigmas": True})


def test_initial_noise_at_infinity_is_the_noise_itself():
    eps = initial_noise((3, 2), [5, 6], 1.0)
    assert torch.equal(initial_noise((3, 2), [5, 6], INF), eps)
    assert torch.equal(initial_noise((3, 2), [5, 6], 4.0), 4.0 * eps)


# -- solvers from σ = ∞ ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixture():
    return FlowGaussianMixture.default(dtype=torch.float64)


@pytest.fixture(scope="module")
def problem(mixture):
    cond = mixture.condition([0, 1, 2, 3] * 2)
    eps = initial_noise(mixture.latent_shape, range(8), INF).double()
    return (lambda x, s: mixture.denoise(x, s, cond, 2.0)), eps


FIRST_ORDER_START = ["dpmpp_1s", "euler", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm"]
FROM_INFINITY = [s for s in solvers.SOLVERS if s != "unipc_bh1"]   # bh1 has no limit there


def test_unipc_bh1_refuses_to_start_at_infinity(problem):
    """Its first corrector weighs D_1 − D_0 by h/2, infinite from σ = ∞: from finite σ_0 → ∞ it
    drifts away from bh2's limit (which bh2 itself approaches like 1/log σ_0) instead of settling."""
    den, eps = problem
    with pytest.raises(ValueError, match="unipc_bh1 cannot start at σ = ∞"):
        solvers.unipc_bh1(den, eps, [INF, 2.0, 0.0])
    sig = [9.0, 3.0, 1.0, 0.3, 0.05]
    limit = solvers.unipc(den, eps, [INF] + sig)

    def gap(name, p):
        return float((solvers.get(name)(den, 10.0 ** p * eps, [10.0 ** p] + sig) - limit)
                     .pow(2).mean().sqrt())
    assert gap("unipc", 32) < gap("unipc", 8) / 3
    assert gap("unipc_bh1", 32) > gap("unipc_bh1", 8) > gap("unipc_bh1", 2) > 10 * gap("unipc", 32)


@pytest.mark.parametrize("name", FIRST_ORDER_START)
def test_first_step_from_infinity_is_d_plus_sigma_eps(problem, name):
    den, eps = problem
    for s1 in (7.0, 0.3, 0.0):
        out = solvers.get(name)(den, eps, [INF, s1])
        torch.testing.assert_close(out, den(eps, INF) + s1 * eps, rtol=0, atol=1e-14)


def test_heun_from_infinity_is_the_trapezoid_in_one_over_sigma(problem):
    den, eps = problem
    d0 = den(eps, INF)
    guess = d0 + 2.0 * eps
    expected = 2.0 * eps + (d0 + den(guess, 2.0)) / 2
    torch.testing.assert_close(solvers.heun(den, eps, [INF, 2.0]), expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(solvers.heun(den, eps, [INF, 0.0]), d0, rtol=0, atol=0)
    # UniPC's corrector after its first step is the same trapezoid (ρ = ½, weight 1 − q = 1)
    seen = []
    sig = [INF, 2.0, 0.5]
    out = solvers.unipc(den, eps, sig, lambda i, s, sn, x, d: seen.append(d))
    q = 0.5 / 2.0
    corrected = (out - (1 - q) * seen[1]) / q
    torch.testing.assert_close(corrected, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", FROM_INFINITY)
def test_model_calls_and_hooks_from_infinity(problem, name):
    den, eps = problem
    for sig in ([INF, 9.0, 2.0, 0.4, 0.0], [INF, 9.0, 2.0, 0.4, 0.05], [INF, 0.0]):
        f, calls = counting(den)
        seen = []
        out = solvers.get(name)(f, eps, torch.tensor(sig, dtype=torch.float64),
                                lambda i, s, sn, x, d: seen.append((i, s, x)))
        assert len(calls) == solvers.model_calls(name, sig) and calls[0] == INF
        assert [s for _, s, _ in seen] == sig[:-1]
        assert seen[0][2] is eps or torch.equal(seen[0][2], eps)   # the state at ∞ is ε
        assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", ["dpmpp_1s", "euler", "ipndm"])
def test_finite_starts_tend_to_the_infinite_start_as_one_over_sigma(problem, name):
    den, eps = problem
    sig = [9.0, 3.0, 1.0, 0.3, 0.0]
    exact = solvers.get(name)(den, eps, [INF] + sig)
    gaps = [float((solvers.get(name)(den, s0 * eps, [s0] + sig) - exact).abs().max())
            for s0 in (1e2, 1e4, 1e8)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-6
    assert gaps[1] / gaps[0] == pytest.approx(1e-2, rel=0.2)   # O(1/σ_0)


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "unipc"])
def test_finite_starts_tend_to_the_infinite_start_as_one_over_log_sigma(problem, name):
    """The multistep weights after the first step involve h_0 = log(σ_0/σ_1): the finite start
    approaches the limit only like 1/log σ_0 (so a nudged σ_0 = 1e8 is still visibly off)."""
    den, eps = problem
    sig = [9.0, 3.0, 1.0, 0.3, 0.05]
    exact = solvers.get(name)(den, eps, [INF] + sig)
    gaps = {p: float((solvers.get(name)(den, 10.0 ** p * eps, [10.0 ** p] + sig) - exact)
                     .pow(2).mean().sqrt()) for p in (8, 16, 32, 64, 128)}
    assert gaps[8] > gaps[16] > gaps[32] > gaps[64] > gaps[128] > 0
    for p in (16, 32, 64):   # log σ_0 doubles: the gap about halves
        assert gaps[2 * p] / gaps[p] == pytest.approx(0.5, abs=0.1)
    assert gaps[128] < 0.02 * float(exact.pow(2).mean().sqrt())


def test_heun_has_no_finite_limit_so_it_starts_in_one_over_sigma(problem):
    den, eps = problem
    sig = [9.0, 1.0, 0.0]
    exact = solvers.heun(den, eps, [INF] + sig)
    gaps = [float((solvers.heun(den, s0 * eps, [s0] + sig) - exact).abs().max())
            for s0 in (1e3, 1e6)]
    assert gaps[1] > 100 * gaps[0] > 0   # the σ-trapezoid over [σ_1, σ_0] grows like σ_0


def test_unipc_weights_after_infinity_are_the_limit_of_far_nodes():
    h = 0.7
    for r_far in (-1e5, -1e7):
        pred, corr = solvers._unipc_rhos((-0.8, r_far), h)
        lim_pred, lim_corr = solvers._unipc_rhos_after_infinity((-0.8,), h)
        assert pred[0] == pytest.approx(lim_pred[0], abs=50 / abs(r_far))
        assert corr[0] == pytest.approx(lim_corr[0], abs=50 / abs(r_far))
        assert corr[-1] == pytest.approx(lim_corr[-1], abs=50 / abs(r_far))
        pred2, corr2 = solvers._unipc_rhos((r_far,), h)
        _, lim2 = solvers._unipc_rhos_after_infinity((), h)
        assert corr2[-1] == pytest.approx(lim2[0], abs=50 / abs(r_far))


@pytest.fixture(scope="module")
def convergence(mixture):
    """The broad-component mixture of test_solvers' order test, under flow matching."""
    base = GaussianMixture.default(dim=16, seed=3)
    rng = np.random.default_rng(1)
    g = FlowGaussianMixture(base._host["means"].numpy(), rng.uniform(0.3, 0.5, size=12) ** 2,
                            np.ones(12), np.repeat(np.arange(4), 3), dtype=torch.float64)
    cond = g.condition([0, 1, 2, 3] * 16)
    den = lambda x, s: g.denoise(x, s, cond, 3.0)  # noqa: E731
    eps = initial_noise(g.latent_shape, range(64), INF).double()
    table = FlowTable(shift=3.0)

    def lst(n):   # SD3's shifted grid down to t = 0.01, ending there
        return torch.from_numpy(flow_sigma(table.shifted(np.linspace(1, 0.01, n))))
    return den, eps, lst, solvers.unipc(den, eps, lst(4000))


# Global order from σ = ∞ on shifted (s = 3) lists of 16..128 steps ending at t = 0.01 (see
# docs/flow.md for the local slopes). DPM++2M's first two steps are first order there (its
# 1/(2r) weight vanishes after ∞), so it reaches 2 only from ~32 steps on.
@pytest.mark.parametrize("name, order", [("dpmpp_1s", 0.85), ("dpmpp_2m", 1.7), ("heun", 2.0),
                                         ("dpmpp_3m", 3.0), ("unipc", 2.1), ("ipndm", 2.6)])
def test_convergence_order_from_infinity(convergence, name, order):
    den, eps, lst, ref = convergence
    ns = [16, 32, 64, 128]
    errs = [float((solvers.get(name)(den, eps, lst(n)) - ref).pow(2).mean().sqrt()) for n in ns]
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert abs(slope - order) <= 0.3, f"{name}: measured order {slope:.2f}"
    if name == "dpmpp_2m":
        assert math.log2(errs[2] / errs[3]) == pytest.approx(2.0, abs=0.25)


# -- the gmm-flow testbed -------------------------------------------------------------------------

def test_gmm_flow_is_gmm_in_flow_time(mixture):
    plain = GaussianMixture.default(dtype=torch.float64)
    cond = plain.condition([0, 1, 2, 3, ""])
    x = torch.randn(5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    for s in (0.02, 1.0, 30.0, 1e4):
        torch.testing.assert_close(mixture.denoise(x, s, cond, 2.5), plain.denoise(x, s, cond, 2.5),
                                   rtol=1e-11, atol=1e-11)
    # at t = 1 the posterior is the prior: each class's mean, whatever ε
    d = mixture.denoise(x, INF, cond, 1.0)
    for row, c in enumerate([0, 1, 2, 3, None]):
        mean, _ = mixture.moments(None if c is None else [c])
        np.testing.assert_allclose(d[row].numpy(), mean, atol=1e-12)
    # the closed-form velocity: x_t = (1−t)·y at t = σ/(1+σ), v = (x_t − D)/t
    t = torch.full((5,), 0.4, dtype=torch.float64)
    x_t = 0.6 * x
    v = mixture.velocity(x_t, t, cond, 2.5)
    torch.testing.assert_close(x_t - 0.4 * v, plain.denoise(x, 0.4 / 0.6, cond, 2.5),
                               rtol=1e-11, atol=1e-11)
    assert mixture.family == "gmm-flow" and mixture.name.startswith("gmm-flow-")
    assert mixture.fingerprint() != plain.fingerprint()


def test_the_first_model_call_is_at_t_equal_one(mixture, monkeypatch):
    seen = []
    original = FlowGaussianMixture.posterior_mean_t

    def spy(self, x_t, t, class_ids):
        seen.append((x_t.clone(), t.clone()))
        return original(self, x_t, t, class_ids)
    monkeypatch.setattr(FlowGaussianMixture, "posterior_mean_t", spy)
    sig = S.build({"name": "flow", "steps": 3}, mixture.table)
    out = sample(mixture, sig, [0, 1], [4, 5], solver="dpmpp_2m", guidance=1.0)
    x_t, t = seen[0]
    assert bool((t == 1.0).all())
    assert torch.equal(x_t, initial_noise(mixture.latent_shape, [4, 5], INF).double())
    assert out.nfe == 3 and bool(torch.isfinite(out.latents).all())


def test_a_ddpm_model_refuses_a_start_at_infinity():
    with pytest.raises(ValueError, match="starting at ∞ is for flow-matching models; gmm-d16"):
        sample(load("gmm", device="cpu"), [INF, 1.0, 0.0], [0], [0])


def test_every_solver_samples_the_gmm_flow_testbed():
    model = load("gmm-flow", device="cpu")
    assert model.family == "gmm-flow" and model.table is FLOW
    data = torch.from_numpy(model.moments([0])[0]).float()
    for name in FROM_INFINITY:
        out = sample(model, S.build({"name": "flow", "steps": 12}, model.table), [0] * 64,
                     range(64), solver=name, guidance=1.0)
        # 64 samples of class 0: their mean sits near the class mean
        assert float((out.latents.mean(0) - data).abs().max()) < 0.35, name


# -- schedules on a flow table --------------------------------------------------------------------

def test_optimal_steps_is_comfyuis_node():
    """Values computed by hand from ComfyUI's nodes_optimalsteps.py: 10 steps take the FLUX table
    as is; otherwise log t is interpolated linearly at steps + 1 evenly spaced positions of the
    reversed table; the last value becomes 0. Here as σ = t/(1−t)."""
    table = [0.9968, 0.9886, 0.9819, 0.975, 0.966, 0.9471, 0.9158, 0.8287, 0.5512, 0.2808, 0.001]
    ten = S.optimal_steps(10).numpy()
    np.testing.assert_allclose(ten[:-1], [t / (1 - t) for t in table[:-1]], rtol=1e-12)
    assert ten[-1] == 0 and ten[0] == pytest.approx(311.5)
    # 4 steps: positions 0, 1/4, 1/2, 3/4, 1 of the table reversed (knots at multiples of 1/10);
    # position 1/4 lies halfway between knots 2 and 3 of the reversed table (0.5512 and 0.8287)
    rev = table[::-1]
    t1 = math.exp(0.5 * math.log(rev[2]) + 0.5 * math.log(rev[3]))
    t2 = rev[5]                            # 1/2 is knot 5
    t3 = math.exp(0.5 * math.log(rev[7]) + 0.5 * math.log(rev[8]))
    expected_t = [table[0], t3, t2, t1]
    np.testing.assert_allclose(S.optimal_steps(4).numpy()[:-1],
                               [t / (1 - t) for t in expected_t], rtol=1e-12)
    assert S.build({"name": "optimalsteps", "steps": 4}, FLOW).tolist() == \
        S.optimal_steps(4).tolist()
    with pytest.raises(ValueError, match="model_type must be one of flux"):
        S.optimal_steps(4, "wan")


def test_karras_on_a_flow_model_is_diffusers_karras_in_t():
    sch = scheduler(shift=3.0, use_karras_sigmas=True)
    sch.set_timesteps(9)
    theirs = sch.sigmas.double().numpy()
    table = FlowTable(shift=3.0)
    ours = S.flow_karras(9, table, sigma_min=float(flow_sigma(theirs[-2])))
    assert ours[0] == INF and ours[-1] == 0
    np.testing.assert_allclose(flow_t(ours.numpy()), theirs, rtol=2e-6, atol=1e-7)
    built = S.build({"name": "karras", "steps": 9, "rho": 7.0}, table)
    assert built[0] == INF and float(built[-2]) == pytest.approx(table.sigma_min)


def test_build_on_a_flow_table():
    sd3 = FlowTable(shift=3.0)
    uni = S.build({"name": "uniform", "steps": 4}, FLOW)
    np.testing.assert_allclose(uni.numpy(), [INF, 3.0, 1.0, 1 / 3, 0.0])   # t = 1, ¾, ½, ¼, 0
    shifted = S.build({"name": "flow", "steps": 4, "shift": 1.0}, sd3)
    np.testing.assert_allclose(flow_t(shifted.numpy()[1:-1]), np.linspace(1, 1e-3, 4)[1:],
                               rtol=1e-12)
    assert S.build({"name": "explicit", "sigmas": [INF, 2.0, 0.0]}, FLOW).tolist() == \
        [INF, 2.0, 0.0]
    assert S.build({"name": "explicit", "sigmas": [5.0, 2.0]}, FLOW).tolist() == [5.0, 2.0]
    assert float(S.build({"name": "logsnr", "steps": 3, "sigma_max": 100.0}, FLOW)[0]) == \
        pytest.approx(100.0)
    for bad, match in (({"name": "logsnr", "steps": 3}, "finite sigma_max"),
                       ({"name": "paper", "steps": 5, "p1": 5, "p2": 1.2, "stop": 2},
                        "no faithful flow-model analogue"),
                       ({"name": "sd15-8"}, "no faithful"), ({"name": "ays", "steps": 5},
                                                            "no faithful"),
                       ({"name": "explicit", "sigmas": [INF, 1.0, 2.0]}, "strictly decreasing"),
                       ({"name": "flow", "steps": 3, "shift": -1}, "shift")):
        with pytest.raises(ValueError, match=match):
            S.build(bad, FLOW)
    with pytest.raises(ValueError, match="for flow-matching models"):
        S.flow_shifted(4, S.SD)
    with pytest.raises(ValueError, match="is for flow-matching models"):
        S.build({"name": "flow", "steps": 4})
    # SD tables are untouched by all this
    assert S.build({"name": "karras", "steps": 3}).tolist() == S.karras(3).tolist()


def test_flow_knots_contain_the_default_schedules_and_invert_exactly():
    for table in (FLOW, FlowTable(shift=3.0),
                  FlowTable.from_config({"use_dynamic_shifting": True}, mu=1.15, grid="flux")):
        floor = S.KNOT_FLOOR * table.sigma_min
        for steps in (1, 2, 4, 8, 28, 200):
            default = S.flow_shifted(steps, table)
            fractions, end = S.flow_knot_fractions(default, sigma_floor=floor)
            assert end == "zero" and len(fractions) == steps - 1
            assert all(0 < f < 1 for f in fractions)
            again = S.flow_knots(fractions, sigma_floor=floor, end=end)
            assert again[0] == INF and again[-1] == 0
            np.testing.assert_allclose(again.numpy()[1:], default.numpy()[1:], rtol=1e-12)
            spec = {"name": "knots", "fractions": fractions, "end": end}
            np.testing.assert_allclose(S.build(spec, table).numpy()[1:], default.numpy()[1:],
                                       rtol=1e-12)
    rng = np.random.default_rng(0)
    for _ in range(20):
        u = rng.uniform(0.01, 0.99, size=int(rng.integers(1, 9))).tolist()
        sig = S.flow_knots(u, sigma_floor=5e-4, end="sigma")
        assert sig[0] == INF and bool((sig[1:].diff() < 0).all()) and float(sig[-1]) > 5e-4
        back, end = S.flow_knot_fractions(sig, sigma_floor=5e-4)
        assert end == "sigma"
        np.testing.assert_allclose(back, u, rtol=1e-9, atol=1e-12)
    assert S.flow_knots([], sigma_floor=1e-3).tolist() == [INF, 0.0]
    with pytest.raises(ValueError, match="starts at σ = ∞"):
        S.flow_knot_fractions([5.0, 1.0, 0.0], sigma_floor=1e-3)


# -- the command line ----------------------------------------------------------------------------
def test_sample_and_score_commands_on_gmm_flow(tmp_path, capsys):
    """Presets and the scorer take a list that starts at σ = ∞ (schedules.flow_explicit)."""
    import json

    from schedsearch.cli import main

    out = str(tmp_path / "gmm-flow")
    assert main(["sample", "--model", "gmm-flow", "--prompt", "0", "--prompt", "2", "--seeds",
                 "0-2", "--no-progress", "--out", out]) == 0
    with open(f"{out}/samples.json", encoding="utf-8") as f:
        rec = json.load(f)
    assert rec["schedule"]["sigmas"][0] == INF and rec["schedule"]["timesteps"][0] == 1000.0
    assert rec["model"]["family"] == "gmm-flow" and rec["nfe"] == 20
    capsys.readouterr()
    assert main(["score", "--model", "gmm-flow", "--n", "64", "--checkpoints", ""]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["nfe"] == 8 and 0 < result["fid"] < 50


def test_a_finite_start_runs_through_the_commands_today(tmp_path):
    from schedsearch.cli import main

    assert main(["sample", "--model", "gmm-flow", "--schedule", "optimalsteps", "--steps", "6",
                 "--prompt", "1", "--seeds", "0-1", "--no-progress",
                 "--out", str(tmp_path / "oss")]) == 0
