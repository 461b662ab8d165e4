"""The layout the README promises, checked on the source (fast, no cluster).

The import layers themselves are import-linter's job (``lint-imports``, contract in
pyproject.toml); these tests check what a layer contract cannot say: no cycles at all, one home
for Slurm commands and submitit's internals, small modules and functions, a README that names
real modules.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
from functools import cache
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "hpcdl"
SCHEDULER = PACKAGE / "scheduler"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80

# Functions allowed to stay longer than MAX_FUNCTION_LINES, as "path::qualified.name": each
# entry needs a comment saying why splitting it would make it harder to read. Empty on purpose.
LONG_FUNCTIONS: dict[str, str] = {}

SLURM_COMMANDS = ("sbatch", "sacct", "squeue", "scancel", "scontrol", "sinfo")
# A string literal that *runs* a Slurm command: an argv element or the start of a command line
# ("scancel", "scancel 123", f"scontrol update ..."); prose in docstrings and comments is fine.
_COMMAND_LITERAL = re.compile(rf"^(?:{'|'.join(SLURM_COMMANDS)})(?:\s|$)")
# submitit's private API: its submission module, script renderer and job-folder layout.
_SUBMITIT_PRIVATE = re.compile(r"submitit\.core\._submit|_make_sbatch_string|_result\.pkl")


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _outside_scheduler() -> list[Path]:
    return [p for p in _modules() if SCHEDULER not in p.parents]


@cache
def _graph() -> grimp.ImportGraph:
    # cache_dir=None: no cache folder in the checkout; the graph takes about a second to build.
    # Imports under `if TYPE_CHECKING:` never run, so they cannot make an import-order cycle
    # (a protocol may name the concrete type it describes); lint-imports still counts them.
    return grimp.build_graph("hpcdl", cache_dir=None, exclude_type_checking_imports=True)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself
    (Tarjan's algorithm, iterative so deep import chains cannot hit the recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges.get(node, ()):
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_cycles():
    """The checker itself: a cycle, a self-import and a long chain back are all found."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert _cycles({"a": {"a"}}) == [["a"]]
    chain = {f"m{i}": {f"m{i + 1}"} for i in range(2000)} | {"m2000": {"m0"}}
    assert len(_cycles(chain)[0]) == 2001
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycles():
    """No hpcdl module imports, directly or through others, a module that imports it back
    (imports inside functions count too: a cycle there is only postponed)."""
    graph = _graph()
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    cycles = _cycles(edges)
    detail = []
    for component in cycles:
        members = set(component)
        for m in component:
            for other in sorted(edges[m] & members):
                lines = graph.get_import_details(importer=m, imported=other)
                where = ", ".join(f"l.{d['line_number']}" for d in lines)
                detail.append(f"  {m} -> {other} ({where})")
    assert not cycles, "import cycles:\n" + "\n".join(detail)


def test_no_import_cycles_counting_type_only_imports():
    """Issue 20's acceptance: no cycle even through ``if TYPE_CHECKING:`` imports (the sweep's
    protocol and trial once imported each other for types; the stop flag's protocol lives below
    both its readers, in hpcdl.preemption)."""
    graph = grimp.build_graph("hpcdl", cache_dir=None, exclude_type_checking_imports=False)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert _cycles(edges) == []


def _string_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, text) of every string constant except docstrings (f-string parts included)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def slurm_command_uses(source: str) -> list[str]:
    """Where a module that mentions ``subprocess`` names a Slurm command as a command."""
    if not re.search(r"\bsubprocess\b", source):
        return []
    return [
        f"l.{line}: {text!r}"
        for line, text in _string_literals(ast.parse(source))
        if _COMMAND_LITERAL.match(text)
    ]


@pytest.mark.parametrize(
    ("source", "flagged"),
    [
        ('import subprocess\nsubprocess.run(["sbatch", "x.sh"])', True),
        ('import subprocess\nsubprocess.run(("scontrol", "requeue", j))', True),
        ('import subprocess\nsubprocess.run(f"scancel {j}", shell=True)', True),
        ('import subprocess\nimport shutil\nshutil.which("sacct")', True),
        ('from subprocess import run\nrun(["squeue", "-h"])', True),
        ('import subprocess\nsubprocess.run(["sinfo"])', True),
        ('import subprocess\nsubprocess.run(["mpiexec", "-n", "2"])', False),
        ('subprocess_free = ["sbatch"]', False),  # no subprocess at all
        ('"""Calls sbatch through subprocess."""\nimport subprocess', False),  # docstring
        ('import subprocess  # sbatch is run elsewhere\nx = "sbatching"', False),
        ('import subprocess\nmsg = "the job was sbatch-ed"', False),
    ],
)
def test_slurm_command_detector(source, flagged):
    """The checker below, on small sources: it must catch every way a command is spelled."""
    assert bool(slurm_command_uses(source)) is flagged


def test_slurm_commands_run_only_in_the_scheduler_package():
    """No module outside hpcdl/scheduler/ runs sbatch/sacct/squeue/scancel/scontrol/sinfo."""
    found = {
        _rel(p): uses for p in _outside_scheduler() if (uses := slurm_command_uses(p.read_text()))
    }
    assert not found, "Slurm commands run outside hpcdl/scheduler/:\n" + json.dumps(found, indent=1)


