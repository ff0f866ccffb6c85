"""The package's shape, checked from its source: no import cycle (function-level imports
included), no function over 60 lines, every module opens with a sentence saying its job, and no
reference to documents outside the repository."""

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "schedsearch"
# The seeded training script of the digits testbed is a script, not library code.
LONG_FUNCTIONS_ALLOWED = {"schedsearch/models/digits_train.py"}
MAX_LINES = 60


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every schedsearch module ``name`` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # "from . import x" names a submodule, or else an attribute of the package
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod
                       for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def find_cycle(g: dict[str, set[str]]):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    g = graph()
    assert len(g) > 30
    # the graph sees function-level imports: the CLI reaches the study only inside a handler
    assert "schedsearch.study" in g["schedsearch.cli.run"]
    cycle = find_cycle(g)
    assert cycle is None, " → ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_layers_point_down():
    """The sampling core never imports the orchestration layer or the CLI."""
    g = graph()
    core = ["noise", "schedules", "solvers", "freeu", "sampler", "models", "teacher", "oss",
            "gits", "presets", "prompts", "metrics"]
    upper = {"schedsearch.study", "schedsearch.report", "schedsearch.slots", "schedsearch.space",
             "schedsearch.context", "schedsearch.config", "schedsearch.tracking",
             "schedsearch.baselines", "schedsearch.cli"}
    for name, deps in g.items():
        if any(name == f"schedsearch.{c}" or name.startswith(f"schedsearch.{c}.") for c in core):
            bad = {d for d in deps if d in upper or d.startswith("schedsearch.cli")}
            assert not bad, f"{name} imports {bad}"


def functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel in LONG_FUNCTIONS_ALLOWED:
            continue
        for fn in functions(ast.parse(path.read_text(encoding="utf-8"))):
            n = fn.end_lineno - fn.lineno + 1
            if n > MAX_LINES:
                long.append(f"{rel}:{fn.lineno} {fn.name} ({n} lines)")
    assert not long, "\n".join(long)


def test_every_module_says_its_job_first():
    for path in sorted(PACKAGE.rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        assert doc and doc.split("\n\n")[0].strip().endswith((".", ":")), path


def tracked_files():
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / f for f in out if (ROOT / f).is_file()]


# The name of the project's private design notes, which live outside this repository. Spelled in
# two pieces so that this test, the one file that must name it, does not itself read as a citation.
OUTSIDE_DOC = "SP" + "EC"


@pytest.mark.parametrize("word", [OUTSIDE_DOC, OUTSIDE_DOC + ".md"])
def test_no_reference_to_documents_outside_the_repository(word):
    hits = []
    for path in tracked_files():
        if path.suffix not in (".py", ".md", ".yaml", ".ipynb", ".toml", ".txt", ".json") or \
                path == Path(__file__).resolve():
            continue
        text = path.read_text(encoding="utf-8", errors="ignore")
        for i, line in enumerate(text.splitlines(), 1):
            if word in line.split() or f"{word} §" in line or f"({word}" in line:
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)
