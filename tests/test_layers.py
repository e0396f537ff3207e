"""The package's layering (docs/architecture.md): imports go one way, and only the entry points
and the config boundary touch ml_collections.

Every ``import`` of the package's own modules is read from the source (module level and inside
functions alike) and checked against the table of what each layer may import.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "atpo_jax"

# Layer of a module (by its path under atpo_jax/) -> the layers it may import.
LAYERS = {
    "settings": set(),
    "kernels": set(),
    "parallel": set(),
    "models": {"settings", "kernels"},
    "tools": {"settings"},
    "rewards": {"settings"},
    "data": {"settings", "tools", "rewards"},
    "rollout": {"settings", "kernels", "parallel", "models", "tools", "rewards"},
    "train": {"settings", "kernels", "parallel", "models", "tools", "rewards", "data", "rollout"},
    "config": {"settings", "train"},
    "builder": {"settings", "kernels", "parallel", "models", "tools", "rewards", "data", "rollout", "train", "config"},
}  # fmt: skip
ENTRY_POINTS = {"launch", "evaluate", "cli"}  # may import anything
# Single modules allowed one layer more than their layer (docs/architecture.md says why): the dense
# retriever and its index builder load the e5 encoder, a Flax model, inside functions only, so the
# rest of ``tools`` (the BM25 server, the sandbox) never imports JAX.
MODULE_EXCEPTIONS = {"tools/dense.py": {"models"}, "tools/build_index.py": {"models"}}
ML_COLLECTIONS = {"config.py", "launch.py", "evaluate.py"}


def layer_of(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0] if parts[0] != "__init__" else "package"


def _module(path: pathlib.Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def imports(path: pathlib.Path) -> list[str]:
    """Every module name ``path`` imports (absolute imports; the package uses no relative ones)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names.append(node.module or "")
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def project_layers(names: list[str]) -> set[str]:
    layers = set()
    for name in names:
        parts = name.split(".")
        if parts[0] == "atpo_jax" and len(parts) > 1 and parts[1] in LAYERS:
            layers.add(parts[1])
    return layers


def test_imports_go_one_way():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = layer_of(path)
        if layer in ENTRY_POINTS or layer == "package":
            continue
        allowed = LAYERS[layer] | {layer} | MODULE_EXCEPTIONS.get(_module(path), set())
        for used in sorted(project_layers(imports(path)) - allowed):
            problems.append(f"{path.relative_to(PACKAGE)} ({layer}) imports atpo_jax.{used}")
    assert problems == []


def test_only_the_config_boundary_and_entry_points_use_ml_collections():
    users = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if any(name.split(".")[0] == "ml_collections" for name in imports(path))
    )
    assert set(users) <= ML_COLLECTIONS, users
    assert "config.py" in users  # the one conversion of a ConfigDict into RunSettings


def test_every_layer_is_in_the_table():
    layers = {layer_of(p) for p in PACKAGE.rglob("*.py")} - ENTRY_POINTS - {"package"}
    assert layers <= set(LAYERS), layers - set(LAYERS)


def test_module_exceptions_import_only_inside_functions():
    """An exception's extra layer is imported lazily (never at module level)."""
    for module, extra in MODULE_EXCEPTIONS.items():
        tree = ast.parse((PACKAGE / module).read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        assert not project_layers(names) & extra, module
