import json

import numpy as np
import pytest
import torch

from schedsearch.noise import SD, NoiseTable


def test_sd_table_end_points_are_golden():
    assert SD.sigma_min == pytest.approx(0.0291672, abs=1e-7)
    assert SD.sigma_max == pytest.approx(14.6146412, abs=1e-7)
    assert SD.num_timesteps == 1000 and SD.name == "sd"


def test_from_diffusers_config_matches_scheduler_alphas(tmp_path):
    from diffusers import DDIMScheduler
    for kind in ("scaled_linear", "linear"):
        sched = DDIMScheduler(beta_schedule=kind, beta_start=0.00085, beta_end=0.012)
        path = tmp_path / "scheduler_config.json"
        sched.save_config(tmp_path)
        table = NoiseTable.from_config(json.loads(path.read_text()))
        np.testing.assert_allclose(table.alphas_cumprod, sched.alphas_cumprod.double().numpy(),
                                   rtol=1e-6)
    v = NoiseTable.from_config({"prediction_type": "v_prediction"})
    assert v.prediction_type == "v_prediction" and v.name == "sd"
    assert NoiseTable.from_config({"beta_schedule": "linear"}).name != "sd"


def test_sigma_to_t_hits_integer_steps_and_interpolates_log_sigma():
    t = SD.sigma_to_t(SD.sigmas[[0, 10, 500, 999]])
    np.testing.assert_allclose(t, [0, 10, 500, 999], atol=1e-9)
    mid = np.exp(0.25 * SD._log_sigmas[400] + 0.75 * SD._log_sigmas[401])
    assert SD.sigma_to_t(mid) == pytest.approx(400.75, abs=1e-9)
    # tensor path agrees with the numpy path
    s = torch.tensor([14.0, 3.3, 0.5, 0.05], dtype=torch.float64)
    np.testing.assert_allclose(SD.sigma_to_t(s).numpy(), SD.sigma_to_t(s.numpy()), atol=1e-9)


def test_t_to_sigma_interpolates_alpha_bar():
    a = 0.3 * SD.alphas_cumprod[200] + 0.7 * SD.alphas_cumprod[201]
    assert SD.t_to_sigma(200.7) == pytest.approx(np.sqrt((1 - a) / a), rel=1e-12)
    assert SD.t_to_sigma(999.0) == pytest.approx(SD.sigma_max, rel=1e-12)
    # the two directions agree to ~0.02 of a step away from the very first steps, where σ
    # changes by half between t = 0 and t = 1 (docs/conventions.md)
    t = np.linspace(5, 999, 7777)
    gap = np.abs(SD.sigma_to_t(SD.t_to_sigma(t)) - t)
    assert 0.005 < gap.max() < 0.02
    with pytest.raises(ValueError, match=r"t must lie in \[0, 999\]"):
        SD.t_to_sigma(1000.5)


def test_bad_tables_are_refused():
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseTable.from_config({"prediction_type": "sample"})
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseTable.from_config({"beta_schedule": "sigmoid"})
