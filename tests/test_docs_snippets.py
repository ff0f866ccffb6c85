"""The Python snippets in README and docs/ run as written and print what their comments say, and
every ``schedsearch`` command in their shell blocks is one the CLI accepts.

A snippet that needs a real model (a hub id on CUDA) runs on the tiny offline pipeline of the same
class instead, with only its ``pipe = ...`` line left out; every other line is the document's.
Not run: docs/scoring.md's noise measurement (36 × 200 images, minutes) and its paired-bootstrap
sketch (its features are the prose's), and docs/solvers.md's one-line call signature.
"""

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
from PIL import Image

from tiny import tiny_sd3_pipeline, tiny_sd_pipeline

ROOT = Path(__file__).resolve().parent.parent


def snippet(doc: str, containing: str) -> str:
    """The one ```python block of ``doc`` whose code contains ``containing``."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / doc).read_text(encoding="utf-8"), re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"{doc}: {len(found)} python blocks contain {containing!r}"
    return found[0]


def run(code: str, **names) -> dict:
    scope = dict(names)
    exec(compile(code, "<snippet>", "exec"), scope)
    return scope


@pytest.fixture(scope="module")
def sd_pipe():
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_readme_generate_snippet(sd_pipe):
    code = snippet("README.md", "schedsearch.generate(pipe")
    lines = code.splitlines()
    kept = [line for line in lines if not line.startswith("pipe = ")]
    assert len(kept) == len(lines) - 1   # only the model line is swapped
    images = run("\n".join(kept), pipe=sd_pipe)["images"]
    assert len(images) == 1 and isinstance(images[0], Image.Image)


def test_the_readme_diffusers_scheduler_snippet(sd_pipe):
    """As written it used ``schedsearch.load_preset`` without importing schedsearch."""
    from schedsearch.diffusers import PresetScheduler

    original = sd_pipe.scheduler
    try:
        scope = run(snippet("README.md", "PresetScheduler.from_preset(preset"), pipe=sd_pipe)
        assert isinstance(sd_pipe.scheduler, PresetScheduler) and sd_pipe.scheduler.nfe == 5
    finally:
        sd_pipe.scheduler = original
    assert isinstance(scope["image"], Image.Image) and scope["preset"].name == "sd15-5"


def test_the_readme_flow_euler_snippet():
    from schedsearch import schedules
    from schedsearch.models.diffusers_flow import from_flow_pipeline
    from schedsearch.presets import Preset

    pipe = tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    spec = {"name": "knots", "fractions": [0.3, 0.2, 0.4], "end": "zero"}
    table = from_flow_pipeline(pipe, height=64, width=64).table
    preset = Preset(name="flow-euler", family="any", sigmas=schedules.build(spec, table),
                    solver="euler", guidance=4.0, schedule=spec)
    scope = run(snippet("README.md", "flow_euler_sigmas(preset)"), pipe=pipe, preset=preset,
                prompt="a red cat")
    assert isinstance(scope["image"], Image.Image)
    assert pipe.scheduler.config.use_dynamic_shifting is False and pipe.scheduler.config.shift == 1


def test_the_conventions_round_trip_gaps_are_the_ones_printed():
    code = snippet("docs/conventions.md", "SD.sigma_to_t(SD.t_to_sigma(t))")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run(code)
    claimed = re.search(r"#\s*([\d. ]+)$", code.strip()).group(1).split()
    assert [f"{float(v):.3f}" for v in printed.getvalue().split()] == claimed


def test_the_freeu_plan_snippet_turns_on_where_its_comment_says():
    code = snippet("docs/freeu.md", "FreeUPlan.from_start(")
    scope = run(code)
    first = next(line for line in code.splitlines() if "from_start(" in line)
    plan = eval(first.split("#")[0], scope)
    claimed = first.split("#")[1].replace(" ", "").split(",")
    assert ["on" if s is not None else "off" for s in plan.steps] == claimed


def test_the_scorer_snippet():
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        scope = run(snippet("docs/scoring.md", "scorer = Scorer("))
    res = scope["res"]
    assert res.fid > 0 and sorted(res.fid_at) == [64, 128, 256] and printed.getvalue()


def shell_commands(doc: Path) -> list[str]:
    """The ``schedsearch`` command lines of a document's shell blocks (```bash, ```sh or a bare
    ```), continuations joined, comments, pipes and redirections cut, optional ``[...]`` kept."""
    commands, block = [], None
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            if block is None:
                block, lang = [], line[3:].strip()
            else:
                if lang in ("", "bash", "sh"):
                    text = re.sub(r"\\\n\s*", " ", "\n".join(block))
                    for line in text.splitlines():
                        if re.match(r"\s*\S+ \S+: ", line):   # an error line shown, not run
                            continue
                        for part in re.split(r"\s*(?:&&|;)\s*", re.split(r"\s+#", line)[0]):
                            m = re.match(r"\s*(?:\.venv/bin/)?(schedsearch(?:\s.*)?)$", part)
                            if m:
                                cut = re.split(r"\s*(?:\||>)\s*", m.group(1))[0]
                                commands.append(cut.replace("[", "").replace("]", "").strip())
                block = None
        elif block is not None:
            block.append(line)
    return commands


def assert_parses(cmd: str, where: str) -> None:
    """``cmd`` is a command the CLI accepts: known flags, a command that runs something."""
    from schedsearch.cli import build_parser

    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            args, extra = build_parser().parse_known_args(shlex.split(cmd)[1:])
        except SystemExit:
            pytest.fail(f"{where}: `{cmd}`: {err.getvalue().strip().splitlines()[-1]}")
    assert not extra and getattr(args, "handler", None), f"{where}: `{cmd}`: {extra}"


@pytest.mark.parametrize("doc", ["README.md", *sorted(p.name for p in (ROOT / "docs").glob("*.md"))])
def test_every_documented_command_parses(doc):
    """A renamed or removed flag leaves no command in the docs that the CLI would refuse."""
    path = ROOT / doc if doc == "README.md" else ROOT / "docs" / doc
    for cmd in shell_commands(path):
        assert_parses(cmd, doc)


def test_the_command_scan_reads_every_shell_block():
    """The scan finds the README's commands (a parse of nothing would pass the test above)."""
    found = shell_commands(ROOT / "README.md")
    assert "schedsearch run --budget 5" in " ".join(found) and len(found) >= 15
    assert any(c.startswith("schedsearch export --name mine") for c in found)


def test_every_help_example_parses():
    """The examples under each command's --help are commands the CLI accepts too."""
    import argparse

    from schedsearch.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    examples = [re.split(r"\s+#|\s*(?:\||>)\s*", line.strip())[0]
                for command in sub.choices.values()
                for line in re.sub(r"\\\n\s*", " ", command.epilog or "").splitlines()
                if line.strip().startswith("schedsearch ")]
    assert len(examples) >= 20
    for cmd in examples:
        assert_parses(cmd, "--help example")
