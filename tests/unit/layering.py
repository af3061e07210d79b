"""The layers of ``fission`` (written once, here) and an AST reader of the package's imports.

``test_layers`` checks that imports point down the table; ``test_packaging`` uses the same
reader to check that every third-party import is declared for the layer that makes it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "fission"

# Top row first. A module may import its own layer and any row below it; layers that share a
# row are peers and must not import each other.
ROWS: tuple[tuple[str, ...], ...] = (
    ("cli",),
    ("server", "mcp"),
    # The fleet (a Service spread over hosts) and E2B's API (an adapter the server mounts; it
    # imports nothing from the server): peers, neither imports the other.
    ("fleet", "e2b"),
    ("sdk",),
    ("api",),
    ("core",),
    ("net", "vmm"),
    ("agent",),
    ("images", "auth"),
    ("guest",),
    ("foundation",),
)

# Top-level modules (``fission/config.py``, ``errors.py``, ...) are the foundation, except these.
# ``fission/__init__.py`` exposes ``fission.run``, ``fission.Sandbox``... from the SDK (lazily,
# so ``import fission.config`` stays cheap): it is the SDK's front door and sits in its layer.
# ``fission/__main__.py`` is the ``fission`` command's entry point.
MODULE_LAYERS: Mapping[str, str] = {
    "fission": "sdk",
    "fission.__main__": "cli",
}

# The guest agent is copied into images and runs on the guest's stdlib alone.
IMPORTS_NOTHING_FROM_FISSION = frozenset({"guest"})

RANK: Mapping[str, int] = {
    layer: len(ROWS) - index for index, row in enumerate(ROWS) for layer in row
}


@dataclass(frozen=True)
class Import:
    """One import statement's target, as seen in a module's source."""

    module: str  # the importing module, e.g. ``fission.vmm.qemu``
    path: str  # its file, relative to the repository
    line: int
    target: str  # the imported module, absolute, e.g. ``fission.images.tools``


def module_name(path: Path, root: Path = PACKAGE_ROOT) -> str:
    """``fission/vmm/qemu.py`` -> ``fission.vmm.qemu``; a package's ``__init__`` is the package."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_sources(root: Path = PACKAGE_ROOT) -> dict[str, tuple[str, str]]:
    """Every module under ``root``: name -> (path relative to the repository, source)."""
    return {
        module_name(path, root): (str(path.relative_to(root.parent)), path.read_text())
        for path in sorted(root.rglob("*.py"))
    }


def imports_of(module: str, path: str, source: str, known: Iterable[str] = ()) -> Iterator[Import]:
    """Each import in ``source``, at any depth (functions, ``TYPE_CHECKING``), made absolute.

    ``from pkg import name`` targets ``pkg.name`` when that is a module in ``known``, else ``pkg``.
    """
    modules = set(known)
    is_package = path.endswith("__init__.py")
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, path, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute_base(module, is_package, node.level, node.module)
            for alias in node.names:
                child = f"{base}.{alias.name}"
                target = child if child in modules else base
                yield Import(module, path, node.lineno, target)


def _absolute_base(module: str, is_package: bool, level: int, name: str | None) -> str:
    if level == 0:
        return name or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    anchor = package[: len(package) - (level - 1)]
    return ".".join([*anchor, name] if name else anchor)


def layer_of(module: str, top_level_modules: Iterable[str]) -> str:
    """The layer of a module inside ``fission``: its subpackage, or the foundation."""
    if module in MODULE_LAYERS:
        return MODULE_LAYERS[module]
    parts = module.split(".")
    if f"fission.{parts[1]}" in set(top_level_modules):
        return "foundation"
    return parts[1]


def top_level_modules(sources: Mapping[str, tuple[str, str]]) -> set[str]:
    """The modules that are files directly in ``fission/`` (not subpackages, not the package)."""
    return {
        name for name, (path, _) in sources.items() if path.count("/") == 1 and name.count(".") == 1
    }


def all_imports(sources: Mapping[str, tuple[str, str]]) -> list[Import]:
    """Every import made by the modules in ``sources``."""
    known = set(sources)
    return [
        found
        for name, (path, source) in sources.items()
        for found in imports_of(name, path, source, known)
    ]


def violations(sources: Mapping[str, tuple[str, str]]) -> list[str]:
    """One line (``file:line: from-layer -> to-layer (target)``) per import against the table."""
    top = top_level_modules(sources)
    found = []
    for imp in all_imports(sources):
        if not (imp.target == "fission" or imp.target.startswith("fission.")):
            continue
        source_layer = layer_of(imp.module, top)
        target_layer = layer_of(imp.target, top)
        where = f"{imp.path}:{imp.line}: {source_layer} -> {target_layer} ({imp.target})"
        if source_layer in IMPORTS_NOTHING_FROM_FISSION and target_layer != source_layer:
            found.append(f"{where}: {source_layer} imports nothing from fission")
        elif source_layer not in RANK or target_layer not in RANK:
            unknown = source_layer if source_layer not in RANK else target_layer
            found.append(f"{where}: layer {unknown!r} is not in the table")
        elif source_layer == target_layer:
            continue
        elif RANK[target_layer] > RANK[source_layer]:
            found.append(f"{where}: imports a higher layer")
        elif RANK[target_layer] == RANK[source_layer]:
            found.append(f"{where}: imports a peer in its row")
    return found
