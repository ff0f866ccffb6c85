import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from schedsearch import presets, schedules
from schedsearch.freeu import FreeU, FreeUPlan


def test_shipped_presets_are_what_the_code_generates(tmp_path):
    written = presets.write_shipped(tmp_path)
    assert len(written) == len(list(presets.SHIPPED_DIR.glob("*.json"))) == 13
    for path in written:
        shipped = json.loads((presets.SHIPPED_DIR / path.name).read_text())
        made = json.loads(path.read_text())
        # σ and t to 1e-12 relative: pow/log in numpy builds differ in the last bit of a double
        for key in ("sigmas", "timesteps"):
            assert made.pop(key) == pytest.approx(shipped.pop(key), rel=1e-12, abs=0), path.name
        assert made == shipped, f"{path.name} drifted; run python -m schedsearch.presets"


def test_paper_presets_carry_the_papers_solver_and_freeu_plan():
    p5 = presets.load("sd15-5")
    assert p5.solver == "dpmpp_1s" and p5.nfe == 5 and p5.guidance == 5.5
    assert p5.freeu.variant == "original" and all(s == FreeU(1.1, 1.1, 0.9, 0.2) for s in p5.freeu.steps)
    torch.testing.assert_close(p5.sigmas, schedules.paper_preset("sd15-5"), rtol=0, atol=0)
    x6 = presets.load("sdxl-6")
    assert [s is not None for s in x6.freeu.steps] == [False, True, True, True, False, True]
    assert x6.freeu.steps[5] == FreeU(1.3, 1.4, 0.9, 0.2)
    assert presets.load("sd15-8").freeu is None and presets.load("sd15-8").solver == "dpmpp_2m"
    ays = presets.load("ays-sdxl-10")
    torch.testing.assert_close(ays.sigmas[:-1], torch.tensor(schedules.AYS_TABLES["sdxl"][:-1],
                                                             dtype=torch.float64))


def test_round_trip_is_exact(tmp_path):
    p = presets.Preset("mine", "sd15", schedules.paper(5, 6.3, 1.37, stop=2.71), "2m",
                       FreeUPlan.from_start(5, 2, FreeU(1.2, 1.3, 0.7, 0.4), "diffusers"), 6.0,
                       {"name": "paper"}, presets.provenance(study="s", trial=3))
    q = presets.read(p.save(tmp_path / "mine.json"))
    assert q.sigmas.tolist() == p.sigmas.tolist()  # bit-exact: JSON floats round-trip
    assert q.freeu == p.freeu and q.solver == "dpmpp_2m" and q.guidance == 6.0
    assert q.provenance["trial"] == 3 and q.provenance["schedsearch_version"]


def test_a_file_saved_with_a_byte_order_mark_reads_as_without(tmp_path):
    """Windows editors save UTF-8 with a BOM: such a preset was "not valid JSON ... corrupt", and
    so was a --noise-config scheduler config."""
    from schedsearch.cli import main

    plain = presets.load("sd15-5").save(tmp_path / "plain.json")
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert presets.read(bom).to_json() == presets.read(plain).to_json()
    config = tmp_path / "scheduler_config.json"
    config.write_bytes(b"\xef\xbb\xbf" + json.dumps({"beta_schedule": "scaled_linear",
                                                     "beta_start": 0.00085, "beta_end": 0.012,
                                                     "num_train_timesteps": 1000}).encode())
    assert main(["schedule", "karras", "--steps", "4", "--noise-config", str(config)]) == 0


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(sigmas=[1.0, 2.0, 0.0]), "strictly decreasing"),
    (lambda d: d.update(solver="lms"), "solver must be one of"),
    (lambda d: d.update(nfe=9), "says nfe = 9 but its σ list and solver spend 5"),
    (lambda d: d.update(schema="other/2"), "unknown preset schema"),
    (lambda d: d.pop("schema"), r'not a schedsearch preset \(no "schema": "schedsearch.preset/1"\); '
                                r'make one with `schedsearch export`'),
    (lambda d: d.pop("sigmas"), "missing sigmas"),
    (lambda d: d["freeu"]["steps"].pop(), "FreeU plan has 4 steps but the σ list has 5"),
    (lambda d: d["freeu"]["steps"][0].update(b1=0), "FreeU b1 must be a finite number > 0"),
    (lambda d: d.update(family="sd9"), "preset family must be one of"),
    (lambda d: d.update(guidance="high"), "guidance must be a number"),
])
def test_corrupt_presets_get_clear_errors(tmp_path, mutate, message):
    d = presets.load("sd15-5").to_json()
    mutate(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=message):
        presets.read(path)


