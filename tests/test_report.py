"""The report: the recommendation as a pure function of the comparison rows, and studies written
by schedsearch 0.1.0 (before the orchestration split) still resume and export."""

import json
from pathlib import Path

import optuna
import pytest

from schedsearch import presets
from schedsearch.config import StudyConfig
from schedsearch.report import comparison_markdown, preset_from_study, recommend
from schedsearch.study import RunOptions, run_study

LEGACY = Path(__file__).parent / "fixtures" / "legacy-study"


def row(key, nfe, fid, held=1.0):
    return {"key": key, "name": key, "nfe": nfe, "fid": fid, "fid_heldout": held,
            "kid_heldout": 0.0, "solver": "dpmpp_2m"}


def test_the_winner_is_recommended_unless_a_same_nfe_row_beats_it_on_the_search_subset():
    rows = [row("best", 5, 7.0, held=9.0), row("karras", 5, 8.0, held=1.0), row("karras20", 20, 1.0)]
    # held-out never decides, and a baseline spending more model calls never wins
    assert recommend(rows)["key"] == "best"
    rows[1]["fid"] = 6.5
    assert recommend(rows)["key"] == "karras"
    rows[1]["fid"] = 7.0          # a tie goes to the known schedule
    assert recommend(rows)["key"] == "karras"
    rows[1]["fid"] = 7.01
    assert recommend(rows)["key"] == "best"
    # the best trial of an "fid,nfe" study may spend fewer calls than the budget: compare there
    rows = [row("best", 4, 7.0), row("karras", 5, 6.0), row("ays4", 4, 6.9)]
    assert recommend(rows)["key"] == "ays4"


def test_with_validation_scores_the_recommendation_is_decided_on_the_fresh_seeds():
    rows = [row("best", 8, 6.53, held=9.0), row("karras", 8, 6.64), row("ays", 8, 7.2),
            row("karras20", 20, 1.0)]
    rows[0]["fid_validation"], rows[1]["fid_validation"] = 6.90, 6.88
    # better on the search subset, worse where it was not picked: the known schedule
    assert recommend(rows)["key"] == "karras"
    rows[1]["fid_validation"] = 6.90          # a tie goes to the known schedule
    assert recommend(rows)["key"] == "karras"
    rows[1]["fid_validation"] = 6.95
    assert recommend(rows)["key"] == "best"
    # rows without validation scores (worse on the search subset) take no part
    rows[2]["fid"] = 6.0
    assert recommend(rows)["key"] == "best"


def test_the_comparison_table_marks_the_recommendation_the_ci_and_the_karras_ratio():
    rows = [row("best", 5, 7.0, held=8.0), row("karras", 5, 8.0, held=10.0),
            row("ays", 5, 7.2, held=8.1)]
    rows[0]["recommended"] = True
    rows[1]["vs_best"] = {"delta": -2.0, "lo": -2.6, "hi": -1.5, "excludes_zero": True}
    rows[2]["vs_best"] = {"delta": -0.1, "lo": -0.4, "hi": 0.2, "excludes_zero": False}
    table = comparison_markdown(rows).splitlines()
    assert table[0].endswith("| best − this, held-out (95% CI) | held-out vs Karras@budget |")
    assert table[2] == "| ★ best | 5 | dpmpp_2m | 7.000 | 8.000 | 0.0000 | — | 0.80× |"
    # a CI that excludes zero is bold: the difference is beyond the noise of the proxy
    assert table[3].endswith("| **-2.000 [-2.600, -1.500]** | 1.00× |")
    assert table[4].endswith("| -0.100 [-0.400, +0.200] | 0.81× |")
    assert len(table) == 5            # every difference inside its interval: no footnote


