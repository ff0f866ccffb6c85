"""The search end to end on the exact testbed: budget by construction, a whole study with MLflow
and presets, kill/resume, several workers on sqlite and PostgreSQL, the dashboard's REST API."""

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

from schedsearch import presets, report, slots, solvers
from schedsearch.config import StudyConfig, config_json, identity
from schedsearch.noise import SD
from schedsearch.space import SEARCHED_SOLVERS, Space, Target
from schedsearch.study import RunOptions, run_study

SMALL = dict(model="gmm", budget=5, n_search=64, n_heldout=64, batch_size=64, trials=5,
             refine=0.4, baselines=["karras", "paper", "ays"], checkpoints=[16, 32],
             validation_sets=2, refine_margin=100.0)   # a second local run, whatever its start


def cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "schedsearch", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kw)


@pytest.mark.parametrize("budget", [1, 2, 3, 5, 8])
def test_every_candidate_spends_exactly_the_budget(budget):
    # at one model call: the paper family stopping at σ_stop is what the space holds
    space = Space({"family": ["paper"], "end": ["sigma"]} if budget == 1 else {})
    target = Target(budget=budget, table=SD, family="sd15", guidance=3.0, freeu_ok=True)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=budget))
    for _ in range(60):
        trial = study.ask()
        preset = space.suggest(trial, target)
        assert solvers.model_calls(preset.solver, preset.sigmas) == preset.nfe == budget
        assert preset.freeu is None or len(preset.freeu.steps) == len(preset.sigmas) - 1
        # the stored parameters rebuild the very same preset
        again = Space.preset(trial.params, target, name=preset.name)
        assert again.to_json() == preset.to_json()
        study.tell(trial, 0.0)


def test_default_config_is_the_shipped_digits_study():
    shipped = StudyConfig.from_file(Path(__file__).parents[1] / "studies" / "digits-5.yaml")
    assert shipped == StudyConfig()
    for name in ("sd15-coco-5.yaml", "sdxl-6.yaml"):
        StudyConfig.from_file(Path(__file__).parents[1] / "studies" / name)  # valid


@pytest.mark.parametrize("budget, trials, local", [(2, 48, 29), (3, 60, 41), (4, 80, 61),
                                                  (5, 100, 81), (6, 120, 101), (8, 160, 141)])
def test_trials_grow_with_the_budget_unless_set(budget, trials, local):
    config = StudyConfig(budget=budget)
    # the global stage keeps its 19 trials (40% of 48); every extra trial refines the incumbent
    assert config.trials == trials and config.stages() == (trials - local, local)
    # an explicit count is kept, and a stored config reads back to the same count
    assert StudyConfig(budget=budget, trials=10).trials == 10
    assert StudyConfig.from_dict(config_json(config)).trials == trials


@pytest.mark.parametrize("trials, refine, stages", [(8, 0.6, (3, 5)), (48, 0.5, (24, 24)),
                                                    (100, 0.5, (24, 76)), (100, 0.0, (100, 0)),
                                                    # one global trial at least: it was (0, 1)
                                                    (1, 0.6, (1, 0)), (2, 0.9, (1, 1))])
def test_refine_splits_the_first_48_trials_and_the_rest_are_local(trials, refine, stages):
    assert StudyConfig(trials=trials, refine=refine).stages() == stages


@pytest.mark.parametrize("trials, found, starts, runs", [
    (60, 2, 2, [21, 20]), (72, 2, 2, [27, 26]), (60, 1, 2, [41]), (60, 0, 2, [41]),
    (60, 3, 2, [21, 20]), (4, 3, 3, [1, 1]), (2, 2, 2, [1]), (60, 3, 3, [14, 14, 13])])
def test_the_local_stage_is_split_between_its_cmaes_runs(trials, found, starts, runs):
    """``found`` starts, at most ``refine_starts`` of them used, share the local trials evenly."""
    config = StudyConfig(trials=trials, refine_starts=starts)
    assert config.local_runs(found) == runs and sum(runs) == config.stages()[1]


def test_local_runs_start_from_the_best_trial_of_each_solver_best_first():
    from schedsearch.study import local_starts

    study = optuna.create_study()
    dist = {"solver": optuna.distributions.CategoricalDistribution(["unipc", "dpmpp_2m", "ipndm"])}
    for value, solver in [(7.0, "dpmpp_2m"), (6.5, "unipc"), (6.9, "unipc"), (6.8, "dpmpp_2m")]:
        study.add_trial(optuna.trial.create_trial(params={"solver": solver}, distributions=dist,
                                                  value=value))
    study.add_trial(optuna.trial.create_trial(params={"solver": "ipndm"}, distributions=dist,
                                              state=optuna.trial.TrialState.FAIL))
    def starts(**kw):
        return [t.number for t in local_starts(study, StudyConfig(**kw))]
    # unipc's best (6.5), then dpmpp_2m's best (6.8, 4.6% behind); ipndm never completed
    assert starts(refine_starts=4, refine_margin=0.1) == [1, 3]
    assert starts(refine_starts=1, refine_margin=0.1) == [1]
    assert starts(refine_starts=4, refine_margin=0.04) == [1]   # 6.8 > 6.5 × 1.04
    assert starts(refine_starts=4, refine_margin=0.0) == [1]
    assert local_starts(optuna.create_study(), StudyConfig()) == []


def test_a_paper_family_trial_starts_only_the_first_local_run():
    """Further runs refine free-form lists; the paper family's few parameters start a run only
    when the best trial is one, or when the space holds no free-form family."""
    from schedsearch.study import local_starts

    dist = {"solver": optuna.distributions.CategoricalDistribution(["unipc", "dpmpp_2m", "ipndm"]),
            "family": optuna.distributions.CategoricalDistribution(["paper", "knots"])}

    def starts(trials, **kw):
        study = optuna.create_study()
        for value, solver, family in trials:
            study.add_trial(optuna.trial.create_trial(
                params={"solver": solver, "family": family}, distributions=dist, value=value))
        return [t.number for t in local_starts(study, StudyConfig(refine_starts=4, **kw))]

    # digits at 5 NFE: UniPC knots best, DPM++(2M) best as a paper point (3% behind), then as
    # knots (7% behind), iPNDM knots 4% behind
    five = [(6.89, "unipc", "knots"), (7.10, "dpmpp_2m", "paper"), (7.40, "dpmpp_2m", "knots"),
            (7.17, "ipndm", "knots")]
    assert starts(five) == [0, 3]                          # the default margin, 5%
    assert starts(five, refine_margin=0.1) == [0, 3, 2]    # DPM++(2M) from its knots point
    # a best trial of the paper family still starts the first run
    four = [(7.11, "dpmpp_2m", "paper"), (7.33, "unipc", "knots"), (7.20, "unipc", "paper")]
    assert starts(four) == [0, 1]
    # a space of the paper family alone: its trials start every run
    assert starts(four, space={"family": ["paper"]}) == [0, 2]


