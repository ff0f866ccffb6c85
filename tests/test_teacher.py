import os
import shutil
import warnings

import numpy as np
import pytest
import torch

from schedsearch import schedules
from schedsearch.models.gmm import GaussianMixture
from schedsearch.noise import SD
from schedsearch.sampler import initial_noise, sample
from schedsearch.teacher import (TeacherCacheWarning, TeacherGrid, cache_dir, error_vs_teacher,
                                 trajectories)


class Counting:
    """A model proxy that counts the images the denoiser is called on."""

    def __init__(self, model):
        self._model, self.rows, self.calls = model, 0, 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def denoise(self, x, sigma, cond, guidance):
        self.rows += x.shape[0]
        self.calls += 1
        return self._model.denoise(x, sigma, cond, guidance)


PROMPTS = [0, 1, 2, 3, 1, 2]
SEEDS = [11, 12, 13, 14, 15, 16]


@pytest.fixture
def gmm():
    return GaussianMixture.default()


def test_default_grid_is_uniform_in_t_and_ends_at_zero():
    T = TeacherGrid(steps=100).sigmas(SD)
    assert T.shape == (101,) and T.dtype == torch.float64
    assert float(T[0]) == 0.0 and float(T[1]) == pytest.approx(SD.sigma_min, rel=1e-12)
    assert float(T[-1]) == pytest.approx(SD.sigma_max, rel=1e-12)
    assert bool((T[1:] > T[:-1]).all())
    # the 99 points above the data end are evenly spaced in the DDPM timestep
    t = SD.sigma_to_t(T[1:].numpy())
    np.testing.assert_allclose(np.diff(t), 999 / 99, atol=0.05)


def test_grid_variants():
    k = TeacherGrid("karras", 10).sigmas(SD)
    torch.testing.assert_close(k.flip(0), schedules.karras(10, SD.sigma_min, SD.sigma_max))
    ls = TeacherGrid("logsnr", 10, "sigma_min").sigmas(SD)
    assert ls.shape == (11,) and float(ls[0]) == pytest.approx(SD.sigma_min)
    np.testing.assert_allclose(np.diff(np.log(ls.numpy())),
                               np.log(SD.sigma_max / SD.sigma_min) / 10)
    stop = TeacherGrid(steps=20, end=0.132).sigmas(SD)
    assert stop.shape == (21,) and float(stop[0]) == 0.132
    with pytest.raises(ValueError, match=r"teacher steps must be an integer in \[2, 10000\]"):
        TeacherGrid(steps=1)
    with pytest.raises(ValueError, match="grid end"):
        TeacherGrid(end="middle")
    with pytest.raises(ValueError, match="teacher grid must be one of"):
        TeacherGrid("cosine")


def test_teacher_is_the_sampler_on_its_own_grid(gmm, tmp_path):
    grid = TeacherGrid(steps=20)
    tea = trajectories(gmm, PROMPTS, SEEDS, guidance=3.0, grid=grid, cache=str(tmp_path),
                       batch_size=4)
    assert tea.x.shape == (6, 21, 16) and tea.calls == 20
    # starts from the sampler's own initial noise for these seeds
    torch.testing.assert_close(tea.x[:, -1], initial_noise((16,), SEEDS, SD.sigma_max))
    ref = sample(gmm, tea.sigmas.flip(0), PROMPTS, SEEDS, solver="dpmpp_1s", guidance=3.0,
                 decode=False)
    torch.testing.assert_close(tea.final, ref.latents, atol=1e-6, rtol=0)
    # every stored D is the model's output at the stored state
    for j in (1, 7, 20):
        d = gmm.denoise(tea.x[:, j], float(tea.sigmas[j]), gmm.condition(PROMPTS), 3.0)
        torch.testing.assert_close(tea.denoised[:, j], d, atol=1e-6, rtol=0)
    # the DPM++1S step links consecutive states
    q = (tea.sigmas[4] / tea.sigmas[5]).float()
    torch.testing.assert_close(tea.x[:, 4], torch.lerp(tea.denoised[:, 5], tea.x[:, 5], q))
    # and scoring the teacher's own grid against it gives (float) zero
    assert float(error_vs_teacher(gmm, tea.sigmas.flip(0), tea).max()) < 1e-12


