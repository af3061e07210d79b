"""What core sends a VM's agent, and the VM names core shares with the drivers.

VMs come to life in one place, ``Driver.start`` (``fission.vmm.base``): every path that fails
after the VMM was spawned destroys the VM before raising. Core holds a driver and never names a
VMM; ``Machine``, ``GUEST_OVERHEAD_MB`` and ``boot_timeout`` are the driver interface's, re-exported
for the modules that used them from here.
"""

from __future__ import annotations

from fission.agent.client import ExecRequest
from fission.core.limits import MB
from fission.core.spec import RunSpec
from fission.net.egress import proxy_env
from fission.vmm.base import GUEST_OVERHEAD_MB, Machine, boot_timeout, new_vm_id

__all__ = ["GUEST_OVERHEAD_MB", "Machine", "boot_timeout", "exec_request", "new_vm_id"]


def exec_request(spec: RunSpec) -> ExecRequest:
    """The agent request that runs ``spec``'s program under its limits."""
    language, limits = spec.language, spec.limits
    return ExecRequest(
        argv=list(language.argv),
        env=language.env | proxy_env(spec.network) | spec.env,
        timeout=limits.timeout,
        memory_bytes=limits.memory_mb * MB,
        pids_max=limits.pids,
        output_limit=limits.output_limit_bytes,
        script=spec.code,
        script_name=language.script_name,
        mode=language.mode,
    )
