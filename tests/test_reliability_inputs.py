"""Bad input is refused up front as one line that says what to do: damaged reference statistics,
a busy port for the MLflow UI, prompt sources that are not prompt files, configs and presets that
are not UTF-8 (or not valid YAML), and an output folder the file system cannot hold. Everything
runs for real: safetensors files on disk, bound sockets, and the CLI in a subprocess."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from schedsearch.metrics.refstats import FORMAT, RefStats, default_refstats
from schedsearch.study import RunOptions


def _cli(*args, env=None, timeout=120):
    """Run ``schedsearch ARGS`` in a subprocess; on a hang send SIGTERM (the ui command takes its
    server's process group down with it) rather than leave a server behind."""
    full_env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}
    full_env.pop("SCHEDSEARCH_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-m", "schedsearch", *args], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"schedsearch {args[0]} still running after {timeout} s:\n{out}\n{err}")
    return proc.returncode, out, err


def _one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"schedsearch {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


# -- reference statistics -------------------------------------------------------------------------
def _write_refstats(path, mu, sigma, features=None, **meta):
    from safetensors.numpy import save_file

    n = features.shape[0] if features is not None else 100
    info = {"format": FORMAT, "extractor": "identity", "resize": "none", "n": str(n),
            "dim": str(mu.shape[0]), "source": "test", "created": "2024-01-01T00:00:00+00:00",
            "schedsearch_version": "0", **meta}
    tensors = {"mu": mu, "sigma": sigma}
    if features is not None:
        tensors["features"] = features
    save_file(tensors, str(path), metadata=info)
    return str(path)


def _good_moments(dim=16, n=100, seed=0):
    f = np.random.default_rng(seed).normal(size=(n, dim))
    return f.mean(0), np.cov(f, rowvar=False), f.astype(np.float32)


def test_refstats_with_nan_are_refused_naming_the_file(tmp_path):
    mu, sigma, _ = _good_moments()
    mu[3] = np.nan
    path = _write_refstats(tmp_path / "nan-mu.safetensors", mu, sigma)
    with pytest.raises(ValueError, match="nan-mu.safetensors.*schedsearch refstats --images"):
        RefStats.load(path)
    mu, sigma, _ = _good_moments()
    sigma[2, 5] = sigma[5, 2] = np.inf
    with pytest.raises(ValueError, match="sigma.*not finite"):
        RefStats.load(_write_refstats(tmp_path / "inf-sigma.safetensors", mu, sigma))


def test_refstats_with_an_asymmetric_sigma_or_bad_features_are_refused(tmp_path):
    mu, sigma, feats = _good_moments()
    skew = sigma.copy()
    skew[0, 1] += 0.1 * np.abs(sigma).max()
    with pytest.raises(ValueError, match="asym.safetensors.*not symmetric"):
        RefStats.load(_write_refstats(tmp_path / "asym.safetensors", mu, skew))
    # rounding-level asymmetry is what np.cov itself can produce: accepted
    tiny = sigma.copy()
    tiny[0, 1] *= 1 + 1e-13
    assert RefStats.load(_write_refstats(tmp_path / "ok.safetensors", mu, tiny)).dim == 16
    feats[7, 2] = np.nan
    with pytest.raises(ValueError, match="features.*not finite"):
        RefStats.load(_write_refstats(tmp_path / "nan-f.safetensors", mu, sigma, feats))
    with pytest.raises(ValueError, match="bad-n.safetensors.*'n'"):
        RefStats.load(_write_refstats(tmp_path / "bad-n.safetensors", mu, sigma, n="many"))


def test_a_testbed_file_names_the_testbed_rebuild(tmp_path):
    mu, sigma, _ = _good_moments()
    sigma[:] = np.nan
    path = _write_refstats(tmp_path / "t.safetensors", mu, sigma, model="gmm-d16-k12",
                           model_fingerprint="gmm-d16-k12-0123")
    with pytest.raises(ValueError, match="schedsearch refstats --testbed gmm --rebuild"):
        RefStats.load(path)


def test_score_with_nan_reference_statistics_exits_2_with_one_line(tmp_path):
    mu, sigma, _ = _good_moments()
    sigma[0, 0] = np.nan
    bad = _write_refstats(tmp_path / "bad.safetensors", mu, sigma)
    start = time.monotonic()
    code, out, err = _cli("score", "--model", "gmm", "--device", "cpu", "--n", "16",
                          "--checkpoints", "", "--kid-subsets", "0", "--ref-stats", bad)
    assert code == 2, (out, err)
    line = _one_error_line(err, "score")
    assert bad in line and "schedsearch refstats" in line
    assert out == "" and time.monotonic() - start < 60


def test_a_damaged_cached_testbed_entry_is_rebuilt(tmp_path):
    from safetensors.numpy import save_file

    from schedsearch.models import load

    model = load("gmm", device="cpu")
    cache = str(tmp_path / "cache")
    ref = default_refstats(model, n=200, cache=cache)
    # the same file with NaN moments: right provenance, wrong numbers
    mu = ref.mu.copy()
    mu[0] = np.nan
    save_file({"mu": mu, "sigma": ref.sigma, "features": ref.features.astype(np.float32)},
              ref.path, metadata=ref.meta)
    again = default_refstats(model, n=200, cache=cache)
    assert again.path == ref.path
    assert np.isfinite(again.mu).all() and np.array_equal(again.mu, ref.mu)
    assert np.isfinite(RefStats.load(ref.path).mu).all()


# -- schedsearch ui -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    out = tmp_path_factory.mktemp("run")
    MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}").create_experiment("x")
    return out


def test_ui_on_a_busy_port_exits_2_without_starting_a_server(run_folder):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.monotonic()
        code, out, err = _cli("ui", "--out", str(run_folder), "--port", str(port), timeout=90)
        elapsed = time.monotonic() - start
    assert code == 2, (out, err)
    line = _one_error_line(err, "ui")
    assert f"port {port}" in line and "--port" in line
    assert "http://" not in out
    assert elapsed < 30


def test_ui_reports_a_server_that_dies_before_serving(capsys):
    from schedsearch.cli import UserError, ui

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dying = [sys.executable, "-c", "import sys; sys.exit(3)"]
    with pytest.raises(UserError, match="exited with status 3 before it served"):
        ui.serve(dying, dict(os.environ), "127.0.0.1", port)
    assert "http://" not in capsys.readouterr().out


