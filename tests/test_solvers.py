import numpy as np
import pytest
import torch

from schedsearch import schedules as S, solvers
from schedsearch.models.gmm import GaussianMixture
from schedsearch.noise import SD
from schedsearch.sampler import initial_noise


@pytest.fixture(scope="module")
def smooth_gmm():
    """A mixture with broad components: smooth enough for the asymptotic regime at 16+ steps."""
    base = GaussianMixture.default(dim=16, seed=3)
    rng = np.random.default_rng(1)
    return GaussianMixture(base._host["means"].numpy(), rng.uniform(0.3, 0.5, size=12) ** 2,
                           np.ones(12), np.repeat(np.arange(4), 3), dtype=torch.float64)


@pytest.fixture(scope="module")
def convergence_problem(smooth_gmm):
    g = smooth_gmm
    cond = g.condition([0, 1, 2, 3] * 16)
    x0 = initial_noise(g.latent_shape, range(64), SD.sigma_max).double()
    den = lambda x, s: g.denoise(x, s, cond, 3.0)  # noqa: E731
    return den, x0, solvers.heun(den, x0, S.karras(3000, append_zero=False))


# Global order on Karras lists of 16..128 steps ending at σ_min (see docs/solvers.md). The three
# multistep methods of nominal order > 2 measure below it over this range and tend to 2 when the
# lists are refined further (local slopes from 256 to 512 steps: 3M 2.08, UniPC 2.05, iPNDM 2.01).
# What caps each one, found by changing one thing at a time (exploration, not part of the suite):
# - dpmpp_3m (nominal 3): the upstream 3M weights the second difference by φ₃ where a Taylor
#   expansion asks for 2·φ₃ (its local error is O(h³) on a D quadratic in log σ); with 2·φ₃ the
#   same lists measure 3.4-3.9 up to 128 steps, then its first-order first step takes over. We keep
#   the upstream formula: this solver is meant to be k-diffusion's 3M.
# - unipc (UniP-3 + UniC, nominal 4): the first-order last step of lower_order_final (an O(h²) local
#   error); run at full order to the end, the same lists measure 4.1-4.7 through 256 steps.
# - ipndm (nominal 4): two caps at 2 each, its first-order first step and Adams-Bashforth weights
#   for equal steps used on the unequal steps of a Karras list; with an exact start and
#   variable-step weights it measures 3.1-3.8.
@pytest.mark.parametrize("name, order", [("dpmpp_1s", 1.0), ("dpmpp_2m", 2.0), ("heun", 2.0),
                                         ("dpmpp_3m", 2.8), ("unipc", 3.95), ("unipc_bh1", 3.95),
                                         ("ipndm", 2.6)])
def test_convergence_order_on_the_exact_testbed(convergence_problem, name, order):
    den, x0, ref = convergence_problem
    ns = [16, 32, 64, 128]
    errs = [(solvers.get(name)(den, x0, S.karras(n, append_zero=False)) - ref).pow(2).mean().sqrt()
            for n in ns]
    slope = -np.polyfit(np.log(ns), np.log([float(e) for e in errs]), 1)[0]
    assert abs(slope - order) <= 0.3, f"{name}: measured order {slope:.2f}"


def counting(den):
    calls = []

    def f(x, s):
        calls.append(s)
        return den(x, s)
    return f, calls


def test_model_calls_per_solver():
    g = GaussianMixture.default(dtype=torch.float64)
    cond = g.condition([0, 1])
    x = initial_noise(g.latent_shape, [1, 2], SD.sigma_max).double()
    den = lambda x, s: g.denoise(x, s, cond, 1.0)  # noqa: E731
    for sig in (S.karras(6), S.paper(5, 5, 1.2, stop=2)):
        for name in solvers.SOLVERS:
            f, calls = counting(den)
            solvers.get(name)(f, x, sig)
            assert len(calls) == solvers.model_calls(name, sig)
    assert solvers.model_calls("heun", S.karras(6)) == 11
    assert solvers.model_calls("heun", S.paper(5, 5, 1.2, stop=2)) == 10
    assert solvers.model_calls("DPM++2M", S.paper(5, 5, 1.2, stop=2)) == 5
    for name in ("unipc", "DPM++3M", "ipndm"):
        assert solvers.model_calls(name, S.karras(6)) == 6
        assert solvers.model_calls(name, S.paper(5, 5, 1.2, stop=2)) == 5


def test_first_order_solvers_agree_and_2m_is_exactly_the_documented_formula():
    g = GaussianMixture.default(dtype=torch.float64)
    cond = g.condition([0, 1, 2])
    x = initial_noise(g.latent_shape, [7, 8, 9], SD.sigma_max).double()
    den = lambda x, s: g.denoise(x, s, cond, 2.0)  # noqa: E731
    sig = S.paper(6, 5, 1.2, stop=2)
    torch.testing.assert_close(solvers.dpmpp_1s(den, x, sig), solvers.euler(den, x, sig),
                               rtol=1e-10, atol=1e-10)
    # DPM++2M written out from docs/solvers.md
    s = sig.tolist()
    xs, d_prev = x.clone(), None
    for i in range(len(s) - 1):
        d = den(xs, s[i])
        q = s[i + 1] / s[i]
        if d_prev is None:
            dd = d
        else:
            r = np.log(s[i - 1] / s[i]) / np.log(s[i] / s[i + 1])
            dd = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * d_prev
        xs = q * xs + (1 - q) * dd
        d_prev = d
    torch.testing.assert_close(solvers.dpmpp_2m(den, x, sig), xs, rtol=1e-12, atol=1e-12)
    # a final step to σ = 0 returns the denoised value
    f, calls = counting(den)
    out = solvers.dpmpp_2m(f, x, torch.tensor([14.0, 2.0, 0.0], dtype=torch.float64))
    xs1 = torch.lerp(den(x, 14.0), x, 2.0 / 14.0)
    torch.testing.assert_close(out, den(xs1, 2.0))


