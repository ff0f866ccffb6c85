"""A study on a flow-matching model end to end (the exact ``gmm-flow`` testbed): the space holds
knots from σ = ∞ only, the flow baselines are scored and compared with paired CIs, and the
exported preset knows its kind."""

import json
import math
import os
import subprocess
import sys

import optuna
import pytest

from schedsearch import models, presets, schedules, solvers
from schedsearch.config import FLOW_BASELINES, SD_BASELINES, StudyConfig, applicable_baselines
from schedsearch.noise import FLOW
from schedsearch.space import Space, Target
from schedsearch.study import RunOptions, run_study

SMALL = dict(model="gmm-flow", budget=5, n_search=64, n_heldout=64, batch_size=64, trials=10,
             checkpoints=[16, 32], heldout_sets=2, bootstrap=200)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("flow-study")
    lines = []
    with pytest.MonkeyPatch.context() as mp:   # the teacher's cache, kept to this study
        mp.setenv("SCHEDSEARCH_CACHE", str(out / "cache"))
        summary = run_study(StudyConfig.from_dict(SMALL),
                            RunOptions(out=out / "run", progress=False, export_user_preset=False),
                            echo=lines.append)
    return summary, lines, out / "run"


def test_flow_study_compares_every_flow_baseline_with_a_ci(finished):
    summary, lines, _ = finished
    keys = [r["key"] for r in summary["rows"]]
    assert keys == ["best", *FLOW_BASELINES]          # the default: every baseline that applies
    names = {r["key"]: r["name"] for r in summary["rows"]}
    assert names["flow"] == "flow default euler @5" and names["flow50"] == "flow default euler @50"
    assert {r["nfe"] for r in summary["rows"] if r["key"] in ("flow28", "flow50")} == {28, 50}
    for r in summary["rows"][1:]:                     # winner − baseline, paired, over 2 sets
        ci = r["vs_best"]
        assert ci["lo"] <= ci["delta"] <= ci["hi"] and ci["sets"] == 2
    assert sum(r.get("recommended", False) for r in summary["rows"]) == 1
    assert not summary["failed_baselines"]
    # what the model leaves out of the space, said once
    assert sum("family paper: not searched" in line for line in lines) == 1
    assert sum("FreeU: not searched (the model has no UNet)" in line for line in lines) == 1


def test_the_winner_is_a_knots_schedule_from_infinity(finished):
    summary, _, out = finished
    assert summary["best_params"]["family"] == "knots"
    assert not any(k.startswith(("p1", "freeu", "t_aug")) for k in summary["best_params"])
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'study.db'}")
    trials = optuna.load_study(study_name="gmm-flow-5nfe", storage=storage).get_trials()
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done and all(t.params["family"] == "knots" for t in done)
    for t in done:   # every candidate from ∞, at exactly the budget
        sigmas = t.user_attrs["candidate"]["sigmas"]
        assert math.isinf(sigmas[0]) and t.user_attrs["candidate"]["nfe"] == 5
    # the warm start re-ran the best same-NFE baselines as knots points from ∞
    assert any(t.user_attrs.get("warm") is not None for t in trials)


def test_the_exported_preset_is_refused_on_a_ddpm_model(finished):
    summary, _, _ = finished
    preset = presets.read(summary["preset"])
    assert preset.family == "gmm-flow" and presets.kind(preset) == "flow"
    if summary["recommended"] == "best":
        assert math.isinf(float(preset.sigmas[0]))
    presets.fit(preset, models.load("gmm-flow", device="cpu"))          # its own model: fine
    with pytest.raises(ValueError, match=r"made for a flow-matching model .* gmm-.* is a "
                                         r"DDPM-trained model"):
        presets.fit(preset, models.load("gmm", device="cpu"))
    # and the other way round: a DDPM preset on a flow model
    with pytest.raises(ValueError, match=r"sd15-5 \(sd15\) was made for a DDPM-trained model"):
        presets.fit(presets.load("sd15-5"), models.load("gmm-flow", device="cpu"))


