"""Packaging: each third-party import is declared for the layer that makes it, ``pip install
fission`` (no extras) is enough for the SDK and the embedded runner, the command names the extra
it misses, and the committed gRPC stubs are exactly what ``fission.proto`` gives."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from functools import cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.unit.layering import (
    PACKAGE_ROOT,
    Import,
    all_imports,
    layer_of,
    package_sources,
    top_level_modules,
)

REPO = PACKAGE_ROOT.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
BASE = "base"
RUNTIME_GROUPS = (BASE, "server", "cli")
# Extras outside ``all``: a fleet on Ray is for those who run one (``dev`` brings it for CI).
ADDON_GROUPS = ("cluster",)
# The extra each layer may rely on besides the base install; unnamed layers have the base only.
EXTRA_OF_LAYER: Mapping[str, str] = {
    "server": "server",
    "mcp": "server",
    "e2b": "server",
    "cli": "cli",
    "fleet": "cluster",
}
# The generated gRPC stubs are imported by the gRPC server alone.
EXTRA_OF_MODULE: Mapping[str, str] = {
    "fission.api.fission_pb2": "server",
    "fission.api.fission_pb2_grpc": "server",
}
STUBS = ("fission_pb2.py", "fission_pb2.pyi", "fission_pb2_grpc.py")
HEAVY = ("fastapi", "uvicorn", "starlette", "pydantic", "grpc", "google.protobuf", "mcp")
HEAVY += ("mcp_types", "typer", "rich", "jinja2")


def declared() -> dict[str, set[str]]:
    """Each group (base and every extra, ``fission[...]`` expanded) -> its distribution names."""
    project = PYPROJECT["project"]
    groups = {BASE: list(project["dependencies"]), **project["optional-dependencies"]}

    def names(group: str) -> set[str]:
        found = set()
        for line in groups[group]:
            requirement = Requirement(line)
            if canonicalize_name(requirement.name) == "fission":
                found |= {n for extra in requirement.extras for n in names(extra)}
            else:
                found.add(canonicalize_name(requirement.name))
        return found

    return {group: names(group) for group in groups}


def pinned(group: str, name: str) -> Requirement:
    """The requirement on ``name`` in ``group`` of pyproject.toml."""
    project = PYPROJECT["project"]
    lines = project["dependencies"] if group == BASE else project["optional-dependencies"][group]
    matches = [Requirement(line) for line in lines if Requirement(line).name == name]
    assert len(matches) == 1, f"{name} is not in {group}"
    return matches[0]


@cache
def distribution_files() -> dict[str, str]:
    """Installed files -> distribution: each top-level name and each ``namespace/sub`` name."""
    owners: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        for file in dist.files or ():
            parts = [part.removesuffix(".py") for part in file.parts]
            if parts[0] == ".." or parts[0].endswith((".dist-info", ".egg-info")):
                continue
            for depth in (1, 2):
                if len(parts) >= depth:
                    owners.setdefault("/".join(parts[:depth]), canonicalize_name(dist.name))
    return owners


def distribution_of(target: str) -> str | None:
    """The installed distribution that provides module ``target`` (namespace packages too)."""
    parts = target.split(".")
    owners = distribution_files()
    # The longer name first: ``google/protobuf`` is protobuf's, ``google`` is many packages'.
    return owners.get("/".join(parts[:2])) or owners.get(parts[0])


def third_party_imports() -> list[tuple[Import, str]]:
    """Every import of a module from outside fission and the stdlib, with the group it needs."""
    sources = package_sources()
    top = top_level_modules(sources)
    found = []
    for imp in all_imports(sources):
        root = imp.target.split(".")[0]
        if root in ("", "fission") or root in sys.stdlib_module_names:
            continue
        layer = layer_of(imp.module, top)
        if layer == "guest" and f"fission.guest.{root}" in sources:
            continue  # run as a script in the guest, the agent imports its modules flat
        group = EXTRA_OF_MODULE.get(imp.module) or EXTRA_OF_LAYER.get(layer, BASE)
        found.append((imp, group))
    return found


def test_every_third_party_import_is_declared_for_its_layer() -> None:
    groups = declared()
    wrong = []
    for imp, group in third_party_imports():
        dist = distribution_of(imp.target)
        if dist is None or dist not in groups[BASE] | groups[group]:
            where = f"{imp.path}:{imp.line}: {imp.target} (distribution {dist})"
            extra = "" if group == BASE else f" nor in the {group!r} extra"
            wrong.append(f"{where} is not in the project's dependencies{extra}")
    assert not wrong, "\n".join(dict.fromkeys(wrong))


def test_every_declared_dependency_is_imported_by_its_group() -> None:
    groups = declared()
    used: dict[str, set[str | None]] = {group: set() for group in RUNTIME_GROUPS + ADDON_GROUPS}
    for imp, group in third_party_imports():
        used[group].add(distribution_of(imp.target))
    for group in RUNTIME_GROUPS + ADDON_GROUPS:
        assert groups[group] - used[group] == set(), f"declared in {group} but never imported"


def test_all_and_dev_bring_every_extra() -> None:
    groups = declared()
    runtime = set().union(*(groups[group] for group in RUNTIME_GROUPS))
    assert groups["all"] | groups[BASE] == runtime  # an extra always comes with the base
    assert groups["all"] <= groups["dev"]
    for addon in ADDON_GROUPS:
        assert groups[addon] <= groups["dev"]


def test_the_command_knows_which_extra_brings_each_import() -> None:
    from fission.__main__ import EXTRA_OF

    base = declared()[BASE]  # what the base install brings needs no extra (e.g. anyio)
    expected = {
        imp.target.split(".")[0]: group
        for imp, group in third_party_imports()
        if group != BASE and distribution_of(imp.target) not in base
    }
    assert expected == EXTRA_OF
    assert PYPROJECT["project"]["scripts"] == {"fission": "fission.__main__:main"}


BLOCKER = """
import importlib.abc, sys
BLOCKED = set({blocked!r})
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
sys.meta_path.insert(0, Blocker())
"""


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter with this checkout first on the path."""
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )


