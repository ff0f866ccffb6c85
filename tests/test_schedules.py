import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from schedsearch import schedules as S
from schedsearch.noise import SD

# The paper presets' golden values (docs/schedules.md): σ_stop, t_stop, and the evaluated UNet
# timesteps where given.
GOLDEN = {
    "sd15-8": dict(steps=8, sigma_stop=0.14713, t_stop=22.68,
                   t=[999, 857.32, 719.44, 585.86, 457.19, 334.35, 218.70, 112.73],
                   sigmas=[14.615, 6.712, 3.608, 2.172, 1.404, 0.937, 0.617, 0.373, 0.147]),
    "sd15-5": dict(steps=5, sigma_stop=0.13198, t_stop=18.32,
                   t=[999, 772.51, 556.68, 354.19, 169.97],
                   sigmas=[14.615, 4.519, 1.962, 1.001, 0.502, 0.132]),
    "sd15-6": dict(steps=6, sigma_stop=0.13198, t_stop=18.32),
    "sdxl-8": dict(steps=8, sigma_stop=0.05983, t_stop=3.18),
    "sdxl-6": dict(steps=6, sigma_stop=0.13198, t_stop=18.32),
}


def check_golden(name, sigmas, ts):
    g = GOLDEN[name]
    assert len(sigmas) == g["steps"] + 1 and len(ts) == g["steps"]
    assert float(sigmas[-1]) == pytest.approx(g["sigma_stop"], abs=1e-3)
    assert float(sigmas[0]) == pytest.approx(SD.sigma_max, abs=1e-6)
    assert float(ts[0]) == pytest.approx(999.0, abs=0.01)
    if "t" in g:
        np.testing.assert_allclose(ts, g["t"], atol=0.01)
        np.testing.assert_allclose(sigmas, g["sigmas"], atol=1e-3)


@pytest.mark.parametrize("name", list(GOLDEN))
def test_paper_presets_reproduce_golden_values_from_python(name):
    s = S.paper_preset(name)
    check_golden(name, s.numpy(), S.timesteps(s).numpy())
    p = S.PAPER_SETTINGS[name]
    sigma_stop = S.stop_sigma(p["steps"], p["p1"], M=p["M"], k=p["k"])
    assert sigma_stop == pytest.approx(GOLDEN[name]["sigma_stop"], abs=1e-5)
    assert SD.sigma_to_t(sigma_stop) == pytest.approx(GOLDEN[name]["t_stop"], abs=0.01)


@pytest.mark.parametrize("name", list(GOLDEN))
def test_paper_presets_reproduce_golden_values_from_cli(name):
    out = subprocess.run([sys.executable, "-m", "schedsearch", "schedule", name, "--format", "json"],
                         capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    check_golden(name, np.array(data["sigmas"]), np.array(data["timesteps"]))


def test_closed_form_stop_matches_the_explicit_ramp_and_the_papers_8_step_setting():
    a = S.paper(8, p1=7, p2=1.2, stop=3)
    b = S.paper(8, p1=7, p2=1.2, M=12, k=9)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, S.paper_preset("sd15-8"), rtol=0, atol=0)
    # stop → fraction (N+1)/(N+stop)
    hi, lo = SD.sigma_max ** (1 / 5), SD.sigma_min ** (1 / 5)
    assert S.stop_sigma(5, 5, stop=2) == pytest.approx((hi + 6 / 7 * (lo - hi)) ** 5, rel=1e-12)


def test_real_stop_expresses_presets_without_an_integer_stop():
    for name in ("sd15-6", "sdxl-8"):
        p = S.PAPER_SETTINGS[name]
        stop = S.equivalent_stop(p["steps"], p["M"], p["k"])
        assert stop != int(stop)
        torch.testing.assert_close(S.paper(p["steps"], p["p1"], p["p2"], stop=stop),
                                   S.paper_preset(name), rtol=1e-12, atol=0)
    assert S.equivalent_stop(5, 8, 6) == pytest.approx(2.0)


def test_paper_final_denoise_appends_zero_and_one_model_call():
    s = S.paper(5, 5, 1.2, stop=2, final_denoise=True)
    assert len(s) == 7 and float(s[-1]) == 0.0
    torch.testing.assert_close(s[:-1], S.paper(5, 5, 1.2, stop=2))


