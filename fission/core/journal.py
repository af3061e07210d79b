"""The daemon's journal of the VMs it owns, so a restart after a crash can clean up.

Each live VM has a file ``<state>/journal/<vm_id>.json`` naming its VMM pid, that process's
start time (so a recycled pid is never killed by mistake) and its directory. ``reconcile``
kills every recorded process that is still the same process, removes every VM directory under
``<state>/vms``, has the driver remove what else its VMs left (QEMU: the jail cgroups
``fission/vm-*`` of the recorded VMs and any other that a crashed fission left empty), and
empties the journal. Catalogued sandboxes (``catalog``) outlive a daemon: reconcile leaves
their VMs (process, directory, cgroups) and their sandbox directories alone (``keep_vms``,
``keep_sandboxes``); the next daemon re-attaches them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Collection
from pathlib import Path
from typing import Any

from fission.vmm.base import Driver, VirtualMachine, default_driver
from fission.vmm.processes import process_start_time

__all__ = ["Journal", "process_start_time"]


class Journal:
    """Records of the VMs a daemon owns, kept in its state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / "journal"
        self.vms_dir = state_dir / "vms"
        self.sandboxes_dir = state_dir / "sandboxes"
        self._pids: dict[str, int | None] = {}  # VMs recorded by this process: id -> VMM pid
        for directory in (self.directory, self.vms_dir, self.sandboxes_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def record(self, vm: VirtualMachine) -> None:
        """Remember a started VM."""
        pid = vm.pid
        self._pids[vm.config.vm_id] = pid
        entry = {
            "pid": pid,
            "start_time": process_start_time(pid) if pid else None,
            "workdir": str(vm.config.workdir),
        }
        path = self.directory / f"{vm.config.vm_id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entry))
        os.replace(tmp, path)

    def forget(self, vm: VirtualMachine) -> None:
        """Drop a destroyed VM's record."""
        self._pids.pop(vm.config.vm_id, None)
        (self.directory / f"{vm.config.vm_id}.json").unlink(missing_ok=True)

    def live_pids(self) -> list[int]:
        """The VMM process ids of the VMs this process recorded and has not forgotten."""
        return [pid for pid in list(self._pids.values()) if pid]

    def live_count(self) -> int:
        """How many VMs this process recorded and has not forgotten."""
        return len(self._pids)

    def entries(self) -> list[dict[str, Any]]:
        """Every record (unreadable ones are skipped)."""
        found = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return found

    def reconcile(
        self,
        driver: Driver | None = None,
        keep_vms: Collection[str] = (),
        keep_sandboxes: Collection[str] = (),
    ) -> dict[str, int]:
        """Kill what a dead daemon left running and remove its files; return what was done.

        ``keep_vms`` (VM ids) and ``keep_sandboxes`` (sandbox ids) belong to catalogued
        sandboxes that outlive the daemon: they are left as they are.
        """
        killed = 0
        kept_dirs = {f"vm-{vm_id}" for vm_id in keep_vms} | set(keep_sandboxes)
        for entry in self.entries():
            if Path(str(entry.get("workdir", ""))).name in kept_dirs:
                continue
            pid, start = entry.get("pid"), entry.get("start_time")
            if isinstance(pid, int) and start is not None and process_start_time(pid) == start:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
        removed = 0
        # Every VM directory counts, not only journalled VMs: a VM still starting when the
        # daemon died has a directory and a cgroup (with a process in it) but no entry yet.
        vm_ids = [path.stem for path in self.directory.glob("*.json")]
        vm_ids += [path.name.removeprefix("vm-") for path in self.vms_dir.glob("vm-*")]
        vm_ids = [vm_id for vm_id in vm_ids if vm_id not in keep_vms]
        cgroups = (driver or default_driver()).release_stale(vm_ids)
        # VMs of an embedded service live in the shared runtime dir: their journalled workdirs.
        outside = [
            Path(entry["workdir"])
            for entry in self.entries()
            if isinstance(entry.get("workdir"), str)
            and Path(entry["workdir"]).name.startswith("vm-")
            and Path(entry["workdir"]).parent != self.vms_dir
        ]
        for path in list(self.directory.iterdir()):
            path.unlink(missing_ok=True)
        for path in [*self.vms_dir.iterdir(), *self.sandboxes_dir.iterdir(), *outside]:
            if path.name not in kept_dirs and path.exists():
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
        return {"killed": killed, "removed": removed, "cgroups": cgroups}
