"""The layout the developer guide promises (docs/developer/architecture.md), checked: no
module-level import cycles, the coordinator never imports the node, and every kind has its
three halves where the guide says."""

from __future__ import annotations

import ast
from importlib import import_module
from pathlib import Path

import iaptnet
from iaptnet.node.registry import KIND_MODULES, load_kinds
from iaptnet.protocol.kinds import MODULES

ROOT = Path(iaptnet.__file__).parent


def module_imports() -> dict[str, set[str]]:
    """Module -> the iaptnet modules it imports at module level (imports inside functions,
    which run later, are left out)."""
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = ("iaptnet", *path.relative_to(ROOT).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.parse(path.read_text()).body:
            for n in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
                if isinstance(n, ast.ImportFrom):
                    base = package.split(".")
                    target = (
                        ".".join(base[: len(base) - n.level + 1] + ([n.module] if n.module else []))
                        if n.level
                        else (n.module or "")
                    )
                    subs = [f"{target}.{a.name}" for a in n.names if f"{target}.{a.name}" in modules]
                    found = subs if len(subs) == len(n.names) else [target, *subs]
                elif isinstance(n, ast.Import):
                    found = [a.name for a in n.names]
                else:
                    continue
                edges[name].update(f for f in found if f in modules and f != name)
    return edges


def test_no_module_level_import_cycle():
    edges = module_imports()
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in sorted(edges[name]):
            if state.get(other) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(other) :] + [other]))
            if other not in state:
                visit(other, path + [other])
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])


def test_the_coordinator_and_protocol_never_import_the_node():
    for name, targets in module_imports().items():
        if name.startswith(("iaptnet.coordinator", "iaptnet.protocol", "iaptnet.flower")):
            assert not [t for t in targets if t.startswith("iaptnet.node")], name


def test_every_kind_has_its_three_halves():
    handlers = load_kinds()
    for kind, module in MODULES.items():
        contract = import_module(f"iaptnet.protocol.kinds.{module}")
        assert callable(getattr(contract, "parse", None)), kind
        assert module in KIND_MODULES, kind
        node = import_module(f"iaptnet.node.{module}")
        assert any(r.fn.__module__ == node.__name__ for r in handlers.values()), kind
        coordinator = import_module(f"iaptnet.coordinator.{module}")
        assert kind == "glm" or callable(getattr(coordinator, "run_study", None)), kind