def test_ays_golden_and_interpolation():
    s = S.ays(5, "sd15")
    np.testing.assert_allclose(s[:-1].numpy(), [14.6146, 3.8637, 1.8842, 0.9643, 0.3977], atol=1e-4)
    assert float(s[-1]) == 0.0
    np.testing.assert_allclose(S.ays(10, "sdxl")[:-1].numpy(), S.AYS_TABLES["sdxl"][:-1], rtol=1e-9)
    s7 = S.ays(7, "sdxl")
    assert len(s7) == 8 and bool((s7[:-1].diff() < 0).all())
    # log-linear: midpoints of the 20-step table are geometric means of the 10-step table
    s20 = S.ays(20, "sd15")
    t10 = np.array(S.AYS_TABLES["sd15"])
    np.testing.assert_allclose(s20[1:-1:2].numpy(), np.sqrt(t10[:-1] * t10[1:]), rtol=1e-9)


def test_karras_formula_and_rho():
    s = S.karras(5, 0.1, 10.0, rho=3.0)
    i = np.arange(5) / 4
    expected = (10 ** (1 / 3) + i * (0.1 ** (1 / 3) - 10 ** (1 / 3))) ** 3
    np.testing.assert_allclose(s[:-1].numpy(), expected, rtol=1e-12)
    assert float(s[-1]) == 0 and len(S.karras(5, append_zero=False)) == 5


def test_uniform_is_trailing_in_t_and_logsnr_is_geometric():
    s = S.uniform(4)
    np.testing.assert_allclose(S.timesteps(s).numpy(), [999, 749.25, 499.5, 249.75], atol=0.03)
    g = S.logsnr(4, 0.1, 10.0)
    np.testing.assert_allclose(g[:-1].numpy(), [10, 10 ** (1 / 3), 10 ** (-1 / 3), 0.1], rtol=1e-12)


def test_build_reads_specs_and_explicit_lists_round_trip():
    spec = {"name": "paper", "steps": 5, "p1": 5.0, "p2": 1.2, "stop": 2}
    torch.testing.assert_close(S.build(spec), S.paper(5, 5.0, 1.2, stop=2))
    s = S.build({"name": "explicit", "sigmas": [14.6, 2.0, 0.3, 0.0]})
    assert s.tolist() == [14.6, 2.0, 0.3, 0.0]
    with pytest.raises(ValueError, match="preset sd15-5 has 5 steps"):
        S.build({"name": "sd15-5", "steps": 6})
    with pytest.raises(ValueError, match="unknown schedule 'foo'"):
        S.build({"name": "foo"})


BAD = [
    (lambda: S.paper(5, p1=0, p2=1.2, stop=2), r"p1 must be a finite number > 0, got 0"),
    (lambda: S.paper(5, p1=-3, p2=1.2, stop=2), r"p1 must be a finite number > 0, got -3"),
    (lambda: S.paper(5, p1=5, p2=0, stop=2), r"p2 must be a finite number > 0, got 0"),
    (lambda: S.paper(5, p1=5, p2=-1.2, stop=2), r"p2 must be a finite number > 0"),
    (lambda: S.paper(5, p1=math.nan, p2=1.2, stop=2), r"p1 must be a finite number > 0, got nan"),
    (lambda: S.paper(5, p1=5, p2=1.2, stop=0), r"stop must be a number >= 1, got 0"),
    (lambda: S.paper(5, p1=5, p2=1.2, stop=0.5), r"stop must be a number >= 1, got 0.5"),
    (lambda: S.paper(5, p1=5, p2=1.2, stop=math.nan), r"stop must be a number >= 1, got nan"),
    (lambda: S.paper(0, p1=5, p2=1.2, stop=2), r"steps must be an integer in \[1, 10000\], got 0"),
    (lambda: S.karras(0), r"steps must be an integer in \[1, 10000\], got 0"),
    (lambda: S.karras(-2), r"steps must be an integer in \[1, 10000\], got -2"),
    (lambda: S.ays(0), r"steps must be an integer in \[1, 10000\]"),
    (lambda: S.uniform(2.5), r"steps must be an integer in \[1, 10000\], got 2.5"),
    (lambda: S.karras(5, rho=0), r"rho must be a finite number > 0"),
    (lambda: S.karras(5, 1.0, 0.5), r"sigma_min must be < sigma_max"),
    (lambda: S.logsnr(5, math.nan, 3.0), r"sigma_min must be a finite number > 0, got nan"),
    (lambda: S.paper(5, 5, 1.2, M=8, k=7), r"k must be an integer in \[1, M-2\] = \[1, 6\], got 7"),
    (lambda: S.paper(5, 5, 1.2, stop=2, M=8, k=6), r"either stop or \(M, k\)"),
    (lambda: S.ays(5, "sd3"), r"family must be one of sd15, sdxl"),
    (lambda: S.explicit([5.0, 6.0, 0.0]),
     r"strictly decreasing: sigmas\[1\] = 6.0 is not below sigmas\[0\] = 5.0"),
    (lambda: S.explicit([5.0, 5.0]), r"strictly decreasing: sigmas\[1\] = 5.0"),
    (lambda: S.explicit([5.0, 0.0, -1.0]), r"sigmas\[1\] = 0.0: sigmas must be > 0, except an optional final 0"),
    (lambda: S.explicit([5.0, -1.0]), r"sigmas\[1\] = -1.0: sigmas must be > 0"),
    (lambda: S.explicit([5.0, math.nan, 0.0]), r"sigmas\[1\] = nan is not a finite number"),
    (lambda: S.explicit([math.inf, 1.0]), r"sigmas\[0\] = inf is not a finite number"),
    (lambda: S.explicit([3.0]), r"at least 2 values"),
    (lambda: S.explicit("abc"), r"sigmas must be a list of numbers"),
]