def test_an_interval_beside_its_difference_gets_a_footnote_saying_why():
    """The basic bootstrap interval removes FID's small-sample bias, so it may lie beside the
    observed difference (the flow example: -5.677 [-7.101, -5.743]); the table says why once."""
    rows = [row("best", 5, 7.0, held=8.0), row("flow", 5, 14.0, held=13.1)]
    rows[1]["vs_best"] = {"delta": -5.677, "lo": -7.101, "hi": -5.743, "excludes_zero": True}
    table = comparison_markdown(rows).splitlines()
    assert table[3].endswith("| **-5.677 [-7.101, -5.743]** |")
    assert table[4] == "" and table[5].startswith("An interval beside its difference rather than "
                                                  "around it is not an error")
    assert "basic bootstrap" in table[5] and "docs/scoring.md" in table[5] and len(table) == 6


def test_the_pareto_table_and_figure_show_the_front_and_the_baselines_beside_it():
    from schedsearch import plots
    from schedsearch.report import pareto_markdown

    summary = {"objectives": ["fid", "nfe"], "pareto_front": [
        {"trial": 7, "values": [0.61, 2], "params": {"solver": "unipc"}},
        {"trial": 3, "values": [0.18, 5], "params": {"solver": "dpmpp_2m"}}]}
    table = pareto_markdown(summary).splitlines()
    assert table[-2:] == ["| 7 | 0.610 | 2 | unipc |", "| 3 | 0.180 | 5 | dpmpp_2m |"]
    assert pareto_markdown({"rows": []}) == ""
    fig = plots.pareto([(2, 0.61), (3, 4.0), (5, 0.18)], [(2, 0.61), (5, 0.18)],
                       {"karras @5": (5, 0.26), "karras @20": (20, 0.19)})
    ax = fig.axes[0]
    # karras @20 lies past the trials: a dashed line at its FID, the x-axis stays at 2..5
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == 1 and dashed[0].get_ydata()[0] == 0.19
    assert ax.get_xlim()[1] < 6
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["trial", "Pareto front", "karras @5", "karras @20 (NFE 20)"]


def test_a_study_of_schedsearch_0_1_exports_the_same_preset(legacy, tmp_path):
    old = presets.read(LEGACY / "legacy-gmm.preset.json")
    summary = json.loads((LEGACY / "summary.json").read_text())
    preset = preset_from_study(f"sqlite:///{legacy / 'study.db'}", "legacy-gmm", "again")
    assert preset.sigmas.tolist() == old.sigmas.tolist() and preset.solver == old.solver
    assert preset.provenance["trial"] == summary["best_trial"] == old.provenance["trial"]
    assert preset.family == "gmm"     # a testbed's name is its family; nothing is guessed
    assert preset.provenance["scores"]["fid_heldout"] == summary["rows"][0]["fid_heldout"]


def test_a_study_of_schedsearch_0_1_resumes_keeps_its_trials_and_adds_the_new_ones(legacy):
    url = f"sqlite:///{legacy / 'study.db'}"
    before = {t.number: (t.params, t.values) for t in
              optuna.load_study(study_name="legacy-gmm", storage=url).get_trials()}
    assert len(before) == 4
    config = StudyConfig.from_dict(dict(model="gmm", budget=4, n_search=64, n_heldout=64,
                                        batch_size=64, trials=6, refine=0.0,
                                        baselines=["karras", "ays"]))
    summary = run_study(config, RunOptions(out=legacy, study_name="legacy-gmm", progress=False,
                                           artifacts=False, export_user_preset=False),
                        echo=lambda *_: None)
    trials = optuna.load_study(study_name="legacy-gmm", storage=url).get_trials()
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state.is_finished() for t in trials)   # new ones may be pruned
    for t in trials[:4]:
        assert (t.params, t.values) == before[t.number]
    # the old baselines (stored in 0.1.0's flat form) are compared, not scored again
    rows = {r["key"]: r for r in summary["rows"]}
    old_rows = {r["key"]: r for r in json.loads((LEGACY / "summary.json").read_text())["rows"]}
    assert set(rows) == {"best", "karras", "ays"}
    for key in ("karras", "ays"):
        assert rows[key]["fid"] == old_rows[key]["fid"]
        # held-out is scored again: the same number up to float rounding, which moves in the
        # 7th digit between torch releases
        assert rows[key]["fid_heldout"] == pytest.approx(old_rows[key]["fid_heldout"], rel=1e-5)


