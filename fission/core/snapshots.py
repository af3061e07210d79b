"""Warm clones: which runs a clone of a language's warm template can serve, and how it is warmed.

Every language's image has a warm template: a VM booted once, warmed (for Python: numpy and
pandas imported in the guest's fork server, a confined child forked and waiting) and saved;
a clone restores it in tens of milliseconds instead of booting. How a template is built and
stored is the driver's business (for QEMU: its driver's ``qemu_snapshots``); core says what warms
it (``warm_template``) and which runs a clone fits (``fits``): those whose limits fit the
template's shape (``TEMPLATE_*``).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from fission.agent.client import AgentClient
from fission.core.languages import Language, resolve_language
from fission.core.limits import Limits
from fission.core.machines import exec_request
from fission.core.spec import RunSpec
from fission.errors import ImageBuildFailed
from fission.vmm.base import (
    GUEST_OVERHEAD_MB,
    TEMPLATE_CAPACITY_MB,
    TEMPLATE_DISK_MB,
    TEMPLATE_VCPUS,
    Driver,
    VMRequest,
    WarmTemplate,
    default_driver,
)

__all__ = [
    "PREPARE_TIMEOUT",
    "TEMPLATE_CAPACITY_MB",
    "TEMPLATE_DISK_MB",
    "TEMPLATE_VCPUS",
    "build_warm_snapshot",
    "ensure_template",
    "fits",
    "vm_request",
    "warm_template",
    "warm_up",
]

PREPARE_TIMEOUT = 300.0


def fits(limits: Limits) -> bool:
    """True when a clone of the standard template can serve a run with ``limits``."""
    return (
        limits.cpus == TEMPLATE_VCPUS
        and limits.memory_mb <= TEMPLATE_CAPACITY_MB
        and limits.disk_mb == TEMPLATE_DISK_MB
    )


async def warm_up(agent: AgentClient, language: Language) -> None:
    """Run the language's warm-up program once, discarding its output."""
    spec = RunSpec(language, language.warm_up, Limits(timeout=120))
    async with asyncio.timeout(130):
        outcome = await agent.exec(exec_request(spec), lambda _stream, _data: None)
    if outcome.exit_code != 0:
        raise ImageBuildFailed(f"the {language.name} warm-up exited with {outcome.exit_code}")


def warm_template(image: str) -> WarmTemplate:
    """How ``image``'s template is warmed: its language's warm-up, then the agent made ready.

    For Python the guest's fork server preloads the language's modules (``fission.zygote``).
    """
    # An OCI or apt image is LANGUAGE@oci-KEY or LANGUAGE@apt-KEY (``fission.images.oci``,
    # ``apt_images``): warmed as its language.
    language = replace(resolve_language(image.partition("@")[0]), image=image)
    kernel_args: tuple[str, ...] = ()
    if language.mode == "python":
        kernel_args = ("fission.zygote=" + (",".join(language.preload) or "none"),)

    async def warm(agent: AgentClient) -> None:
        await warm_up(agent, language)
        await agent.prepare_snapshot(PREPARE_TIMEOUT)

    return WarmTemplate(kernel_args, warm)


def vm_request(spec: RunSpec, *, warm: bool = True, disk_dir: Path | None = None) -> VMRequest:
    """The VM to ask the driver for ``spec``: a clone of the warm template when it fits (and
    ``warm``), else a cold boot shaped by the limits; with a disk of its own in ``disk_dir``."""
    image, limits = spec.language.image, spec.limits
    if warm and fits(limits):
        return VMRequest.clone(image, warm_template(image), disk_dir)
    memory = limits.memory_mb + GUEST_OVERHEAD_MB
    return VMRequest(image, limits.cpus, memory, limits.disk_mb, disk_dir=disk_dir)


async def ensure_template(driver: Driver, image: str) -> None:
    """Build ``image``'s warm template now unless the driver has it (``fission images build``)."""
    await driver.configure(VMRequest.clone(image, warm_template(image)))


async def build_warm_snapshot(language: str, driver: Driver | None = None) -> None:
    """The language's warm snapshot on this host, built unless current (``images build``)."""
    await ensure_template(driver or default_driver(), language)
