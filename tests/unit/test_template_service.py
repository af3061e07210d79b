"""Templates on the fake driver: built once into a named derived snapshot, then runs and
sandboxes start from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from fission.core import derived, template_build
from fission.core.languages import resolve_language
from fission.core.sandbox_spec import SandboxSpec
from fission.core.sandbox_templates import create_from_template
from fission.core.service import Service
from fission.core.spec import RunSpec
from fission.errors import ImageBuildFailed, InvalidInput

BASH = resolve_language("bash")


def template(tmp_path: Path, start: str = "echo set-up ran") -> Path:
    (tmp_path / "note.txt").write_text("from the template\n")
    path = tmp_path / "t.toml"
    path.write_text(
        f'name = "unit"\nbase = "bash"\nstart = "{start}"\n'
        '[files]\n"/home/sandbox/note.txt" = "note.txt"\n[env]\nMODE = "t"\n'
        "[limits]\ntimeout = 45\n"
    )
    return path


async def test_a_template_is_built_once_then_runs_start_from_it(
    service: Service, tmp_path: Path
) -> None:
    built, cached = await service.build_template(template(tmp_path))
    assert not cached and built.snapshot.name.startswith("template-unit-")
    assert derived.in_use(built.snapshot)  # the snapshot budget never takes a template's
    again, cached = await service.build_template(template(tmp_path))
    assert cached and again.snapshot == built.snapshot
    result = await service.run(RunSpec(resolve_language("python"), "echo $MODE", template="unit"))
    assert result.exit_code == 0
    assert result.stdout == b"t\n"  # bash, the template's language, with its env


async def test_a_sandbox_starts_from_a_template(service: Service, tmp_path: Path) -> None:
    await service.build_template(template(tmp_path))
    manager = service.sandboxes
    record = await create_from_template(manager, SandboxSpec(resolve_language("python")), "unit")
    try:
        assert record.spec.language.name == "bash"
        assert record.spec.env == {"MODE": "t"}
        assert record.spec.limits.timeout == 45
        result = await manager.exec_command(record.id, "echo $MODE")
        assert result.stdout == b"t\n"
    finally:
        await manager.delete(record.id)


async def test_a_failing_set_up_names_what_failed_and_keeps_nothing(
    service: Service, tmp_path: Path
) -> None:
    with pytest.raises(ImageBuildFailed, match="template unit: set-up or the start command"):
        await service.build_template(template(tmp_path, start="echo broken >&2; exit 7"))
    assert not list(derived.derived_dir().glob("template-unit-*"))
    assert template_build.built_templates() == []


async def test_a_template_run_that_does_not_fit_the_snapshot_is_refused(
    service: Service, tmp_path: Path
) -> None:
    await service.build_template(template(tmp_path))
    from fission.core.limits import Limits

    spec = RunSpec(BASH, "true", Limits(cpus=2), template="unit")
    with pytest.raises(InvalidInput, match="template unit runs with the default"):
        await service.run(spec)


async def test_the_mcp_tools_build_list_use_and_delete_a_template(
    service: Service, tmp_path: Path
) -> None:
    from fission.mcp.files import HostFiles
    from fission.mcp.tools import FissionTools

    template(tmp_path)
    tools = FissionTools(HostFiles(tmp_path))
    tools.running = service
    built = await tools.template_build("t.toml")
    assert (built.template.name, built.template.language, built.cached) == ("unit", "bash", False)
    assert [t.name for t in (await tools.template_list()).templates] == ["unit"]
    ran = await tools.run_code("echo $MODE", template="unit")
    assert ran.stdout == "t\n"
    box = await tools.sandbox_create(template="unit")
    assert box.language == "bash"
    await tools.sandbox_delete(box.id)
    assert (await tools.template_delete("unit")).templates == []


async def test_the_mcp_build_refuses_files_outside_the_shared_directory(
    service: Service, tmp_path: Path
) -> None:
    from fission.errors import PathNotAllowed
    from fission.mcp.files import HostFiles
    from fission.mcp.tools import FissionTools

    shared = tmp_path / "shared"
    shared.mkdir()
    (tmp_path / "secret.txt").write_text("no")
    (shared / "t.toml").write_text('base = "bash"\n[files]\n"/home/sandbox/s" = "../secret.txt"\n')
    tools = FissionTools(HostFiles(shared))
    tools.running = service
    with pytest.raises(PathNotAllowed, match="outside"):
        await tools.template_build("t.toml")


def test_grpc_and_rest_requests_carry_the_template() -> None:
    from fission.api import fission_pb2 as pb
    from fission.server.grpc_messages import run_spec
    from fission.server.models import RunRequest, SandboxCreate

    assert run_spec(pb.RunRequest(code="1", template="t1")).template == "t1"
    assert run_spec(pb.RunRequest(code="1")).template is None
    assert RunRequest(code="1", template="t1").to_spec().template == "t1"
    assert SandboxCreate(template="t1").template == "t1"
    assert pb.CreateSandboxRequest(template="t1").HasField("template")