def test_a_rerun_with_more_heldout_sets_recomputes_the_intervals_too(tmp_path):
    """The held-out FIDs of a finished study re-scored on more seed sets came with the intervals
    stored for the old count: the table showed a 3-set FID beside a 1-set CI ("over 1 seed
    set(s)"). Every interval is now over the sets asked for, and a run back to one set gives back
    the one-set numbers."""
    cfg = dict(model="gmm", budget=4, n_search=64, n_heldout=64, batch_size=64, trials=2,
               refine=0.0, baselines=["karras", "ays"], validation_sets=1)
    opts = RunOptions(out=tmp_path, progress=False, artifacts=False, export_user_preset=False)
    runs = [run_study(StudyConfig.from_dict({**cfg, "heldout_sets": k}), opts,
                      echo=lambda *_: None) for k in (1, 2, 1)]
    vs = [{r["key"]: r["vs_best"] for r in s["rows"] if r.get("vs_best")} for s in runs]
    held = [{r["key"]: r["fid_heldout"] for r in s["rows"]} for s in runs]
    for k, v, h in zip((1, 2, 1), vs, held):
        assert set(v) == {"karras", "ays"}
        for key, ci in v.items():
            assert ci["sets"] == k and ci["lo"] <= ci["hi"]
            assert ci["delta"] == pytest.approx(h["best"] - h[key], abs=1e-9)
    assert vs[2] == vs[0] and held[2] == held[0]
    assert vs[1]["ays"]["delta"] != vs[0]["ays"]["delta"]
    # another number of resamples: the same difference, an interval drawn anew
    again = run_study(StudyConfig.from_dict({**cfg, "bootstrap": 300}), opts, echo=lambda *_: None)
    ays = next(r["vs_best"] for r in again["rows"] if r["key"] == "ays")
    assert ays["resamples"] == 300 and vs[0]["ays"]["resamples"] == 1000
    assert ays["delta"] == vs[0]["ays"]["delta"] and (ays["lo"], ays["hi"]) != (
        vs[0]["ays"]["lo"], vs[0]["ays"]["hi"])


def test_a_resumed_study_moves_the_star_and_its_description_counts_what_ran(tmp_path,
                                                                           monkeypatch):
    """With one trial the ★ is AYS; thirty trials later it is the best trial. The AYS run kept
    schedsearch.recommended=true beside the new ★ (two runs tagged), and the study run's
    description counted queued and re-queued slots as trials."""
    from mlflow.tracking import MlflowClient

    from schedsearch.cli import main

    monkeypatch.delenv("SCHEDSEARCH_DEBUG", raising=False)
    out = tmp_path / "run"
    flags = ["run", "--model", "gmm", "--budget", "4", "--n-search", "64", "--n-heldout", "32",
             "--no-user-preset", "--no-progress", "--out", str(out)]
    stars = []
    for trials in ("1", "30"):
        assert main([*flags, "--trials", trials]) == 0
        summary = json.loads((out / "summary.json").read_text())
        stars.append(summary["recommended"])
        client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
        exp = client.get_experiment_by_name("gmm-4nfe")
        tagged = client.search_runs([exp.experiment_id],
                                    "tags.`schedsearch.recommended` = 'true'")
        assert [r.info.run_name for r in tagged] == [
            next("★ " + r["name"] for r in summary["rows"] if r.get("recommended"))]
        study = client.search_runs([exp.experiment_id], "tags.`schedsearch.role` = 'study'")[0]
        assert f"searched over {summary['finished']} trials" in \
            study.data.tags["mlflow.note.content"]
        assert summary["finished"] == int(trials)
    assert stars == ["ays", "best"]   # this seed's study: the ★ moves, the case that went wrong
