"""``fission install`` and ``fission repo``: set a VM up through the allowlist, then run a command.

Both run shell commands in the language's image (``bash`` is in every image) under the same
limits, output and exit codes as ``fission run``. ``install`` caches the VM with the packages
installed as a derived snapshot, so the same package set starts as fast as a plain run the
next time; ``repo`` clones a git URL through the proxy or copies a local directory in (never
mounts it).
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fission.agent.client import OutputSink
from fission.core import derived, orchestrator
from fission.core.audit_events import audit_local_egress
from fission.core.languages import Language
from fission.core.limits import Limits
from fission.core.machines import Machine
from fission.core.spec import RunResult, RunSpec
from fission.core.transfers import Upload
from fission.errors import InvalidInput
from fission.net.egress import attach
from fission.net.policy import NetworkPolicy

WORKDIR = "/home/sandbox/work"
INSTALL_LOG = "/home/sandbox/.fission-install.log"
INSTALL_TIMEOUT = 600.0
REGISTRY_HOSTS = {
    "python": ("pypi.org", "files.pythonhosted.org"),
    "node": ("registry.npmjs.org",),
}
PACKAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+\-\[\],=<>!~@/^*]*$")
MAX_REPO_FILES = 10000
GIT_IMAGES = ("python",)  # images whose recipe has git
MAX_REPO_BYTES = 256 * 1024 * 1024


def shell_language(language: Language) -> Language:
    """``language``'s image, running bash scripts (with the language's environment)."""
    return Language(
        f"{language.name}-shell", language.image, ("bash",), "main.sh", env=language.env
    )


def url_host(url: str, what: str) -> str:
    """``HOST[:PORT]`` of an http(s) URL, as an allowlist entry; InvalidInput when malformed."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(f"{what} {url!r}: use an http:// or https:// URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}"


def check_packages(packages: Sequence[str]) -> list[str]:
    """The package specs, checked so none reads as an option or shell syntax."""
    if not packages:
        raise InvalidInput("--packages names no package")
    for package in packages:
        if not PACKAGE.match(package):
            raise InvalidInput(f"--packages: {package!r} is not a package name or spec")
    return sorted(set(packages))


def install_script(language: Language, packages: list[str]) -> str:
    """The shell script that installs ``packages`` with the language's package manager."""
    quoted = " ".join(shlex.quote(p) for p in packages)
    if language.name == "python":
        command = (
            "python3 -m pip install --user --no-cache-dir --break-system-packages "
            f"--progress-bar off -q -- {quoted}"
        )
    elif language.name == "node":
        command = (
            f"mkdir -p {WORKDIR} && cd {WORKDIR} && "
            f"npm install --no-fund --no-audit --no-update-notifier --loglevel=error {quoted}"
        )
    else:
        raise InvalidInput(f"fission install supports python and node, not {language.name}")
    return f"set -e\n{command}\necho {shlex.quote(' '.join(packages))} >> {INSTALL_LOG}\n"


@dataclass(frozen=True)
class InstallResult:
    """The command's result, whether the environment came from the cache, and the set-up's."""

    result: RunResult
    cached: bool
    setup_ms: float
    installed: bool = True