def test_ui_refuses_a_port_out_of_range(run_folder):
    code, out, err = _cli("ui", "--out", str(run_folder), "--port", "70000", timeout=60)
    assert code == 2, (out, err)
    assert "70000" in _one_error_line(err, "ui")


# -- prompt files ---------------------------------------------------------------------------------
def test_score_with_a_prompt_folder_exits_2_with_one_line(tmp_path):
    folder = tmp_path / "captions"
    folder.mkdir()
    code, out, err = _cli("score", "--model", "gmm", "--device", "cpu", "--n", "16",
                          "--prompts", str(folder),
                          env={"SCHEDSEARCH_CACHE": str(tmp_path / "cache")})
    assert code == 2, (out, err)
    line = _one_error_line(err, "score")
    assert "is a folder" in line and "prompt file" in line and "does not exist" not in line


@pytest.mark.parametrize("flag, value, message", [("--refine-margin", "-0.5", "refine_margin"),
                                                  ("--refine-starts", "0", "refine_starts")])
def test_run_with_a_bad_local_stage_flag_exits_2_with_one_line(tmp_path, flag, value, message):
    code, out, err = _cli("run", "--model", "gmm", "--out", str(tmp_path / "run"), flag, value)
    assert code == 2, (out, err)
    line = _one_error_line(err, "run")
    assert message in line and value in line
    assert not (tmp_path / "run").exists()   # refused before anything was made


@pytest.mark.parametrize("flag, value", [("--heartbeat", "0"), ("--heartbeat", "-5"),
                                         ("--grace", "inf"), ("--timeout", "nan"),
                                         ("--timeout", "-1")])
def test_worker_timings_that_cannot_work_are_refused(tmp_path, flag, value):
    # before: --heartbeat 0 spun its thread against the database, --timeout nan never stopped and
    # --timeout -1 ran a study that took no trial
    with pytest.raises(ValueError, match=f"^{flag} must be a number of seconds > 0, got "):
        RunOptions(out=tmp_path, **{flag[2:]: float(value)})


def test_a_grace_within_the_heartbeat_is_one_line(tmp_path):
    code, out, err = _cli("run", "--model", "gmm", "--out", str(tmp_path / "run"),
                          "--heartbeat", "10", "--grace", "5")
    assert code == 2, (out, err)
    line = _one_error_line(err, "run")
    assert "--grace (5 s) must exceed --heartbeat (10 s)" in line
    assert not (tmp_path / "run").exists()


# -- files that are not text, or not the text they should be ---------------------------------------
# A pickle (or any binary) handed over as a config or preset is refused by its first bytes, never
# unpickled; a YAML mistake is one line with PyYAML's 1-based position, not its several-line dump.
PICKLE = b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01."


@pytest.mark.parametrize("command, flag, name, content, message", [
    ("run", "--config", "study.yaml", PICKLE,
     "study.yaml: not UTF-8 text (byte 0x80 on line 1); a study config is a YAML text file"),
    ("run", "--config", "study.yaml", b"budget: 5\n  trials: 3\n",
     "study.yaml: not valid YAML (mapping values are not allowed here at line 2, column 9)"),
    ("run", "--config", "study.yaml", b"budget: [\n",
     "study.yaml: not valid YAML (expected the node content, but found '<stream end>' at line 2, "
     "column 1)"),
    ("score", "--preset", "winner.json", b'{"name": "x"}\n\xff',
     "winner.json: not UTF-8 text (byte 0xff on line 2); a preset is a JSON text file"),
])
def test_a_config_or_preset_that_is_not_its_text_is_one_line(tmp_path, command, flag, name,
                                                             content, message):
    path = tmp_path / name
    path.write_bytes(content)
    out_flag = ["--out", str(tmp_path / "out")] if command == "run" else []
    code, out, err = _cli(command, flag, str(path), *out_flag,
                          env={"SCHEDSEARCH_CACHE": str(tmp_path / "cache")})
    assert code == 2, (out, err)
    assert _one_error_line(err, command) == f"schedsearch {command}: error: {path.parent}/{message}"
    assert path.read_bytes() == content and not (tmp_path / "out").exists()


def test_an_output_folder_the_file_system_cannot_hold_is_one_line(tmp_path):
    """/proc takes no new files: creating a folder there fails with ENOENT, not EACCES."""
    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc here")
    out = "/proc/schedsearch-out"
    code, _, err = _cli("run", "--model", "gmm", "--out", out,
                        env={"SCHEDSEARCH_CACHE": str(tmp_path / "cache")})
    assert code == 2, err
    assert _one_error_line(err, "run") == (f"schedsearch run: error: cannot write '{out}' (No such "
                                           f"file or directory); choose another --out")


# -- flags that would be ignored, and a reader that goes away ---------------------------------------
def test_a_sigma_list_or_fractions_name_their_schedule_and_clash_with_any_other(tmp_path, capsys):
    """--sigmas alone scores that σ list (it used to be ignored for the default 8-step Karras),
    --fractions alone that knots list; given to another schedule or beside --preset, either is
    one line rather than silently dropped."""
    import json

    from schedsearch.cli import main

    def score(*flags):
        assert main(["score", "--model", "gmm", "--device", "cpu", "--n", "64", *flags]) == 0
        return json.loads(capsys.readouterr().out)

    implied = score("--sigmas", "14.6,3,0.5,0")
    named = score("--schedule", "explicit", "--sigmas", "14.6,3,0.5,0")
    assert implied["nfe"] == 3 and implied["fid"] == named["fid"]
    assert implied["fid"] != score("--schedule", "karras", "--steps", "8")["fid"]
    knots = score("--fractions", "0.2,0.3,0.1")
    assert knots["nfe"] == 4 and knots["fid"] == score("--schedule", "knots",
                                                        "--fractions", "0.2,0.3,0.1")["fid"]
    for args, flag in ((("score", "--schedule", "karras", "--steps", "4", "--sigmas", "3,1,0"),
                        "--sigmas"),
                       (("schedule", "ays", "--steps", "5", "--fractions", "0.2"), "--fractions"),
                       (("score", "--preset", "sd15-5", "--sigmas", "3,1,0"), "--sigmas")):
        code, out, err = _cli(*args, "--n", "16") if args[0] == "score" else _cli(*args)
        assert code == 2, (out, err)
        assert flag in _one_error_line(err, args[0])


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """``schedsearch schedule karras --steps 10000 | head -1``: no BrokenPipeError traceback, the
    exit status a tool killed by SIGPIPE has (141)."""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "schedsearch", "schedule", "karras", "--steps",
                             "10000"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().split() == ["step", "sigma", "timestep"]
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141, err
    assert err == ""


