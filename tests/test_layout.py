"""The house plan, checked from the source alone (``ast``: no framework is imported):
every backend package has the same files in the same roles, and the import graph of
``common`` and the backends has no cycle and keeps the library free of the application."""
from __future__ import annotations

import ast
import re
import subprocess
import tokenize
from pathlib import Path

import pytest

from common import ROOT
from common.backend import BACKENDS, capabilities

PACKAGES = ("common", *BACKENDS.values())
BACKEND_FILES = {"__init__.py", "_framework.py", "_model.py", "_trainer.py"}
TRAINING_FILES = {"_trainer.py", "_plain.py"}  # the optimizer step; the book's own code, bench --baseline's yardstick
OPTIONAL_BACKEND_FILES = {"_layers.py"}  # only where the framework lacks a layer
# The library part: what a user's own script builds on. It never imports the application part
# (the CLI, bench, plots, the training loop's files and reports), so it stays small and importable alone.
LIBRARY = {"common", "common.errors", "common.spec", "common.shapes", "common.weights", "common.reference", "common.parity",
           "common.backend", "common.io", "common.report", "common.data", "common.machine", "common.zoo",
           "common.images", "common.replicas", "common.divergence"}
APPLICATION = {"common.train", "common.plots", "common.cli", "common.cli_args", "common.bench",
               "common.bench_worker", "common.__main__", "common.launch"}


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            files[name] = path
    return files


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (module level and inside functions alike)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules, ignoring the edge from a submodule to its own package
    (Python runs ``package/__init__`` first: that edge is no cycle of the code's making)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if node.startswith(target + "."):
                continue
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["common.backend"] = graph["common.backend"] | {"common.train"}  # the cycle this project once had
    graph["common.train"] = graph["common.train"] | {"common.backend"}
    cycle = find_cycle(graph)
    assert cycle is not None and {"common.backend", "common.train"} <= set(cycle)


def test_the_library_never_imports_the_application():
    graph = import_graph()
    assert set(graph) >= LIBRARY - {"common.data"} and APPLICATION <= set(graph)
    library = {name for name in graph if name in LIBRARY or name.startswith("common.data.")}
    offending = {name: sorted(graph[name] & APPLICATION) for name in library if graph[name] & APPLICATION}
    assert not offending, offending
    unclassified = {name for name in graph if name.startswith("common")} - library - APPLICATION
    assert not unclassified, f"classify these as library or application in this test: {sorted(unclassified)}"


@pytest.mark.parametrize("name", list(BACKENDS))
def test_backend_packages_have_the_same_files(name):
    files = {path.name for path in (ROOT / BACKENDS[name]).glob("*.py")}
    expected = BACKEND_FILES | TRAINING_FILES if capabilities(name).trains else BACKEND_FILES - TRAINING_FILES
    assert expected <= files and not files - expected - OPTIONAL_BACKEND_FILES, sorted(files)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_a_backend_face_holds_no_logic(name):
    """``__init__.py`` is the face: imports, CAPABILITIES and the public names; no def, class, if or loop."""
    tree = ast.parse((ROOT / BACKENDS[name] / "__init__.py").read_text())
    allowed = (ast.Import, ast.ImportFrom, ast.Assign, ast.Expr)
    logic = [type(node).__name__ for node in tree.body if not isinstance(node, allowed)]
    assert not logic, logic


@pytest.mark.parametrize("name", list(BACKENDS))
def test_common_names_no_backend(name):
    """What differs per framework is in the records: common never branches on a backend's name."""
    for path in (ROOT / "common").rglob("*.py"):
        text = path.read_text()
        for needle in (f'== "{name}"', f'NAME == "{name}"', f"backend == '{name}'"):
            assert needle not in text, f"{path.relative_to(ROOT)} branches on backend {name!r}"


# Where a backend may be named: its registry line, the package list and extra, the setup and GPU scripts,
# and the documentation. Everything else reads the registry and the records.
NAMING_ALLOWED = ("common/backend.py", "pyproject.toml", "scripts/", "docs/", "README.md", "mkdocs.yml")


def tracked_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:  # an installed package, not a checkout: nothing to check
        pytest.skip("not a git checkout")
    return [name for name in listed.stdout.splitlines() if (ROOT / name).is_file()]


def naming(name: str) -> re.Pattern:
    """A backend named in code: its name quoted, or its package."""
    return re.compile(rf"""(["']{name}["']|\b{BACKENDS[name]}\b)""")


@pytest.mark.parametrize("name", list(BACKENDS))
def test_no_file_of_common_but_the_registry_names_a_backend(name):
    offending = [path for path in tracked_files() if path.startswith("common/") and path.endswith(".py")
                 and path != "common/backend.py" and naming(name).search((ROOT / path).read_text())]
    assert not offending, f"{offending} name backend {name!r}: read the registry or the record instead"


def test_no_file_of_common_types_a_list_of_backends():
    """A list of backend names written out in common (a metavar, a help text) goes stale with the next
    backend: such lists are made from the registry."""
    typed = re.compile(r"\b(" + "|".join(BACKENDS) + r")(,\s?(" + "|".join(BACKENDS) + r")){2,}\b")
    offending = [f"{path}: {match.group(0)}" for path in tracked_files() if path.startswith("common/")
                 and path.endswith(".py") for match in typed.finditer((ROOT / path).read_text())]
    assert not offending, offending


# Where the backends that predate the house plan are still named in code outside their own places: tests
# that take one as their example or check what only it does, beside its own module. A debt to pay down
# (each such test reads the registry or moves into tests/test_backend_NAME.py), never to grow: a backend
# added since (jax) is named nowhere but its package, its test module and NAMING_ALLOWED.
NAMED_BEFORE_THE_HOUSE = {
    "pt": {"benchmarks/profile_pt.py", "tests/test_backend_onnx.py", "tests/test_bad_inputs.py", "tests/test_bench.py",
           "tests/test_cli.py", "tests/test_device.py", "tests/test_download.py", "tests/test_evaluate_images.py",
           "tests/test_export.py", "tests/test_images.py", "tests/test_parity_mutations.py",
           "tests/test_reference.py", "tests/test_replicas.py", "tests/test_train.py", "tests/test_zoo.py"},
    "tf": {"tests/replica_worker.py", "tests/test_bad_inputs.py", "tests/test_bench.py", "tests/test_cli.py",
           "tests/test_export.py", "tests/test_parity_mutations.py", "tests/test_replicas.py", "tests/test_zoo.py"},
    "mx": {"tests/replica_worker.py", "tests/test_bad_inputs.py", "tests/test_bench.py", "tests/test_cli.py",
           "tests/test_device.py", "tests/test_export.py", "tests/test_replicas.py",
           "tests/test_zoo.py", "tests/test_zoo_fetch.py"},
    "onnx": {"tests/test_bad_inputs.py", "tests/test_bench.py", "tests/test_export.py", "tests/test_parity.py"},
}


def names_in_code(path: Path, name: str) -> bool:
    """Whether Python code names backend ``name``: its package as a name, or its name as a whole string
    (prose in docstrings and comments does not count)."""
    with open(path, "rb") as source:
        for token in tokenize.tokenize(source.readline):
            if token.type == tokenize.NAME and token.string == BACKENDS[name]:
                return True
            if token.type == tokenize.STRING and token.string in (f'"{name}"', f"'{name}'"):
                return True
    return False


@pytest.mark.parametrize("name", list(BACKENDS))
def test_a_backend_is_one_folder_named_only_in_its_own_places(name):
    """Adding a backend is its package, its test module, one registry line and one extra: no other code
    names it (the docs, scripts and pyproject.toml may)."""
    own = (BACKENDS[name] + "/", f"tests/test_backend_{name}.py", "tests/test_layout.py", *NAMING_ALLOWED)
    named = {path for path in tracked_files() if path.endswith(".py") and not path.startswith(own)
             and names_in_code(ROOT / path, name)}
    assert named <= NAMED_BEFORE_THE_HOUSE.get(name, set()), \
        f"{sorted(named - NAMED_BEFORE_THE_HOUSE.get(name, set()))} name backend {name!r}: read the registry instead"


def test_the_code_naming_check_tells_code_from_prose(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text('"""Like alexnet_pt, this module ..."""\n# the "pt" backend\nx = 1\n')
    assert not names_in_code(planted, "pt")
    planted.write_text('"""Prose."""\nbackend = load_backend("pt")\n')
    assert names_in_code(planted, "pt")
    planted.write_text("import alexnet_mx\n")
    assert names_in_code(planted, "mx") and not names_in_code(planted, "pt")


def test_the_naming_check_finds_a_planted_name(tmp_path):
    planted = "if backend == 'mx':\n    import alexnet_mx\n"
    assert naming("mx").search(planted) and not naming("pt").search(planted)


MACHINE_NAMES = re.compile(r"\b(H100|H200|A100|V100|Xeon|EPYC|Ryzen|Zen ?\d)\b")
FIGURES = re.compile(r"\d+(\.\d+)?\s?(img/s|images/s|[GT]FLOP/s|ms)\b|[+-]\d+(\.\d+)?%|\b\d+(\.\d+)?x (faster|slower)")


def docstrings(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node)
            if text:
                yield getattr(node, "name", path.name), text


def stale_notes(path: Path) -> list[str]:
    """Figures and machine names in a module's docstrings: they belong in docs/notes.md (they go stale in code)."""
    return [f"{path}:{name}: {match.group(0)!r}" for name, text in docstrings(path)
            for pattern in (MACHINE_NAMES, FIGURES) for match in pattern.finditer(text)]


def test_docstrings_hold_no_figures_or_machine_names():
    """Docstrings say what and why; measurements live in docs/ (the book's plain code is a copy, exempt)."""
    found = [note for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
             if path.name != "_plain.py" for note in stale_notes(path)]
    assert not found, "\n".join(found)


def test_the_stale_note_check_finds_a_planted_figure(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text('"""Measured on an NVIDIA H200: +26% training, 17,000 img/s."""\n\n\ndef f():\n    """On a Xeon."""\n')
    assert len(stale_notes(planted)) == 4
