"""What goes into each image, and the cache keys derived from it (pure data and functions)."""

from __future__ import annotations

from dataclasses import dataclass

from fission.cache_keys import cache_key

SUITE = "bookworm"
KERNEL_PACKAGE = "linux-image-cloud-amd64"
# Bumped when the way an image is put together changes, so caches rebuild.
RECIPE_FORMAT = "1"

# Kernel modules the initramfs loads, in load order (Debian's cloud kernel builds them as modules).
KERNEL_MODULES: tuple[str, ...] = (
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_mmio.ko",
    "kernel/drivers/block/virtio_blk.ko",
    "kernel/drivers/char/virtio_console.ko",
    "kernel/drivers/char/hw_random/virtio-rng.ko",
    "kernel/fs/overlayfs/overlay.ko",
)

# Run inside the new root at build time: the unprivileged user code runs as, and its home.
CUSTOMIZE_COMMANDS: tuple[str, ...] = (
    "groupadd --gid 1000 sandbox",
    "useradd --uid 1000 --gid 1000 --create-home --home-dir /home/sandbox --shell /bin/bash "
    "sandbox",
    "mkdir -p /opt/fission",
    # No DNS inside the guest: names go to the host's egress proxy, which resolves them itself.
    "cp /dev/null /etc/resolv.conf",
)

# Paths dpkg leaves out of every image: documentation and translations nobody reads in a VM.
DPKG_EXCLUDES: tuple[str, ...] = (
    "/usr/share/man/*",
    "/usr/share/doc/*",
    "/usr/share/locale/*",
    "/usr/share/info/*",
)


@dataclass(frozen=True)
class Recipe:
    """One language's root image: a name and the Debian packages on top of minbase."""

    name: str
    packages: tuple[str, ...]
    description: str


RECIPES: dict[str, Recipe] = {
    "python": Recipe(
        "python",
        # pip, pytest, git and curl: for `fission install`, `fission repo` and network runs.
        (
            "python3",
            "python3-numpy",
            "python3-pandas",
            "python3-pip",
            "python3-pytest",
            "git",
            "curl",
            "ca-certificates",
        ),
        "Python 3 with numpy, pandas, pip, pytest, git and curl",
    ),
    "node": Recipe("node", ("python3", "nodejs", "npm"), "Node.js and npm"),
    "bash": Recipe("bash", ("python3", "bash", "coreutils"), "bash and coreutils"),
    # ca-certificates: `fission install --lang go` fetches modules over TLS through the proxy.
    "go": Recipe("go", ("python3", "golang-go", "ca-certificates"), "Go (Debian's golang-go)"),
}


def recipe_key(recipe: Recipe, apt_sources: bytes) -> str:
    """Cache key of a language's base tree: its packages, the suite and the apt sources."""
    return cache_key(
        RECIPE_FORMAT,
        SUITE,
        recipe.name,
        *recipe.packages,
        *CUSTOMIZE_COMMANDS,
        *DPKG_EXCLUDES,
        apt_sources,
    )