def test_freeu_start_or_variant_without_freeu_is_one_line_not_ignored(capsys):
    """--t-aug or --freeu-variant without --freeu used to be dropped silently; beside --preset
    too. With --freeu they shape the plan (FreeU on from step t_aug, the variant named)."""
    import json

    from schedsearch.cli import main

    for flags, named in ((("--t-aug", "2"), "--t-aug"),
                         (("--freeu-variant", "original"), "--freeu-variant"),
                         (("--preset", "sd15-5", "--t-aug", "0"), "--t-aug")):
        assert main(["score", "--n", "16", *flags]) == 2
        line = _one_error_line(capsys.readouterr().err, "score")
        assert named in line and ("--freeu B1,B2,S1,S2" in line or "--preset" in line)
    assert main(["score", "--n", "16", "--freeu", "sd15", "--t-aug", "2",
                 "--freeu-variant", "original"]) == 0
    plan = json.loads(capsys.readouterr().out)["provenance"]["freeu"]
    assert plan["variant"] == "original"
    assert [s is not None for s in plan["steps"]] == [False, False, True, True, True, True,
                                                      True, True]


@pytest.mark.parametrize("images, message", [
    ("missing", "image folder '.*missing' does not exist"),
    ("a-file.txt", "'.*a-file.txt' is a file, not a folder of images"),
    ("empty", "no images in '.*empty'"),
])
def test_refstats_names_a_bad_image_folder_before_asking_for_weights(tmp_path, images, message):
    # a mistyped --images must not first send the user off to download 92 MB of Inception weights
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file.txt").write_text("not images\n")
    code, _, err = _cli("refstats", "--images", str(tmp_path / images),
                        "--out", str(tmp_path / "ref.safetensors"),
                        env={"SCHEDSEARCH_INCEPTION": str(tmp_path / "no-inception.pt")})
    line = _one_error_line(err, "refstats")
    assert code == 2 and re.search(message, line) and "Inception" not in line, err
    assert not (tmp_path / "ref.safetensors").exists()


def _png(path, size, seed=0):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.mark.parametrize("extractor", ["digits", "identity"])
@pytest.mark.parametrize("batch", ["4", "5"])
def test_refstats_names_an_unreadable_image_or_one_of_another_size(tmp_path, capsys, extractor,
                                                                    batch):
    """A damaged file was a PIL traceback; a folder that mixes sizes was 'this folder mixes
    sizes' within a batch and, across batches, a numpy shape error (identity) or the digits
    classifier's complaint about its input. Now one line names the files."""
    from schedsearch.cli import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(10):
        _png(folder / f"a{i}.png", 8, seed=i)
    (folder / "a5.png").write_bytes(b"not a png")   # sorted mid-folder: after a batch is done
    out = tmp_path / "ref.safetensors"
    argv = ["refstats", "--images", str(folder), "--out", str(out), "--extractor", extractor,
            "--batch-size", batch]
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err, "refstats")
    assert re.search(r"imgs/a5\.png: not a readable image \(.*\); remove or replace it$", line)
    _png(folder / "a5.png", 8, seed=5)
    for i in range(3):   # batches of 5 split a0-a4, a5-a9, b0-b2: each batch of one size
        _png(folder / f"b{i}.png", 16, seed=10 + i)
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err, "refstats")
    assert re.search(r"needs images of one size; this folder mixes .*imgs/a0\.png \(8×8\) and "
                     r".*imgs/b0\.png \(16×16\): remove or resize the odd ones, or use "
                     r"--extractor inception", line)
    assert not out.exists()
    for i in range(3):
        (folder / f"b{i}.png").unlink()
    assert main(argv) == 0 and out.is_file()


@pytest.mark.parametrize("name", ["s:refine", "a/b", "../up", "two words", "x.json", ""])
def test_a_study_name_that_is_not_a_plain_name_is_refused(tmp_path, name):
    # "s:refine" would be study s's own local stage; "a/b" made nested run folders and a preset
    # the user folder refused
    with pytest.raises(ValueError, match=r"^--study-name .*: use letters, digits and \. _ \+ -"):
        RunOptions(out=tmp_path, study_name=name)
    assert RunOptions(out=tmp_path, study_name="sd15_v1.2-5nfe").study_name == "sd15_v1.2-5nfe"


def test_comma_lists_of_run_are_read_as_people_type_them():
    from schedsearch.cli import build_parser
    from schedsearch.cli.run import config_from_args

    args = build_parser().parse_args(["run", "--model", "gmm", "--objectives", "FID, nfe",
                                      "--baselines", "Karras, ays,"])
    config, name = config_from_args(args)
    assert config.objectives == ["fid", "nfe"] and config.baselines == ["karras", "ays"]
    assert name == "gmm-5nfe"


def test_default_study_names_are_plain_whatever_the_model_path():
    from types import SimpleNamespace

    from schedsearch.config import default_study_name

    names = [default_study_name(SimpleNamespace(model=m, budget=5)) for m in
             ("digits", "/models/my model (v2)/", "org/SD-1.5", "ckpt/b.safetensors", "x/..:y")]
    assert names == ["digits-5nfe", "my-model-v2-5nfe", "SD-1.5-5nfe", "b-5nfe", "y-5nfe"]


