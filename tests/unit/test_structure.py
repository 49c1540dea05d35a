"""The package's shape: no import cycles (module-level imports and imports inside functions alike), deepspeed
imported by one module only, and no production module importing the test suite."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"megalm": ROOT / "megalm", "megalm.kernels": ROOT / "kernels"}


def package_modules() -> dict[str, Path]:
    """Dotted module name -> file, for megalm/ and kernels/ (installed as megalm.kernels)."""
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imported_names(path: Path, module: str, is_package: bool):
    """Every dotted name an import statement in the file can bind, relative imports made absolute."""
    here = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def import_graph() -> dict[str, set]:
    modules = package_modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for target in imported_names(path, name, path.name == "__init__.py"):
            while target and target not in modules:          # a name inside a module: the module itself
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):   # own package: not a cycle
                graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set]) -> list | None:
    """One cycle as a list of modules (first == last), or None; iterative depth-first search."""
    state = {}                         # 1: on the current path, 2: finished
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            step = next(stack[-1], None)
            if step is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(step) == 1:
                return path[path.index(step):] + [step]
            elif step not in state:
                state[step] = 1
                path.append(step)
                stack.append(iter(sorted(graph[step])))
    return None


def test_the_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50 and "megalm.engine.deepspeed.engine" in graph
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_deepspeed_is_imported_by_one_module_and_nothing_imports_the_tests():
    importers, test_users = set(), set()
    for name, path in package_modules().items():
        names = set(imported_names(path, name, path.name == "__init__.py"))
        if any(n == "deepspeed" or n.startswith("deepspeed.") for n in names):
            importers.add(name)
        if any(n == "tests" or n.startswith("tests.") or n == "megalm.testing" for n in names):
            test_users.add(name)
    assert importers == {"megalm.engine.deepspeed.compat"}
    assert test_users == set()


def test_every_package_ships_in_the_wheel():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.relative_to(ROOT).parts[:-1]) for p in (ROOT / "megalm").rglob("__init__.py")}
    assert found - listed == set()


SHOW_KERNELS = """
import importlib.util, pathlib, sys
import megalm.kernels.attention
spec = importlib.util.find_spec("kernels")
regular = spec is not None and spec.origin not in (None, "namespace")
bare = pathlib.Path(spec.origin).resolve() if regular else "none"
print(bare, pathlib.Path(megalm.kernels.attention.__file__).resolve())
"""


def test_the_kernels_folder_never_shadows_the_pypi_kernels_package(tmp_path):
    """transformers imports the unrelated PyPI `kernels`; with the repository root first on sys.path (pytest,
    `python -m` in a checkout) our kernels/ must not be found in its place (CI failed on exactly that)."""
    import subprocess
    import sys

    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/__init__.py would make the folder `kernels`"
    for cwd in (ROOT, tmp_path):
        out = subprocess.run([sys.executable, "-c", SHOW_KERNELS], cwd=cwd, capture_output=True, text=True, check=True)
        bare, ours = out.stdout.split()
        assert bare == "none" or not Path(bare).is_relative_to(ROOT / "kernels"), (cwd, bare)
        assert Path(ours).is_relative_to(ROOT / "kernels"), (cwd, ours)
