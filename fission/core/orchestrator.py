"""Machines for runs: a clone of the language's warm snapshot when the limits fit, else a cold boot.

``boot`` starts one for a RunSpec through the driver (``boot_timeout``, ``FISSION_BOOT_TIMEOUT``,
bounds VMM start to agent HELLO); ``warm_clone`` makes one for a pool and warms it. Running
programs in them is ``execution.execute``; the Service owns the machines and destroys each after
one run.
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


async def warm_clone(language: Language, driver: Driver | None = None) -> Machine:
    """A clone of the language's snapshot that has run its warm-up (for the pools).

    The warm-up translates the guest's hot paths in this QEMU process (its code cache starts
    empty) and uses up the fork server's first warm child; waiting for the next one means the
    user's run starts on a child that is already confined and waiting.
    """
    machine = await boot(RunSpec(language, language.warm_up), driver=driver)
    try:
        await snapshots.warm_up(machine.agent, language)
        await machine.agent.prepare_snapshot(snapshots.PREPARE_TIMEOUT)
    except BaseException:
        await machine.destroy()
        raise
    return machine
