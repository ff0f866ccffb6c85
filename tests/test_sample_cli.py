"""``schedsearch sample`` end to end: the real command on the gmm testbed and on a tiny SD
pipeline saved to disk; the files it writes and the provenance in samples.json."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from schedsearch import __version__, schedules
from schedsearch.cli import main
from schedsearch.freeu import FreeU, FreeUPlan
from schedsearch.models import load
from schedsearch.sampler import sample, to_uint8
from tiny import save_pipeline, tiny_sd_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return save_pipeline(tiny_sd_pipeline(), tmp_path_factory.mktemp("tiny-sd"))


def read(out):
    with open(os.path.join(out, "samples.json"), encoding="utf-8") as f:
        return json.load(f)


def test_gmm_writes_vectors_scatter_and_provenance(tmp_path):
    out = str(tmp_path / "gmm")
    assert main(["sample", "--model", "gmm", "--prompt", "0", "--prompt", "2", "--seeds", "0-2",
                 "--no-progress", "--out", out]) == 0
    assert sorted(os.listdir(out)) == ["samples.json", "samples.npy", "scatter.png"]
    rec = read(out)
    model = load("gmm", device="cpu")
    sigmas = schedules.karras(20, model.table.sigma_min, model.table.sigma_max)
    # defaults: DPM++2M, Karras 20 steps, the family's guidance
    assert rec["model"]["fingerprint"] == model.fingerprint()
    assert rec["schedule"]["spec"] == {"name": "karras", "steps": 20, "rho": 7.0}
    assert rec["schedule"]["sigmas"] == sigmas.tolist()
    assert rec["solver"] == "dpmpp_2m" and rec["guidance"] == 3.0 and rec["nfe"] == 20
    assert rec["freeu"] == FreeUPlan.off(20).to_json()
    assert rec["seeds"] == [0, 1, 2, 0, 1, 2]
    assert [im["prompt"] for im in rec["images"]] == ["0", "0", "0", "2", "2", "2"]
    assert rec["schedsearch_version"] == __version__ and rec["figure"] == "scatter.png"
    assert rec["timings"]["sample_s"] > 0
    ref = sample(model, sigmas, [0, 0, 0, 2, 2, 2], [0, 1, 2, 0, 1, 2], guidance=3.0)
    assert np.array_equal(np.load(os.path.join(out, "samples.npy")), ref.images.numpy())
    assert Image.open(os.path.join(out, "scatter.png")).size[0] >= 600


def test_gmm_unconditional_samples_are_sampled_and_plotted(tmp_path):
    """--prompt '' is the testbeds' unconditional prompt; the scatter plot read every prompt as
    a class label, so the command failed after sampling, with its images written."""
    out = str(tmp_path / "gmm")
    assert main(["sample", "--model", "gmm", "--prompt", "", "--prompt", "1", "--seeds", "0,1",
                 "--no-progress", "--out", out]) == 0
    rec = read(out)
    assert [im["prompt"] for im in rec["images"]] == ["", "", "1", "1"]
    model = load("gmm", device="cpu")
    sigmas = schedules.karras(20, model.table.sigma_min, model.table.sigma_max)
    ref = sample(model, sigmas, ["", "", 1, 1], [0, 1, 0, 1], guidance=3.0)
    assert np.array_equal(np.load(os.path.join(out, "samples.npy")), ref.images.numpy())
    assert Image.open(os.path.join(out, "scatter.png")).size[0] >= 600


def test_tiny_sd_through_python_m(sd_dir, tmp_path):
    """The real entry point in a fresh process: a paper preset, DPM++1S and FreeU from step 0."""
    out = str(tmp_path / "sd")
    cmd = [sys.executable, "-m", "schedsearch", "sample", "--model", sd_dir,
           "--prompt", "a red cat", "--seeds", "0,5", "--schedule", "sd15-5", "--solver",
           "DPM++1S", "--freeu", "1.1,1.1,0.9,0.2", "--guidance", "5.5", "--no-progress",
           "--out", out]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 images, 5 model calls each (dpmpp_1s" in proc.stdout
    files = sorted(os.listdir(out))
    assert files == ["0000_a-red-cat_seed0.png", "0001_a-red-cat_seed5.png", "grid.png",
                     "samples.json"]
    rec = read(out)
    model = load(sd_dir, device="cpu")
    sigmas = schedules.paper_preset("sd15-5")
    plan = FreeUPlan.from_start(5, 0, FreeU(1.1, 1.1, 0.9, 0.2))
    assert rec["model"]["fingerprint"] == model.fingerprint()
    assert rec["model"]["family"] == "sd15" and rec["model"]["height"] == 64
    assert rec["schedule"]["sigmas"] == sigmas.tolist() and rec["schedule"]["ends_at_zero"] is False
    assert rec["schedule"]["timesteps"][:2] == pytest.approx([999.0, 772.51], abs=0.01)
    assert rec["freeu"] == plan.to_json() and rec["nfe"] == 5 and rec["solver"] == "dpmpp_1s"
    assert rec["guidance"] == 5.5 and rec["prompts"] == {"source": "--prompt"}
    assert [im["file"] for im in rec["images"]] == files[:2]
    # the PNGs hold exactly what the library samples for those seeds
    ref = sample(model, sigmas, ["a red cat"] * 2, [0, 5], solver="dpmpp_1s", guidance=5.5,
                 freeu=plan)
    for i, name in enumerate(files[:2]):
        assert np.array_equal(np.asarray(Image.open(os.path.join(out, name))),
                              to_uint8(ref.images)[i])
    # 64 px images are upscaled ×2 in the grid: 2 columns, 1 px padding
    assert Image.open(os.path.join(out, "grid.png")).size == ((2 * 65 + 1) * 2, 66 * 2)


def test_prompt_file_uses_the_prompt_sets_own_seeds(sd_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n\na dog\nthe sea\n", encoding="utf-8")
    out = str(tmp_path / "p")
    assert main(["sample", "--model", sd_dir, "--prompts", str(prompts), "--n", "2",
                 "--schedule", "ays", "--steps", "4", "--no-progress", "--out", out]) == 0
    rec = read(out)
    assert [im["prompt"] for im in rec["images"]] == ["a red cat", "a dog"]
    assert rec["seeds"] == [0, 1]                      # seed·10⁶ + position, seed 0
    assert rec["prompts"]["source"] == "prompts.txt@seed0" and rec["prompts"]["n"] == 2
    assert rec["schedule"]["sigmas"] == schedules.ays(4, "sd15").tolist()
    # with --seeds: every prompt × every seed, a row per prompt
    out2 = str(tmp_path / "p2")
    assert main(["sample", "--model", sd_dir, "--prompts", str(prompts), "--seeds", "7,9",
                 "--schedule", "uniform", "--steps", "3", "--no-progress", "--out", out2]) == 0
    rec2 = read(out2)
    assert [(im["prompt"], im["seed"]) for im in rec2["images"]] == [
        ("a red cat", 7), ("a red cat", 9), ("a dog", 7), ("a dog", 9), ("the sea", 7),
        ("the sea", 9)]
    assert Image.open(os.path.join(out2, "grid.png")).size == ((2 * 65 + 1) * 2, (3 * 65 + 1) * 2)
    # the set's own seeds (0, 1, 2) did not run: the record says where the seeds came from
    assert rec2["prompts"]["seeds_from"] == "--seeds" and "seeds" not in rec2["prompts"]
    assert rec2["seeds"] == [7, 9] * 3


def test_a_csv_prompt_file_takes_caption_column(tmp_path, capsys):
    """sample's own error told to pass --caption-column, which sample did not have."""
    prompts = tmp_path / "p.csv"
    prompts.write_text("id,label\n0,3\n1,1\n", encoding="utf-8")
    out = str(tmp_path / "c")
    assert main(["sample", "--model", "gmm", "--prompts", str(prompts), "--no-progress",
                 "--out", out]) == 2
    assert "--caption-column" in capsys.readouterr().err
    assert main(["sample", "--model", "gmm", "--prompts", str(prompts), "--caption-column",
                 "label", "--no-progress", "--out", out]) == 0
    assert [im["prompt"] for im in read(out)["images"]] == ["3", "1"]   # labels, as in a text file


