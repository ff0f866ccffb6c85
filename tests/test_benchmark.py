"""analysis/benchmark.py on a real Stable Diffusion checkpoint path: a tiny pipeline saved to disk,
a prompt file, reference statistics through the Inception extractor (a stand-in file in clean-fid's
format — the real weights cannot be downloaded here). Run twice: the second run reads the finished
study back from --work instead of searching again. And on the gmm-flow testbed (exact and cheap):
the flow baselines, the flow default Euler reference curve and the ratios to flow@28 / flow@50.
Also the other analysis and benchmark scripts: what their --help promises, what sampler_speed records,
and that the dashboard screenshot reports the ui's own error and saves only checked pages."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from schedsearch.config import FLOW_BASELINES

ROOT = Path(__file__).resolve().parents[1]


def _run(args, env):
    proc = subprocess.run([sys.executable, str(ROOT / "analysis" / "benchmark.py"), *args],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _check_study(summary):
    rows = {r["key"]: r for r in summary["rows"]}
    assert set(rows) == {"best", "karras", "karras20", "paper", "ays", "gits", "oss"}
    assert rows["karras20"]["nfe"] == 20 and rows["paper"]["nfe"] == 5   # the paper's smallest preset
    assert all(r["nfe"] == 3 for k, r in rows.items() if k not in ("karras20", "paper"))
    assert sum(bool(r.get("recommended")) for r in rows.values()) == 1
    assert all(len(r["fid_heldout_sets"]) == 2 for r in rows.values())
    assert summary["cost"]["image_model_calls"] >= 4 * 3
    assert summary["winner"]["trial"] == summary["best_trial"]


def test_benchmark_runs_on_a_stable_diffusion_checkpoint_and_rewrites_the_readme_block(tmp_path, offline_sd):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- results:begin -->\nstale\n<!-- results:end -->\n\nafter\n")
    out, work = tmp_path / "results", tmp_path / "runs"
    env = dict(os.environ, SCHEDSEARCH_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               SCHEDSEARCH_PRESETS=str(tmp_path / "presets"))
    args = ["--testbeds", "sd", "--budgets", "3", "--study-seeds", "2", "--heldout-sets", "2",
            "--model", offline_sd.model, "--prompts", str(offline_sd.prompts),
            "--ref-stats", str(offline_sd.ref), "--inception", str(offline_sd.inception),
            "--guidance", "5.5", "--trials", "3", "--n-search", "4", "--n-heldout", "4",
            "--batch-size", "4", "--teacher-steps", "8", "--distill-samples", "2",
            "--curve-nfe", "3", "6", "--work", str(work), "--out", str(out), "--readme", str(readme)]
    _run(args, env)

    res = json.loads((out / "benchmark.json").read_text())
    sd = res["testbeds"]["sd"]
    assert set(sd["studies"]["3"]) == {"0", "1"}            # one study per search seed
    assert {p.name for p in work.iterdir() if p.is_dir()} == {"sd-3nfe-seed0", "sd-3nfe-seed1"}
    for summary in sd["studies"]["3"].values():
        _check_study(summary)
    agg = sd["budgets"]["3"]
    found = [s["rows"][0]["fid_heldout"] for s in sd["studies"]["3"].values()]
    assert agg["found"]["min"] == min(found) and agg["found"]["max"] == max(found)
    # the best same-NFE baseline is picked by held-out FID among the baselines spending 3 NFE
    rows0 = {r["key"]: r for r in sd["studies"]["3"]["0"]["rows"]}
    best_key = min(("karras", "ays", "gits", "oss"), key=lambda k: rows0[k]["fid_heldout"])
    assert agg["best_same_nfe"]["keys"][0] == best_key
    assert abs(agg["found_over_best_same_nfe"]["per_seed"][0]
               - found[0] / rows0[best_key]["fid_heldout"]) < 1e-12
    ci = agg["ci_vs_best_same_nfe"]
    assert ci["seeds"] == 2 and ci["per_seed"][0]["delta"] == rows0[best_key]["vs_best"]["delta"]
    assert agg["found_worse_than_best_same_nfe"]["ever"] == \
        (max(found) > rows0[best_key]["fid_heldout"] * (1 + 1e-6))   # beyond float round-off
    assert abs(agg["found_over_karras20"]["mean"]
               - sum(found) / 2 / rows0["karras20"]["fid_heldout"]) < 1e-12
    # the mean ratio's Student-t 95% interval over the 2 seeds: mean ± t(0.975, 1)·|a − b|/2,
    # t(0.975, 1) = 12.7062 from the tables
    r = agg["found_over_best_same_nfe"]["per_seed"]
    half = 12.706205 * abs(r[0] - r[1]) / 2
    lo, hi = agg["found_over_best_same_nfe"]["ci95"]
    assert abs(lo - (sum(r) / 2 - half)) < 1e-6 and abs(hi - (sum(r) / 2 + half)) < 1e-6
    assert res["study_wall_seconds"] == sum(s["wall_seconds"] for s in sd["studies"]["3"].values())
    assert [len(w["sigmas"]) for w in agg["winners"]] == [4, 4]   # 3 steps, one call each
    assert [c["nfe"] for c in sd["curve"]] == [3, 6]
    # Karras at 3 NFE is scored twice (as a baseline in the study and on the curve): same prompts,
    # seeds and sampler, so the same number
    assert abs(sd["curve"][0]["fid"] - rows0["karras"]["fid"]) < 1e-6 * max(1.0, rows0["karras"]["fid"])
    cost = sd["distill_cost"]
    assert cost["teacher"]["image_model_calls"] == 2 * 8           # N per sample
    assert cost["gits"]["image_model_calls"] == 0                   # GITS reuses the teacher
    assert cost["oss"]["image_model_calls"] > 0
    assert (out / "fid_vs_nfe_sd.png").stat().st_size > 1000
    assert (out / "winners_sigmas_sd.png").stat().st_size > 1000
    text = readme.read_text()
    assert "stale" not in text and text.endswith("<!-- results:end -->\n\nafter\n")
    for heading in ("held-out FID by budget and method", "found schedule vs the best same-NFE "
                    "baseline", "the found schedules", "search cost"):
        assert f"#### sd: {heading}" in text
    assert "(results/winners_sigmas_sd.png)" in text and "★" in text   # figures relative to the README
    assert f"| {lo:.3f}–{hi:.3f} |" in text     # the mean's interval, in the ratio table
    # benchmark.md links the figures beside it
    assert "](./winners_sigmas_sd.png)" in (out / "benchmark.md").read_text()

    # again: the finished studies are read back, not searched again
    stdout = _run(args, env)
    assert stdout.count("finished earlier") == 2
    again = json.loads((out / "benchmark.json").read_text())["testbeds"]["sd"]
    assert again["studies"]["3"]["1"]["rows"] == sd["studies"]["3"]["1"]["rows"]


def test_benchmark_on_a_flow_testbed_runs_the_flow_baselines_and_the_flow_default_curve(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- results:begin -->\nstale\n<!-- results:end -->\n")
    out, work = tmp_path / "results", tmp_path / "runs"
    env = dict(os.environ, SCHEDSEARCH_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               SCHEDSEARCH_PRESETS=str(tmp_path / "presets"))
    _run(["--testbeds", "gmm-flow", "--budgets", "3", "--study-seeds", "1", "--heldout-sets", "2",
          "--trials", "3", "--n-search", "64", "--n-heldout", "64", "--batch-size", "64",
          "--teacher-steps", "8", "--distill-samples", "2", "--curve-nfe", "3", "6",
          "--threads", "1", "--work", str(work), "--out", str(out), "--readme", str(readme)], env)

    tb = json.loads((out / "benchmark.json").read_text())["testbeds"]["gmm-flow"]
    summary = tb["studies"]["3"]["0"]
    rows = {r["key"]: r for r in summary["rows"]}
    assert list(rows) == ["best", *FLOW_BASELINES]
    assert rows["flow28"]["nfe"] == 28 and rows["flow50"]["nfe"] == 50
    assert all(r["nfe"] == 3 for k, r in rows.items() if k not in ("flow28", "flow50"))
    assert all(len(r["fid_heldout_sets"]) == 2 for r in rows.values())
    # the curve runs the flow baseline's sampler (the default schedule with Euler): at 3 NFE it
    # scores the same images with the same σ list, so the same number
    assert tb["curve_reference"] == {"key": "flow", "label": "flow default Euler"}
    assert [c["nfe"] for c in tb["curve"]] == [3, 6]
    assert abs(tb["curve"][0]["fid"] - rows["flow"]["fid"]) <= 1e-6 * max(1.0, rows["flow"]["fid"])
    agg = tb["budgets"]["3"]
    found = rows["best"]["fid_heldout"]
    for ref in ("flow28", "flow50"):   # the long-step references, not DDPM's Karras@20
        assert abs(agg[f"found_over_{ref}"]["mean"] - found / rows[ref]["fid_heldout"]) < 1e-12
    assert "found_over_karras20" not in agg
    # same-NFE: among the baselines spending the budget, never the 28/50-step references
    best_key = min(("flow", "optimalsteps", "gits", "oss"), key=lambda k: rows[k]["fid_heldout"])
    assert agg["best_same_nfe"]["keys"] == [best_key]
    assert tb["distill_cost"]["teacher"]["image_model_calls"] == 2 * 8
    assert (out / "fid_vs_nfe_gmm-flow.png").stat().st_size > 1000
    assert (out / "winners_sigmas_gmm-flow.png").stat().st_size > 1000
    text = readme.read_text()
    assert "stale" not in text and "Karras" not in text
    for heading in ("held-out FID by budget and method", "found schedule vs the best same-NFE "
                    "baseline", "the found schedules", "search cost"):
        assert f"#### gmm-flow: {heading}" in text
    assert ("| budget | found | flow default Euler | OptimalSteps | GITS | OSS | "
            "flow default Euler @28 | flow default Euler @50 |") in text
    assert "| found / flow@28 | found / flow@50 |" in text


def test_the_search_text_says_which_studies_ran_an_earlier_local_rule():
    """A benchmark whose finished studies were made with an earlier margin (their layout the
    same under the new rule, so they were not re-run) says so instead of claiming one rule."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
    from benchmark_report import _search_text

    def budget(b, margin):
        return {"budget": b, "search": dict(trials=max(48, 16 * b), refine=0.6, refine_starts=2,
                                            refine_margin=margin, warm_start=2, sampler="tpe",
                                            pruner="median")}

    mixed = _search_text([budget(3, 0.05), budget(4, 0.1), budget(5, 0.05), budget(6, 0.1)])
    assert ("48, 64, 80, 96 trials at 3, 4, 5, 6 NFE, 19 in the global stage" in mixed)
    assert ("around the global stage's best trial and the best free-form trial with another "
            "solver if its search FID is within 5% of the best's; the 4 and 6 NFE studies ran the "
            "earlier rule: a trial of any family within 10%)") in mixed
    same = _search_text([budget(3, 0.05), budget(5, 0.05)])
    assert "within 5% of the best's)" in same and "earlier rule" not in same
    old = _search_text([budget(4, 0.1), budget(6, 0.1)])
    assert "the best trial with another solver if its search FID is within 10% of the best's)" in old


