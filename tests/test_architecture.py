"""The shape of the package: imports flow one way, modules stay short, and docs/ARCHITECTURE.md maps them.

Every `import l2t...` / `from l2t... import` counts, at module level and inside
functions alike: a function-level import does not make a circle go away.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "l2t"
ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"

MAX_LINES = 450
MAX_RECIPE_LINES = 60


def modules() -> dict[str, Path]:
    return {path.stem: path for path in sorted(PACKAGE.glob("*.py"))}


def l2t_imports(path: Path, known: set[str]) -> set[str]:
    """The l2t modules `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("l2t.")}
        elif isinstance(node, ast.ImportFrom):
            module = "l2t" + ("." + node.module if node.module else "") if node.level else (node.module or "")
            if module == "l2t":
                found |= {alias.name for alias in node.names if alias.name in known}
            elif module.startswith("l2t."):
                found.add(module.split(".")[1])
    found.discard(path.stem)
    return found & known


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: l2t_imports(path, set(found)) for name, path in found.items()}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = "open"
        path.append(name)
        for dependency in sorted(graph.get(name, ())):
            if state.get(dependency) == "open":
                return path[path.index(dependency) :] + [dependency]
            if dependency not in state and (circle := visit(dependency)):
                return circle
        state[name] = "done"
        path.pop()
        return None

    for name in sorted(graph):
        if name not in state and (circle := visit(name)):
            return circle
    return None


def test_the_circle_finder_finds_a_circle():
    graph = {"config": {"templates"}, "templates": {"runs"}, "runs": {"config"}, "chat": set()}
    assert find_circle(graph) == ["config", "templates", "runs", "config"]
    assert find_circle({"config": {"chat"}, "chat": set()}) is None


def test_function_level_imports_are_edges_too(tmp_path):
    module = tmp_path / "merge.py"
    module.write_text("from l2t import runs\n\ndef later():\n    from l2t.models import load_processor\n    import l2t.chat\n")
    assert l2t_imports(module, {"runs", "models", "chat", "merge"}) == {"runs", "models", "chat"}


def test_no_import_circle_in_the_package():
    circle = find_circle(import_graph())
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def test_every_module_is_short():
    lengths = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules().items()}
    too_long = {name: n for name, n in lengths.items() if n >= MAX_LINES}
    assert not too_long, f"modules of {MAX_LINES} lines or more: {too_long}"


def test_the_training_recipe_fits_on_a_screen():
    tree = ast.parse((PACKAGE / "train.py").read_text(encoding="utf-8"))
    [recipe] = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "train"]
    assert recipe.end_lineno - recipe.lineno + 1 < MAX_RECIPE_LINES


def test_the_architecture_page_names_every_module_and_only_real_ones():
    text = ARCHITECTURE.read_text(encoding="utf-8")
    named = set(re.findall(r"\bl2t/(\w+)\.py\b", text))
    assert set(modules()) - named == set(), "modules missing from docs/ARCHITECTURE.md"
    assert named - set(modules()) == set(), "docs/ARCHITECTURE.md names modules that don't exist"
    for app_module in re.findall(r"\bapp/(\w+)\.py\b", text):
        assert (REPO / "app" / f"{app_module}.py").is_file(), f"docs/ARCHITECTURE.md names app/{app_module}.py"
