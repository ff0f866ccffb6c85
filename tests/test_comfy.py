"""ComfyUI workflows from presets: every generated graph is checked node by node against ComfyUI's
own node declarations (tests/fixtures/comfy_nodes.json), the σ string is read back the way
ManualSigmas reads it, and each caveat line appears exactly when ComfyUI would differ."""

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from schedsearch import comfy, solvers
from schedsearch.freeu import FreeU, FreeUPlan
from schedsearch.noise import SD
from schedsearch.presets import SHIPPED_DIR, Preset, read

FIXTURE = Path(__file__).parent / "fixtures" / "comfy_nodes.json"
WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


@pytest.fixture(scope="module")
def defs():
    return json.loads(FIXTURE.read_text(encoding="utf-8"))["nodes"]


# -- the validator: what ComfyUI's validate_prompt / validate_inputs check, and a little more ----
def _check_link(wf, defs, value, decl) -> str | None:
    if (len(value) != 2 or not isinstance(value[0], str) or isinstance(value[1], bool)
            or not isinstance(value[1], int)):
        return f"bad link {value!r}: must be [node_id, output_index]"
    source = wf.get(value[0])
    if not isinstance(source, dict) or source.get("class_type") not in defs:
        return f"link to a missing or unknown node {value[0]!r}"
    outputs = defs[source["class_type"]]["outputs"]
    if not 0 <= value[1] < len(outputs):
        return f"link to output {value[1]} of {source['class_type']}, which has {len(outputs)}"
    if outputs[value[1]]["type"] != decl["type"]:
        return f"link type {outputs[value[1]]['type']} != {decl['type']}"
    return None


def _check_widget(value, decl) -> str | None:
    kind = decl["type"]
    if kind not in WIDGETS:
        return f"a {kind} input needs a link, got {value!r}"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {"INT": isinstance(value, int) and not isinstance(value, bool), "FLOAT": number,
          "STRING": isinstance(value, str), "BOOLEAN": isinstance(value, bool),
          "COMBO": isinstance(value, str)}[kind]
    if not ok:
        return f"{value!r} is not a {kind}"
    if kind == "COMBO" and "choices" in decl and value not in decl["choices"]:
        return f"{value!r} is not one of the choices"
    if number and ("min" in decl and value < decl["min"] or "max" in decl and value > decl["max"]):
        return f"{value!r} is outside [{decl.get('min')}, {decl.get('max')}]"
    return None


def validate(wf, defs) -> list[str]:
    if not isinstance(wf, dict) or not wf:
        return ["a workflow must be a non-empty object"]
    errors, outputs = [], 0
    for nid, node in wf.items():
        if not isinstance(node, dict) or "class_type" not in node:
            errors.append(f"{nid}: not a node (ComfyUI: 'a node is missing the class_type')")
            continue
        extra = set(node) - {"class_type", "inputs", "_meta"}
        if extra:
            errors.append(f"{nid}: unexpected keys {sorted(extra)}")
        spec = defs.get(node["class_type"])
        if spec is None:
            errors.append(f"{nid}: unknown node class {node['class_type']!r}")
            continue
        outputs += spec["output_node"]
        inputs = node.get("inputs", {})
        declared = {**spec["required"], **spec["optional"]}
        errors += [f"{nid}: required input {k!r} missing"
                   for k in spec["required"] if k not in inputs]
        for name, value in inputs.items():
            if name not in declared:
                errors.append(f"{nid}: unknown input {name!r}")
                continue
            check = _check_link if isinstance(value, list) else _check_widget
            problem = (check(wf, defs, value, declared[name]) if isinstance(value, list)
                       else check(value, declared[name]))
            if problem:
                errors.append(f"{nid}.{name}: {problem}")
    if outputs == 0:
        errors.append("no output node")
    return errors


# -- helpers ---------------------------------------------------------------------------------------
def _on_grid(ts, end=0.0):
    return [float(SD.sigmas[t]) for t in ts] + [end]


GRID = _on_grid([900, 700, 500, 300, 100])                     # whole timesteps, σ₀ < σ_max
GRID_ABOVE = _on_grid([900, 700, 500, 300, 100], float(SD.sigmas[20]))
PAPERISH = [14.614641229333639, 4.518847005558466, 1.9615401191449076, 1.0009841260660335,
            0.5015149255496912, 0.0]
