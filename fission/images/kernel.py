"""The guest kernel: Debian's cloud kernel package, downloaded with apt and unpacked.

Never the host's /boot: the guest kernel is an input of the image, chosen and cached by its
package version, so every host runs the same guest kernel.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fission.cache_keys import cache_key
from fission.errors import ImageBuildFailed
from fission.images.recipes import KERNEL_MODULES, KERNEL_PACKAGE
from fission.images.store import images_dir
from fission.images.tools import capture, run_logged
from fission.tools import require_tool


def resolve_kernel_package() -> tuple[str, str]:
    """Return (versioned package name, version) that ``linux-image-cloud-amd64`` points to."""
    apt_cache = require_tool("apt-cache")
    depends = capture(
        [apt_cache, "depends", KERNEL_PACKAGE],
        timeout=60,
        what=f"apt-cache depends {KERNEL_PACKAGE}",
    )
    names = re.findall(r"Depends:\s+(linux-image-\S+)", depends)
    if not names:
        raise ImageBuildFailed(
            f"apt knows no package behind {KERNEL_PACKAGE}: run `apt-get update` and retry"
        )
    show = capture(
        [apt_cache, "show", "--no-all-versions", names[0]],
        timeout=60,
        what=f"apt-cache show {names[0]}",
    )
    match = re.search(r"^Version:\s*(\S+)", show, re.MULTILINE)
    if not match:
        raise ImageBuildFailed(f"apt-cache shows no version for {names[0]}")
    return names[0], match.group(1)


def kernel_dir_for(key: str) -> Path:
    """Directory of the unpacked kernel with cache key ``key``."""
    return images_dir() / f"kernel-{key}"


def build_kernel(log: Path) -> dict[str, Any]:
    """Download and unpack the kernel unless cached; return its manifest entry."""
    package, version = resolve_kernel_package()
    key = cache_key(package, version, *KERNEL_MODULES)
    target = kernel_dir_for(key)
    entry_file = target / "release"
    if entry_file.is_file() and (target / "vmlinuz").is_file():
        release = entry_file.read_text().strip()
        return {
            "key": key,
            "path": str(target / "vmlinuz"),
            "release": release,
            "modules": str(target / "modules"),
            "package": f"{package}={version}",
        }
    apt_get, dpkg_deb = require_tool("apt-get"), require_tool("dpkg-deb")
    with tempfile.TemporaryDirectory(prefix="fission-kernel-") as tmp:
        work = Path(tmp)
        run_logged(
            [apt_get, "download", f"{package}={version}"],
            log,
            cwd=work,
            timeout=600,
            what=f"downloading {package}",
        )
        debs = list(work.glob("*.deb"))
        if not debs:
            raise ImageBuildFailed(f"apt-get download left no .deb for {package}; log: {log}")
        unpacked = work / "root"
        run_logged(
            [dpkg_deb, "-x", str(debs[0]), str(unpacked)],
            log,
            timeout=300,
            what=f"unpacking {debs[0].name}",
        )
        vmlinuz = sorted((unpacked / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise ImageBuildFailed(f"{package} holds no /boot/vmlinuz-*")
        release = vmlinuz[0].name.removeprefix("vmlinuz-")
        staging = target.with_name(target.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "modules").mkdir(parents=True)
        shutil.copy2(vmlinuz[0], staging / "vmlinuz")
        module_root = unpacked / "lib" / "modules" / release
        for module in KERNEL_MODULES:
            source = module_root / module
            if not source.is_file():
                raise ImageBuildFailed(f"{package} lacks module {module}")
            shutil.copy2(source, staging / "modules" / source.name)
        (staging / "release").write_text(release + "\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return {
        "key": key,
        "path": str(target / "vmlinuz"),
        "release": release,
        "modules": str(target / "modules"),
        "package": f"{package}={version}",
    }