def test_not_json_and_unknown_names(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"schema": "schedsearch.preset/1", "name": ')
    with pytest.raises(ValueError, match=r"not valid JSON .* line 1, column \d+\); the preset file is corrupt"):
        presets.read(path)
    with pytest.raises(ValueError, match="no preset named 'nope'; known presets: ays-sd15-10"):
        presets.load("nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        presets.load(str(tmp_path / "missing.json"))


def test_a_user_file_with_a_shipped_name_is_ignored_and_listed_so(tmp_path, monkeypatch):
    monkeypatch.setenv("SCHEDSEARCH_PRESETS", str(tmp_path))
    p = presets.load("sd15-8")
    p.provenance = {"note": "mine"}
    p.save(tmp_path / "sd15-8.json")
    presets.load("ays-sd15-5").replace(name="mine").save(tmp_path / "mine.json")
    assert presets.load("sd15-8").provenance == presets.paper_preset("sd15-8").provenance
    assert presets.load(str(tmp_path / "sd15-8.json")).provenance == {"note": "mine"}  # by path
    out = subprocess.run([sys.executable, "-m", "schedsearch", "presets", "list"],
                         capture_output=True, text=True, check=True).stdout
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert rows["mine"].endswith(str(tmp_path / "mine.json")) and "ays-sdxl-5" in out
    assert [line for line in out.splitlines() if line.startswith("sd15-8 ")] == [
        f"sd15-8{' ' * 22} sd15      8  dpmpp_2m  off    shipped",
        f"sd15-8{' ' * 22} (ignored: the shipped sd15-8 wins; rename {tmp_path / 'sd15-8.json'} "
        f"to use it by name, or give its path)"]


def test_the_list_shows_an_unreadable_user_file_and_skips_a_folder(tmp_path, monkeypatch, capsys):
    """A folder named x.json in the preset folder stopped the whole list with 'cannot write'."""
    from schedsearch.cli import main

    monkeypatch.setenv("SCHEDSEARCH_PRESETS", str(tmp_path))
    (tmp_path / "folder.json").mkdir()
    (tmp_path / "other.json").write_text('{"name": "x"}')   # some other program's JSON
    presets.load("ays-sd15-5").replace(name="mine").save(tmp_path / "mine.json")
    assert main(["presets", "list"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "folder" not in rows and rows["mine"].endswith(str(tmp_path / "mine.json"))
    assert rows["other"].startswith("other" + " " * 24 + f"(unreadable: {tmp_path / 'other.json'}: "
                                    "not a schedsearch preset")
    with pytest.raises(ValueError, match=r"folder.json is a folder, not a preset file$"):
        presets.read(tmp_path / "folder.json")


def test_cli_show_formats(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "schedsearch", "presets", "show", *a],  # noqa: E731
                                    capture_output=True, text=True, check=True).stdout
    data = json.loads(run("sd15-5", "--format", "json"))
    assert data["nfe"] == 5 and data["freeu"]["variant"] == "original"
    comfy = [float(v) for v in run("sd15-5", "--format", "comfy").split(",")]
    assert comfy[0] == pytest.approx(14.614641) and comfy[-1] == pytest.approx(0.132002)
    assert "FreeU: original on steps [0, 1, 2, 3, 4]" in run("sd15-5")
    # a searched guidance (space: guidance) was shown with all its digits
    path = presets.load("sd15-5").replace(guidance=2.163846400703612).save(tmp_path / "g.json")
    assert run(str(path)).splitlines()[0] == "sd15-5: sd15, 5 NFE, dpmpp_1s, guidance 2.164"


# -- σ outside the model's noise table ------------------------------------------------------------
def _preset_file(tmp_path, sigmas, name="odd"):
    d = presets.load("sd15-8").to_json()
    d.update(name=name, sigmas=sigmas, nfe=len(sigmas) - 1, freeu=None, schedule=None)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize("sigmas, message", [
    ([1e9, 3.0, 0.5, 0.0], "σ = 1e+09 lies above digits's noise table"),
    ([14.6, 3.0, 0.5, 0.01, 0.0], "σ = 0.01 lies below digits's noise table"),
])
def test_sigma_outside_the_noise_table_is_refused_where_presets_are_fitted(tmp_path, sigmas,
                                                                          message):
    from schedsearch import generate, models

    model = models.load("digits", device="cpu")
    preset = presets.read(_preset_file(tmp_path, sigmas))
    table = (r", which runs from σ = 0\.0291672 to 14\.6146 \(usable: 0\.0145836 to 14\.7608\); "
             r"pass --allow-outside-table")
    with pytest.raises(ValueError, match=re.escape(message) + table):
        presets.fit(preset, model)
    with pytest.raises(ValueError, match=re.escape(message)):
        generate(model, preset, [3], seeds=[0])
    fitted, _ = presets.fit(preset, model, allow_outside_table=True)
    assert fitted.sigmas.tolist() == sigmas


def test_sigma_inside_the_table_is_accepted():
    from schedsearch import models

    model = models.load("digits", device="cpu")
    for p in presets.shipped():
        presets.fit(p, model)
    # a rounded σ_max, a start below σ_max (distill --free-start, --sigma-max), the knots floor
    floor = schedules.KNOT_FLOOR * model.table.sigma_min
    for sigmas in ([14.7, 1.0, 0.0], [5.0, 1.0, 0.0], [14.6146, 1.0, floor]):
        presets.fit(presets.Preset("ok", "any", sigmas, "euler"), model)


def test_sample_and_score_refuse_it_in_one_line_unless_allowed(tmp_path, capsys, monkeypatch):
    from schedsearch.cli import main

    monkeypatch.delenv("SCHEDSEARCH_DEBUG", raising=False)
    path = str(_preset_file(tmp_path, [30.0, 3.0, 0.5, 0.0]))
    common = ["--preset", path]
    assert main(["sample", *common, "--no-progress", "--seeds", "0", "--prompt", "3", "--out",
                 str(tmp_path / "s")]) == 2
    assert main(["score", *common, "--n", "8"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(": error: ")[0] for line in lines] == ["schedsearch sample",
                                                               "schedsearch score"]
    assert all("preset odd: σ = 30 lies above digits's noise table" in line and
               "pass --allow-outside-table" in line for line in lines), lines
    assert not (tmp_path / "s").exists()
    assert main(["sample", *common, "--no-progress", "--allow-outside-table", "--seeds", "0",
                 "--prompt", "3", "--out", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "samples.json").read_text())["preset"]["sigmas"][0] == 30.0


# -- name clashes in the user preset folder --------------------------------------------------------
LEGACY = Path(__file__).parent / "fixtures" / "legacy-study"


@pytest.fixture
def two_studies(tmp_path, monkeypatch):
    """The legacy study, and a copy of it in a second run folder (same name, another storage) and
    under another name in the first one."""
    import optuna

    monkeypatch.setenv("SCHEDSEARCH_PRESETS", str(tmp_path / "presets"))
    monkeypatch.delenv("SCHEDSEARCH_DEBUG", raising=False)
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        out.mkdir()
        shutil.copy(LEGACY / "study.db", out / "study.db")
    optuna.copy_study(from_study_name="legacy-gmm", from_storage=f"sqlite:///{a / 'study.db'}",
                      to_storage=f"sqlite:///{a / 'study.db'}", to_study_name="other")
    return a, b


def _export(capsys, out, study, name, *extra):
    from schedsearch.cli import main

    capsys.readouterr()
    rc = main(["export", "--study", study, "--name", name, "--out", str(out), *extra])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_export_refuses_a_shipped_name(two_studies, capsys, tmp_path):
    a, _ = two_studies
    rc, err = _export(capsys, a, "legacy-gmm", "sd15-5")
    assert rc == 2 and err == [
        "schedsearch export: error: 'sd15-5' is the name of a shipped preset, which a user preset "
        "may not replace; choose another name (schedsearch export --name NAME)"]
    assert not (tmp_path / "presets" / "sd15-5.json").exists()
    assert presets.load("sd15-5").provenance["source"].startswith("Hyperparameters")
    rc, err = _export(capsys, a, "legacy-gmm", "sd15-5", "--to", str(tmp_path / "elsewhere.json"))
    assert rc == 0 and presets.read(tmp_path / "elsewhere.json").name == "sd15-5"


def test_export_refuses_to_overwrite_another_studys_preset(two_studies, capsys, tmp_path):
    a, b = two_studies
    mine = tmp_path / "presets" / "mine.json"
    assert _export(capsys, a, "legacy-gmm", "mine")[0] == 0
    assert presets.read(mine).provenance["trial"] == 1          # the best
    assert _export(capsys, a, "legacy-gmm", "mine", "--trial", "2")[0] == 0   # same study: fine
    assert presets.read(mine).provenance["trial"] == 2
    second = mine.read_text()
    for out, study in ((a, "other"), (b, "legacy-gmm")):      # another name; another storage
        rc, err = _export(capsys, out, study, "mine")
        assert rc == 2 and len(err) == 1, err
        assert err[0].startswith("schedsearch export: error: a user preset named 'mine' from study "
                                 "'legacy-gmm' of sqlite:///") and str(mine) in err[0]
        assert err[0].endswith("choose another name (schedsearch export --name NAME), or remove "
                               "that file to replace it")
    assert mine.read_text() == second


@pytest.mark.parametrize("name", ["../outside", "sub/inner", "two words", "mine.json", ".hidden"])
def test_export_names_that_are_not_plain_file_names_are_refused(two_studies, capsys, tmp_path,
                                                                name):
    # before: "../outside" wrote presets/../outside.json, i.e. outside the preset folder, and
    # "sub/inner" a file that `--preset sub/inner` then looked for as a path
    a, _ = two_studies
    rc, err = _export(capsys, a, "legacy-gmm", name)
    assert rc == 2 and err == [
        f"schedsearch export: error: {name!r} cannot name a preset in the user preset folder: use "
        f"letters, digits and . _ + - (no path, no spaces, not ending in .json), e.g. schedsearch "
        f"export --name my-sd15-5; or write it anywhere with --to FILE"]
    assert sorted(p.name for p in tmp_path.rglob("*.json")) == []
    assert _export(capsys, a, "legacy-gmm", "v1.2_sd15+freeu-5")[0] == 0
    assert presets.load("v1.2_sd15+freeu-5").provenance["trial"] == 1


def test_export_to_a_path_that_cannot_be_written_names_it_and_to(two_studies, capsys, tmp_path):
    a, _ = two_studies
    (tmp_path / "a-file").write_text("")
    rc, err = _export(capsys, a, "legacy-gmm", "x", "--to", str(tmp_path / "a-file" / "x.json"))
    assert rc == 2 and err == [f"schedsearch export: error: cannot create '{tmp_path / 'a-file'}'"
                               f": '{tmp_path / 'a-file'}' is a file, not a folder; remove or "
                               f"rename it, or choose another --to"]


def test_export_without_study_takes_the_storages_only_study(two_studies, capsys, tmp_path):
    """--study may be left out where the storage holds one study (a run folder); with two, one
    line names them. The preset is the same as with --study."""
    from schedsearch.cli import main

    a, b = two_studies
    assert main(["export", "--name", "only", "--out", str(b), "--to", str(tmp_path / "x.json")]) == 0
    assert _export(capsys, b, "legacy-gmm", "named", "--to", str(tmp_path / "y.json"))[0] == 0
    x, y = presets.read(tmp_path / "x.json"), presets.read(tmp_path / "y.json")
    assert x.sigmas.tolist() == y.sigmas.tolist() and x.provenance["trial"] == y.provenance["trial"]
    capsys.readouterr()
    assert main(["export", "--name", "only", "--out", str(a), "--to", str(tmp_path / "z.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("holds 2 studies (legacy-gmm, other): pick one with "
                                             "--study")
    assert not (tmp_path / "z.json").exists()


@pytest.mark.parametrize("flags, line", [
    # a storage file that is not there was created, empty, then said to hold no study
    (["--storage", "sqlite:///{t}/missing.db"], "--storage sqlite:///{t}/missing.db: there is no "
     "file {t}/missing.db; pass the study.db of a run folder, or --out DIR"),
    # a stage study exported something; an unknown name did not say which studies there are
    (["--out", "{a}", "--study", "legacy-gmm:refine"], "legacy-gmm:refine is a stage of study "
     "legacy-gmm: export --study legacy-gmm (--trial N picks any trial of either stage)"),
    (["--out", "{a}", "--study", "nope"], "no study named 'nope' in sqlite:///{a}/study.db; it "
     "holds legacy-gmm, other"),
])
def test_export_names_a_storage_or_study_that_is_not_there(two_studies, capsys, tmp_path, flags,
                                                           line):
    from schedsearch.cli import main

    a, _ = two_studies
    fill = dict(t=tmp_path, a=a)
    argv = ["export", "--name", "x", "--to", str(tmp_path / "x.json"),
            *[f.format(**fill) for f in flags]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"schedsearch export: error: {line.format(**fill)}"]
    assert not (tmp_path / "missing.db").exists() and not (tmp_path / "x.json").exists()


def test_the_studys_export_refuses_a_clash_with_a_warning_and_keeps_its_own_file(two_studies,
                                                                                tmp_path):
    from types import SimpleNamespace

    from schedsearch.report import export_preset, recommended_preset
    from schedsearch.study import RunOptions

    pick = {"key": "best", "fid": 1.0, "fid_heldout": 2.0, "kid_heldout": 0.1}
    best = SimpleNamespace(number=3, params={})
    ctx = SimpleNamespace(provenance=lambda: presets.provenance(model="gmm"))

    def export(out, study):
        opts = RunOptions(out=tmp_path / out, progress=False)
        written = export_preset(recommended_preset(pick, presets.load("ays-sd15-5"), best, ctx,
                                                   opts, study), opts)
        assert presets.read(written["preset"]).provenance["study"] == study   # always written
        return written

    shipped = export("x", "sd15-5")
    assert "user_preset" not in shipped and "is the name of a shipped preset" in shipped["warning"]
    assert not (tmp_path / "presets" / "sd15-5.json").exists()
    first = export("x", "mine")
    assert first["user_preset"] == str(tmp_path / "presets" / "mine.json")
    assert "warning" not in first
    # the same study again replaces its own export; the same name from another run folder does not
    assert "warning" not in export("x", "mine")
    other = export("z", "mine")
    assert other["warning"].startswith("preset not copied to the user preset folder: a user preset "
                                       "named 'mine' from study 'mine' of sqlite:///")
    assert other["warning"].endswith(f"the study's preset is in {other['preset']}")
    assert "user_preset" not in other


@pytest.mark.parametrize("change, message", [
    ({"provenance": [1, 2]}, "provenance must be a JSON object, got [1, 2]"),
    ({"guidance": True}, "guidance must be a number in (0, 100), got True"),
    ({"nfe": "8"}, "says nfe = '8' but its σ list and solver spend 8"),
    ({"sigmas": [float("inf"), 3.0, 0.5, 0.0], "nfe": 3},
     "family sd15 is a DDPM-trained model's, whose σ list starts at a finite σ_max; this one "
     "starts at ∞ (a flow model's)"),
])
def test_inconsistent_preset_files_are_refused(two_studies, tmp_path, capsys, change, message):
    """Each was read: a list provenance crashed `run` at its very end (and export), true ran as
    guidance 1, "8" was refused as if 8 ≠ 8, an SD preset from ∞ was called a flow one."""
    d = presets.load("sd15-8").to_json()
    d.update(name="odd", **change)
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError) as exc:
        presets.read(path)
    assert str(exc.value) == f"{path}: {message}"
    # in the user preset folder, an export of that name is refused in one line, the file kept
    user = tmp_path / "presets" / "odd.json"
    user.parent.mkdir()
    shutil.copy(path, user)
    rc, err = _export(capsys, two_studies[0], "legacy-gmm", "odd")
    assert rc == 2 and len(err) == 1 and "a user preset named 'odd' from an unreadable file" in err[0]
    assert user.read_bytes() == path.read_bytes()


def test_a_preset_name_wins_over_a_file_or_folder_of_that_name_here(tmp_path, monkeypatch):
    """A folder sd15-5 (or a run folder named like its study's preset) in the working directory
    made `presets show sd15-5` fail; a shipped name always means the shipped preset."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SCHEDSEARCH_PRESETS", str(tmp_path / "presets"))
    (tmp_path / "sd15-5").mkdir()
    assert presets.load("sd15-5").sigmas.tolist() == schedules.paper_preset("sd15-5").tolist()
    # a name that is no preset still loads as a path, with or without .json
    d = presets.load("sd15-8").to_json()
    d["name"] = "here"
    (tmp_path / "here").write_text(json.dumps(d))
    assert presets.load("here").name == "here"


def test_export_without_trial_is_the_star_row_even_a_baseline(tmp_path, capsys, monkeypatch):
    """`export` without --trial took the best trial although the study recommended a baseline (the
    ★ row, which `run` wrote), and replaced run's user preset with it; a trial's export lacked
    the run's model fingerprint and prompt sets."""
    from schedsearch.cli import main

    monkeypatch.setenv("SCHEDSEARCH_PRESETS", str(tmp_path / "presets"))
    monkeypatch.delenv("SCHEDSEARCH_DEBUG", raising=False)
    out = tmp_path / "run"
    assert main(["run", "--model", "gmm", "--budget", "4", "--trials", "3", "--n-search", "32",
                 "--n-heldout", "32", "--out", str(out), "--no-progress",
                 "--no-user-preset"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    ran = presets.read(out / "gmm-4nfe.preset.json")
    # this seed's study keeps AYS: no searched schedule beat it on the validation seeds
    assert summary["recommended"] == "ays"
    rc, _ = _export(capsys, out, "gmm-4nfe", "mine", "--to", str(tmp_path / "mine.json"))
    assert rc == 0
    got = presets.read(tmp_path / "mine.json")
    assert (got.sigmas.tolist(), got.solver, got.freeu) == (ran.sigmas.tolist(), ran.solver,
                                                            ran.freeu)
    assert got.provenance["baseline"] == "ays" and got.name == "mine"
    for key in ("model_fingerprint", "prompts", "heldout", "scores", "study", "storage"):
        assert got.provenance[key] == ran.provenance[key], key
    rc, _ = _export(capsys, out, "gmm-4nfe", "t", "--trial", str(summary["best_trial"]),
                    "--to", str(tmp_path / "t.json"))
    trial = presets.read(tmp_path / "t.json")
    assert rc == 0 and trial.provenance["trial"] == summary["best_trial"]
    assert trial.sigmas.tolist() != got.sigmas.tolist()
    assert trial.provenance["model_fingerprint"] == ran.provenance["model_fingerprint"]


def test_a_flow_presets_timesteps_are_the_models_and_show_needs_no_guidance(tmp_path, capsys):
    """A flow preset's JSON carried SD-table timesteps ([999, 575.8, ...] for 1000·t = [1000,
    677.1, ...]); `presets show` died on a preset without guidance (an optional field)."""
    from schedsearch.cli import main

    flow = presets.Preset("f", "gmm-flow", [float("inf"), 2.097, 0.770, 0.152, 0.0], "euler")
    assert flow.to_json()["timesteps"] == pytest.approx(
        [1000.0, 1000 * 2.097 / 3.097, 1000 * 0.770 / 1.770, 1000 * 0.152 / 1.152], rel=1e-12)
    sd = presets.load("sd15-8")
    assert sd.to_json()["timesteps"] == schedules.timesteps(sd.sigmas).tolist()
    path = tmp_path / "f.json"
    path.write_text(json.dumps(flow.to_json()))
    assert main(["presets", "show", str(path)]) == 0
    assert capsys.readouterr().out.startswith(
        "f: gmm-flow, 4 NFE, euler, guidance the model's default")
