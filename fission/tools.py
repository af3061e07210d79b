"""Finding the host programs that image builds and VMs need (``require_tool``)."""

from __future__ import annotations

import shutil

from fission.errors import MissingTool

# Which Debian package ships each program, for error messages that say what to install.
PACKAGE_OF: dict[str, str] = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "mmdebstrap": "mmdebstrap",
    "mkfs.ext4": "e2fsprogs",
    "busybox": "busybox-static",
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
}


def require_tool(name: str) -> str:
    """Return the path of program ``name`` or raise MissingTool naming its package."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if found is None:
        package = PACKAGE_OF.get(name, name)
        raise MissingTool(
            f"{name} is not installed: install the Debian package '{package}' "
            f"(apt-get install {package}) or run `make setup`"
        )
    return found
