"""The layout holds: the networks live in shared/models/ and import nothing from the rest of the project."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "precompute", "train", "generate", "evaluate", "mmaudio_lora", "bench")


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function (relative imports resolved)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-node.level])
                names.add(f"{package}.{node.module}" if node.module else package)
            else:
                names.add(node.module)
    return names


def _project_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def test_models_import_only_models():
    models = _project_files("shared/models")
    assert len(models) >= 12
    offending = {str(path.relative_to(REPO)): sorted(name for name in _imported_modules(path)
                                                     if name.split(".")[0] in PACKAGES
                                                     and not name.startswith("shared.models"))
                 for path in models}
    assert {path: names for path, names in offending.items() if names} == {}


def test_no_network_is_defined_outside_models():
    """Every nn.Module class of the project is in shared/models/."""
    outside = []
    for path in _project_files(*PACKAGES):
        if "shared/models/" in str(path.relative_to(REPO)) + "/":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any("Module" in ast.unparse(base) or "nn." in ast.unparse(base)
                                                      for base in node.bases):
                outside.append(f"{path.relative_to(REPO)}:{node.name}")
    assert outside == []


def test_the_scan_sees_an_import_inside_a_function(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import torch\n\ndef load():\n    from shared.weights import require\n    return require\n")
    assert _imported_modules(probe) == {"torch", "shared.weights"}


# Which top-level packages each package may import (besides itself and shared/): the pipeline's order.
ALLOWED_STAGES = {"shared": set(), "precompute": set(), "train": set(), "generate": set(),
                  "evaluate": {"generate", "train"}, "mmaudio_lora": {"precompute", "train", "generate", "evaluate"},
                  "bench": {"precompute", "train", "generate", "evaluate", "mmaudio_lora"}}


def test_stages_import_only_what_stands_below_them():
    """shared/ imports no stage; precompute, train and generate never import each other; evaluate/
    stands above generate/ and nothing but the CLI (and the benches) imports it."""
    offending = {}
    for package, allowed in ALLOWED_STAGES.items():
        for path in _project_files(package):
            wrong = sorted(name for name in _imported_modules(path) if name.split(".")[0] in PACKAGES
                           and name.split(".")[0] not in allowed | {package, "shared"})
            if wrong:
                offending[str(path.relative_to(REPO))] = wrong
    assert offending == {}
    assert set(ALLOWED_STAGES) == set(PACKAGES)


def import_cycles(root: Path, folder: str) -> list[list[str]]:
    """Every circle among the modules under `root/folder`, top-level and function-level imports
    alike (`from shared import x` counts as importing shared.x when that is a module)."""
    modules = {".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): path
               for path in sorted((root / folder).rglob("*.py"))}
    edges = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imported_modules(path):
            if imported in modules:
                targets.add(imported)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in modules:
                targets.update(f"{node.module}.{alias.name}" for alias in node.names
                               if f"{node.module}.{alias.name}" in modules)
        edges[name] = targets - {name}
    cycles, state = [], {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    return cycles


def test_shared_has_no_import_circle(tmp_path):
    """No module of shared/ imports (at the top or inside a function) one that imports it back,
    directly or around a longer circle; the walk itself sees a circle where there is one."""
    assert import_cycles(REPO, "shared") == []
    package = tmp_path / "probe"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from probe.b import x\n")
    (package / "b.py").write_text("def f():\n    from probe import a\n")
    assert import_cycles(tmp_path, "probe") == [["probe.a", "probe.b", "probe.a"]]