async def install(
    language: Language,
    packages: Sequence[str],
    command: str,
    *,
    index_url: str | None = None,
    allow_hosts: Sequence[str] = (),
    limits: Limits | None = None,
    on_output: OutputSink | None = None,
) -> InstallResult:
    """Install ``packages`` (or restore them from the cache), then run ``command``."""
    wanted = check_packages(packages)
    if index_url:
        hosts = [*allow_hosts, url_host(index_url, "--index-url")]
    else:
        hosts = [*allow_hosts, *REGISTRY_HOSTS.get(language.name, ())]
    policy = NetworkPolicy.allowing(hosts)
    shell = shell_language(language)
    env = {"PIP_INDEX_URL": index_url, "npm_config_registry": index_url} if index_url else {}
    spec = RunSpec(shell, command, limits or Limits(), env, network=policy)
    if not orchestrator.snapshots.fits(spec.limits):
        raise InvalidInput("fission install runs with the default --cpus and --disk")
    script = install_script(language, wanted)
    setup = RunSpec(shell, script, Limits(timeout=INSTALL_TIMEOUT), env, network=policy)
    key = await derived.derived_key(language.image, "install", *wanted, index_url or "")
    name = f"install-{language.name}"
    started = time.monotonic()
    directory = derived.find(name, key)
    cached = directory is not None
    if directory is None:

        async def do_setup(machine: Machine) -> tuple[bool, RunResult]:
            result = await run_on(machine, setup, on_output)
            return result.exit_code == 0, result

        directory, setup_result = await derived.build(name, key, language.image, do_setup)
        if directory is None:  # the package manager failed: its result is the answer
            elapsed = (time.monotonic() - started) * 1000
            return InstallResult(setup_result, False, elapsed, installed=False)
    setup_ms = (time.monotonic() - started) * 1000
    machine = await derived.restore(directory, language.image)
    result = await run_on(machine, spec, on_output, destroy=True)
    return InstallResult(result, cached, setup_ms)


async def run_on(
    machine: Machine, spec: RunSpec, on_output: OutputSink | None, destroy: bool = False
) -> RunResult:
    """Run ``spec`` in ``machine`` with its network policy attached for the run."""
    egress = None
    events: list[dict[str, Any]] = []
    try:
        egress = await attach(machine.agent, spec.network, events.append)
        return await orchestrator.run_in_vm(machine.vm, machine.agent, spec, on_output)
    finally:
        if egress is not None:
            await egress.aclose()
        if destroy:
            await machine.destroy()
        await audit_local_egress(spec, events, "install.egress")


def local_uploads(source: Path) -> tuple[Upload, ...]:
    """Every regular file under ``source`` as an upload into WORKDIR; symlinks are skipped."""
    uploads: list[Upload] = []
    total = 0
    for path in sorted(source.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        total += path.stat().st_size
        if len(uploads) >= MAX_REPO_FILES or total > MAX_REPO_BYTES:
            raise InvalidInput(
                f"{source} holds more than {MAX_REPO_FILES} files or "
                f"{MAX_REPO_BYTES // (1024 * 1024)} MB: clone it from a URL instead"
            )
        uploads.append(Upload(path, f"{WORKDIR}/{path.relative_to(source).as_posix()}"))
    return tuple(uploads)


def repo_script(url: str | None, ref: str | None, command: str) -> str:
    """The shell script that fetches the repository (if a URL), checks out ``ref``, runs."""
    lines = ["set -e"]
    if url is not None:
        lines.append(f"git clone -q -- {shlex.quote(url)} {WORKDIR}")
    lines.append(f"mkdir -p {WORKDIR} && cd {WORKDIR}")
    if ref:
        lines.append(f"git -c advice.detachedHead=false checkout -q {shlex.quote(ref)} --")
    lines += ["set +e", command, ""]
    return "\n".join(lines)


async def repo(
    language: Language,
    source: str,
    command: str,
    *,
    ref: str | None = None,
    allow_hosts: Sequence[str] = (),
    limits: Limits | None = None,
    on_output: OutputSink | None = None,
) -> RunResult:
    """Clone ``source`` (a git URL) or copy it in (a local directory), then run ``command``."""
    if ref is not None and (not ref or ref.startswith("-")):
        raise InvalidInput(f"--ref {ref!r} is not a branch, tag or commit")
    local = Path(source)
    if "://" not in source and local.is_dir():
        uploads = local_uploads(local)
        policy = NetworkPolicy.allowing(list(allow_hosts)) if allow_hosts else NetworkPolicy()
        script = repo_script(None, ref, command)
    else:
        if language.image not in GIT_IMAGES:
            raise InvalidInput(
                f"cloning needs git, which only the {', '.join(GIT_IMAGES)} image has: "
                "use --lang python, or pass a local directory"
            )
        uploads = ()
        policy = NetworkPolicy.allowing([*allow_hosts, url_host(source, "the repository")])
        script = repo_script(source, ref, command)
    spec = RunSpec(shell_language(language), script, limits or Limits(), network=policy)
    return await orchestrator.run(spec, on_output, uploads)