def test_import_fission_and_the_sdk_load_no_front_end() -> None:
    code = f"""
import json, sys
heavy = {HEAVY!r}
def loaded():
    return sorted(m for m in sys.modules if m in heavy or m.startswith(tuple(h + "." for h in heavy)))
import fission
after_fission = ("fission.sdk" in sys.modules, loaded())
# httpx imports its optional command line, which loads rich, whenever rich is installed: that is
# httpx's doing, not the SDK's, so it is switched off here (None in sys.modules: ImportError).
sys.modules["httpx._main"] = None
import fission.sdk
fission.run, fission.Sandbox, fission.AsyncSandbox
print(json.dumps({{"fission": after_fission, "sdk": loaded()}}))
"""
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["fission"] == [False, []], "import fission is meant to load the SDK lazily"
    assert result["sdk"] == []


def test_the_base_install_imports_every_base_module_without_extras() -> None:
    """What ``pip install fission`` gives (SDK, core, VMM, images...) imports with no extra."""
    from fission.__main__ import EXTRA_OF

    sources = package_sources()
    top = top_level_modules(sources)
    base = sorted(
        name
        for name in sources
        if EXTRA_OF_LAYER.get(layer_of(name, top)) is None and name not in EXTRA_OF_MODULE
    )
    assert "fission.sdk" in base and "fission.core.service" in base
    code = (
        BLOCKER.format(blocked=sorted(EXTRA_OF))
        + f"""
import importlib
for name in {base!r}:
    importlib.import_module(name)
import fission
fission.run
print("imported", len({base!r}), sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["imported", str(len(base)), "[]"]


def test_the_command_without_its_extra_says_what_to_install() -> None:
    code = BLOCKER.format(blocked=["typer"]) + "from fission.__main__ import main\nmain()\n"
    proc = run_python(code)
    assert proc.returncode == 1
    assert "pip install 'fission[cli]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_command_missing_the_server_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import fission.cli
    from fission.__main__ import main

    def needs_uvicorn() -> None:
        raise ModuleNotFoundError("No module named 'uvicorn'", name="uvicorn")

    monkeypatch.setattr(fission.cli, "main", needs_uvicorn)
    with pytest.raises(SystemExit) as exited:
        main()
    assert "pip install 'fission[server]'" in str(exited.value.code)


def test_a_missing_module_of_no_extra_is_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    import fission.cli
    from fission.__main__ import main

    def broken() -> None:
        raise ModuleNotFoundError("No module named 'fission.nowhere'", name="fission.nowhere")

    monkeypatch.setattr(fission.cli, "main", broken)
    with pytest.raises(ModuleNotFoundError):
        main()


def test_the_stubs_runtime_minimums_are_the_generator_pin() -> None:
    tools = pinned("dev", "grpcio-tools")
    (pin,) = tools.specifier
    assert pin.operator == "=="
    grpc_stub = (PACKAGE_ROOT / "api" / "fission_pb2_grpc.py").read_text()
    assert f"GRPC_GENERATED_VERSION = '{pin.version}'" in grpc_stub
    assert f">={pin.version}" in str(pinned("server", "grpcio").specifier)
    messages = (PACKAGE_ROOT / "api" / "fission_pb2.py").read_text()
    gencode = re.search(r"# Protobuf Python Version: (\S+)", messages)
    assert gencode is not None
    assert f">={gencode.group(1)}" in str(pinned("server", "protobuf").specifier)


def test_the_committed_stubs_are_what_the_proto_gives(tmp_path: Path) -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools is not installed (`make setup` installs it)")
    (pin,) = pinned("dev", "grpcio-tools").specifier
    installed = importlib.metadata.version("grpcio-tools")
    if installed != pin.version:
        pytest.skip(f"grpcio-tools {installed} is installed, the stubs are {pin.version}'s")
    proto = "fission/api/fission.proto"
    outputs = [f"--{kind}_out={tmp_path}" for kind in ("python", "pyi", "grpc_python")]
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", *outputs, proto],
        cwd=REPO,
        check=True,
        timeout=60,
    )
    for name in STUBS:
        made = (tmp_path / "fission" / "api" / name).read_bytes()
        committed = (PACKAGE_ROOT / "api" / name).read_bytes()
        assert made == committed, f"fission/api/{name} is stale: run `make protos`"