def test_a_relative_out_blocked_by_a_file_names_out(tmp_path, monkeypatch, capsys):
    # the error names the absolute path, --out was relative: they were not matched, and the line
    # said "choose another path"
    from schedsearch.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SCHEDSEARCH_DEBUG", raising=False)
    (tmp_path / "afile").write_text("")
    assert main(["sample", "--model", "gmm", "--out", "afile/sub"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"schedsearch sample: error: cannot create '{tmp_path / 'afile'}': '{tmp_path / 'afile'}' "
        f"is a file, not a folder; remove or rename it, or choose another --out")


# -- flags that used to be dropped silently, or checked only after the expensive part ------------
@pytest.mark.parametrize("argv, message", [
    # an unset shell variable: '' used to mean the default seeds 0-3
    (["sample", "--model", "gmm", "--seeds", ""], "--seeds is empty"),
    # an empty --objectives or --baselines ran the default study, every baseline included
    (["run", "--objectives", ""], "--objectives is empty: give it a value, or leave it out"),
    (["run", "--baselines", " , "], "--baselines is empty: name at least one, or leave the flag"),
    # any option given as '' (an unset shell variable) ran on the option's default
    (["run", "--prompts", ""], "--prompts is empty: give it a value, or leave it out for its"),
    (["run", "--storage", " "], "--storage is empty: give it a value, or leave it out"),
    (["sample", "--sigmas", ""], "--sigmas is empty: give it a value, or leave it out"),
    (["score", "--ref-stats", ""], "--ref-stats is empty: give it a value, or leave it out"),
    # FreeU from a step the schedule never reaches: used to sample with FreeU off
    (["sample", "--model", "digits", "--steps", "5", "--freeu", "sd15", "--t-aug", "5"],
     r"--t-aug 5 is past the last step: the schedule has 5 steps \(0-based 0\.\.4\)"),
    # a checkpoint beyond --n used to be dropped, a negative KID count to mean no KID
    (["score", "--n", "100", "--checkpoints", "64,300"],
     r"--checkpoints must lie in 2\.\.100 \(--n\), got 300"),
    (["score", "--checkpoints", "1"], r"must lie in 2\.\.256 \(--n\), got 1$"),
    (["score", "--kid-subsets", "-1"], r"--kid-subsets must be >= 0"),
    # it built a list of ten billion prompts first
    (["score", "--n", "10000000000", "--checkpoints", ""],
     r"at most 1,000,000 images per prompt seed .*, got 10,000,000,000$"),
    (["refstats", "--testbed", "gmm", "--batch-size", "0"], r"--batch-size must be >= 1, got 0"),
    # refstats flags that did nothing for their source (a digits --data-seed stamped the same
    # statistics with that seed)
    (["refstats", "--testbed", "digits", "--data-seed", "3"],
     r"--data-seed applies to --testbed gmm .*the digits reference is its fixed held-out split$"),
    (["refstats", "--images", "imgs", "--data-seed", "3"], r"a folder's images are what they are$"),
    (["refstats", "--images", "imgs", "--rebuild"], r"--rebuild applies to --testbed"),
    (["refstats", "--testbed", "gmm", "--inception", "w.pt"],
     r"--inception is used only with --extractor inception; the gmm testbed's statistics use "
     r"its own extractor$"),
    # seeds a torch.Generator cannot take: "Overflow when unpacking long long", or a negative
    # seed silently remapped to 2**64 + seed
    (["sample", "--model", "gmm", "--seeds", "18446744073709551616"],
     r"seeds must lie in 0\.\.18446744073709551615 .*, got 18446744073709551616$"),
    (["sample", "--model", "gmm", "--seeds", "0,-5"], r"seeds must lie in .*, got -5$"),
    # a typo of a range built a list of ten billion seeds first
    (["sample", "--model", "gmm", "--seeds", "3,0-9999999999"],
     r"--seeds asks for 10,000,000,001 values; at most 1,000,000 \(one image each\)$"),
    (["score", "--prompt-seed", "99999999999999"],
     r"the prompt seed must be an integer in 0\.\.18446744073708 .*got 99999999999999$"),
    (["run", "--model", "gmm", "--prompt-seed", "-1"], "the prompt seed must be an integer in"),
    # a sqlite storage that names no file ran the study in memory: lost at exit, no resume
    (["run", "--model", "gmm", "--storage", "sqlite:///"],
     r"--storage sqlite:/// names no file: the study would live in memory and be lost"),
    (["run", "--model", "gmm", "--storage", "sqlite:///:memory:"], "names no file"),
    # class labels a testbed does not have: every baseline and trial used to fail, one by one
    (["run", "--model", "gmm", "--prompts", "classes:9"],
     r"prompts classes:9: class label must be in 0\.\.3, got 4$"),
    # ... and in sample and score, where the error came once sampling was under way
    (["sample", "--model", "gmm", "--prompts", "classes:9", "--n", "8"],
     r"prompts classes:9: class label must be in 0\.\.3, got 4$"),
    (["sample", "--model", "gmm", "--prompt", "7"], r"prompts --prompt: class label must be in"),
    (["score", "--model", "gmm", "--prompts", "classes:9", "--n", "8"],
     r"prompts classes:9: class label must be in 0\.\.3, got 4$"),
    # one image per trial: used to run every baseline and trial, each failing, then say so
    (["run", "--model", "gmm", "--n-search", "1"], "n_search must be >= 2"),
    (["run", "--model", "gmm", "--n-heldout", "1"], "n_heldout must be >= 2"),
    # --inception beside a testbed's own extractor was ignored: not the FID that was asked for
    (["score", "--model", "gmm", "--inception", "weights.pt"],
     r"--inception is used only with --extractor inception; gmm scores with its own extractor"),
    (["run", "--model", "gmm", "--extractor", "identity", "--inception", "weights.pt"],
     r"gmm scores with the identity extractor \(add --extractor inception"),
    # dropped without a word: the prompts were not the column asked for; a multi-objective study
    # has no local stage and no winner's round
    (["score", "--model", "gmm", "--caption-column", "text"],
     r"--caption-column 'text' applies to a CSV prompt file, not to 'classes:4'$"),
    (["sample", "--model", "gmm", "--prompt", "1", "--caption-column", "text"],
     r"--caption-column applies to a CSV --prompts file"),
    # a text model's prompts before its pipeline loads (here: before the missing folder is found)
    (["sample", "--model", "./no-such-model", "--prompts", "no-such-prompts.txt"],
     r"prompt file 'no-such-prompts.txt' does not exist$"),
    (["sample", "--model", "./no-such-model", "--prompts", "classes:8", "--n", "8"],
     r"\./no-such-model is a text-to-image model and classes:8 are a testbed's class labels"),
    (["run", "--model", "./no-such-model", "--prompts", "classes:8"],
     r"\./no-such-model is a text-to-image model and classes:8 are a testbed's class labels"),
    (["run", "--model", "gmm", "--objectives", "fid,nfe", "--refine", "0.3", "--validation-sets",
      "2"], r"--refine, --validation-sets: for a single-objective study; --objectives fid,nfe "
            r"runs one stage"),
    # a device torch does not know was its traceback; a CUDA index the machine lacks said cuda
    (["sample", "--model", "gmm", "--device", "tpu"],
     r"--device 'tpu' is not a device torch knows; use cpu, cuda or cuda:N$"),
    (["score", "--model", "gmm", "--device", "cuda:99"],
     r"--device cuda:99(: this machine has \d+ CUDA device| was asked for, but no CUDA device)"),
    (["refstats", "--testbed", "gmm", "--device", "tpu"], r"--device 'tpu' is not a device"),
    # numpy's own words, once the storage was made
    (["run", "--model", "gmm", "--seed", "-1"],
     r"seed \(the search's\) must be an integer in 0\.\.4294967295, got -1$"),
    (["run", "--model", "gmm", "--objectives", "nfe,fid"],
     r"objectives must be .*\(FID first: --objectives fid,nfe\), got \['nfe', 'fid'\]$"),
])
def test_a_flag_that_cannot_work_is_one_line_before_any_work(tmp_path, capsys, argv, message):
    from schedsearch.cli import main

    out = tmp_path / "out"
    flags = {"score": ["--save-images", str(out)], "sample": ["--out", str(out)],
             "refstats": ["--out", str(out)],
             "run": ["--out", str(out), "--no-user-preset", "--no-progress"]}[argv[0]]
    assert main([*argv, *flags]) == 2
    assert re.search(message, _one_error_line(capsys.readouterr().err, argv[0]))
    assert argv[0] == "run" or not out.exists()   # a run has made its storage by then
    assert not (out / "mlflow.db").exists()


@pytest.mark.parametrize("command, name", [("run", "study.db"), ("run", "mlflow.db"),
                                           ("ui", "mlflow.db"), ("export", "study.db")])
def test_a_database_with_damaged_pages_is_one_line_and_left_as_it_is(tmp_path, capsys, command,
                                                                     name):
    """SQLite's header intact, its pages cut short: a traceback from Optuna after the model had
    loaded (mlflow.db: after minutes of MLflow's retries)."""
    import sqlite3

    from schedsearch.cli import main

    out = tmp_path / "out"
    out.mkdir()
    con = sqlite3.connect(out / name)
    con.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
    con.executemany("INSERT INTO t VALUES (?, ?)", ((i, "x" * 200) for i in range(2000)))
    con.commit()
    con.close()
    data = (out / name).read_bytes()
    (out / name).write_bytes(data[: len(data) // 2])
    argv = {"run": ["run", "--model", "gmm", "--no-user-preset", "--no-progress"],
            "ui": ["ui", "--no-browser"], "export": ["export", "--name", "x", "--to",
                                                     str(tmp_path / "x.json")]}[command]
    assert main([*argv, "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err, command)
    assert re.search(rf"{re.escape(str(out / name))} is a damaged SQLite database \(.+\): "
                     r"move it aside", line), line
    assert (out / name).read_bytes() == data[: len(data) // 2]


@pytest.mark.parametrize("argv, message", [
    (["oss", "--budget", "3", "--solver", "dpmpp_9m"], "solver must be one of"),
    (["oss", "--budget", "0"], r"--budget must be >= 1 \(model calls per image\), got 0"),
    (["gits", "--budget", "3", "--coeff", "0"], "coeff must be a finite number > 0, got 0.0"),
    (["gits", "--budget", "3", "--coeff", "inf"], "coeff must be a finite number > 0, got inf"),
    (["teacher", "--prompts", "classes:9"], r"prompts classes:9: class label must be in 0\.\.3"),
    (["oss", "--budget", "3", "--prompts", "classes:9"], r"prompts classes:9: class label must"),
])
def test_a_distiller_flag_is_checked_before_the_teacher_runs(tmp_path, capsys, argv, message):
    """On a real model the 100-step teacher takes minutes to hours; these errors used to come
    after it (the teacher in the cache is the proof that it ran)."""
    from schedsearch.cli import main

    cache = tmp_path / "cache"
    assert main([*argv, "--model", "gmm", "--n", "8", "--cache-dir", str(cache),
                 "--no-progress"]) == 2
    assert re.search(message, _one_error_line(capsys.readouterr().err, argv[0]))
    assert not cache.exists() or not any(cache.iterdir())


def test_a_teacher_cache_that_cannot_be_written_is_one_warning_line(tmp_path, capsys):
    """The teacher is still computed and printed; the warning is one line in the command's own
    voice, not Python's two (the second quoting our source)."""
    import json
    import warnings

    from schedsearch.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    before = warnings.showwarning
    assert main(["teacher", "--model", "gmm", "--n", "8", "--teacher-steps", "10",
                 "--cache-dir", str(blocker / "cache"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["samples"] == 8
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("schedsearch teacher: warning: could not write the teacher cache ")
    assert lines[0].endswith("(Not a directory); it is recomputed next time: point --cache-dir "
                             "or SCHEDSEARCH_CACHE at a folder you can write to")
    assert warnings.showwarning is before   # main() leaves the caller's warnings as they were


def test_a_cache_that_cannot_hold_reference_statistics_costs_a_warning_not_the_score(
        tmp_path, capsys, monkeypatch):
    """It was '[Errno 2] No such file or directory' and no score."""
    import json

    from schedsearch.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SCHEDSEARCH_CACHE", str(blocker / "cache"))
    assert main(["score", "--model", "gmm", "--n", "32", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["fid"] > 0
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"schedsearch score: warning: could not cache the reference statistics in "
        f"{blocker / 'cache' / 'refstats'}/")
    assert lines[0].endswith("(Not a directory); they are rebuilt next time: point "
                             "SCHEDSEARCH_CACHE at a folder you can write to")
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("command", ["run", "score"])
def test_a_text_models_prompts_and_scoring_files_are_checked_before_it_loads(
        tmp_path, capsys, monkeypatch, command):
    """A large pipeline takes minutes to load; its prompts, Inception's weights and the
    reference statistics used to be looked at only after that, one failed run each. The model
    folder here is empty, so loading it would fail: each message below proves it came first."""
    from schedsearch.cli import main

    model = tmp_path / "my-sd-model"
    model.mkdir()
    monkeypatch.setenv("SCHEDSEARCH_INCEPTION", str(tmp_path / "no-inception.pt"))
    three, four = tmp_path / "three.txt", tmp_path / "four.txt"
    three.write_text("a cat\na dog\na car\n")
    four.write_text("a cat\na dog\na car\na bus\n")
    # (GITS and OSS left out of the run: their own 16 prompts are checked too)
    size = (["--n-search", "2", "--n-heldout", "2", "--out", str(tmp_path / "run"),
             "--no-user-preset", "--no-progress", "--baselines", "karras,ays"]
            if command == "run" else ["--n", "4"])
    for flags, message in (
            ([], r"my-sd-model needs prompts: pass --prompts FILE"),
            (["--prompts", str(three)], r"asked for 4 prompts but '.*three.txt' holds only 3"
                                        + (r" \(a prompt per image: --n-search 2 \+ 1 held-out "
                                           r"set\(s\) × --n-heldout 2; lower them, or repeat "
                                           r"lines in the file\)$" if command == "run" else
                                           r" \(--n 4, a prompt per image; lower it, or repeat "
                                           r"lines in the file\)$")),
            (["--prompts", str(four)], r"Inception weights .* were not found; looked at: "
                                       r".*no-inception\.pt"),
            (["--prompts", str(four), "--extractor", "identity"],
             r"no built-in reference data for '.*my-sd-model'; .* --ref-stats FILE$"),
            (["--prompts", str(four), "--extractor", "identity", "--ref-stats",
              str(tmp_path / "ref.safetensors")],
             r"reference statistics file '.*ref.safetensors' does not exist")):
        assert main([command, "--model", str(model), *size, *flags]) == 2
        err = capsys.readouterr().err   # the Inception message adds the download command
        assert err.startswith(f"schedsearch {command}: error: ") and "Traceback" not in err
        assert re.search(message, err.splitlines()[0]), err
    # and with all of them right, it is the model that is refused
    _write_refstats(tmp_path / "ref.safetensors", *_good_moments()[:2])
    assert main([command, "--model", str(model), *size, "--prompts", str(four), "--extractor",
                 "identity", "--ref-stats", str(tmp_path / "ref.safetensors")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"my-sd-model' is not a diffusers pipeline folder \(no model_index.json\)",
                     line), line


@pytest.mark.parametrize("argv, message", [
    (["sample", "--out", "{tmp}/out"], r"my-sd-model is a text-to-image model: give --prompt TEXT "
                                       r"or --prompts FILE$"),
    (["teacher", "--cache-dir", "{tmp}/cache"], r"my-sd-model needs prompts: pass --prompts FILE"),
    (["oss", "--budget", "3", "--cache-dir", "{tmp}/cache"], r"my-sd-model needs prompts"),
])
def test_a_text_model_without_prompts_is_told_before_it_loads(tmp_path, capsys, argv, message):
    from schedsearch.cli import main

    model = tmp_path / "my-sd-model"
    model.mkdir()   # empty: loading it would fail with another message
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main([*argv, "--model", str(model)]) == 2
    assert re.search(message, _one_error_line(capsys.readouterr().err, argv[0]))


def test_ui_on_a_tracking_uri_that_names_nothing_is_one_line(tmp_path):
    """A sqlite file that is not there used to be created by the MLflow server (folders too: a
    typo made a new empty store), and a database or server that does not answer meant minutes
    of MLflow's retries; each is now one line before any server starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    missing = tmp_path / "no-such-folder" / "mlflow.db"
    for uri, message in ((f"sqlite:///{missing}", f"there is no file {missing}; pass the "
                                                  f"mlflow.db of a run folder, or --out DIR"),
                         (f"http://127.0.0.1:{closed}", "the MLflow tracking server .* "
                                                        r"\(--tracking-uri\) does not answer"),
                         (f"postgresql://u@127.0.0.1:{closed}/db",
                          r"the MLflow tracking database .* \(--tracking-uri\) cannot be reached")):
        code, out, err = _cli("ui", "--tracking-uri", uri, "--no-browser", timeout=60)
        assert code == 2, (out, err)
        line = _one_error_line(err, "ui")
        assert re.search(message, line) and "--out DIR" in line, line
        assert "MLflow UI" not in out
    assert not missing.parent.exists()


@pytest.mark.parametrize("uri, message", [
    ("sqlite:///:memory:", r"MLFLOW_TRACKING_URI sqlite:///:memory: names no file: the runs would "
                           r"live in memory and be lost"),
    ("file:///{tmp}/mlruns", r"MLFLOW_TRACKING_URI file:///.*/mlruns: MLflow does not take this "
                             r"store \(.*\); use a database"),
    ("{tmp}/mlruns", r"MLFLOW_TRACKING_URI .*/mlruns: MLflow does not take this store"),
])
def test_a_tracking_uri_mlflow_cannot_keep_is_one_line_before_any_work(tmp_path, capsys,
                                                                       monkeypatch, uri, message):
    """In memory, a study's runs were lost at exit (and the run pointed `schedsearch ui` at a
    folder without them); MLflow's file store was a traceback once the model had loaded."""
    from mlflow.tracking import MlflowClient

    from schedsearch.cli import main

    uri = uri.replace("{tmp}", str(tmp_path).lstrip("/") if uri.startswith("file") else
                      str(tmp_path))
    if not uri.startswith("sqlite"):
        try:
            MlflowClient(tracking_uri=uri)
            pytest.skip("this MLflow still takes its file store")
        except Exception:   # what the command must now say in one line
            pass
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "run"
    assert main(["run", "--model", "gmm", "--out", str(out), "--no-user-preset",
                 "--no-progress"]) == 2
    assert re.search(message, _one_error_line(capsys.readouterr().err, "run"))
    assert not out.exists()


@pytest.mark.parametrize("command, name", [("run", "study.db"), ("run", "mlflow.db"),
                                           ("ui", "mlflow.db"), ("export", "study.db")])
def test_a_damaged_database_in_the_run_folder_is_one_line_and_left_as_it_is(tmp_path, capsys,
                                                                            command, name):
    """Used to be SQLAlchemy's 'file is not a database' traceback (mlflow.db: after the model
    had loaded)."""
    from schedsearch.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "study.db").write_bytes(b"")           # an empty file is a new database: fine
    (out / "mlflow.db").write_bytes(b"")
    (out / name).write_bytes(b"PK\x03\x04 a zip file, not sqlite")
    argv = {"run": ["run", "--model", "gmm", "--no-user-preset", "--no-progress"],
            "ui": ["ui", "--no-browser"], "export": ["export", "--name", "x", "--to",
                                                     str(tmp_path / "x.json")]}[command]
    assert main([*argv, "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err, command)
    assert line.endswith(f"{out / name} is not an SQLite database (damaged, or another "
                         f"program's file): move it aside, and a study started there makes a "
                         f"new one")
    assert (out / name).read_bytes() == b"PK\x03\x04 a zip file, not sqlite"


@pytest.mark.parametrize("argv, message", [
    (["run", "--config", "{d}"], "'{d}' is a folder, not a file; give the file's path$"),
    (["score", "--ref-stats", "{d}"], "'{d}' is a folder; reference statistics are one "
                                      ".safetensors file: make it from an image folder"),
    # read before the study's storage is made: a failed run used to leave an empty study.db
    (["run", "--ref-stats", "{d}"], "'{d}' is a folder; reference statistics are one "),
    (["sample", "--preset", "{d}"], "{d} is a folder, not a preset file$"),
])
def test_a_folder_given_for_an_input_file_says_so(tmp_path, capsys, argv, message):
    """It said 'cannot write' (a config), 'does not exist' (reference statistics)."""
    from schedsearch.cli import main

    folder = tmp_path / "given"
    folder.mkdir()
    out = tmp_path / "out"
    argv = [a.format(d=folder) for a in argv]
    flags = {"run": ["--out", str(out), "--no-user-preset"], "score": [],
             "sample": ["--out", str(out)]}[argv[0]]
    assert main([*argv, "--model", "gmm", *flags]) == 2
    assert re.search(message.format(d=re.escape(str(folder))),
                     _one_error_line(capsys.readouterr().err, argv[0]))
    assert list(folder.iterdir()) == [] and not out.exists()


def test_refstats_no_features_without_out_is_one_line(tmp_path, capsys, monkeypatch):
    """The cached copy keeps its features (KID needs them): without --out the flag did nothing."""
    from schedsearch.cli import main

    monkeypatch.setenv("SCHEDSEARCH_CACHE", str(tmp_path / "cache"))
    assert main(["refstats", "--testbed", "gmm", "--no-features"]) == 2
    assert _one_error_line(capsys.readouterr().err, "refstats").endswith(
        "--no-features applies to the --out file (the cached copy keeps its features, for KID); "
        "add --out FILE")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("argv, line", [
    (["run", "--budjet", "4"], "schedsearch run: error: unrecognized arguments: --budjet 4 "
                               "(did you mean --budget for --budjet?)"),
    (["presets", "show", "sd15-5", "--formt=json"],
     "schedsearch presets show: error: unrecognized arguments: --formt=json (did you mean "
     "--format for --formt=json?)"),
    (["gits", "--budget", "4", "--calibrate"],
     "schedsearch gits: error: unrecognized arguments: --calibrate"),
])
def test_an_unknown_flag_is_named_by_its_command_with_the_likely_one(capsys, argv, line):
    """argparse's top level said 'schedsearch: error: unrecognized arguments' under the usage
    of every command."""
    from schedsearch.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == line and err[0].startswith(f"usage: schedsearch {argv[0]}")


def test_an_empty_required_option_or_a_meaningful_empty_one(tmp_path, capsys):
    """A required option given as '' is told to take a value (it has no default to fall back
    on); score's --checkpoints '' keeps its meaning, no intermediate FID, and so does a
    workflow's --prompt '', an empty positive prompt."""
    from schedsearch.cli import main

    assert main(["export", "--out", str(tmp_path), "--name", ""]) == 2
    assert _one_error_line(capsys.readouterr().err, "export").endswith(
        "error: --name is empty: give it a value")
    assert main(["score", "--model", "gmm", "--n", "100", "--checkpoints", "", "--no-progress"]) == 0
    assert list(json.loads(capsys.readouterr().out)["fid_at"]) == ["100"]   # no 64: --n alone
    assert main(["presets", "show", "sd15-5", "--format", "comfy-workflow", "--prompt", ""]) == 0
    texts = [n["inputs"]["text"] for n in json.loads(capsys.readouterr().out).values()
             if n["class_type"] == "CLIPTextEncode"]
    assert texts == ["", ""]   # the positive prompt as given, the negative one empty


@pytest.mark.parametrize("argv, message", [
    (["schedule", "karras", "--steps", "5", "--rho", "0.001"],
     "schedule 'karras' (rho=0.001, sigma_min=0.029167158151720367, sigma_max=14.614641229333639)"
     " overflows float64: choose less extreme parameters"),
    (["schedule", "paper", "--steps", "5", "--p2", "1e-9"], "overflows float64"),
    (["schedule", "karras", "--steps", "5", "--sigma-max", "1e308"],
     "gives an unusable σ list (sigmas[4] = 0.0: sigmas must be > 0, except an optional final 0)"),
    (["schedule", "karras", "--steps", "100000000"],
     "steps must be an integer in [1, 10000], got 100000000"),
    (["teacher", "--model", "gmm", "--teacher-steps", "100000000", "--n", "1"],
     "teacher steps must be an integer in [2, 10000], got 100000000"),
    (["refstats", "--testbed", "gmm", "--n", "100000000000"],
     "--n must be in [2, 1000000], got 100000000000"),
    (["refstats", "--testbed", "gmm", "--data-seed", "-1"],
     "--data-seed must be in [0, 2**64), got -1"),
    (["teacher", "--model", "gmm", "--no-cache", "--cache-dir", "{d}"],
     "--no-cache neither reads nor writes the cache: drop --cache-dir"),
    (["ui", "--out", "{d}", "--tracking-uri", "sqlite:///{d}/mlflow.db"],
     "give --out (a run folder) or --tracking-uri (any MLflow store), not both"),
    (["export", "--out", "{d}", "--storage", "sqlite:///{d}/study.db", "--name", "a"],
     "give the study's --out folder or its --storage URL, not both"),
])
def test_extreme_values_and_conflicting_flags_are_one_line(tmp_path, capsys, monkeypatch, argv,
                                                           message):
    """Each was a traceback (OverflowError), a list with two zeros, minutes of printing or
    computing, an out-of-memory kill, or a flag silently ignored."""
    from schedsearch.cli import main

    monkeypatch.setenv("SCHEDSEARCH_CACHE", str(tmp_path / "cache"))
    argv = [a.format(d=tmp_path) for a in argv]
    assert main(argv) == 2
    assert message in _one_error_line(capsys.readouterr().err, argv[0])
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("command", ["teacher", "oss", "gits"])
@pytest.mark.parametrize("value", ["nan", "-5", "1e6"])
def test_distill_guidance_is_checked(capsys, command, value):
    """teacher/oss/gits had no preset to check it: nan died in the sampler, -5 ran."""
    from schedsearch.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([command, "--model", "gmm", "--guidance", value,
              *(["--budget", "3"] if command != "teacher" else [])])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"schedsearch {command}: error: argument --guidance: must be a number in (0, 100), "
        f"got {value}")


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "not a scheduler config: its JSON is not an object"),
    ("null", "not a scheduler config: its JSON is not an object"),
    ('{"num_train_timesteps": 1e12}', "num_train_timesteps must be in [2, 100000], got 1000000000000"),
    ('{"beta_start": "x"}', "beta_start must be a number, got 'x'"),
    ('{"beta_start": -1}', "beta_start must be in (0, 1), got -1.0"),   # was a numpy warning too
    ('{"num_train_timesteps": 10.5}', "num_train_timesteps must be an integer, got 10.5"),
    ('{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": "x"}',
     "shift must be a number, got 'x'"),
])
def test_a_noise_config_that_is_not_one_is_one_line_naming_the_file(tmp_path, capsys, content,
                                                                      message):
    """A list or null was an AttributeError; 10¹² steps said to lower --batch-size."""
    from schedsearch.cli import main

    path = tmp_path / "scheduler_config.json"
    path.write_text(content)
    for command in (["schedule", "karras", "--steps", "3"],
                    ["sample", "--model", "gmm", "--seeds", "0", "--out", str(tmp_path / "s")]):
        assert main([*command, "--noise-config", str(path)]) == 2
        assert _one_error_line(capsys.readouterr().err, command[0]).endswith(
            f"--noise-config {path}: {message}")
    assert not (tmp_path / "s").exists()


def test_distill_json_names_the_seeds_given(capsys):
    """With --seeds the JSON said 'classes:4@seed0', the prompt seed's seeds, which did not run."""
    from schedsearch.cli import main

    assert main(["oss", "--model", "gmm", "--budget", "3", "--teacher-steps", "8", "--seeds",
                 "7,9,11", "--no-cache", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["prompts"] == "classes:4 with --seeds 7,9,11"


@pytest.mark.parametrize("content, extra, message", [
    ("{}", [], "not a scheduler config: it sets none of num_train_timesteps, beta_schedule, "
                "beta_start, beta_end, trained_betas"),
    ('{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}', ["--mu", "0.1"],
     "--mu applies to a dynamically shifted config (use_dynamic_shifting: true); this one has a "
     "fixed shift 3.0: drop --mu"),
])
def test_a_noise_config_that_would_be_read_as_something_else(tmp_path, capsys, content, extra,
                                                             message):
    """{} (or a preset file) ran as the SD table; --mu on a fixed shift was dropped."""
    from schedsearch.cli import main

    path = tmp_path / "c.json"
    path.write_text(content)
    name = "flow" if "FlowMatch" in content else "karras"
    assert main(["schedule", name, "--steps", "3", "--noise-config", str(path), *extra]) == 2
    assert _one_error_line(capsys.readouterr().err, "schedule").endswith(message)


@pytest.mark.parametrize("value, ok", [(np.float32(4.5), True), (np.int64(7), True), (7, True),
                                       (True, False), (0, False), (100, False),
                                       (float("nan"), False), ("4", False)])
def test_one_guidance_rule_for_configs_and_presets(value, ok):
    """Configs and presets take the same CFG scales and store them as plain floats: a config
    once refused numpy's float32 that a preset took, and a JSON dump of a float32 fails."""
    from schedsearch.config import StudyConfig
    from schedsearch.presets import Preset

    makers = [lambda g: StudyConfig(guidance=g).guidance,
              lambda g: Preset(name="p", family="digits", sigmas=[2.0, 1.0, 0.0], solver="euler",
                               guidance=g).guidance]
    for make in makers:
        if ok:
            got = make(value)
            assert type(got) is float and got == float(value) and json.dumps(got)
        else:
            with pytest.raises(ValueError, match=r"guidance must be a number in \(0, 100\), got"):
                make(value)


@pytest.mark.parametrize("ends, ok", [([1, 99.5], True), ([0.5, 0.5], True), ([0, 5], False),
                                      ([5, 100], False), ([-1, 5], False)])
def test_a_searched_guidance_range_holds_only_guidance_a_preset_takes(ends, ok):
    from schedsearch.space import Space

    if ok:
        assert Space(ranges={"guidance": ends}).ranges["guidance"] == ends
    else:
        with pytest.raises(ValueError, match=r"search space: guidance must lie inside \(0, 100\)"):
            Space(ranges={"guidance": ends})


def test_too_few_prompts_for_the_distilled_baselines_are_one_line_before_loading(tmp_path,
                                                                                  capsys):
    """GITS and OSS take distill_samples prompts of their own: too few failed both, after the
    model had loaded and the first baselines were scored (here the model is not even there: the
    line must come first)."""
    from schedsearch.cli import main

    eight = tmp_path / "eight.txt"
    eight.write_text("".join(f"prompt {i}\n" for i in range(8)))
    argv = ["run", "--model", "./no-such-model", "--prompts", str(eight), "--n-search", "2",
            "--n-heldout", "2", "--no-user-preset", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert re.search(r"asked for 16 prompts but .* holds only 8 \(distill_samples 16, GITS and "
                     r"OSS's teacher images; .* leave gits and oss out of --baselines",
                     _one_error_line(capsys.readouterr().err, "run"))
    assert main([*argv, "--baselines", "karras,ays"]) == 2   # no teacher: the next check speaks
    assert "distill_samples" not in capsys.readouterr().err
