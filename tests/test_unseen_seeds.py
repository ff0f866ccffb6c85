"""analysis/unseen_seeds.py on a real (tiny) finished gmm study: the winner it scores is the trial
the study picked, its FIDs are what scoring that preset on the other prompt seeds gives, and the
ratios divide the right numbers."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from schedsearch import models, prompts
from schedsearch.config import StudyConfig
from schedsearch.metrics.score import Scorer, scoring_setup
from schedsearch.study import RunOptions, run_study

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("unseen_seeds", ROOT / "analysis" / "unseen_seeds.py")
unseen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(unseen)


def test_ratios_divide_the_mean_winner_by_the_best_same_nfe_baseline_and_the_references():
    r = unseen.ratios(4, [6.0, 7.0], {"karras": (4, 10.0), "ays": (4, 8.0), "karras20": (20, 7.5),
                                      "paper": (5, 9.0)})
    assert r["best_same_nfe"] == "ays" and r["found"] == 6.5
    assert r["found_over_best_same_nfe"] == pytest.approx(6.5 / 8.0)
    assert r["found_over_karras20"] == pytest.approx(6.5 / 7.5)
    # the paper's nearest preset spends another NFE but is no long-step reference
    assert not {"found_over_karras", "found_over_ays", "found_over_paper"} & set(r)


def test_unseen_seeds_scores_the_studys_winner_and_baselines_on_other_prompt_seeds(tmp_path):
    work = tmp_path / "runs"
    # a searched guidance: the winner runs at its own (not gmm's 3), the baselines at 3
    cfg = StudyConfig.from_dict(dict(model="gmm", budget=3, n_search=64, n_heldout=64,
                                     batch_size=64, trials=6, refine=0.5, validation_sets=2,
                                     baselines=["karras", "ays", "karras20"],
                                     space={"guidance": [2.0, 2.5]}))
    summary = run_study(cfg, RunOptions(out=work / "gmm-3nfe-seed0", progress=False,
                                        export_user_preset=False), echo=lambda *_: None)
    baselines, winner = unseen.study_presets(work / "gmm-3nfe-seed0")
    assert set(baselines) == {"karras", "ays", "karras20"}
    assert baselines["karras20"][0] == 20 and baselines["ays"][0] == 3
    # the winner is the trial the study picked: on the search subset it scores the study's value
    rows = {r["key"]: r for r in summary["rows"]}
    model = models.load("gmm")
    extractor, ref = scoring_setup(model)

    def score(preset, seed):
        pset = prompts.load(models.default_prompts(model), 64, seed)
        return Scorer(model, extractor, ref, pset, guidance=preset.guidance,
                      batch_size=64, checkpoints=[], kid_subsets=0).score(
            preset.sigmas, solver=preset.solver, freeu=preset.freeu).fid

    assert 2.0 <= winner.guidance <= 2.5 and baselines["ays"][1].guidance == 3.0
    assert score(winner, 0) == pytest.approx(rows["best"]["fid"], rel=1e-6)

    out = tmp_path / "results"
    args = ["--work", str(work), "--testbed", "gmm", "--budgets", "3", "--prompt-seeds", "5", "6",
            "--n", "64", "--batch-size", "64", "--out", str(out)]
    # the benchmark's 3 studies are asked for by default: the two missing ones are named
    with pytest.raises(SystemExit, match="gmm-3nfe-seed1, gmm-3nfe-seed2 in .*--study-seeds 3"):
        unseen.main(args)
    assert unseen.main([*args, "--study-seeds", "1"]) == 0
    res = json.loads((out / "unseen_seeds_gmm.json").read_text())["budgets"]["3"]
    want = np.mean([score(winner, 5), score(winner, 6)])
    assert res["winners"] == [pytest.approx(want, rel=1e-6)]
    ays = np.mean([score(baselines["ays"][1], s) for s in (5, 6)])
    karras = np.mean([score(baselines["karras"][1], s) for s in (5, 6)])
    assert res["baselines"]["ays"]["fid"] == pytest.approx(ays, rel=1e-6)
    best = "ays" if ays < karras else "karras"
    assert res["best_same_nfe"] == best
    assert res["found_over_best_same_nfe"] == pytest.approx(want / min(ays, karras), rel=1e-6)
    assert "found_over_karras20" in res


def test_unseen_seeds_without_finished_studies_says_what_to_run(tmp_path):
    with pytest.raises(SystemExit, match="run analysis/benchmark.py first"):
        unseen.main(["--work", str(tmp_path), "--testbed", "gmm", "--budgets", "3",
                     "--out", str(tmp_path)])