@pytest.mark.parametrize("call, message", BAD)
def test_bad_parameters_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_cli_reports_bad_parameters_without_a_traceback():
    r = subprocess.run([sys.executable, "-m", "schedsearch", "schedule", "paper", "--steps", "5",
                        "--p2", "-1"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "p2 must be a finite number > 0, got -1.0" in r.stderr and "Traceback" not in r.stderr


def test_cli_comfy_and_table_formats():
    run = lambda *a: subprocess.run([sys.executable, "-m", "schedsearch", "schedule", *a],  # noqa: E731
                                    capture_output=True, text=True, check=True).stdout
    comfy = run("ays", "--steps", "5", "--format", "comfy").strip()
    values = [float(v) for v in comfy.split(",")]
    np.testing.assert_allclose(values, S.ays(5).numpy(), atol=1e-6)
    table = run("sd15-5")
    assert "772.51" in table and "left for the VAE" in table


# -- free-form knots ------------------------------------------------------------------------------
def _distilled(budget):
    from schedsearch import gits, oss
    from schedsearch.models.gmm import GaussianMixture
    from schedsearch.teacher import TeacherGrid, trajectories

    g = GaussianMixture.default()
    tea = trajectories(g, [0, 1, 2, 3] * 4, list(range(16)), guidance=3.0,
                       grid=TeacherGrid(steps=40), use_cache=False)
    return gits.search(tea, budget).sigmas, oss.search(g, tea, budget).sigmas


@pytest.mark.parametrize("budget", [3, 4, 5, 6, 8])
def test_every_baseline_is_a_point_of_the_knots_space(budget):
    """Karras, AYS (both tables), the paper presets, GITS and OSS map to fractions in (0, 1) and
    back to the same σ list."""
    lists = [S.karras(budget), S.ays(budget, "sd15"), S.ays(budget, "sdxl"), *_distilled(budget)]
    lists += [S.paper_preset(n) for n, st in S.PAPER_SETTINGS.items() if st["steps"] == budget]
    for sig in lists:
        fractions, end = S.knot_fractions(sig)
        assert end == ("zero" if float(sig[-1]) == 0 else "sigma")
        assert all(0.001 < f < 0.999 for f in fractions)
        assert len(fractions) == budget - (end == "zero")
        back = S.knots(fractions, end=end)
        torch.testing.assert_close(back, sig, rtol=1e-9, atol=1e-12)
        assert S.build({"name": "knots", "fractions": fractions, "end": end}).tolist() == \
            back.tolist()


def test_knots_are_strictly_decreasing_for_any_fractions_and_refuse_bad_ones():
    rng = np.random.default_rng(0)
    for _ in range(200):
        u = rng.uniform(1e-6, 1 - 1e-6, size=rng.integers(1, 9))
        for end in ("zero", "sigma"):
            sig = S.knots(u, end=end)
            assert float(sig[0]) == pytest.approx(SD.sigma_max)
            assert bool((sig[1:] < sig[:-1]).all())
            assert float(sig[:-1].min() if end == "zero" else sig.min()) > S.KNOT_FLOOR * SD.sigma_min
    for bad in ([0.0], [1.0], [float("nan")], [-0.2]):
        with pytest.raises(ValueError, match="must lie in"):
            S.knots(bad)
    with pytest.raises(ValueError, match="starts at σ_max"):
        S.knot_fractions(S.karras(5, sigma_max=10.0))
    with pytest.raises(ValueError, match="floor"):
        S.knot_fractions([SD.sigma_max, 1.0, 0.01])


@pytest.mark.parametrize("args, flag", [
    (("karras", "--steps", "5", "--p1", "3"), "--p1"),
    (("ays", "--steps", "5", "--rho", "5"), "--rho"),
    (("karras", "--steps", "5", "--family", "sdxl"), "--family"),
    (("ays", "--steps", "5", "--sigma-min", "0.1"), "--sigma-min"),
    (("karras", "--steps", "5", "--final-denoise"), "--final-denoise"),
    (("karras", "--steps", "5", "--end", "sigma"), "--end"),
    (("explicit", "--sigmas", "3,1,0", "--steps", "4"), "--steps"),
    (("karras", "--steps", "5", "--mu", "0.5"), "--mu"),
])
def test_a_schedule_flag_given_to_another_schedule_is_refused(args, flag, capsys):
    """Each schedule flag is read by some schedules only; given to another it used to be dropped
    without a word (the list printed was not the one asked for). Now it is one line naming it."""
    from schedsearch.cli import main

    assert main(["schedule", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("schedsearch schedule: error: ")
    assert flag in err and "drop" in err


def test_schedule_flags_keep_their_defaults_where_they_apply(capsys):
    """The defaults the help states still hold when the flag is left out (p1 7, p2 1.2, stop 3,
    ρ 7, a final step to 0 for knots), and a given value still reaches the list."""
    import json

    from schedsearch.cli import main

    def sigmas(*args):
        assert main(["schedule", *args, "--format", "json"]) == 0
        return json.loads(capsys.readouterr().out)["sigmas"]

    np.testing.assert_allclose(sigmas("paper", "--steps", "8"),
                               sigmas("paper", "--steps", "8", "--p1", "7", "--p2", "1.2",
                                      "--stop", "3"))
    np.testing.assert_allclose(sigmas("karras", "--steps", "5"), S.karras(5, rho=7.0).numpy())
    assert sigmas("karras", "--steps", "5", "--rho", "3") != sigmas("karras", "--steps", "5")
    assert sigmas("knots", "--fractions", "0.2,0.3")[-1] == 0
    assert sigmas("knots", "--fractions", "0.2,0.3", "--end", "sigma")[-1] > 0


def test_a_sigma_list_or_fractions_alone_name_their_schedule(capsys):
    """`--sigmas` and `--fractions` say "alone, it selects the explicit/knots schedule", as they
    do for sample and score; `schedule` required NAME anyway and refused `--sigmas 14,1,0`."""
    import json

    from schedsearch.cli import main

    def printed(*args):
        assert main(["schedule", *args, "--format", "json"]) == 0
        return json.loads(capsys.readouterr().out)

    alone = printed("--sigmas", "14,1,0")
    assert alone["schedule"]["name"] == "explicit" and alone["sigmas"] == [14.0, 1.0, 0.0]
    assert alone == printed("explicit", "--sigmas", "14,1,0")
    knots = printed("--fractions", "0.2,0.3", "--end", "sigma")
    assert knots == printed("knots", "--fractions", "0.2,0.3", "--end", "sigma")
    assert len(knots["sigmas"]) == 3 and knots["sigmas"][-1] > 0
    assert main(["schedule"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "NAME" in err and "--sigmas" in err


@pytest.mark.parametrize("sigmas, message", [
    ([math.inf, math.nan, 0.0], "sigmas[1] = nan is not a finite number"),
    ([math.inf, 2.0, 5.0, 0.0], "sigmas[2] = 5.0 is not below sigmas[1] = 2.0"),
    ([math.inf, 5.0, -1.0], "sigmas[2] = -1.0: sigmas must be > 0"),
    ([math.inf, math.inf, 0.0], "sigmas[1] = inf is not a finite number"),
    ([math.inf, True, False], "sigmas must be a list of numbers, got [inf, True, False]"),
    ([14.0, True, 0], "sigmas must be a list of numbers, got [14.0, True, 0]"),
])
def test_a_bad_flow_list_names_the_users_index(sigmas, message):
    """The tail after ∞ was checked from index 0 (sigmas[0] = nan for the user's second value),
    and JSON true/false ran as 1 and 0."""
    with pytest.raises(ValueError) as exc:
        S.flow_explicit(sigmas)
    assert message in str(exc.value)