@pytest.mark.parametrize("data, message", [
    (dict(budget=0), "budget must be an integer >= 1"),
    (dict(trials=0), "trials must be an integer >= 1"),
    (dict(n_search=0), "n_search must be an integer >= 1"),
    (dict(baselines=["karras", "dpm"]), r"unknown baselines \['dpm'\]"),
    (dict(objectives=["kid"]), "objectives must be"),
    (dict(objectives=["fid", "clip"]), "the clip objective needs local CLIP weights"),
    (dict(space={"p1": [0.0, 3.0]}), "p1 and p2 must stay > 0"),
    (dict(space={"b2": [0.0, 1.5]}), "FreeU b2 must stay > 0"),
    (dict(space={"stop": [0.5, 3.0]}), "stop must stay >= 1"),
    (dict(space={"warp": [1, 2]}), "unknown search-space keys: warp"),
    (dict(space={"p1": [9.0, 3.0]}), r"'p1' must be \[low, high\]"),
    (dict(space={"p1": ["a", 3.0]}), r"'p1' must be \[low, high\], got \['a', 3.0\]"),
    (dict(space={"stop": [True, 3]}), r"'stop' must be \[low, high\]"),
    (dict(space={"solver": "unipc"}), r"'solver' must be a list, e.g. \[unipc, dpmpp_2m\]"),
    (dict(space={"family": ["knots", "spline"]}), "'family' must be a non-empty list of paper, knots"),
    (dict(space={"solver": ["dpmpp_2m", "heun"]}), "one model call per step"),
    (dict(space={"solver": ["rk45"]}), "solver must be one of"),
    (dict(space={"solver": ["unipc", "UniPC", "ipndm"]}), "'solver' lists unipc twice"),
    (dict(space={"end": ["zero", "zero"]}), "'end' lists zero twice"),
    (dict(space={"freeu": [False]}), r"'freeu' must be true \(search FreeU\) or false, got \[False"),
    (dict(space={"freeu": "no"}), "'freeu' must be true"),
    (dict(space={"knots": [0.0, 0.9]}), r"strictly inside \(0, 1\)"),
    (dict(budget=1, space={"family": ["knots"]}),
     r"knots family needs a budget of 2 or more .* searches space: \{family: \[paper\], end: "
     r"\[sigma\]\}, the default there"),
    (dict(budget=1, space={"end": ["zero", "sigma"]}), "ending at 0 spends the only model call"),
    (dict(budget=1, model="gmm-flow"), "a flow-matching model has nothing to search at 1 model"),
    (dict(n_search=1), r"n_search must be >= 2 \(FID needs two images at least\)"),
    (dict(guidance=0), r"guidance must be a number in \(0, 100\)"),
    (dict(space={"guidance": [0, 5]}),
     r"search space: guidance must lie inside \(0, 100\), got \[0, 5\]"),
    (dict(space={"guidance": [2, 150]}), r"guidance must lie inside \(0, 100\)"),
    (dict(space={"guidance": [5, 2]}), r"'guidance' must be \[low, high\]"),
    (dict(refine=1.0), r"refine .* must lie in \[0, 1\)"),
    (dict(distill_samples=0), "distill_samples must be an integer >= 1"),
    (dict(teacher_steps="100"), "teacher_steps must be an integer >= 1, got '100'"),
    (dict(heldout_sets=0), "heldout_sets must be an integer >= 1"),
    (dict(validation_sets=0), "validation_sets must be an integer >= 1"),
    (dict(refine_starts=0), "refine_starts must be an integer >= 1"),
    (dict(refine_margin=-0.1), "refine_margin .* must be a number >= 0"),
    (dict(refine_margin=float("nan")), "refine_margin .* must be a number >= 0"),
    (dict(n_search=100_000, validation_sets=5), "validation and held-out seeds never meet"),
    (dict(checkpoints=[1000]), "checkpoints must lie in"),
    (dict(colour="red"), "unknown study config keys: colour; known keys"),
    (dict(budget=True), "budget must be an integer >= 1"),
    (dict(model=None), "model must be a testbed name, hub id or path, got None"),
    (dict(prompts=5), "prompts must be a string, got 5"),
    (dict(ref_stats=""), "ref_stats is empty: give it a value, or leave it out"),
    (dict(space=[1]), "space must be a mapping of keys to ranges or choices"),
    (dict(objectives="fid"), r"objectives must be a list, e.g. \[fid, nfe\], got 'fid'"),
    (dict(checkpoints="50,100"), "checkpoints must be a list"),
    (dict(checkpoints=[50.5]), "checkpoints must be integers"),
    (dict(height=512), "height: for Stable Diffusion models only, not the digits testbed"),
    (dict(model="a/b", width=True), "width must be an integer number of pixels"),
    (dict(trails=5), r"unknown study config keys: trails \(did you mean trials for trails\?\)"),
    # refused by the held-out check once every trial had run
    (dict(bootstrap=50), r"bootstrap must be >= 100 resamples .*, got 50"),
    (dict(model="a/b", eval_batch=-1), r"eval_batch must be an integer >= 0 \(0: off\)"),
    (dict(vae="x"), "vae: for Stable Diffusion models only, not the digits testbed"),
    (dict(space={"solvr": ["unipc"]}), r"search-space keys: solvr \(did you mean solver for solvr"),
])
def test_bad_configs_are_refused(data, message):
    with pytest.raises(ValueError, match=message):
        StudyConfig.from_dict(data)


def test_an_empty_yaml_section_reads_as_its_default(tmp_path):
    """`space:` with every line under it commented out is null in YAML: the default space (it was
    a TypeError traceback), and an empty `objectives:` is FID alone."""
    path = tmp_path / "study.yaml"
    path.write_text("budget: 4\nspace:\n#  family: [knots]\nobjectives:\n")
    config = StudyConfig.from_file(path)
    assert config.space == {} and config.objectives == ["fid"]
    assert identity(config) == identity(StudyConfig(budget=4))


def test_unipc_bh1_is_searchable_on_request_and_off_by_default():
    assert "unipc_bh1" not in Space().ranges["solver"]
    space = Space({"solver": ["UniPC", "uni_pc"]})   # ComfyUI's uni_pc is the bh1 variant
    assert space.ranges["solver"] == ["unipc", "unipc_bh1"]
    assert StudyConfig.from_dict(dict(space={"solver": ["unipc_bh1"]})).space["solver"] == ["unipc_bh1"]
    with pytest.raises(ValueError, match="unipc_bh1 cannot start at σ = ∞"):
        StudyConfig.from_dict(dict(model="digits-flow", space={"solver": ["unipc_bh1"]}))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    os.environ["SCHEDSEARCH_PRESETS"] = str(out / "user-presets")
    summary = run_study(StudyConfig.from_dict(SMALL), RunOptions(out=out, progress=False),
                        echo=lambda *_: None)
    return out, summary