# each script's result-writing flag, and the default its --help must name: the committed results
WRITES = {
    "analysis/baselines_vs_teacher.py": ("--out", "analysis/results"),
    "analysis/digits_quality.py": ("--out", "analysis/results"),
    "analysis/unseen_seeds.py": ("--out", "analysis/results"),
    "benchmarks/scoring_overhead.py": ("--out", "benchmarks/results/scoring_overhead-<model>.json"),
    "benchmarks/study_overhead.py": ("--json", "benchmarks/results/study_overhead.json"),
    "benchmarks/sampler_speed.py": ("--out", "benchmarks/results/sampler_speed.json"),
}


def _help(*cmd):
    proc = subprocess.run([sys.executable, *cmd, "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return " ".join(proc.stdout.split())   # argparse wraps lines: compare with single spaces


@pytest.mark.parametrize("script", sorted(WRITES))
def test_each_scripts_help_says_where_it_writes_by_default(script):
    flag, default = WRITES[script]
    text = _help(str(ROOT / script))
    # the flag's own help (from the flag up to the next one) names the default and warns of it
    options = text.split("options:", 1)[1]             # past the usage line, which names it too
    # the flag with its upper-case metavar: not a mention of it in another flag's help
    own = re.search(rf" {flag} [A-Z_]+ (.*?)(?: --[a-z]|$)", options).group(1)
    assert f"default: {default}" in own and "committed results" in own, own


def test_the_training_scripts_say_what_device_covers():
    flow = _help("-m", "schedsearch.models.digits_flow_train")
    assert "--device DEVICE training device (default cpu)" in flow
    assert "classifier" not in flow                      # digits_flow_train trains none
    ddpm = _help("-m", "schedsearch.models.digits_train")
    assert "the classifier always trains on the CPU" in ddpm


def _load(relpath):
    spec = importlib.util.spec_from_file_location(Path(relpath).stem, ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sampler_speed_records_its_repeats_and_device(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    speed = _load("benchmarks/sampler_speed.py")
    # a tiny UNet in place of SD1.5's: what is checked is the JSON, not the speed
    monkeypatch.setattr(speed, "SD15_UNET", dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=32))
    out = tmp_path / "speed.json"
    monkeypatch.setattr(sys, "argv", ["sampler_speed.py", "--device", "cpu", "--size", "64",
                                      "--batch", "1", "--steps", "2", "--repeats", "3",
                                      "--out", str(out)])
    assert speed.main() == 0
    res = json.loads(out.read_text())
    assert res["repeats"] == 3 and res["device"] == "cpu" and res["dtype"] == "torch.float32"
    assert [r["steps"] for r in res["results"]] == [2]
    # the default is the repo's file wherever the script is started from
    assert Path(speed.ROOT) == ROOT


def test_dashboard_screenshot_shows_why_the_ui_gave_no_url(tmp_path):
    shot = _load("analysis/dashboard_screenshot.py")
    with pytest.raises(SystemExit) as err:
        shot.start_ui(str(tmp_path / "no-run"), 5099, timeout=120)
    message = str(err.value)
    assert "printed no URL (it exited with status 2)" in message
    assert f"no mlflow.db in {tmp_path / 'no-run'}" in message   # the ui's own words


@pytest.mark.parametrize("dom, saved", [("<td>★ best (trial 3)</td><td>trial 4</td>", True),
                                        ("<div>GenAI apps</div>", False)])
def test_dashboard_screenshot_checks_the_page_before_saving_it(monkeypatch, tmp_path, dom, saved):
    shot = _load("analysis/dashboard_screenshot.py")
    calls = []
    ui = subprocess.Popen(["sleep", "60"], start_new_session=True)   # stands in for the ui
    url = "http://127.0.0.1:1/#/experiments/1?workflowType=machine_learning"
    monkeypatch.setattr(shot, "start_ui", lambda out, port: (ui, url))
    monkeypatch.setattr(shot, "page_dom", lambda u: calls.append("dom") or dom)
    monkeypatch.setattr(shot, "screenshot", lambda u, png, size="": calls.append(png))
    png = str(tmp_path / "dash.png")
    monkeypatch.setattr(sys, "argv", ["dashboard_screenshot.py", "--out", str(tmp_path),
                                      "--png", png])
    assert shot.main() == (0 if saved else 1)
    assert calls == (["dom", png] if saved else ["dom"])
    assert ui.wait(timeout=10) != 0                      # the ui's process group was ended
