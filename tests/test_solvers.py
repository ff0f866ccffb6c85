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


@pytest.mark.parametrize("name, order", [("dpmpp_1s", 1.0), ("dpmpp_2m", 2.0), ("heun", 2.0)])
def test_convergence_order_on_the_exact_testbed(smooth_gmm, name, order):
    g = smooth_gmm
    cond = g.condition([0, 1, 2, 3] * 16)
    x0 = initial_noise(g.latent_shape, range(64), SD.sigma_max).double()
    den = lambda x, s: g.denoise(x, s, cond, 3.0)  # noqa: E731
    ref = solvers.heun(den, x0, S.karras(3000, append_zero=False))
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


def test_first_order_solvers_agree_and_2m_is_exactly_the_spec_formula():
    g = GaussianMixture.default(dtype=torch.float64)
    cond = g.condition([0, 1, 2])
    x = initial_noise(g.latent_shape, [7, 8, 9], SD.sigma_max).double()
    den = lambda x, s: g.denoise(x, s, cond, 2.0)  # noqa: E731
    sig = S.paper(6, 5, 1.2, stop=2)
    torch.testing.assert_close(solvers.dpmpp_1s(den, x, sig), solvers.euler(den, x, sig),
                               rtol=1e-10, atol=1e-10)
    # DPM++2M written out from SPEC §3
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
    with pytest.raises(ValueError, match="solver must be one of"):
        solvers.canonical("lms")