def test_study_compares_winner_and_baselines_on_search_and_heldout(finished):
    out, summary = finished
    rows = {r["key"]: r for r in summary["rows"]}
    assert set(rows) == {"best", "karras", "paper", "ays"}
    for r in rows.values():
        assert r["nfe"] == 5 and r["fid"] > 0 and r["fid_heldout"] > 0
    url = f"sqlite:///{out / 'study.db'}"
    trials = optuna.load_study(study_name="gmm-5nfe", storage=url).get_trials()
    runs = [optuna.load_study(study_name=n, storage=url).get_trials()
            for n in ("gmm-5nfe:refine", "gmm-5nfe:refine:2")]
    local = runs[0] + runs[1]
    base = optuna.load_study(study_name="gmm-5nfe:baselines", storage=url)
    assert sorted(tuple(t.user_attrs["baselines"]) for t in base.get_trials()) == \
        [("ays",), ("karras",), ("paper",)]
    # 5 trials: 3 in the global stage, 2 in the local one's two runs (shown as 3 and 4)
    assert [t.number for t in trials] == [0, 1, 2] and [[t.number for t in r] for r in runs] == [[0], [0]]
    assert all(t.state.is_finished() for t in trials + local)
    done = [(t.value, t.number) for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    done += [(t.value, t.number + 3 + k) for k, r in enumerate(runs) for t in r
             if t.state == optuna.trial.TrialState.COMPLETE]
    # the winner: of the 3 best on the search subset and the best warm start, the lowest mean
    # FID on the 2 validation sets (fresh seeds)
    contenders = [n for _, n in sorted(done)[:3]]
    warm_done = sorted((t.value, t.number) for t in trials
                       if "warm" in t.user_attrs and t.state == optuna.trial.TrialState.COMPLETE)
    if warm_done[0][1] not in contenders:
        contenders.append(warm_done[0][1])
    attrs = optuna.load_study(study_name="gmm-5nfe", storage=url).user_attrs
    vals = {n: [attrs[f"validation:trial{n}"], attrs[f"validation:1:trial{n}"]] for n in contenders}
    assert all(v[0] != v[1] for v in vals.values())   # two sets of different seeds
    means = {n: sum(v) / 2 for n, v in vals.items()}
    assert summary["best_trial"] == min(means, key=lambda n: (means[n], n))
    assert rows["best"]["fid"] == dict((n, v) for v, n in done)[summary["best_trial"]]
    assert rows["best"]["fid_validation"] == pytest.approx(means[summary["best_trial"]])
    # the best baseline on the search subset meets the winner there too, and ★ is the lower
    rival = min(("karras", "paper", "ays"), key=lambda k: rows[k]["fid"])
    rival_val = (attrs[f"validation:{rival}"] + attrs[f"validation:1:{rival}"]) / 2
    assert rows[rival]["fid_validation"] == pytest.approx(rival_val)
    assert summary["recommended"] == (rival if rival_val <= means[summary["best_trial"]]
                                      else "best")
    # nothing else was re-scored
    assert {k.rpartition(":")[2] for k in attrs if k.startswith("validation")} == \
        {f"trial{n}" for n in contenders} | {rival}
    # the first trial is the paper's preset (sd15-5 hyperparameters at this budget)
    assert trials[0].params["p1"] == 5.0 and trials[0].params["stop"] == pytest.approx(2.0)
    assert trials[0].params["solver"] == "dpmpp_1s" and trials[0].params["family"] == "paper"
    # the third is the best baseline as a free-form point, run with the first searched solver
    best_base = min(("karras", "paper", "ays"), key=lambda k: rows[k]["fid"])
    warm = trials[2]
    assert warm.user_attrs["warm"] == 0 and warm.params["family"] == "knots"
    assert warm.params["solver"] == "dpmpp_1s"
    stored = [b.user_attrs["results"][best_base]["preset"]["sigmas"] for b in base.get_trials()
              if best_base in b.user_attrs["results"]][0]
    assert warm.user_attrs["candidate"]["sigmas"] == pytest.approx(stored, rel=1e-9)
    # the local stage's first run moves the global stage's best continuous parameters, keeping
    # its choices; the second run starts from the best free-form trial with another solver
    ranked = sorted((t for t in trials if t.state == optuna.trial.TrialState.COMPLETE),
                    key=lambda t: t.value)
    other = [t for t in ranked if t.params["solver"] != ranked[0].params["solver"]
             and t.params["family"] == "knots"]
    assert other, "the global stage should have run two solvers"
    for incumbent, t in zip((ranked[0], other[0]), local):
        assert t.user_attrs["candidate"]["stage"] == 2
        moved = t.user_attrs["candidate"]["params"]
        assert {k: v for k, v in moved.items() if not isinstance(v, float)} == \
            {k: v for k, v in incumbent.params.items() if not isinstance(v, float)}
        assert set(t.params) == {f"d_{k}" for k, v in incumbent.params.items()
                                 if isinstance(v, float)}
    table = (out / "comparison.md").read_text()
    assert "karras dpm++2m @5" in table and "FID (held-out)" in table


def test_the_best_warm_start_always_meets_the_top_trials_on_fresh_seeds(finished, tmp_path):
    """With rerank = 1 the contenders are the best trial on the search subset and the best
    warm start (the best baseline as a trial); the lower mean FID on the validation sets wins,
    whatever their search FIDs were."""
    import shutil

    from schedsearch import report
    from schedsearch.context import Context

    out, _ = finished
    for f in out.glob("study.db*"):   # the database and any write-ahead log beside it
        shutil.copy(f, tmp_path / f.name)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    main = slots.load(storage, "gmm-5nfe")
    stages = slots.stored_stages(storage, main)
    studies = slots.Studies(main, tuple(st for st, _ in stages[1:]),
                            slots.load(storage, "gmm-5nfe:baselines"), storage,
                            tuple(offset for _, offset in stages[1:]))
    for key in list(studies.trials.user_attrs):   # forget the study's own re-scoring
        if key.startswith("validation"):
            storage.set_study_user_attr(studies.trials._study_id, key, None)
    ctx = Context(StudyConfig.from_dict({**SMALL, "rerank": 1}), echo=lambda *_: None)
    complete = report.completed(studies)
    top = min(complete, key=lambda d: (d.value, d.number))
    warm = min((d for d in complete if "warm" in d.trial.user_attrs),
               key=lambda d: (d.value, d.number))
    # a top trial that is the warm start itself would make this test say nothing
    assert top.number != warm.number and top.value < warm.value
    best = report.winner(studies.trials, ctx, complete)
    fresh = {d.number: [ctx.score(report.stored_preset(d.trial.user_attrs["candidate"]),
                                  which=f"validation:{j}").fid for j in range(2)]
             for d in (top, warm)}
    assert best.number == min(fresh, key=lambda n: (sum(fresh[n]), n))
    attrs = slots.load(storage, "gmm-5nfe").user_attrs
    for n, (v0, v1) in fresh.items():
        assert attrs[f"validation:trial{n}"] == v0 and attrs[f"validation:1:trial{n}"] == v1


def test_mlflow_holds_every_trial_and_baseline(finished):
    from mlflow.tracking import MlflowClient

    out, _ = finished
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("gmm-5nfe")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    roles = {}
    for r in runs:
        roles.setdefault(r.data.tags["schedsearch.role"], []).append(r)
        assert r.info.status == "FINISHED"
    assert len(roles["study"]) == 1 and len(roles["baseline"]) == 3 and len(roles["best"]) == 1
    assert len(roles["trial"]) + 1 == 5
    parent = roles["study"][0].info.run_id
    artifacts = {"schedule.png", "samples.png", "preset.json", "samples.safetensors"}
    for r in roles["trial"] + roles["best"] + roles["baseline"]:
        assert r.data.tags["mlflow.parentRunId"] == parent
        names = {a.path for a in client.list_artifacts(r.info.run_id)}
        if r.data.tags["schedsearch.state"] == "COMPLETE":
            assert {"fid", "kid", "nfe"} <= set(r.data.metrics)
        # artifacts for the winner and the baselines only: trials spend their time sampling
        if r.data.tags["schedsearch.role"] in ("best", "baseline"):
            assert artifacts <= names
        else:
            assert not names
    parent_files = {a.path for a in client.list_artifacts(parent)}
    assert {"comparison.md", "summary.json", "fid_vs_trial.png", "schedules.png"} <= parent_files
    assert "pareto_front.png" not in parent_files   # one objective: no front to draw


def test_study_figures_are_rebuilt_from_the_mlflow_store_alone(finished, tmp_path):
    """analysis/study_figures.py took the store's last experiment, MLflow's empty "Default", and
    drew empty figures."""
    out, summary = finished
    r = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "analysis" /
                                            "study_figures.py"), "--out", str(out),
                        "--to", str(tmp_path)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert r.returncode == 0, r.stderr
    trials = sum(summary["trials"][stage].get("COMPLETE", 0) for stage in ("global", "local"))
    assert f"{trials} scored trials, 3 baselines" in r.stdout
    assert "| ★ " in r.stdout   # the comparison table, downloaded from the study's run
    for name in ("fid_vs_trial.png", "schedules.png", "partial_fid.png", "comparison.md"):
        assert (tmp_path / name).stat().st_size > 0


