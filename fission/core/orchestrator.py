"""Machines for runs: a clone of the language's warm snapshot when the limits fit, else a cold boot.

``boot`` starts one for a RunSpec through the driver (``boot_timeout``, ``FISSION_BOOT_TIMEOUT``,
bounds VMM start to agent HELLO); ``clone`` restores one for a pool and ``warm_up`` warms it
(``warm_clone`` does both). Running programs in them is ``execution.execute``; the Service owns
the machines and destroys each after one run.
"""

from __future__ import annotations

from fission.core import snapshots
from fission.core.languages import Language
from fission.core.machines import Machine
from fission.core.spec import RunSpec
from fission.vmm.base import Driver, default_driver


async def boot(spec: RunSpec, *, warm: bool = True, driver: Driver | None = None) -> Machine:
    """A ready VM for ``spec``: a clone of the warm snapshot when it fits, else a cold boot."""
    driver = driver or default_driver()
    return await driver.start(await driver.configure(snapshots.vm_request(spec, warm=warm)))


async def clone(language: Language, driver: Driver | None = None) -> Machine:
    """A clone of the language's snapshot, restored and answering, not warmed up yet."""
    return await boot(RunSpec(language, language.warm_up), driver=driver)


async def warm_up(machine: Machine, language: Language) -> None:
    """Warm a clone for its first run: run the language's warm-up, then wait for the next child.

    The warm-up translates the guest's hot paths in this QEMU process (its code cache starts
    empty) and uses up the fork server's first warm child; waiting for the next one means the
    user's run starts on a child that is already confined and waiting.
    """
    await snapshots.warm_up(machine.agent, language)
    await machine.agent.prepare_snapshot(snapshots.PREPARE_TIMEOUT)


async def warm_clone(language: Language, driver: Driver | None = None) -> Machine:
    """A clone of the language's snapshot that has run its warm-up (``clone``, ``warm_up``)."""
    machine = await clone(language, driver)
    try:
        await warm_up(machine, language)
    except BaseException:
        await machine.destroy()
        raise
    return machine
