"""Imports point down the layer table (tests/unit/layering.py), and the checker catches those
that do not: planted upward, peer and guest imports each fail, naming file:line and layers."""

from __future__ import annotations

import re

import pytest

from tests.unit.layering import (
    PACKAGE_ROOT,
    RANK,
    ROWS,
    Import,
    imports_of,
    package_sources,
    violations,
)

ARCHITECTURE_DOC = PACKAGE_ROOT.parent / "docs" / "architecture.md"


def planted(module: str, source: str) -> dict[str, tuple[str, str]]:
    """The real package plus one made-up module with ``source``."""
    sources = package_sources()
    path = module.replace(".", "/") + ".py"
    assert module not in sources
    sources[module] = (path, source)
    return sources


def test_imports_point_down_the_layers() -> None:
    found = violations(package_sources())
    assert not found, "imports against the layer table:\n" + "\n".join(found)


def test_every_subpackage_has_a_layer() -> None:
    subpackages = {p.parent.name for p in PACKAGE_ROOT.glob("*/__init__.py")}
    assert subpackages - set(RANK) == set()


def test_an_upward_import_fails_naming_file_line_and_layers() -> None:
    sources = planted(
        "fission.vmm.planted", "import os\n\n\ndef f():\n    from ..core import service\n"
    )
    assert violations(sources) == [
        "fission/vmm/planted.py:5: vmm -> core (fission.core.service): imports a higher layer"
    ]


def test_a_peer_import_fails_even_under_type_checking() -> None:
    source = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fission.server import app\n"
    )
    sources = planted("fission.mcp.planted", source)
    assert violations(sources) == [
        "fission/mcp/planted.py:3: mcp -> server (fission.server.app): imports a peer in its row"
    ]


def test_the_guest_may_not_import_even_the_foundation() -> None:
    sources = planted("fission.guest.planted", "import fission.errors\n")
    assert violations(sources) == [
        "fission/guest/planted.py:1: guest -> foundation (fission.errors): "
        "guest imports nothing from fission"
    ]


def test_the_foundation_may_not_import_a_layer() -> None:
    sources = planted("fission.planted", "from fission.images.store import image_set\n")
    assert violations(sources) == [
        "fission/planted.py:1: foundation -> images (fission.images.store): imports a higher layer"
    ]


def test_a_package_missing_from_the_table_fails() -> None:
    # (a name of no real package: ``fleet``, the example once used here, is a layer now)
    sources = planted("fission.swarm.node", "from fission.core import service\n")
    assert violations(sources) == [
        "fission/swarm/node.py:1: swarm -> core (fission.core.service): "
        "layer 'swarm' is not in the table"
    ]


def test_the_package_front_door_counts_as_the_sdk() -> None:
    """``fission/__init__.py`` re-exports the SDK, so a lower layer importing ``fission`` fails."""
    sources = planted("fission.core.planted", "from fission import __version__\n")
    assert violations(sources) == [
        "fission/core/planted.py:1: core -> sdk (fission): imports a higher layer"
    ]


def test_downward_and_own_layer_imports_pass() -> None:
    source = "from fission.vmm import qemu\nfrom . import service\nimport fission.config\n"
    assert violations(planted("fission.core.planted", source)) == []


@pytest.mark.parametrize(
    ("module", "path", "statement", "target"),
    [
        (
            "fission.guest.agent",
            "fission/guest/agent.py",
            "from . import protocol",
            "fission.guest.protocol",
        ),
        (
            "fission.guest.agent",
            "fission/guest/agent.py",
            "from .protocol import AgentError",
            "fission.guest.protocol",
        ),
        ("fission.core", "fission/core/__init__.py", "from . import spec", "fission.core.spec"),
        (
            "fission.core.spec",
            "fission/core/spec.py",
            "from ..errors import FissionError",
            "fission.errors",
        ),
        ("fission.core.spec", "fission/core/spec.py", "from .. import vmm", "fission.vmm"),
        (
            "fission.core.spec",
            "fission/core/spec.py",
            "import fission.vmm.qemu as q",
            "fission.vmm.qemu",
        ),
        (
            "fission.core.spec",
            "fission/core/spec.py",
            "from fission.vmm.qemu import QemuVM",
            "fission.vmm.qemu",
        ),
    ],
)
def test_relative_and_from_imports_resolve_to_modules(
    module: str, path: str, statement: str, target: str
) -> None:
    known = package_sources()
    assert list(imports_of(module, path, statement, known)) == [Import(module, path, 1, target)]


def test_the_architecture_doc_draws_the_same_table() -> None:
    text = ARCHITECTURE_DOC.read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    drawn = re.search(r"```\n(.*?)```", section, re.S)
    assert drawn is not None, "docs/architecture.md: the Layers section has no drawn table"
    rows = [line.split("(")[0].strip() for line in drawn.group(1).splitlines() if line.strip()]
    expected = [" | ".join(row) for row in ROWS]
    assert rows == expected
    assert "tests/unit/layering.py" in section, "the doc should say where the table is kept"