A = FreeU(1.1, 1.1, 0.9, 0.2)


def make(sigmas=GRID, solver="dpmpp_2m", freeu=None, guidance=5.5, family="sd15", name="t"):
    return Preset(name=name, family=family, sigmas=sigmas, solver=solver, freeu=freeu,
                  guidance=guidance)


def node_of(wf, class_type):
    found = [n for n in wf.values() if n["class_type"] == class_type]
    assert len(found) <= 1
    return found[0] if found else None


def assert_sigmas_read_back(wf, preset):
    text = node_of(wf, "ManualSigmas")["inputs"]["sigmas"]
    assert not re.search(r"[eE]", text), "ManualSigmas' regex has no exponents"
    parsed = comfy.parse_manual_sigmas(text)
    want = preset.sigmas.tolist()
    assert len(parsed) == len(want)
    for got, s in zip(parsed, want):  # 6 printed decimals, then float32
        assert abs(got - s) <= 5e-7 + 1.2e-7 * abs(s), (got, s)


def kinds(lines):
    """Which caveats a note list holds, by their fixed wording."""
    keys = {"solver": "solver ", "freeu": "FreeU", "start": "√(1+σ₀²)",
            "timestep": "whole timestep", "guidance": "sets no guidance",
            "resolution": "for any model"}
    return {k for k, key in keys.items() for line in lines if key in line}


# -- the fixture -----------------------------------------------------------------------------------
def test_fixture_records_comfyui_commits_and_sources():
    data = json.loads(FIXTURE.read_text(encoding="utf-8"))
    assert data["comfyui"]["repository"] == "comfyanonymous/ComfyUI"
    files = data["comfyui"]["files"]
    assert all(re.fullmatch(r"[0-9a-f]{40}", c) for c in files.values())
    for name, spec in data["nodes"].items():
        assert spec["source"] in files, name
        for decl in {**spec["required"], **spec["optional"]}.values():
            assert decl["type"] == decl["type"].upper()


def test_every_solver_has_a_comfyui_sampler(defs):
    assert set(solvers.SOLVERS) <= set(comfy.SAMPLERS)
    for s in comfy.SAMPLERS.values():
        assert s.node in defs
        errors = validate({"1": {"class_type": s.node, "inputs": s.inputs}}, defs)
        assert errors == ["no output node"], errors  # its own inputs are all valid


# -- shipped presets -------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(SHIPPED_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_shipped_presets(path, defs):
    preset = read(path)
    wf, lines = comfy.export(preset)
    assert validate(wf, defs) == []
    assert json.loads(json.dumps(wf)) == wf
    assert_sigmas_read_back(wf, preset)
    assert wf["8"]["inputs"]["samples"] == ["7", 0]  # the state at σ_end, not denoised_output
    # Expected caveats from the preset file itself: its timesteps field, σ₀ and FreeU plan.
    data = json.loads(path.read_text(encoding="utf-8"))
    expect = set()
    if any(abs(t - round(t)) > 1e-3 for t in data["timesteps"]):
        expect.add("timestep")
    if math.isclose(data["sigmas"][0], SD.sigma_max, rel_tol=1e-5):
        expect.add("start")
    steps = (data["freeu"] or {}).get("steps") or []
    if steps and (steps[0] is None or any(s != steps[0] for s in steps)):
        expect.add("freeu")
    assert kinds(lines) == expect, lines
    freeu = node_of(wf, "FreeU")
    if steps and "freeu" not in expect:
        assert freeu["inputs"] == {"model": ["1", 0], **steps[0]}
        assert wf["7"]["inputs"]["model"] == ["10", 0]
    else:
        assert freeu is None and wf["7"]["inputs"]["model"] == ["1", 0]


