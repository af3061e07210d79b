"""``fission install`` and ``fission repo``, planned: checked requests turned into run specs.

Both run shell commands in the language's image (``bash`` is in every image) under the same
limits, output and exit codes as ``fission run``. ``install`` caches the VM with the packages
installed as a derived snapshot, so the same package set starts as fast as a plain run the
next time; ``repo`` clones a git URL through the proxy, or runs in files the client uploaded
(a local directory is read by the client, never by the service, and copied in, never mounted).
``Service.install`` and ``Service.repo`` carry the plans out.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from fission.core import snapshots
from fission.core.languages import Language
from fission.core.limits import Limits
from fission.core.spec import RunResult, RunSpec
from fission.errors import InvalidInput
from fission.net.policy import NetworkPolicy

WORKDIR = "/home/sandbox/work"
INSTALL_LOG = "/home/sandbox/.fission-install.log"
INSTALL_TIMEOUT = 600.0
REGISTRY_HOSTS = {
    "python": ("pypi.org", "files.pythonhosted.org"),
    "node": ("registry.npmjs.org",),
    "go": ("proxy.golang.org", "sum.golang.org"),
}
GO_PROXY = "https://proxy.golang.org"
PACKAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+\-\[\],=<>!~@/^*]*$")
GIT_IMAGES = ("python",)  # images whose recipe has git


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


def package_env(language: Language, index_url: str | None) -> dict[str, str]:
    """The environment that points the language's package manager at ``index_url``."""
    if language.name == "go":
        # A private GOPROXY has no checksum database behind it; the public one has.
        return {"GOPROXY": index_url, "GOSUMDB": "off"} if index_url else {"GOPROXY": GO_PROXY}
    return {"PIP_INDEX_URL": index_url, "npm_config_registry": index_url} if index_url else {}


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
    elif language.name == "go":
        # A module of its own in the workdir: the command builds there with the modules got.
        command = (
            f"mkdir -p {WORKDIR} && cd {WORKDIR} && "
            "{ test -f go.mod || go mod init sandbox >/dev/null 2>&1; } && "
            f"go get {quoted}"
        )
    else:
        raise InvalidInput(f"fission install supports python, node and go, not {language.name}")
    return f"set -e\n{command}\necho {shlex.quote(' '.join(packages))} >> {INSTALL_LOG}\n"


@dataclass(frozen=True)
class InstallResult:
    """The command's result, whether the environment came from the cache, and the set-up's."""

    result: RunResult
    cached: bool
    setup_ms: float
    installed: bool = True


@dataclass(frozen=True)
class InstallPlan:
    """What ``fission install`` runs: a set-up step (cached as a derived snapshot), a command."""

    language: Language
    setup: RunSpec  # installs the packages; its VM is saved as the derived snapshot
    command: RunSpec  # runs in a restore of that snapshot
    name: str  # derived snapshots' name prefix
    key_parts: tuple[str, ...]  # with the base snapshot, the cache key


def plan_install(
    language: Language,
    packages: Sequence[str],
    command: str,
    *,
    index_url: str | None = None,
    allow_hosts: Sequence[str] = (),
    limits: Limits | None = None,
) -> InstallPlan:
    """Check an install request and plan it; InvalidInput before any VM starts."""
    wanted = check_packages(packages)
    if index_url:
        hosts = [*allow_hosts, url_host(index_url, "--index-url")]
    else:
        hosts = [*allow_hosts, *REGISTRY_HOSTS.get(language.name, ())]
    policy = NetworkPolicy.allowing(hosts)
    shell = shell_language(language)
    env = package_env(language, index_url)
    spec = RunSpec(shell, command, limits or Limits(), env, network=policy)
    if not snapshots.fits(spec.limits):
        raise InvalidInput("fission install runs with the default --cpus and --disk")
    script = install_script(language, wanted)
    setup = RunSpec(shell, script, Limits(timeout=INSTALL_TIMEOUT), env, network=policy)
    return InstallPlan(
        language, setup, spec, f"install-{language.name}", ("install", *wanted, index_url or "")
    )


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


def plan_repo(
    language: Language,
    url: str | None,
    command: str,
    *,
    ref: str | None = None,
    allow_hosts: Sequence[str] = (),
    limits: Limits | None = None,
) -> RunSpec:
    """The run that clones ``url`` (or uses files uploaded to WORKDIR when None) and runs."""
    if ref is not None and (not ref or ref.startswith("-")):
        raise InvalidInput(f"--ref {ref!r} is not a branch, tag or commit")
    if url is None:
        policy = NetworkPolicy.allowing(list(allow_hosts)) if allow_hosts else NetworkPolicy()
    else:
        if language.image not in GIT_IMAGES:
            raise InvalidInput(
                f"cloning needs git, which only the {', '.join(GIT_IMAGES)} image has: "
                "use --lang python, or pass a local directory"
            )
        policy = NetworkPolicy.allowing([*allow_hosts, url_host(url, "the repository")])
    script = repo_script(url, ref, command)
    return RunSpec(shell_language(language), script, limits or Limits(), network=policy)
