import numpy as np
import pytest
import torch

from schedsearch.models.gmm import GaussianMixture


def brute_posterior_mean(g, x, sigma, cls):
    """E[x0 | x] by importance sampling the exact prior: an independent check of the closed form."""
    x0 = g.sample_data([cls] * 200000 if cls is not None else None, n=200000, seed=5)
    logw = -((x[None, :] - x0) ** 2).sum(1) / (2 * sigma**2)
    w = torch.softmax(logw, 0)
    return (w[:, None] * x0).sum(0)


@pytest.mark.parametrize("cls", [None, 2])
def test_posterior_mean_matches_monte_carlo(cls):
    g = GaussianMixture.default(dim=2, num_classes=3, per_class=2, seed=4, dtype=torch.float64)
    x = torch.tensor([[0.3, -0.4]], dtype=torch.float64)
    sigma = 0.8
    cond = g.condition([cls if cls is not None else ""])
    exact = g.denoise(x, sigma, cond, 1.0)[0]
    torch.testing.assert_close(exact, brute_posterior_mean(g, x[0], sigma, cls), atol=2e-2, rtol=0)


def test_denoiser_limits_and_cfg():
    g = GaussianMixture.default(dtype=torch.float64)
    x = torch.randn(5, 16, dtype=torch.float64)
    cond = g.condition([0, 1, 2, 3, ""])
    # σ → 0: D(x) → x; σ → ∞: D(x) → the (class) mean
    torch.testing.assert_close(g.denoise(x, 1e-6, cond), x, atol=1e-6, rtol=0)
    mu, _ = g.moments([1])
    torch.testing.assert_close(g.denoise(x[1:2] * 0, 1e4, g.condition([1]))[0],
                               torch.as_tensor(mu), atol=1e-4, rtol=0)
    d_u = g.denoise(x, 2.0, g.condition([""] * 5))
    d_c = g.denoise(x, 2.0, cond)
    torch.testing.assert_close(g.denoise(x, 2.0, cond, 4.0), d_u + 4.0 * (d_c - d_u))
    per_sample = g.denoise(x, torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0]), cond)
    for i, s in enumerate([0.5, 1.0, 2.0, 4.0, 8.0]):
        torch.testing.assert_close(per_sample[i], g.denoise(x[i:i + 1], s, cond[i:i + 1])[0])


def test_exact_samples_match_exact_moments():
    g = GaussianMixture.default(dtype=torch.float64)
    x = g.sample_data([0, 1, 2, 3] * 25000, seed=1).numpy()
    mu, cov = g.moments([0, 1, 2, 3])
    np.testing.assert_allclose(x.mean(0), mu, atol=0.02)
    np.testing.assert_allclose(np.cov(x.T), cov, atol=0.02)


def test_bad_class_labels():
    g = GaussianMixture.default()
    with pytest.raises(ValueError, match=r"class label must be in 0..3, got 7"):
        g.condition([7])
    with pytest.raises(ValueError, match="takes class labels"):
        g.condition(["a cat"])