def test_paper_preset_sd15_5_in_detail(defs):
    wf, lines = comfy.export(read(SHIPPED_DIR / "sd15-5.json"), checkpoint="v1-5.safetensors",
                             prompt="a cat", seed=7)
    assert wf["5"]["inputs"]["sigmas"] == ("14.614641, 4.518847, 1.961540, 1.000984, 0.501515, "
                                           "0.132002")
    assert wf["6"] == {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"},
                       "_meta": {"title": "Sampler for dpmpp_1s"}}
    s = wf["7"]["inputs"]
    assert (s["cfg"], s["noise_seed"], s["add_noise"]) == (5.5, 7, True)
    assert wf["1"]["inputs"]["ckpt_name"] == "v1-5.safetensors"
    assert wf["4"]["inputs"] == {"width": 512, "height": 512, "batch_size": 1}
    assert wf["10"]["class_type"] == "FreeU"
    assert kinds(lines) == {"start", "timestep"}
    assert "0.23% more initial noise" in next(x for x in lines if "√" in x)


# -- solvers × where the σ list ends ---------------------------------------------------------------
@pytest.mark.parametrize("end", ["zero", "above"])
@pytest.mark.parametrize("solver", sorted(solvers.SOLVERS))
def test_each_solver_and_end(solver, end, defs):
    preset = make(GRID if end == "zero" else GRID_ABOVE, solver=solver)
    wf, lines = comfy.export(preset)
    assert validate(wf, defs) == []
    assert_sigmas_read_back(wf, preset)
    sampler = wf["6"]
    assert sampler["class_type"] == comfy.SAMPLERS[solver].node
    assert sampler["inputs"] == comfy.SAMPLERS[solver].inputs
    inexact = solver in ("unipc", "unipc_bh1", "ipndm") and end == "zero"
    assert (comfy.solver_caveat(preset) is not None) == inexact
    assert kinds(lines) == ({"solver"} if inexact else set()), lines


def test_sampler_names():
    names = {k: v.inputs.get("sampler_name") for k, v in comfy.SAMPLERS.items()}
    assert names["dpmpp_1s"] == names["euler"] == "euler"
    assert (names["heun"], names["dpmpp_2m"], names["unipc"], names["unipc_bh1"], names["ipndm"]) == (
        "heun", "dpmpp_2m", "uni_pc_bh2", "uni_pc", "ipndm")
    three = comfy.SAMPLERS["dpmpp_3m"]
    assert three.node == "SamplerDPMPP_3M_SDE" and three.inputs["eta"] == 0.0


@pytest.mark.parametrize("solver", [s for s in ("unipc", "unipc_bh1", "ipndm", "dpmpp_3m")
                                    if s in solvers.SOLVERS])
def test_one_step_lists_are_exact(solver, defs):
    preset = make([float(SD.sigmas[500]), 0.0], solver=solver)
    wf, lines = comfy.export(preset)
    assert validate(wf, defs) == [] and lines == []
    if solver.startswith("unipc"):  # ComfyUI's uni_pc never steps on one step; one UniPC step is DDIM
        assert wf["6"]["inputs"] == {"sampler_name": "euler"}


# -- FreeU plans of each shape ---------------------------------------------------------------------
FREEU_SHAPES = {
    "none": (None, False, False),
    "all-off": (FreeUPlan.off(5), False, False),
    "constant-original": (FreeUPlan.from_start(5, 0, A, "original"), True, False),
    "constant-diffusers": (FreeUPlan.from_start(5, 0, A, "diffusers"), True, True),
    "from-step-2": (FreeUPlan.from_start(5, 2, A, "original"), False, True),
    "per-step": (FreeUPlan.per_step([A, A, FreeU(1.3, 1.4, 0.9, 0.2), A, A], "original"), False,
                 True),
    "off-at-the-end": (FreeUPlan.per_step([A, A, A, A, None], "original"), False, True),
    "out-of-range": (FreeUPlan.from_start(5, 0, FreeU(12.0, 1.1, 0.9, 0.2), "original"), False,
                     True),
}


@pytest.mark.parametrize("shape", list(FREEU_SHAPES))
def test_freeu_plans(shape, defs):
    plan, has_node, caveat = FREEU_SHAPES[shape]
    preset = make(freeu=plan)
    wf, lines = comfy.export(preset)
    assert validate(wf, defs) == []
    freeu = node_of(wf, "FreeU")
    assert (freeu is not None) == has_node
    assert wf["7"]["inputs"]["model"] == (["10", 0] if has_node else ["1", 0])
    if has_node:
        assert freeu["inputs"] == {"model": ["1", 0], **plan.steps[0].as_dict()}
    assert (comfy.freeu_caveat(preset) is not None) == caveat
    assert kinds(lines) == ({"freeu"} if caveat else set()), lines