def test_exported_preset_reproduces_the_trials_images_exactly(finished, tmp_path):
    from mlflow.tracking import MlflowClient
    from safetensors import safe_open

    import schedsearch

    out, summary = finished
    # the best trial, by number (without --trial export gives the ★ row, here maybe a baseline)
    r = cli("export", "--study", "gmm-5nfe", "--name", "mine", "--out", str(out),
            "--trial", str(summary["best_trial"]), "--to", str(tmp_path / "mine.json"))
    assert r.returncode == 0, r.stderr
    preset = presets.load(str(tmp_path / "mine.json"))
    assert preset.provenance["trial"] == summary["best_trial"]
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("gmm-5nfe")
    run = client.search_runs([exp.experiment_id], "tags.`schedsearch.role` = 'best'")[0]
    path = client.download_artifacts(run.info.run_id, "samples.safetensors", str(tmp_path))
    with safe_open(path, "pt") as f:
        logged = f.get_tensor("images")
        prompts = json.loads(f.metadata()["prompts"])
        seeds = json.loads(f.metadata()["seeds"])
    again = schedsearch.generate("gmm", preset, [int(p) for p in prompts], seeds, output="samples")
    assert torch.equal(again.images, logged)


def test_dashboard_lists_trials_and_baselines_with_fid_over_rest(finished):
    import urllib.request

    out, _ = finished
    port = 5600 + os.getpid() % 300
    proc = subprocess.Popen([sys.executable, "-m", "schedsearch", "ui", "--out", str(out), "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"

    def post(path, body):
        req = urllib.request.Request(base + path, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        return json.load(urllib.request.urlopen(req, timeout=10))
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.time() < deadline, "the MLflow UI did not start in 120 s"
                time.sleep(1)
        exps = post("/api/2.0/mlflow/experiments/search", {"max_results": 10})["experiments"]
        exp = next(e for e in exps if e["name"] == "gmm-5nfe")
        runs = post("/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]],
                                                    "max_results": 100})["runs"]
        by_role = {}
        for r in runs:
            tags = {t["key"]: t["value"] for t in r["data"].get("tags", [])}
            metrics = {m["key"]: m["value"] for m in r["data"].get("metrics", [])}
            by_role.setdefault(tags["schedsearch.role"], []).append(metrics)
        assert len(by_role["baseline"]) == 3 and all("fid" in m for m in by_role["baseline"])
        assert any("fid" in m for m in by_role["trial"] + by_role["best"])
        # a tracking server serves its own UI: `ui --tracking-uri` on it prints its runs table
        # and starts nothing (it used to pass the http URI to `mlflow server` as a store)
        r = cli("ui", "--tracking-uri", f"http://user:pw@127.0.0.1:{port}", "--no-browser",
                timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.splitlines()[0] == (
            f"MLflow UI: {base}/#/experiments/{exp['experiment_id']}/runs?workflowType="
            f"machine_learning&orderByKey=metrics.%60fid%60&orderByAsc=true"), r.stdout
    finally:
        proc.terminate()
        proc.wait(30)
    # the server and its workers went down with `schedsearch ui`
    time.sleep(1)
    with pytest.raises(OSError):
        urllib.request.urlopen(base + "/health", timeout=2)


def test_fid_and_nfe_objectives_give_a_pareto_front(tmp_path):
    """The NFE searched from 2 (the paper family ending at 0 has no step at 1 call: those trials
    failed), the best baselines warm-started at the budget, so the front's top end is never worse
    than them; the front printed in comparison.md."""
    cfg = StudyConfig.from_dict({**SMALL, "objectives": ["fid", "nfe"], "trials": 24,
                                 "baselines": ["karras", "ays"], "warm_start": 1})
    summary = run_study(cfg, RunOptions(out=tmp_path, progress=False, export_user_preset=False),
                        echo=lambda *_: None)
    front = summary["pareto_front"]
    assert summary["objectives"] == ["fid", "nfe"]
    assert [p["values"][1] for p in front] == sorted({p["values"][1] for p in front})
    study = optuna.load_study(study_name="gmm-5nfe", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert not study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    warm = [t for t in study.trials if "warm" in t.user_attrs]
    assert len(warm) == 5 and all(t.params["nfe"] == 5 for t in warm)
    best_baseline = min(r["fid"] for r in summary["rows"] if r["key"] in ("karras", "ays"))
    assert front[-1]["values"] == [min(t.values[0] for t in study.trials if t.values
                                       and t.values[1] == 5), 5]
    assert front[-1]["values"][0] <= best_baseline
    assert {t.params["nfe"] for t in study.trials} - {5} and min(t.params["nfe"] for t in study.trials) >= 2
    assert "| trial | FID (search) | NFE | solver |" in (tmp_path / "comparison.md").read_text()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.search_runs([client.get_experiment_by_name("gmm-5nfe").experiment_id],
                                filter_string="tags.`schedsearch.role` = 'study'")[0].info.run_id
    assert "pareto_front.png" in {a.path for a in client.list_artifacts(parent)}
    for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        assert t.values[1] == t.params["nfe"] == t.user_attrs["candidate"]["nfe"]
    # nobody on the front is beaten on both objectives by another complete trial
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    for p in front:
        assert not any(t.values[0] < p["values"][0] and t.values[1] < p["values"][1] for t in done)


def test_a_study_on_a_text_to_image_pipeline_with_a_clip_objective(tmp_path, monkeypatch, offline_sd):
    """The real-model path offline: a tiny SD pipeline from disk, text prompts, reference stats
    from an image folder through the Inception extractor (a stand-in file in clean-fid's format),
    FreeU in the space, and CLIP score as a second objective."""
    from test_metrics import _tiny_clip

    monkeypatch.setenv("SCHEDSEARCH_CACHE", str(tmp_path / "cache"))
    _tiny_clip(str(tmp_path / "clip"))
    cfg = StudyConfig.from_dict(dict(
        model=offline_sd.model, budget=4, prompts=str(offline_sd.prompts), n_search=6, n_heldout=4,
        batch_size=6, trials=4, ref_stats=str(offline_sd.ref), inception=str(offline_sd.inception),
        clip=str(tmp_path / "clip"),
        objectives=["fid", "clip"], baselines=["karras", "paper"], guidance=5.5))
    summary = run_study(cfg, RunOptions(out=tmp_path / "run", progress=False, export_user_preset=False),
                        echo=lambda *_: None)
    assert summary["pareto_front"] and {r["key"] for r in summary["rows"]} == {"best", "karras", "paper"}
    study = optuna.load_study(study_name="sd-4nfe", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    assert study.directions[1] == optuna.study.StudyDirection.MAXIMIZE
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert done and all(0 <= t.values[1] <= 100 for t in done)
    assert all("freeu" in t.params for t in study.get_trials() if t.params)  # FreeU is searched on a UNet model
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sd-4nfe").experiment_id])
    assert any("clip" in r.data.metrics for r in runs if r.data.tags["schedsearch.role"] != "study")


def test_a_diverging_candidate_fails_with_its_reason_and_the_study_goes_on(tmp_path, monkeypatch):
    """FreeU backbone scales of 1e30 overflow the digits UNet (a real divergence, no mock): the
    paper-preset seed trial (FreeU on, clamped into this space) fails, the FreeU-off seed trial
    completes, and the study still compares and exports."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("SCHEDSEARCH_CACHE", str(tmp_path / "cache"))
    cfg = StudyConfig.from_dict(dict(model="digits", budget=3, trials=3, n_search=16, n_heldout=16,
                                     batch_size=16, baselines=["karras"], checkpoints=[8],
                                     refine=0.0, space={"b1": [1e30, 1e31], "b2": [1e30, 1e31]}))
    summary = run_study(cfg, RunOptions(out=tmp_path / "run", progress=False, export_user_preset=False),
                        echo=lambda *_: None)
    study = optuna.load_study(study_name="digits-3nfe", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    trials = study.get_trials()
    assert trials[0].state == optuna.trial.TrialState.FAIL and trials[0].params["freeu"] is True
    reason = trials[0].user_attrs["fail_reason"]
    assert "non-finite" in reason and "step" in reason and "sigma" in reason
    assert trials[1].state == optuna.trial.TrialState.COMPLETE and trials[1].params["freeu"] is False
    assert len(trials) == 3 and summary["rows"][0]["key"] == "best"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("digits-3nfe").experiment_id],
                              "tags.`schedsearch.trial` = '0'")
    assert runs[0].info.status == "FAILED" and runs[0].data.tags["schedsearch.state"] == "FAIL"
    assert runs[0].data.tags["schedsearch.reason"] == reason


def test_the_recommendation_is_a_baseline_when_one_beats_every_trial(tmp_path):
    """A space confined to a poor corner (tiny p2: steps bunched at high noise): Karras at the same
    NFE wins on the search subset, so it is what the study recommends and exports."""
    from schedsearch import schedules

    cfg = StudyConfig.from_dict({**SMALL, "trials": 3, "baselines": ["karras", "karras20"],
                                 "space": {"family": ["paper"], "p2": [0.6, 0.61],
                                           "p1": [2.0, 2.1], "stop": [7.9, 8.0], "end": ["sigma"]}})
    summary = run_study(cfg, RunOptions(out=tmp_path, progress=False, export_user_preset=False),
                        echo=lambda *_: None)
    rows = {r["key"]: r for r in summary["rows"]}
    assert rows["karras"]["fid"] < rows["best"]["fid"]
    assert summary["recommended"] == "karras" and rows["karras"].get("recommended")
    preset = presets.read(summary["preset"])
    assert preset.sigmas.tolist() == schedules.karras(5).tolist() and preset.solver == "dpmpp_2m"
    assert preset.provenance["baseline"] == "karras" and "best_trial" in preset.provenance
    assert "★ karras dpm++2m @5" in (tmp_path / "comparison.md").read_text()
    assert "karras20" not in [r["key"] for r in summary["rows"] if r.get("recommended")]


def test_a_trial_claimed_by_a_worker_that_died_before_logging_it_still_shows_in_mlflow(tmp_path):
    """The window between claiming a slot and creating its MLflow run: a worker that dies there
    leaves a RUNNING trial and no run. The next worker fails and re-queues the trial and logs it as
    an interrupted (KILLED) run, so the dashboard and Optuna tell the same story."""
    from mlflow.tracking import MlflowClient

    from schedsearch.config import default_study_name
    from schedsearch.context import Context
    from schedsearch.study import open_studies

    cfg = StudyConfig.from_dict({**SMALL, "trials": 3, "refine": 0.0, "baselines": ["karras"]})
    url, name = f"sqlite:///{tmp_path / 'study.db'}", default_study_name(cfg)
    storage = slots.make_storage(url, heartbeat=1, grace=2)
    studies = open_studies(storage, name, Context(cfg, echo=lambda *_: None))
    dead = slots.claim(studies.trials, storage)    # ... and the worker dies here
    assert dead is not None and dead.number == 0
    time.sleep(2.5)                                  # its heartbeat goes stale (grace 2 s)

    opts = RunOptions(out=tmp_path, storage=url, heartbeat=1, grace=2, progress=False,
                      export_user_preset=False)
    run_study(cfg, opts, echo=lambda *_: None)
    study = optuna.load_study(study_name=name, storage=url)
    by_number = {t.number: t for t in study.get_trials()}
    assert by_number[0].state == optuna.trial.TrialState.FAIL
    retry = [t for t in by_number.values() if t.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].state == optuna.trial.TrialState.COMPLETE
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in by_number.values()) == 3

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name).experiment_id
    # slot 0's story: the dead worker's attempt, interrupted, then its retry under the same number
    runs = client.search_runs([exp], "tags.`schedsearch.trial` = '0'")
    assert sorted((r.info.status, r.data.tags["schedsearch.state"]) for r in runs) == [
        ("FINISHED", "COMPLETE"), ("KILLED", "INTERRUPTED")]
    assert not client.search_runs([exp], "attributes.status = 'RUNNING'")


def _one_worker(tmp_path):
    """A two-trial gmm study opened by one worker, with its MLflow store and parent run: the
    pieces ``run_study`` wires together, for tests that step a worker through one trial."""
    from schedsearch.config import default_study_name
    from schedsearch.context import Context
    from schedsearch.study import open_studies
    from schedsearch.tracking import Tracker

    cfg = StudyConfig.from_dict({**SMALL, "trials": 2, "refine": 0.0, "baselines": ["karras"]})
    name = default_study_name(cfg)
    storage = slots.make_storage(f"sqlite:///{tmp_path / 'study.db'}")
    ctx = Context(cfg, echo=lambda *_: None)
    studies = open_studies(storage, name, ctx)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", name, tmp_path / "mlartifacts")
    return cfg, name, storage, ctx, studies, tracker, tracker.study_run(name, {}, {})


@pytest.mark.parametrize("when", ["at a checkpoint", "after scoring"])
def test_a_trial_taken_over_while_scoring_leaves_no_finished_run_beside_its_requeued_copy(
        tmp_path, when):
    """A worker that stalls past the grace period has its slot failed and re-queued by another.
    Whether it finds out at a pruning checkpoint or when it reports its score, it drops the trial
    and goes on (at a checkpoint it used to raise and end the worker), and its MLflow run does
    not end FINISHED with a score — the dashboard would show the trial twice — but KILLED,
    saying the slot was taken over, with no FID logged."""
    from mlflow.tracking import MlflowClient

    from schedsearch.space import make_sampler
    from schedsearch.study import evaluate_trial

    cfg, name, storage, ctx, studies, tracker, parent = _one_worker(tmp_path)
    slot = slots.claim(studies.trials, storage, accept=lambda a: "warm" not in a)
    trial = slots.open_trial(studies.trials, storage, slot,
                             sampler=make_sampler("random", 0, False))

    score = ctx.score

    def stalled(*args, **kwargs):   # while this worker scores, another one fails its stale slot
        fail = lambda: storage.set_trial_state_values(slot.trial_id,  # noqa: E731
                                                      optuna.trial.TrialState.FAIL)
        if when == "at a checkpoint":
            fail()
        res = score(*args, **kwargs)
        if when == "after scoring":
            fail()
        return res

    ctx.score = stalled
    make = lambda t: (Space(dict(cfg.space)).suggest(t, ctx.target), None)  # noqa: E731
    said: list = []   # the worker's echo (stderr under --json, whose stdout is the summary)
    assert evaluate_trial(trial, studies.trials, ctx, tracker, parent, make, 0, 1,
                          said.append) == "INTERRUPTED"
    assert [line.split(":")[0] for line in said] == ["  trial 0"], said
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id],
                              "tags.`schedsearch.trial` = '0'")
    assert len(runs) == 1 and runs[0].info.status == "KILLED"
    assert runs[0].data.tags["schedsearch.state"] == "INTERRUPTED"
    assert "taken over by another worker" in runs[0].data.tags["schedsearch.reason"]
    assert "fid" not in runs[0].data.metrics
    assert storage.get_trial(slot.trial_id).state == optuna.trial.TrialState.FAIL


def test_another_workers_recovery_leaves_a_just_scored_trials_run_to_its_worker(tmp_path):
    """Between telling Optuna a trial's score and logging it to MLflow, a worker's run is RUNNING
    while its trial is not. Another worker's recovery (a worker starting, or finishing its own
    work) used to close every such run as interrupted; racing the worker's own logging, that
    left a scored trial KILLED on the dashboard (a two-worker CI run counted 7 of 8 trials). It
    now closes the runs of stale-failed trials and of runs no trial claims after the grace
    period, and leaves the rest to their workers."""
    from mlflow.tracking import MlflowClient

    from schedsearch.space import make_sampler
    from schedsearch.study import evaluate_trial, recover
    from schedsearch.tracking import Tracker

    cfg, name, storage, ctx, studies, tracker, parent = _one_worker(tmp_path)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    # a run no trial claims (yet): a worker between creating it and linking it, or a dead one
    unlinked = tracker.child(parent, "trial 7", "trial", {})
    finish, seen = tracker.finish, {}

    def finish_after_recovery(run, *args, **kwargs):   # the other worker's recovery, in the gap
        recover(studies, Tracker(tracker.uri, name, tmp_path / "mlartifacts"), parent, grace=30)
        seen.update({r: client.get_run(r).info.status for r in (run, unlinked)})
        return finish(run, *args, **kwargs)

    tracker.finish = finish_after_recovery
    slot = slots.claim(studies.trials, storage, accept=lambda a: "warm" not in a)
    trial = slots.open_trial(studies.trials, storage, slot, sampler=make_sampler("random", 0, False))
    make = lambda t: (Space(dict(cfg.space)).suggest(t, ctx.target), None)  # noqa: E731
    assert evaluate_trial(trial, studies.trials, ctx, tracker, parent, make, 0, 1) == "COMPLETE"
    run = storage.get_trial(slot.trial_id).user_attrs["mlflow_run_id"]
    assert seen == {run: "RUNNING", unlinked: "RUNNING"}
    done = client.get_run(run)
    assert done.info.status == "FINISHED" and done.data.tags["schedsearch.state"] == "COMPLETE"
    assert "schedsearch.reason" not in done.data.tags
    # once the grace period is over, a run no trial claims is an orphan; a logged one stays
    recover(studies, tracker, parent, grace=0)
    assert client.get_run(unlinked).info.status == "KILLED"
    assert client.get_run(unlinked).data.tags["schedsearch.state"] == "INTERRUPTED"
    assert client.get_run(run).info.status == "FINISHED"


def test_a_failed_baseline_is_reported_with_its_reason_not_dropped(tmp_path):
    """GITS and OSS need 16 distillation prompts that an 8-line prompt file does not have (run
    refuses that up front; here the file shrinks after the check): their slot fails with that
    reason, and the study says so wherever it shows the comparison."""
    import schedsearch.study as study_module

    prompts = tmp_path / "labels.txt"
    prompts.write_text("0\n1\n2\n3\n" * 4)
    read_inputs = study_module.read_inputs

    def then_shortened(config):   # the file is cut to 8 lines once the study has checked it:
        inputs = read_inputs(config)   # too few since then is the one way left to this failure
        prompts.write_text("0\n1\n2\n3\n" * 2)
        return inputs

    study_module.read_inputs = then_shortened
    try:
        cfg = StudyConfig.from_dict({**SMALL, "prompts": str(prompts), "n_search": 4,
                                     "n_heldout": 4, "checkpoints": [2], "trials": 2, "rerank": 0,
                                     "baselines": ["karras", "gits", "oss"],
                                     "distill_samples": 16})
        summary = run_study(cfg, RunOptions(out=tmp_path / "run", progress=False,
                                            export_user_preset=False), echo=lambda *_: None)
    finally:
        study_module.read_inputs = read_inputs
    assert set(summary["failed_baselines"]) == {"gits, oss"}
    assert summary["failed_baselines"]["gits, oss"].endswith(
        "holds only 8 (distill_samples 16, GITS and OSS's teacher images; lower it in the study "
        "config, leave gits and oss out of --baselines, or repeat lines in the file)")
    assert [r["key"] for r in summary["rows"]] == ["best", "karras"]
    assert "baseline gits, oss failed:" in (tmp_path / "run" / "comparison.md").read_text()


def test_gits_and_oss_at_a_budget_the_teacher_cannot_beat_are_skipped_not_failed(tmp_path,
                                                                              recwarn):
    """Their slot was told NaN: Optuna warned "The value nan is not acceptable" and failed it."""
    cfg = StudyConfig.from_dict({**SMALL, "n_search": 8, "n_heldout": 8, "checkpoints": [4],
                                 "trials": 1, "rerank": 0, "teacher_steps": 5,
                                 "baselines": ["karras", "gits", "oss"]})
    summary = run_study(cfg, RunOptions(out=tmp_path / "run", progress=False,
                                        export_user_preset=False), echo=lambda *_: None)
    assert summary["failed_baselines"] == {}
    assert [r["key"] for r in summary["rows"]] == ["best", "karras"]
    study = optuna.load_study(study_name="gmm-5nfe:baselines",
                              storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    states = {tuple(t.user_attrs["baselines"]): t.state for t in study.trials}
    assert states == {("karras",): optuna.trial.TrialState.COMPLETE,
                      ("gits", "oss"): optuna.trial.TrialState.PRUNED}
    assert not [w for w in recwarn if "nan" in str(w.message)]


def test_gits_and_oss_distill_on_the_block_after_the_studys_and_wrap_past_the_last():
    """At the largest --prompt-seed the next block does not exist: GITS/OSS failed with a seed
    range error; block 0 is just as disjoint from the study's images."""
    from schedsearch import prompts
    from schedsearch.baselines import distill_block
    last = prompts.MAX_PROMPT_SEED - 1
    assert distill_block(7) == 8 and distill_block(last) == 0
    study = set(prompts.load("classes:10", 20, last).seeds)
    distill = prompts.load("classes:10", 20, distill_block(last)).seeds
    assert distill == tuple(range(20)) and not study & set(distill)
    assert max(study) == last * prompts.SEED_STRIDE + 19 < 2 ** 64


def test_a_study_where_no_trial_completes_exits_2_with_the_reason(tmp_path):
    """The only trial is the paper preset with FreeU scales of 1e30: it diverges; the command
    says why in one line and the study's MLflow run ends FAILED, not RUNNING."""
    from mlflow.tracking import MlflowClient

    r = cli("run", "--model", "digits", "--budget", "3", "--trials", "1", "--n-search", "16",
            "--n-heldout", "16", "--batch-size", "16", "--baselines", "karras", "--no-progress",
            "--no-user-preset", "--config", str(_config(tmp_path, refine=0.0, checkpoints=[8],
                                                        space={"b1": [1e30, 1e31]})),
            "--out", str(tmp_path / "run"), env={"SCHEDSEARCH_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("schedsearch run: error: no trial of study") and "non-finite" in line
    # with --json the summary goes to stdout, and the exit status still says it failed (it was 0)
    r = cli(*r.args[3:], "--json", env={"SCHEDSEARCH_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "non-finite" in " ".join(json.loads(r.stdout)["fail_reasons"])
    assert r.stderr.strip().splitlines()[-1] == line
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("digits-3nfe").experiment_id],
                              "tags.`schedsearch.role` = 'study'")
    assert runs[0].info.status == "FAILED"


def _config(tmp_path, **keys):
    import yaml

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(keys))
    return path


def test_local_runs_are_laid_out_once_and_every_worker_follows_that_layout(tmp_path):
    """The first worker done with the global stage stores the layout; a worker that computed
    another one (another refine_starts) and a restarted study use the stored one, so the study
    keeps its trial count."""
    storage = slots.make_storage(f"sqlite:///{tmp_path / 'study.db'}")
    common = dict(directions=["minimize"], sampler=optuna.samplers.RandomSampler(seed=0),
                  pruner=optuna.pruners.NopPruner(), identity={"model": "gmm"}, attrs={},
                  plan=[({}, {})] * 2, baseline_groups=[["karras"]])
    first = slots.open_studies(storage, "s", **common)
    assert first.local == ()                       # not before the global stage is done
    slots.open_local(first, [3, 2])
    other = slots.open_studies(storage, "s", **common)   # a worker joining later gets them
    slots.open_local(other, [1, 1, 1, 1, 1])
    for st in (first, other):
        assert [len(r.get_trials()) for r in st.local] == [3, 2] and st.offsets == (2, 5)
    assert sorted(s.study_name for s in optuna.get_all_study_summaries(storage)) == \
        ["s", "s:baselines", "s:refine", "s:refine:2"]
    assert [off for _, off in slots.stored_stages(storage, first.trials)] == [0, 2, 5]


def test_more_trials_grow_the_last_local_run_once_and_keep_every_shown_number(tmp_path):
    storage = slots.make_storage(f"sqlite:///{tmp_path / 'study.db'}")
    common = dict(directions=["minimize"], sampler=optuna.samplers.RandomSampler(seed=0),
                  pruner=optuna.pruners.NopPruner(), identity={"model": "gmm"}, attrs={},
                  plan=[({}, {})] * 2, baseline_groups=[["karras"]])
    first = slots.open_studies(storage, "s", **common)
    slots.open_local(first, [3, 2])
    assert slots.planned_trials(first.trials.user_attrs) == 7
    for _ in range(2):   # a second worker (or run) asking for the same total adds nothing more
        grown = slots.open_studies(storage, "s", **common, trials=9)
        assert [len(r.get_trials()) for r in grown.local] == [3, 4] and grown.offsets == (2, 5)
    assert slots.stages_of(grown, 0) == (2, 7)
    same = slots.open_studies(storage, "s", **common, trials=8)   # fewer: nothing taken back
    assert [len(r.get_trials()) for r in same.local] == [3, 4]


def test_a_resumed_study_takes_more_trials_and_refuses_another_plan(tmp_path, capsys):
    """Before: --trials 12 → 14 on a finished study added one global trial and no local one (13
    in all, the header saying 14), and another --seed or --sampler drew the rest of the study
    under other settings. Now more trials go to the last CMA-ES run; the rest is one line."""
    from schedsearch.cli import main

    args = ["run", "--model", "gmm", "--n-search", "64", "--n-heldout", "64", "--batch-size", "64",
            "--baselines", "karras", "--validation-sets", "1", "--no-progress", "--no-user-preset",
            "--no-artifacts", "--out", str(tmp_path)]
    assert main([*args, "--trials", "6"]) == 0
    assert "stopped by --timeout" not in capsys.readouterr().out
    # a deadline that has passed before the first slot: the result so far, said to be one
    assert main([*args, "--trials", "8", "--timeout", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "stopped by --timeout after 6 of 8 trials: the same command continues the study" in out
    assert main([*args, "--trials", "8"]) == 0
    out = capsys.readouterr().out
    assert "study gmm-5nfe: 8 trials (2 global, 6 local)" in out and "stopped by" not in out
    stages = slots.stored_stages(f"sqlite:///{tmp_path / 'study.db'}",
                                 optuna.load_study(study_name="gmm-5nfe",
                                                   storage=f"sqlite:///{tmp_path / 'study.db'}"))
    numbers = [off + t.number for study, off in stages for t in study.get_trials()]
    assert sorted(numbers) == list(range(8))
    assert [len(study.get_trials()) for study, _ in stages] == [2, 6]   # one run, 4 + 2
    for extra, message in ((["--trials", "6"], "study 'gmm-5nfe' holds 8 trials; --trials 6 "
                                                 "cannot take any back"),
                           (["--trials", "8", "--seed", "1", "--sampler", "random"],
                            "study 'gmm-5nfe' was created with sampler 'tpe', seed 0; now "
                            "sampler 'random', seed 1. How a study searches is fixed")):
        assert main([*args, *extra]) == 2
        assert message in capsys.readouterr().err


def test_a_study_from_before_the_local_runs_keeps_its_one_local_study(tmp_path):
    storage = slots.make_storage(f"sqlite:///{tmp_path / 'study.db'}")
    common = dict(directions=["minimize"], sampler=optuna.samplers.RandomSampler(seed=0),
                  pruner=optuna.pruners.NopPruner(), identity={"model": "gmm"}, attrs={},
                  plan=[({}, {})] * 2, baseline_groups=[["karras"]])
    slots.open_studies(storage, "s", **common)
    old = optuna.create_study(storage=storage, study_name="s:refine")   # as 0.1.0 made it
    slots.ensure_slots(old, [({}, {})] * 4, grace=30)
    again = slots.open_studies(storage, "s", **common)
    assert [len(r.get_trials()) for r in again.local] == [4] and again.offsets == (2,)


def test_run_prints_the_presets_sigma_list_solver_and_freeu(tmp_path, capsys, monkeypatch):
    """The last lines of ``schedsearch run`` show the recommended preset as a sampler takes it —
    its σ list, solver, FreeU plan and guidance, read back from the preset file it wrote — since the
    winner's params (knot fractions, p1/p2/stop) do not say which σ it runs."""
    from schedsearch.cli import main

    monkeypatch.setenv("SCHEDSEARCH_CACHE", str(tmp_path / "cache"))
    assert main(["run", "--model", "gmm", "--trials", "4", "--n-search", "64", "--n-heldout", "64",
                 "--baselines", "karras,ays", "--no-progress", "--no-user-preset",
                 "--out", str(tmp_path / "my run")]) == 0
    lines = capsys.readouterr().out.splitlines()
    # the dashboard command, copied into a shell, opens this folder (it has a space)
    dashboard = next(line for line in lines if line.startswith("dashboard: "))
    words = shlex.split(dashboard.split("   (")[0])
    assert words[1:5] == ["schedsearch", "ui", "--out", str(tmp_path / "my run")]
    at = next(i for i, line in enumerate(lines) if line.startswith("preset: "))
    preset = presets.read(lines[at][len("preset: "):])
    assert lines[at + 1].split() == (
        ["σ", *[f"{v:.4g}," for v in preset.sigmas.tolist()[:-1]],
         f"{preset.sigmas.tolist()[-1]:.4g}", "·", preset.solver, "·", "FreeU", "off", "·",
         "guidance", "3"])   # gmm's CFG scale: a searched one (space: guidance) differs
    assert preset.nfe == 5 and preset.solver in SEARCHED_SOLVERS


def test_a_fresh_study_prints_no_library_log_lines(tmp_path):
    """A new MLflow store used to announce itself on stderr ('INFO mlflow.store.db.utils:
    Creating initial MLflow database tables...', then 'Updating database tables') above every
    new study; with --no-progress a run that goes well writes nothing there."""
    r = cli("run", "--model", "gmm", "--budget", "3", "--trials", "2", "--n-search", "8",
            "--n-heldout", "8", "--baselines", "karras", "--no-progress", "--no-user-preset",
            "--out", str(tmp_path / "r"), env={"SCHEDSEARCH_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "r" / "mlflow.db").is_file() and "★ recommended" in r.stdout
    assert r.stderr == ""


def test_a_one_call_study_searches_the_paper_family_stopping_above_zero(tmp_path):
    """At budget 1 the default space used to be refused (no free knot) and, with family [paper]
    alone, every trial ending at 0 failed (no step before the final denoise). Now the default
    there is the paper family stopping at a σ > 0; what the user names is kept."""
    assert {k: v for k, v in StudyConfig.from_dict(dict(budget=1)).space.items()} == \
        {"family": ["paper"], "end": ["sigma"]}
    named = StudyConfig.from_dict(dict(budget=1, space={"solver": ["dpmpp_2m"]})).space
    assert named == {"family": ["paper"], "end": ["sigma"], "solver": ["dpmpp_2m"]}
    assert StudyConfig.from_dict(dict(budget=2)).space == {}
    config = StudyConfig.from_dict(dict(model="gmm", budget=1, trials=6, n_search=32,
                                        n_heldout=32, batch_size=32, baselines=["karras"]))
    summary = run_study(config, RunOptions(out=tmp_path, progress=False, export_user_preset=False),
                        echo=lambda *_: None)
    states = {**summary["trials"]["global"], **summary["trials"]["local"]}
    assert set(states) <= {"COMPLETE", "PRUNED"} and states["COMPLETE"] >= 3, states
    best = presets.load(summary["preset"])
    assert best.nfe == 1 and len(best.sigmas) == 2 and 0 < float(best.sigmas[-1]) < 14.61


def test_a_searched_guidance_is_said_and_the_warm_starts_keep_the_studys(tmp_path):
    """``space: {guidance: [lo, hi]}`` opens the guidance: the sampler's trials draw one in the
    range and their presets run it; the baselines stay at the study's (gmm's 3), and so do the
    seeds and warm starts, so the best baseline's warm start reproduces its FID exactly (with a
    drawn guidance it did not). The study says once that FID alone prefers less guidance."""
    config = StudyConfig.from_dict(dict(model="gmm", budget=3, trials=8, n_search=48,
                                        n_heldout=48, batch_size=48, baselines=["karras", "ays"],
                                        space={"guidance": [2.0, 4.0], "solver": ["dpmpp_2m"]}))
    said = []
    summary = run_study(config, RunOptions(out=tmp_path, progress=False, export_user_preset=False),
                        echo=said.append)
    assert [line.strip() for line in said if "guidance:" in line] == [
        "guidance: searched in [2, 4], the baselines run at 3: FID alone prefers less guidance, "
        "so a win over them is the guidance's as much as the schedule's (docs/search.md)"]
    storage = slots.make_storage(f"sqlite:///{tmp_path / 'study.db'}")
    studies = slots.Studies(trials=slots.load(storage, "gmm-3nfe"), local=(), storage=storage,
                            baselines=slots.load(storage, "gmm-3nfe:baselines"))
    assert {k: b["preset"].guidance for k, b in report.collect_baselines(studies).items()} == {
        "karras": 3.0, "ays": 3.0}
    rows = {r["name"]: r for r in summary["rows"][1:]}
    first = {t.number: t for t in slots.load(storage, "gmm-3nfe").get_trials()}
    assert first[0].user_attrs["seeded_from"] == "paper schedule, DPM++2M, no FreeU"
    assert first[0].params["guidance"] == 3.0
    warm = first[1]   # AYS, the best baseline at 3 NFE, as a knots point with DPM++2M
    assert warm.user_attrs["warm"] == 0 and warm.params["guidance"] == 3.0
    assert warm.values[0] == rows["ays (sd15) @3"]["fid"]
    drawn = [t.params["guidance"] for t in first.values() if t.number > 2]
    drawn += [t.params["d_guidance"] for t in slots.load(storage, "gmm-3nfe:refine").get_trials()]
    assert len(set(drawn)) > 1 and 3.0 not in drawn
    assert 2.0 <= presets.load(summary["preset"]).guidance <= 4.0


@pytest.mark.parametrize("sampler", ["cmaes", "gp"])
def test_the_global_stage_runs_with_cmaes_and_gp(tmp_path, capsys, sampler):
    """``--sampler cmaes`` (the ``cmaes`` package, a dependency since it died with
    ModuleNotFoundError on a fresh install) and ``--sampler gp`` (Optuna's GPSampler, which needs
    scipy and torch) drive the global stage over the mixed space: families with different
    parameters, categorical ends and solvers. With no warm starts and no local stage every trial
    after the paper's two seeds is the sampler's own; none may fail."""
    from schedsearch.cli import main

    config = tmp_path / "study.yaml"
    config.write_text("warm_start: 0\nrefine: 0\n")
    out = tmp_path / "run"
    assert main(["run", "--config", str(config), "--model", "gmm", "--budget", "3",
                 "--trials", "10", "--n-search", "48", "--n-heldout", "48", "--baselines", "karras",
                 "--sampler", sampler, "--no-progress", "--no-user-preset", "--out", str(out)]) == 0
    study = slots.load(slots.make_storage(f"sqlite:///{out / 'study.db'}"), "gmm-3nfe")
    assert study.user_attrs["config"]["sampler"] == sampler
    trials = study.get_trials()
    assert len(trials) == 10 and {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    own = [t for t in trials if "seeded_from" not in t.user_attrs]
    assert len(own) == 8 and len({json.dumps(t.params, sort_keys=True) for t in own}) == 8
    # over both families they model only the shared (categorical) parameters, and say so
    said = capsys.readouterr()
    assert f"--sampler {sampler}: it models only the parameters every trial shares" in \
        said.out + said.err


def test_a_study_resumes_with_its_defaults_named_and_refuses_another_setup(tmp_path, capsys):
    """Re-running a study with another guidance, prompt source or subset size is one line naming
    each difference (it measures something else). Naming the model's defaults (gmm: guidance 3,
    classes:4, the identity extractor) continues it: before, ``--guidance 3`` on a study made
    without it was refused as 'stored None, now 3.0'; and a default made explicit at creation
    resumes without it too."""
    from schedsearch.cli import main

    def run(out, *extra):
        return main(["run", "--model", "gmm", "--budget", "3", "--trials", "3", "--n-search", "16",
                     "--n-heldout", "16", "--baselines", "karras", "--no-progress",
                     "--no-user-preset", "--out", str(tmp_path / out), *extra])

    assert run("a") == 0
    assert run("a", "--guidance", "3", "--prompts", "classes:4", "--extractor", "identity") == 0
    capsys.readouterr()
    assert run("a", "--guidance", "2.5", "--prompts", "classes:3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["schedsearch run: error: study 'gmm-3nfe' already exists with a different "
                   "setup: guidance: stored the default (3.0), now 2.5; prompts: stored the "
                   "default ('classes:4'), now 'classes:3'. Re-run with the same settings to "
                   "continue it, or pass --study-name NEW."]
    assert run("a", "--n-search", "24") == 2
    assert "n_search: stored 16, now 24" in capsys.readouterr().err
    assert run("b", "--guidance", "3") == 0 and run("b") == 0
    storage = slots.make_storage(f"sqlite:///{tmp_path / 'a' / 'study.db'}")
    assert sorted(optuna.get_all_study_names(storage)) == [
        "gmm-3nfe", "gmm-3nfe:baselines", "gmm-3nfe:refine"]
    assert len(slots.load(storage, "gmm-3nfe").get_trials()) == 1


def test_a_pipeline_study_resumes_with_its_native_size_named(tmp_path, monkeypatch, offline_sd):
    """On a real pipeline, ``--height``/``--width`` left out mean the model's native size: naming
    it continues the study (a worker started with ``--height 512`` joins one started without),
    another size is refused before any trial, naming the default it stood for."""
    from schedsearch import models

    monkeypatch.setenv("SCHEDSEARCH_CACHE", str(tmp_path / "cache"))
    base = dict(model=offline_sd.model, budget=2, prompts=str(offline_sd.prompts), n_search=4,
                n_heldout=4, batch_size=4, trials=2, ref_stats=str(offline_sd.ref),
                inception=str(offline_sd.inception), baselines=["karras"], guidance=5.5)
    opts = RunOptions(out=tmp_path / "run", progress=False, export_user_preset=False)
    run_study(StudyConfig.from_dict(base), opts, echo=lambda *_: None)
    h, w = models.load(offline_sd.model).native_size
    assert h > 0 and w > 0
    again = run_study(StudyConfig.from_dict({**base, "height": h, "width": w}), opts,
                      echo=lambda *_: None)
    assert again["finished"]
    with pytest.raises(ValueError, match=rf"height: stored the default \({h}\), now {2 * h}\. "):
        run_study(StudyConfig.from_dict({**base, "height": 2 * h}), opts, echo=lambda *_: None)