def test_a_folder_where_an_output_file_goes_is_refused_before_sampling(tmp_path, capsys):
    """It sampled, then failed to write samples.json (sample) or the grid (score: the FID was
    lost)."""
    out = tmp_path / "o"
    (out / "scatter.png").mkdir(parents=True)
    assert main(["sample", "--model", "gmm", "--seeds", "0", "--no-progress", "--out",
                 str(out)]) == 2
    assert f"{out / 'scatter.png'} is a folder where sample writes its scatter.png" in \
        capsys.readouterr().err
    assert main(["score", "--model", "digits", "--n", "8", "--grid", str(out / "scatter.png"),
                 "--no-progress"]) == 2
    assert "is a folder; give the image file to write" in capsys.readouterr().err
    assert os.listdir(out) == ["scatter.png"]


@pytest.mark.parametrize("argv, message", [
    (["--model", "gmm", "--seeds", "3-1"], "--seeds: the range '3-1' runs backwards"),
    (["--model", "gmm", "--seeds", "a"], "--seeds must be integers or ranges a-b"),
    (["--model", "gmm", "--seeds", "0-3,2"], "--seeds lists seed 2 twice"),
    (["--model", "gmm", "--prompt", "7"], "class label must be in 0..3, got 7"),
    (["--model", "gmm", "--height", "64"], "--height: for Stable Diffusion models only"),
    (["--model", "gmm", "--freeu", "1,2"], "--freeu takes four numbers b1,b2,s1,s2"),
    (["--model", "gmm", "--freeu", "1.1,1.1,0.9,0"], "FreeU s2 must be a finite number > 0"),
    (["--model", "gmm", "--solver", "rk4"], "solver must be one of"),
    (["--model", "gmm", "--schedule", "explicit"], "schedule 'explicit' needs --sigmas"),
    (["--model", "gmm", "--schedule", "nope"], "unknown schedule 'nope'"),
    (["--model", "gmm", "--n", "3"], "--n applies to --prompts"),
    (["--model", "gmm", "--batch-size", "0"], "--batch-size must be >= 1"),
    # it did nothing without --prompts (the images were --prompt-seed 0's) yet was recorded
    (["--model", "gmm", "--prompt-seed", "5"], "--prompt-seed applies to --prompts"),
    (["--model", "gmm", "--prompt", "1", "--prompt-seed", "5"], "--prompt-seed applies to"),
])
def test_errors_are_one_clear_line(argv, message, tmp_path, capsys):
    assert main(["sample", *argv, "--no-progress", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("schedsearch sample: error:")


def test_errors_on_a_text_model_and_an_empty_prompt_file(sd_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    cases = [
        ([], "is a text-to-image model: give --prompt TEXT or --prompts FILE"),
        (["--prompts", "classes:3"], "is a text-to-image model and classes:3 are a testbed's class labels"),
        (["--prompts", str(empty)], "holds no prompts; put one prompt per line"),
        (["--prompts", str(tmp_path / "none.txt")], "prompt file"),
    ]
    for extra, message in cases:
        assert main(["sample", "--model", sd_dir, *extra, "--no-progress", "--out",
                     str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err


def test_defaults_sample_the_ten_digit_classes(tmp_path):
    """With only --out: the built-in digits testbed, 10 classes × 4 seeds, DPM++2M Karras 20."""
    from schedsearch.models import digits

    if not (digits.WEIGHTS_DIR / digits.UNET_FILE).is_file():
        pytest.skip("the digits testbed's weights are not generated in this checkout yet")
    out = str(tmp_path / "d")
    assert main(["sample", "--no-progress", "--out", out]) == 0
    rec = read(out)
    assert rec["model"]["name"] == "digits" and rec["nfe"] == 20
    assert [im["prompt"] for im in rec["images"]] == [c for c in range(10) for _ in range(4)]
    assert len([f for f in os.listdir(out) if f.endswith(".png")]) == 41
    # 8×8 digits are upscaled ×16 in the grid so they can be read
    assert Image.open(os.path.join(out, "grid.png")).size == ((4 * 9 + 1) * 16, (10 * 9 + 1) * 16)


def test_a_preset_sets_schedule_solver_freeu_and_guidance(sd_dir, tmp_path):
    import schedsearch
    from schedsearch import presets

    out = tmp_path / "p"
    assert main(["sample", "--model", sd_dir, "--preset", "sd15-5", "--prompt", "a red cube",
                 "--seeds", "3,4", "--out", str(out), "--no-progress"]) == 0
    rec = read(out)
    preset = presets.load("sd15-5")
    assert rec["solver"] == "dpmpp_1s" and rec["nfe"] == 5 and rec["guidance"] == 5.5
    assert rec["freeu"] == preset.freeu.to_json() and rec["preset"]["name"] == "sd15-5"
    assert rec["schedule"]["sigmas"] == preset.sigmas.tolist()
    ref = schedsearch.generate(sd_dir, preset, ["a red cube"] * 2, [3, 4])
    for i, img in enumerate(ref):
        np.testing.assert_array_equal(np.asarray(Image.open(out / rec["images"][i]["file"])),
                                      np.asarray(img))
    assert main(["sample", "--preset", "sd15-5", "--schedule", "karras", "--out", str(tmp_path / "x")]) == 2


def test_every_command_help_is_wrapped_and_run_describes_both_stages(capsys):
    """--help of every command exits 0 with its description wrapped to a terminal's width (the
    raw formatter that keeps the examples' line breaks would print it as one long line), and
    ``run``'s says what the search does now: free-form lists, two stages, fresh seeds."""
    from schedsearch.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert len(commands) >= 10
    for name in commands:
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        description = text.split("\n\n")[1]
        assert max(map(len, description.splitlines())) <= 79, (name, description)
        if name == "run":
            flat = " ".join(description.split())
            for part in ("free-form σ lists", "CMA-ES", "fresh seeds", "paired 95% CI"):
                assert part in flat, part


def test_the_guidance_help_names_every_family_default_and_where_it_comes_first():
    """--guidance's help is written out (the CLI does not import the models for --help); it must
    say every family's default as models.DEFAULT_GUIDANCE has it, and name the preset (sample,
    score) or the config (run) that comes before it, and nothing for the distillers."""
    from schedsearch.cli import build_parser
    from schedsearch.models import DEFAULT_GUIDANCE

    commands = build_parser()._subparsers._group_actions[0].choices
    helps = {name: next(a.help for a in commands[name]._actions if "--guidance" in a.option_strings)
             for name in ("run", "sample", "score", "oss")}
    labels = {"digits": "digits and digits-flow", "digits-flow": "digits and digits-flow",
              "gmm": "gmm and gmm-flow", "gmm-flow": "gmm and gmm-flow", "sd15": "SD1.x/2.x",
              "sd2": "SD1.x/2.x", "sdxl": "SDXL", "sd3": "SD3", "flux": "FLUX's distilled guidance"}
    assert set(labels) == set(DEFAULT_GUIDANCE)
    for family, value in DEFAULT_GUIDANCE.items():
        for text in helps.values():
            assert f"{labels[family]} {value:g}" in text, (family, text)
    assert "the --config file's, else" in helps["run"]
    assert "the preset's, else" in helps["sample"] and "the preset's, else" in helps["score"]
    assert "(default: per model family" in helps["oss"]