# -- each remaining caveat, on and off -------------------------------------------------------------
def test_clean_preset_has_no_notes():
    assert comfy.notes(make()) == []


def test_start_at_sigma_max():
    on = make(_on_grid([999, 700, 500, 300, 100]))
    assert kinds(comfy.notes(on)) == {"start"}
    just_below = make([SD.sigma_max * (1 - 1e-4)] + GRID[1:])
    assert "start" not in kinds(comfy.notes(just_below))


def test_fractional_timesteps():
    assert kinds(comfy.notes(make(PAPERISH[1:-1] + [0.0]))) == {"timestep"}
    # σ_end between timesteps matters only to Heun, the one solver that calls the model there.
    end_between = GRID[:-1] + [0.95 * GRID[-2]]
    assert "timestep" not in kinds(comfy.notes(make(end_between)))
    assert "timestep" in kinds(comfy.notes(make(end_between, solver="heun")))


def test_guidance_and_resolution_defaults():
    wf, lines = comfy.export(make(guidance=None))
    assert wf["7"]["inputs"]["cfg"] == 5.5 and kinds(lines) == {"guidance"}
    wf, lines = comfy.export(make(family="sdxl"))
    assert wf["4"]["inputs"]["width"] == 1024 and lines == []
    wf, lines = comfy.export(make(family="any"))
    assert wf["4"]["inputs"]["width"] == 512 and kinds(lines) == {"resolution"}
    wf, lines = comfy.export(make(family="any"), width=768, height=512)
    assert (wf["4"]["inputs"]["width"], wf["4"]["inputs"]["height"]) == (768, 512) and lines == []


# -- the σ string ----------------------------------------------------------------------------------
def test_sigma_string_is_what_manual_sigmas_reads():
    preset = make([14.6146412, 0.0291676, 0.001, 0.0])
    text = comfy.sigma_string(preset.sigmas)
    assert text == "14.614641, 0.029168, 0.001000, 0.000000"
    assert comfy.parse_manual_sigmas(text) == [float(np.float32(v)) for v in
                                               (14.614641, 0.029168, 0.001, 0.0)]
    with pytest.raises(ValueError, match="ManualSigmas"):
        comfy.sigma_string(make([1.0, 1e-7]).sigmas)


# -- the validator sees what ComfyUI would reject --------------------------------------------------
@pytest.mark.parametrize("break_it, message", [
    (lambda wf: wf.update({"_schedsearch": {"notes": []}}), "class_type"),
    (lambda wf: wf["7"]["inputs"].pop("sigmas"), "missing"),
    (lambda wf: wf["7"]["inputs"].update(steps=5), "unknown input"),
    (lambda wf: wf["8"]["inputs"].update(samples=["7", 2]), "output 2"),
    (lambda wf: wf["7"]["inputs"].update(sigmas=["4", 0]), "LATENT != SIGMAS"),
    (lambda wf: wf["6"]["inputs"].update(sampler_name="dpmpp_3m"), "choices"),
    (lambda wf: wf["7"]["inputs"].update(cfg=150.0), "outside"),
    (lambda wf: wf["7"]["inputs"].update(noise_seed="7"), "not a INT"),
    (lambda wf: wf["3"].update(class_type="CLIPTextEncodeSDXL"), "unknown node class"),
    (lambda wf: wf.pop("9"), "no output node"),
])
def test_validator_catches(break_it, message, defs):
    wf = comfy.workflow(make())
    assert validate(wf, defs) == []
    broken = copy.deepcopy(wf)
    break_it(broken)
    assert any(message in e for e in validate(broken, defs)), validate(broken, defs)


# -- arguments -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["digits", "gmm"])
def test_testbed_presets_have_no_workflow(family):
    preset = make(family=family)
    with pytest.raises(ValueError, match="testbed"):
        comfy.workflow(preset)
    with pytest.raises(ValueError, match="testbed"):
        comfy.notes(preset)


@pytest.mark.parametrize("kwargs", [{"seed": -1}, {"seed": 2 ** 64}, {"seed": True},
                                    {"width": 513}, {"height": 8}, {"width": 20000},
                                    {"width": 512.0}, {"checkpoint": " "}])
