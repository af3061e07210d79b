"""Sandboxes started from a built template: its snapshot restored, a disk of their own on top.

The same path as a sandbox made from a snapshot (``SandboxSnapshots.create_from``), with the
template's derived snapshot as the source: the sandbox gets the template's language, its env
under the caller's, and its default limits where the caller left the defaults.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from fission.core import derived, snapshots, template_build
from fission.core.sandbox_spec import SandboxRecord, SandboxSpec
from fission.core.spec import RunSpec
from fission.errors import InvalidInput
from fission.vmm.base import Machine, VMConfig

if TYPE_CHECKING:
    from fission.core.sandboxes import SandboxManager


def template_spec(spec: SandboxSpec, name: str) -> SandboxSpec:
    """``spec`` in the template ``name``: its language, env and default limits."""
    run = template_build.run_spec(name, RunSpec(spec.language, "", spec.limits, spec.env))
    if not snapshots.fits(run.limits):
        raise InvalidInput(
            f"template {name} sandboxes run with the default cpus and disk "
            f"and at most {snapshots.TEMPLATE_CAPACITY_MB} MB of memory"
        )
    return replace(spec, language=run.language, env=run.env, limits=run.limits)


async def create_from_template(
    manager: SandboxManager,
    spec: SandboxSpec,
    name: str,
    owner: str | None = None,
    max_sandboxes: int | None = None,
) -> SandboxRecord:
    """A new sandbox restored from the built template ``name``."""
    built = template_build.get(name)
    spec = template_spec(spec, name)

    async def start(directory: Path) -> tuple[Machine, VMConfig]:
        return await derived.restore_into(
            built.snapshot,
            built.language.image,
            directory,
            manager.driver,
            detached=manager.durable,
        )

    return await manager._create(spec, owner, max_sandboxes, start, {"template": name})
