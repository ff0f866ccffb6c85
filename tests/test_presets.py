import json
import subprocess
import sys

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


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(sigmas=[1.0, 2.0, 0.0]), "strictly decreasing"),
    (lambda d: d.update(solver="lms"), "solver must be one of"),
    (lambda d: d.update(nfe=9), "says nfe = 9 but its σ list and solver spend 5"),
    (lambda d: d.update(schema="other/2"), "unknown preset schema"),
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


def test_user_presets_are_listed_and_shadow_shipped(tmp_path, monkeypatch):
    monkeypatch.setenv("SCHEDSEARCH_PRESETS", str(tmp_path))
    p = presets.load("sd15-8")
    p.provenance = {"note": "mine"}
    p.save(tmp_path / "sd15-8.json")
    assert presets.load("sd15-8").provenance == {"note": "mine"}
    out = subprocess.run([sys.executable, "-m", "schedsearch", "presets", "list"], capture_output=True,
                         text=True, check=True, env={**__import__("os").environ}).stdout
    assert str(tmp_path / "sd15-8.json") in out and "ays-sdxl-5" in out


def test_cli_show_formats():
    run = lambda *a: subprocess.run([sys.executable, "-m", "schedsearch", "presets", "show", *a],  # noqa: E731
                                    capture_output=True, text=True, check=True).stdout
    data = json.loads(run("sd15-5", "--format", "json"))
    assert data["nfe"] == 5 and data["freeu"]["variant"] == "original"
    comfy = [float(v) for v in run("sd15-5", "--format", "comfy").split(",")]
    assert comfy[0] == pytest.approx(14.614641) and comfy[-1] == pytest.approx(0.132002)
    assert "FreeU: original on steps [0, 1, 2, 3, 4]" in run("sd15-5")