def _cli(*args, tmp_path):
    return subprocess.run([sys.executable, "-m", "schedsearch", "run", "--model", "gmm-flow",
                           "--budget", "3", "--trials", "2", "--n-search", "8", "--n-heldout", "8",
                           "--no-progress", "--no-user-preset", "--out", str(tmp_path / "r"),
                           *args], capture_output=True, text=True,
                          env={**os.environ, "SCHEDSEARCH_CACHE": str(tmp_path / "cache")})


def test_a_paper_only_space_and_a_ddpm_baseline_are_refused_in_one_line(tmp_path):
    config = tmp_path / "paper.yaml"
    config.write_text("space: {family: [paper], end: [sigma]}\n")
    r = _cli("--config", str(config), tmp_path=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr[-2000:]
    assert "family [paper] has no faithful analogue on a flow-matching model" in r.stderr
    assert not (tmp_path / "r" / "study.db").exists()          # before any work
    config.write_text("space: {solver: [unipc, unipc_bh1]}\n")
    r = _cli("--config", str(config), tmp_path=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr[-2000:]
    assert "unipc_bh1 cannot start at σ = ∞" in r.stderr
    assert not (tmp_path / "r" / "study.db").exists()
    r = _cli("--baselines", "karras,flow", tmp_path=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip() == ("schedsearch run: error: baseline karras does not apply to a "
                                "flow-matching model; the ones that do: "
                                + ", ".join(FLOW_BASELINES))
    assert applicable_baselines(None, "ddpm") == list(SD_BASELINES)
    with pytest.raises(ValueError, match="baselines flow, optimalsteps do not apply to a "
                                         "DDPM-trained"):
        StudyConfig(model="digits", baselines=["karras", "flow", "optimalsteps"])


def test_the_flow_space_holds_knots_from_infinity_at_every_budget():
    space = Space()
    for budget in (2, 3, 5, 8):
        target = Target(budget=budget, table=FLOW, family="gmm-flow", guidance=3.0,
                        freeu_ok=False)
        assert space.families(target) == ["knots"] and space.seed_trials(target) == []
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=budget))
        for _ in range(30):
            trial = study.ask()
            preset = space.suggest(trial, target)
            assert math.isinf(float(preset.sigmas[0])) and preset.freeu is None
            assert solvers.model_calls(preset.solver, preset.sigmas) == preset.nfe == budget
            # the exact inverse: the warm-start point of a preset is its own fractions
            back = space.warm_params(preset, preset.solver, target)
            again = Space.preset(back, target, name=preset.name)
            assert again.sigmas.tolist() == pytest.approx(preset.sigmas.tolist(), rel=1e-9)
            # the local stage moves every fraction, the first (σ_1 in t) included, in logit
            moved, params = space.refine(_Fixed(0.5), back, target)
            knots = [k for k in back if k.startswith("knot_")]
            assert all(params[k] != back[k] for k in knots)
            assert math.isinf(float(moved.sigmas[0])) and moved.nfe == budget
            study.tell(trial, 0.0)


def test_baselines_are_points_of_the_flow_space():
    """The model's default schedule at the budget is a warm start (the knots family from ∞ is a
    superset of it); OptimalSteps starts at a finite σ and is not."""
    space = Space()
    target = Target(budget=5, table=FLOW, family="gmm-flow", guidance=3.0, freeu_ok=False)
    default = presets.Preset("flow", "gmm-flow", schedules.build({"name": "flow", "steps": 5},
                                                                 FLOW), "euler")
    params = space.warm_params(default, "dpmpp_2m", target)
    assert params["solver"] == "dpmpp_2m" and "freeu" not in params
    rebuilt = Space.preset(params, target).sigmas
    assert rebuilt.tolist() == pytest.approx(default.sigmas.tolist(), rel=1e-9)
    optimal = default.replace(sigmas=schedules.build({"name": "optimalsteps", "steps": 5}, FLOW))
    assert space.warm_params(optimal, "euler", target) is None


class _Fixed:
    """A stand-in trial whose every suggestion is one value (an offset z for refine)."""

    number = 0

    def __init__(self, z):
        self.z = z

    def suggest_float(self, name, lo, hi):
        return self.z


def test_summary_is_json_with_infinity(finished):
    _, _, out = finished
    data = json.loads((out / "summary.json").read_text())
    assert data["rows"][0]["key"] == "best"
