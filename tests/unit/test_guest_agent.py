"""The guest agent's pure parts: stdlib-only imports, Python 3.9 syntax, the program's env."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from fission.guest.agent import DEFAULT_PATH, SANDBOX_HOME, build_env
from fission.images.store import AGENT_FILES

AGENT_DIR = Path(__file__).resolve().parents[2] / "fission" / "guest"
# Modules shipped beside agent.py in the image; the agent imports them by bare name when run
# as a script and relatively when imported as a package.
SHIPPED = {name.removesuffix(".py") for name in AGENT_FILES}


def imported_roots(source: str) -> tuple[set[str], set[str]]:
    """(top-level modules imported absolutely, modules imported relatively) in ``source``."""
    absolute: set[str] = set()
    relative: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            absolute |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            absolute.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.module:
                relative.add(node.module.split(".")[0])
            else:
                relative |= {alias.name for alias in node.names}
    return absolute, relative


def non_stdlib(source: str) -> set[str]:
    """Modules ``source`` imports that are neither stdlib nor shipped with the agent."""
    absolute, relative = imported_roots(source)
    outside = {name for name in absolute if name not in sys.stdlib_module_names}
    return (outside - SHIPPED) | (relative - SHIPPED)


def test_the_import_check_catches_third_party_and_package_imports() -> None:
    assert non_stdlib("import os\nfrom . import protocol\nimport protocol\n") == set()
    assert non_stdlib("import requests") == {"requests"}
    assert non_stdlib("def f():\n    from fission.errors import VMError\n") == {"fission"}
    assert non_stdlib("from .helpers import x") == {"helpers"}


@pytest.mark.parametrize("name", ["agent.py", "protocol.py"])
def test_guest_and_protocol_import_only_the_standard_library(name: str) -> None:
    assert non_stdlib((AGENT_DIR / name).read_text()) == set()


@pytest.mark.parametrize("name", AGENT_FILES)
def test_every_shipped_agent_file_imports_only_the_standard_library(name: str) -> None:
    assert non_stdlib((AGENT_DIR / name).read_text()) == set()


def test_protocol_imports_nothing_but_the_standard_library() -> None:
    absolute, relative = imported_roots((AGENT_DIR / "protocol.py").read_text())
    assert relative == set()
    assert absolute <= set(sys.stdlib_module_names) | {"__future__"}


def test_every_agent_module_the_guest_imports_is_shipped() -> None:
    # A new agent module must be added to AGENT_FILES, or the image lacks it.
    for name in AGENT_FILES:
        absolute, relative = imported_roots((AGENT_DIR / name).read_text())
        local = {m for m in absolute | relative if (AGENT_DIR / f"{m}.py").exists()}
        assert local <= SHIPPED, f"{name} imports {local - SHIPPED}"


@pytest.mark.parametrize("name", AGENT_FILES)
def test_agent_files_parse_as_python_3_9(name: str) -> None:
    # The guest image's python3 may be as old as 3.9.
    ast.parse((AGENT_DIR / name).read_text(), feature_version=(3, 9))


def test_build_env_defaults() -> None:
    env = build_env({})
    assert env["PATH"] == DEFAULT_PATH and "/usr/bin" in env["PATH"].split(":")
    assert env["HOME"] == SANDBOX_HOME == "/home/sandbox"
    assert env["USER"] == env["LOGNAME"] == "sandbox"
    assert env["LANG"] == "C.UTF-8" and env["TMPDIR"] == "/tmp"


def test_build_env_never_copies_the_agents_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FISSION_SECRET_TOKEN", "s3cret")
    env = build_env({"A": "1"})
    assert "FISSION_SECRET_TOKEN" not in env
    assert "s3cret" not in env.values()
    assert set(env) == {"PATH", "HOME", "USER", "LOGNAME", "LANG", "TMPDIR", "A"}


def test_build_env_request_overrides_defaults() -> None:
    env = build_env({"HOME": "/tmp", "PATH": "/bin", "EXTRA": "x=y", "EMPTY": ""})
    assert env["HOME"] == "/tmp" and env["PATH"] == "/bin"
    assert env["EXTRA"] == "x=y" and env["EMPTY"] == ""
    assert env["USER"] == "sandbox"


@pytest.mark.parametrize(
    "bad",
    [
        {"A=B": "1"},
        {"=": "1"},
        {"": "1"},
        {"A\0B": "1"},
        {"A": "x\0y"},
        {"A": "\0"},
        {"A": 1},
        {1: "a"},
        {"A": None},
    ],
)
def test_build_env_refuses_bad_entries(bad: dict[object, object]) -> None:
    with pytest.raises(ValueError):
        build_env(bad)  # type: ignore[arg-type]


def test_build_env_does_not_change_the_request() -> None:
    requested = {"A": "1"}
    build_env(requested)
    assert requested == {"A": "1"}