def test_bad_options(kwargs):
    with pytest.raises(ValueError):
        comfy.workflow(make(), **kwargs)


def test_save_prefix_stays_in_the_output_folder():
    prefix = comfy.workflow(make(name="../my preset/x"))["9"]["inputs"]["filename_prefix"]
    assert prefix.startswith("schedsearch/") and ".." not in prefix and prefix.count("/") == 1


def test_presets_show_prints_a_workflow_and_its_caveats(tmp_path):
    """The CLI: the workflow JSON on stdout (valid against the node fixture), each caveat as a
    `note:` line on stderr — sdxl-6's per-step FreeU plan has no stock node."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "schedsearch", "presets", "show", "sdxl-6",
                        "--format", "comfy-workflow", "--checkpoint", "dreamshaper.safetensors"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    workflow = json.loads(r.stdout)
    loaders = [n for n in workflow.values() if n["class_type"] == "CheckpointLoaderSimple"]
    assert loaders[0]["inputs"]["ckpt_name"] == "dreamshaper.safetensors"
    assert "FreeU" not in {n["class_type"] for n in workflow.values()}
    notes = [line for line in r.stderr.splitlines() if line.startswith("note: ")]
    assert notes and any("FreeU" in line for line in notes)


def test_presets_show_refuses_workflow_flags_without_a_workflow(capsys):
    """--checkpoint / --prompt only shape a workflow; with another format they used to be dropped
    silently. Now one line; without them the workflow still loads model.safetensors."""
    from schedsearch.cli import main

    for flags in (("--checkpoint", "a.safetensors"), ("--format", "json", "--prompt", "a cat")):
        assert main(["presets", "show", "sd15-5", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--format comfy-workflow" in err
        assert flags[-2] in err
    assert main(["presets", "show", "sd15-5", "--format", "comfy-workflow"]) == 0
    workflow = json.loads(capsys.readouterr().out)
    loaders = [n for n in workflow.values() if n["class_type"] == "CheckpointLoaderSimple"]
    assert loaders[0]["inputs"]["ckpt_name"] == "model.safetensors"


def test_sdxls_empty_negative_is_the_zero_embedding_as_in_schedsearch(defs):
    """schedsearch (and SDXL's pipeline, force_zeros_for_empty_prompt) runs the unconditional
    branch on zeros; CLIPTextEncode("") encodes the empty prompt, another branch, unannounced."""
    wf = comfy.workflow(read(SHIPPED_DIR / "ays-sdxl-5.json"))
    assert validate(wf, defs) == []
    assert wf["11"] == {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3", 0]},
                        "_meta": {"title": "SDXL's unconditional branch: zeros"}}
    assert wf["7"]["inputs"]["negative"] == ["11", 0]
    # a negative prompt of the user's is encoded as given; SD1.x's empty prompt too
    wf = comfy.workflow(read(SHIPPED_DIR / "ays-sdxl-5.json"), negative="blurry")
    assert "11" not in wf and wf["7"]["inputs"]["negative"] == ["3", 0]
    wf = comfy.workflow(read(SHIPPED_DIR / "sd15-5.json"))
    assert "11" not in wf and wf["7"]["inputs"]["negative"] == ["3", 0]


def test_numpy_integers_are_taken_and_written_as_json_integers():
    wf = comfy.workflow(make(), seed=np.int64(5), width=np.int64(512), height=np.int32(512))
    assert json.loads(json.dumps(wf))["7"]["inputs"]["noise_seed"] == 5
    with pytest.raises(ValueError, match="prompt must be a string, got None"):
        comfy.workflow(make(), prompt=None)


def test_brackets_in_prompts_are_text_not_comfyuis_emphasis():
    """ComfyUI weights '(word)' by 1.1 and '(word:1.5)' by 1.5 unless escaped; schedsearch and
    diffusers encode the brackets as text, so the workflow escapes them."""
    wf = comfy.workflow(make(), prompt="a (red) cat (on a mat:1.5)", negative="(blurry)")
    assert wf["2"]["inputs"]["text"] == r"a \(red\) cat \(on a mat:1.5\)"
    assert wf["3"]["inputs"]["text"] == r"\(blurry\)"
    assert comfy.workflow(make(), prompt="a red cat")["2"]["inputs"]["text"] == "a red cat"