def test_submitit_internals_only_in_the_scheduler_package():
    """Only hpcdl/scheduler/ imports submitit or names its private pieces (the issue pins
    submitit because of them: they may change in any minor release)."""
    found: dict[str, list[str]] = {}
    for path in _outside_scheduler():
        source = path.read_text()
        tree = ast.parse(source)
        hits = [
            f"l.{node.lineno}: imports submitit"
            for node in ast.walk(tree)
            if (
                isinstance(node, ast.Import)
                and any(a.name.split(".")[0] == "submitit" for a in node.names)
            )
            or (
                isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "submitit"
            )
        ]
        hits += [
            f"l.{line}: {text!r}"
            for line, text in _string_literals(tree)
            if _SUBMITIT_PRIVATE.search(text)
        ]
        if hits:
            found[_rel(path)] = hits
    assert not found, "submitit used outside hpcdl/scheduler/:\n" + json.dumps(found, indent=1)


def test_modules_are_small():
    long = {
        _rel(p): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def _functions(tree: ast.AST, prefix: str = "") -> list[tuple[str, ast.AST]]:
    """(qualified name, node) of every function, methods and nested functions included."""
    out = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            out.append((f"{prefix}{node.name}", node))
            out += _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            out += _functions(node, f"{prefix}{node.name}.")
        else:
            out += _functions(node, prefix)
    return out


def test_functions_are_short():
    """No function over MAX_FUNCTION_LINES lines (from ``def`` to its last line), unless it is
    in LONG_FUNCTIONS with a reason."""
    long = {}
    for path in _modules():
        for name, node in _functions(ast.parse(path.read_text())):
            n = node.end_lineno - node.lineno + 1
            key = f"{_rel(path)}::{name}"
            if n > MAX_FUNCTION_LINES and key not in LONG_FUNCTIONS:
                long[key] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_long_function_allow_list_is_current():
    """Every allow-listed function still exists and is still long (else drop its entry)."""
    stale = []
    for key in LONG_FUNCTIONS:
        path, _, name = key.partition("::")
        nodes = (
            dict(_functions(ast.parse((ROOT / path).read_text()))) if (ROOT / path).exists() else {}
        )
        node = nodes.get(name)
        if node is None or node.end_lineno - node.lineno + 1 <= MAX_FUNCTION_LINES:
            stale.append(key)
    assert not stale, f"stale LONG_FUNCTIONS entries: {stale}"


def _box_table() -> list[str]:
    """The rows of the README's "What is in the box" table."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## What is in the box\n(.*?)(?=^## )", text, re.M | re.S)
    assert m, "README.md has no '## What is in the box' section"
    rows = [ln for ln in m[1].splitlines() if ln.startswith("|") and not ln.startswith("|---")]
    assert len(rows) > 2, "the table is missing"
    return rows[1:]  # without the header


def _named_paths(row: str) -> list[str]:
    """Repository paths in a table row's code spans (``hpcdl/x.py``, ``site/*.yaml``, ``dir/``)."""
    spans = re.findall(r"`([^`]+)`", row)
    return [s for s in spans if "/" in s and " " not in s and not s.startswith("hpcdl ")]


def _named_objects(row: str) -> list[str]:
    """Dotted Python names in a row's code spans: ``hpcdl.Job``, ``hpcdl.data.stage``."""
    return re.findall(r"`(hpcdl(?:\.\w+)+)`", row)


def _named_functions(row: str) -> list[str]:
    """``name()`` code spans: functions the row says its modules define."""
    return re.findall(r"`(\w+)\(\)`", row)


def test_readme_box_table_parsing():
    row = "| x | `hpcdl/launch.py` (`init_distributed()`), `hpcdl.Job` | `hpcdl submit/render` |"
    assert _named_paths(row) == ["hpcdl/launch.py"]
    assert _named_objects(row) == ["hpcdl.Job"]
    assert _named_functions(row) == ["init_distributed"]


def test_readme_box_table_names_only_existing_modules():
    """Every path, module, object and function the table names exists (after a move, the table
    must follow the code)."""
    missing = []
    for row in _box_table():
        paths = _named_paths(row)
        for spec in paths:
            if not list(ROOT.glob(spec.rstrip("/"))):
                missing.append(spec)
        for dotted in _named_objects(row):
            module, _, attr = dotted.rpartition(".")
            try:
                found = hasattr(importlib.import_module(module), attr)
            except ImportError:
                found = False
            if not found:
                try:
                    importlib.import_module(dotted)
                    found = True
                except ImportError:
                    found = False
            if not found:
                missing.append(dotted)
        sources = [p for spec in paths for p in ROOT.glob(spec) if p.suffix == ".py"]
        for fn in _named_functions(row):
            if not any(re.search(rf"^def {fn}\(", p.read_text(), re.M) for p in sources):
                missing.append(f"{fn}() in {paths}")
    assert not missing, f"README 'What is in the box' names what does not exist: {missing}"