def test_second_run_is_a_cache_hit_with_no_model_calls(gmm, tmp_path, monkeypatch):
    monkeypatch.setenv("SCHEDSEARCH_CACHE", str(tmp_path))
    assert cache_dir() == os.path.join(str(tmp_path), "teacher")
    first = Counting(gmm)
    a = trajectories(first, PROMPTS, SEEDS, guidance=3.0, grid=TeacherGrid(steps=12))
    assert first.rows == 12 * len(SEEDS) and a.calls == 12
    assert os.path.dirname(a.path) == os.path.join(str(tmp_path), "teacher")
    second = Counting(gmm)
    b = trajectories(second, PROMPTS, SEEDS, guidance=3.0, grid=TeacherGrid(steps=12))
    assert second.rows == 0 and b.calls == 0 and b.path == a.path
    assert torch.equal(a.x, b.x) and torch.equal(a.denoised, b.denoised)
    # anything the trajectories depend on changes the key
    third = Counting(gmm)
    c = trajectories(third, PROMPTS, SEEDS, guidance=2.0, grid=TeacherGrid(steps=12))
    assert third.rows == 12 * len(SEEDS) and c.path != a.path
    fourth = Counting(gmm)
    trajectories(fourth, PROMPTS, SEEDS[::-1], guidance=3.0, grid=TeacherGrid(steps=12))
    assert fourth.rows == 12 * len(SEEDS)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_cache_is_recomputed(gmm, tmp_path, damage):
    grid = TeacherGrid(steps=12)
    a = trajectories(gmm, PROMPTS, SEEDS, guidance=3.0, grid=grid, cache=str(tmp_path))
    raw = open(a.path, "rb").read()
    with open(a.path, "wb") as f:
        f.write(b"not a safetensors file" if damage == "garbage" else raw[: len(raw) // 2])
    counted = Counting(gmm)
    with pytest.warns(TeacherCacheWarning, match="unreadable"):
        b = trajectories(counted, PROMPTS, SEEDS, guidance=3.0, grid=grid, cache=str(tmp_path))
    assert counted.rows == 12 * len(SEEDS) and b.calls == 12
    torch.testing.assert_close(b.x, a.x)
    # the rewritten file is sound again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trajectories(gmm, PROMPTS, SEEDS, guidance=3.0, grid=grid,
                            cache=str(tmp_path)).calls == 0


def test_cache_from_another_model_is_recomputed(gmm, tmp_path):
    other = GaussianMixture.default(seed=1)
    grid = TeacherGrid(steps=12)
    theirs = trajectories(other, PROMPTS, SEEDS, guidance=3.0, grid=grid, cache=str(tmp_path))
    mine_path = trajectories(gmm, PROMPTS, SEEDS, guidance=3.0, grid=grid, use_cache=False)
    assert mine_path.path is None
    # plant the other model's file where this model's cache entry lives
    from schedsearch.teacher import _cache_path, _key_hash, make_key
    key = make_key(gmm, PROMPTS, SEEDS, 3.0, grid)
    target = _cache_path(str(tmp_path), key, _key_hash(key))
    shutil.copy(theirs.path, target)
    counted = Counting(gmm)
    with pytest.warns(TeacherCacheWarning, match="written for model 'gmm-.*', not"):
        mine = trajectories(counted, PROMPTS, SEEDS, guidance=3.0, grid=grid, cache=str(tmp_path))
    assert counted.rows == 12 * len(SEEDS)
    torch.testing.assert_close(mine.x, mine_path.x)
    assert not torch.allclose(mine.final, theirs.final)


def test_non_finite_cache_is_recomputed(gmm, tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    grid = TeacherGrid(steps=12)
    a = trajectories(gmm, PROMPTS, SEEDS, guidance=3.0, grid=grid, cache=str(tmp_path))
    with safe_open(a.path, framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(a.path)
    tensors["x"][0, 3, 0] = float("nan")
    save_file(tensors, a.path, metadata=meta)
    with pytest.warns(TeacherCacheWarning, match="non-finite"):
        b = trajectories(gmm, PROMPTS, SEEDS, guidance=3.0, grid=grid, cache=str(tmp_path))
    assert b.calls == 12 and bool(torch.isfinite(b.x).all())


def test_bad_input(gmm, tmp_path):
    with pytest.raises(ValueError, match="seed list is empty"):
        trajectories(gmm, [], [], cache=str(tmp_path))
    with pytest.raises(ValueError, match="one seed per prompt"):
        trajectories(gmm, [0, 1], [5], cache=str(tmp_path))
    with pytest.raises(ValueError, match="first-order"):
        trajectories(gmm, [0], [5], solver="dpmpp_2m", cache=str(tmp_path))


def test_unwritable_cache_still_returns_the_teacher(gmm, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(TeacherCacheWarning, match="could not write"):
        tea = trajectories(gmm, PROMPTS, SEEDS, guidance=3.0, grid=TeacherGrid(steps=12),
                           cache=str(blocker / "teacher"))
    assert tea.calls == 12 and bool(torch.isfinite(tea.x).all())


# -- flow-matching models: the grid starts at σ = ∞ ------------------------------------------------

def test_flow_grid_is_uniform_in_t_from_infinity():
    import math

    from schedsearch.noise import FLOW, FlowTable, flow_t

    for table in (FLOW, FlowTable(shift=3.0)):
        T = TeacherGrid(steps=100).sigmas(table)
        assert T.shape == (101,) and float(T[0]) == 0.0 and math.isinf(float(T[-1]))
        assert float(T[1]) == pytest.approx(table.sigma_min, rel=1e-12)
        # 100 points from t = 1 down to t(σ_min), evenly spaced in the model's time
        t = flow_t(T[1:].numpy())
        np.testing.assert_allclose(np.diff(t), (1 - flow_t(table.sigma_min)) / 99, rtol=1e-9)
        schedules.flow_explicit(T.flip(0))
    k = TeacherGrid("karras", 10).sigmas(FLOW)
    torch.testing.assert_close(k.flip(0), schedules.build({"name": "karras", "steps": 10}, FLOW))
    stop = TeacherGrid(steps=20, end=0.05).sigmas(FLOW)
    assert stop.shape == (21,) and float(stop[0]) == 0.05 and math.isinf(float(stop[-1]))
    with pytest.raises(ValueError, match="finite σ_max"):
        TeacherGrid("logsnr", 10).sigmas(FLOW)


def test_flow_teacher_starts_from_epsilon_at_infinity(tmp_path):
    import math

    from schedsearch.models.gmm_flow import FlowGaussianMixture

    model = FlowGaussianMixture.default()
    counted = Counting(model)
    tea = trajectories(counted, PROMPTS, SEEDS, guidance=3.0, grid=TeacherGrid(steps=20),
                       cache=str(tmp_path))
    assert counted.rows == 20 * len(SEEDS) and tea.calls == 20
    # the state stored at ∞ is ε itself, the sampler's convention there
    assert torch.equal(tea.x[:, -1], initial_noise((16,), SEEDS, math.inf))
    ref = sample(model, tea.sigmas.flip(0), PROMPTS, SEEDS, solver="dpmpp_1s", guidance=3.0,
                 decode=False)
    torch.testing.assert_close(tea.final, ref.latents, atol=1e-6, rtol=0)
    # the first step is the solvers' limit from ∞: D + σ_{N-1}·ε
    torch.testing.assert_close(tea.x[:, -2], tea.denoised[:, -1] + float(tea.sigmas[-2]) * tea.x[:, -1])
    d = model.denoise(tea.x[:, -1], math.inf, model.condition(PROMPTS), 3.0)
    torch.testing.assert_close(tea.denoised[:, -1], d, atol=1e-6, rtol=0)
    assert float(error_vs_teacher(model, tea.sigmas.flip(0), tea).max()) < 1e-12
    # σ = ∞ in the cache round-trips: a second run is a hit
    again = Counting(model)
    hit = trajectories(again, PROMPTS, SEEDS, guidance=3.0, grid=TeacherGrid(steps=20),
                       cache=str(tmp_path))
    assert again.rows == 0 and hit.calls == 0 and torch.equal(hit.x, tea.x)
    assert math.isinf(float(hit.sigmas[-1])) and tea.provenance()["sigma_max"] == math.inf


@pytest.mark.parametrize("stored", ["null", "[]", '"x"'])
def test_cache_whose_key_is_json_but_no_object_is_recomputed(gmm, tmp_path, stored):
    """An AttributeError (a traceback from the CLI) before."""
    from safetensors.torch import load_file, save_file
    grid = TeacherGrid(steps=12)
    a = trajectories(gmm, PROMPTS, SEEDS, guidance=3.0, grid=grid, cache=str(tmp_path))
    save_file(load_file(a.path), a.path, metadata={"schedsearch.teacher.key": stored})
    with pytest.warns(TeacherCacheWarning, match="its teacher key is .*, not a JSON object"):
        b = trajectories(gmm, PROMPTS, SEEDS, guidance=3.0, grid=grid, cache=str(tmp_path))
    assert b.calls == 12   # recomputed, not read
    torch.testing.assert_close(b.x, a.x)