def test_hook_sees_every_step_and_can_stop_on_non_finite_values():
    g = GaussianMixture.default(dtype=torch.float64)
    cond = g.condition([0])
    x = initial_noise(g.latent_shape, [0], SD.sigma_max).double()
    seen = []
    sig = S.karras(4)
    solvers.dpmpp_2m(lambda x, s: g.denoise(x, s, cond, 1.0), x, sig,
                     lambda i, s, sn, xx, d: seen.append((i, s, sn, tuple(d.shape))))
    assert [(i, s, sn) for i, s, sn, _ in seen] == list(zip(range(4), sig[:-1].tolist(), sig[1:].tolist()))

    def exploding(x, s):
        return x * (np.inf if s < 3 else 1.0)
    with pytest.raises(solvers.NonFiniteError, match=rf"step 2 \(sigma = {float(sig[2]):.5g}\)"):
        solvers.dpmpp_1s(exploding, x, sig, solvers.check_finite)


def test_solver_names():
    assert solvers.canonical("DPM++1S") == "dpmpp_1s" and solvers.canonical("dpm++2m") == "dpmpp_2m"
    assert solvers.canonical("DPM++3M") == "dpmpp_3m" and solvers.canonical("3m") == "dpmpp_3m"
    assert solvers.canonical("UniPC") == "unipc" and solvers.canonical("unipc-bh2") == "unipc"
    # ComfyUI's sampler names: its uni_pc is the bh1 variant, uni_pc_bh2 the bh2 one
    assert solvers.canonical("uni_pc") == "unipc_bh1" and solvers.canonical("uni_pc_bh2") == "unipc"
    assert solvers.canonical("iPNDM") == "ipndm"
    with pytest.raises(ValueError, match="solver must be one of"):
        solvers.canonical("lms")


@pytest.mark.parametrize("name", ["unipc", "unipc_bh1", "dpmpp_3m", "ipndm"])
def test_multistep_hooks_see_each_model_call_and_its_input(name):
    """One hook call per step, right after the step's model call, with the x the model saw; for
    UniPC that is the predictor's x_i, which the corrector then replaces."""
    g = GaussianMixture.default(dtype=torch.float64)
    cond = g.condition([0, 1, 2])
    den = lambda x, s: g.denoise(x, s, cond, 2.0)  # noqa: E731
    x = initial_noise(g.latent_shape, [3, 4, 5], SD.sigma_max).double()
    for sig in (S.karras(7), S.paper(6, 5, 1.2, stop=2)):
        f, calls = counting(den)
        seen = []
        solvers.get(name)(f, x, sig, lambda i, s, sn, xx, d: seen.append((i, s, sn, xx.clone(), d)))
        assert [(i, s, sn) for i, s, sn, _, _ in seen] == \
            list(zip(range(len(sig) - 1), sig[:-1].tolist(), sig[1:].tolist()))
        assert calls == sig[:-1].tolist()
        for _, s, _, xx, d in seen:
            torch.testing.assert_close(den(xx, s), d, rtol=0, atol=0)


def test_steps_to_zero_and_warm_up_of_the_multistep_solvers():
    """A last step to σ = 0 returns D for UniPC and 3M; iPNDM takes its Adams-Bashforth step;
    the first step of every solver is DDIM = Euler."""
    g = GaussianMixture.default(dtype=torch.float64)
    cond = g.condition([0, 1])
    den = lambda x, s: g.denoise(x, s, cond, 2.0)  # noqa: E731
    x = initial_noise(g.latent_shape, [1, 2], SD.sigma_max).double()
    one = torch.tensor([14.0, 3.0], dtype=torch.float64)
    for name in ("unipc", "unipc_bh1", "dpmpp_3m", "ipndm"):
        torch.testing.assert_close(solvers.get(name)(den, x, one), solvers.dpmpp_1s(den, x, one),
                                   rtol=1e-12, atol=1e-12)
    sig = torch.tensor([14.0, 6.0, 2.0, 0.0], dtype=torch.float64)
    seen = []
    for name in ("unipc", "unipc_bh1", "dpmpp_3m"):
        out = solvers.get(name)(den, x, sig, lambda i, s, sn, xx, d: seen.append((xx, d)))
        torch.testing.assert_close(out, seen[-1][1], rtol=0, atol=0)
    # iPNDM's third step is AB3 on the slopes at 14, 6 and 2, down to 0
    seen.clear()
    out = solvers.ipndm(den, x, sig, lambda i, s, sn, xx, dd: seen.append((xx, dd)))
    x2, d2 = seen[-1]
    slopes = [(xx - dd) / s for (xx, dd), s in zip(seen, [14.0, 6.0, 2.0])]
    expected = x2 - 2.0 * (23 * slopes[2] - 16 * slopes[1] + 5 * slopes[0]) / 12
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert (out - d2).abs().max() > 1e-3  # not D: the step is not a first-order one
