"""analysis/benchmark.py on a real Stable Diffusion checkpoint path: a tiny pipeline saved to disk,
a prompt file, reference statistics through the Inception extractor (a stand-in file in clean-fid's
format — the real weights cannot be downloaded here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_runs_on_a_stable_diffusion_checkpoint_and_rewrites_the_readme_block(tmp_path, offline_sd):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- results:begin -->\nstale\n<!-- results:end -->\n\nafter\n")
    out = tmp_path / "results"
    env = dict(os.environ, SCHEDSEARCH_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               SCHEDSEARCH_PRESETS=str(tmp_path / "presets"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "analysis" / "benchmark.py"), "--testbeds", "sd", "--budgets", "3",
         "--model", offline_sd.model, "--prompts", str(offline_sd.prompts),
         "--ref-stats", str(offline_sd.ref), "--inception", str(offline_sd.inception),
         "--guidance", "5.5", "--trials", "3", "--n-search", "4", "--n-heldout", "4", "--batch-size", "4", "--teacher-steps", "8", "--distill-samples", "2",
         "--curve-nfe", "3", "6", "--out", str(out), "--readme", str(readme)],
        capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    res = json.loads((out / "benchmark.json").read_text())
    sd = res["testbeds"]["sd"]
    rows = {r["key"]: r for r in sd["budgets"]["3"]["rows"]}
    assert set(rows) == {"best", "karras", "karras20", "paper", "ays", "gits", "oss"}
    assert rows["karras20"]["nfe"] == 20 and rows["paper"]["nfe"] == 5   # the paper's smallest preset
    assert all(r["nfe"] == 3 for k, r in rows.items() if k not in ("karras20", "paper"))
    assert sum(bool(r.get("recommended")) for r in rows.values()) == 1
    assert [c["nfe"] for c in sd["curve"]] == [3, 6]
    # Karras at 3 NFE is scored twice (as a baseline in the study and on the curve): same prompts,
    # seeds and sampler, so the same number
    assert abs(sd["curve"][0]["fid"] - rows["karras"]["fid"]) < 1e-6 * max(1.0, rows["karras"]["fid"])
    cost = sd["distill_cost"]
    assert cost["teacher"]["image_model_calls"] == 2 * 8           # N per sample
    assert cost["gits"]["image_model_calls"] == 0                   # GITS reuses the teacher
    assert cost["oss"]["image_model_calls"] > 0
    assert sd["budgets"]["3"]["study_cost"]["image_model_calls"] >= 4 * 3
    assert (out / "fid_vs_nfe_sd.png").stat().st_size > 1000
    text = readme.read_text()
    assert "stale" not in text and text.endswith("<!-- results:end -->\n\nafter\n")
    assert "#### sd: FID proxy by method" in text and "★ " in text
