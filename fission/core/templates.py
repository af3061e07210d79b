"""Templates: a TOML file naming a base and what to add to it, read and checked (pure).

A template names a base (a language, or another template by name or path), pip/npm/go
packages, Debian packages, files to copy in, environment, a start command and default limits::

    name = "analysis"
    base = "python"                  # a language, a built template's name, or "other.toml"
    apt = ["jq"]                     # Debian packages: baked into an image of its own
    pip = ["fissiondemo"]            # or npm = [...] / go = [...] for the node / go bases
    index_url = "http://127.0.0.1:8000/simple/"   # optional: a private index for pip/npm/go
    start = "mkdir -p ~/work"        # run once at build time, as the sandbox user
    [files]
    "/home/sandbox/data.csv" = "data.csv"   # guest path = file beside the TOML
    [env]
    MODE = "fast"
    [limits]
    timeout = 60
    memory_mb = 512

Everything is checked here, before any VM starts: bad TOML, unknown keys, a base that is not a
language or template, a cycle of bases, a missing file, malformed package names. Bases are
merged (``TemplateSpec.merged``), so every template is one set-up on top of a language's warm
VM: ``fission.core.template_build`` makes it a derived snapshot with a name.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fission.core.languages import Language, resolve_language
from fission.core.limits import Limits
from fission.core.provision import PACKAGE, url_host
from fission.core.transfers import MAX_TRANSFER_FILES
from fission.errors import FissionError, InvalidInput, UnknownLanguage

NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
APT_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
# Which package list each language's package manager installs.
PACKAGE_KINDS = {"python": "pip", "node": "npm", "go": "go"}
KEYS = {
    "name",
    "base",
    "language",
    "apt",
    "pip",
    "npm",
    "go",
    "index_url",
    "start",
    "files",
    "env",
    "limits",
}
OCI_PREFIX = "oci:"
MAX_FILE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class TemplateSpec:
    """One checked template, its bases already merged in."""

    name: str
    language: Language
    apt: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()  # for the language's package manager (pip, npm or go)
    index_url: str | None = None
    start: tuple[str, ...] = ()  # the bases' start commands first
    files: dict[str, Path] = field(default_factory=dict)  # guest path -> host file
    env: dict[str, str] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)  # Limits fields, checked
    oci: Path | None = None  # an OCI image (archive or layout) as the root filesystem

    def default_limits(self) -> Limits:
        """The template's default limits (``Limits`` defaults for what it leaves out)."""
        return Limits(**self.limits)


def bad(source: str, problem: str) -> InvalidInput:
    """The error for a template that cannot be used, naming the file and the problem."""
    return InvalidInput(f"template {source}: {problem}")


def _strings(source: str, data: dict[str, Any], key: str) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad(source, f"{key} must be a list of strings")
    return tuple(value)


def _check_packages(source: str, kind: str, names: tuple[str, ...], pattern: re.Pattern[str]):
    for name in names:
        if not pattern.match(name):
            raise bad(source, f"{kind} package {name!r} is not a package name or spec")


def _files(source: str, data: dict[str, Any], here: Path) -> dict[str, Path]:
    table = data.get("files", {})
    if not isinstance(table, dict):
        raise bad(source, "[files] must map guest paths to files beside the template")
    if len(table) > MAX_TRANSFER_FILES:
        raise bad(source, f"[files] names {len(table)} files; the most is {MAX_TRANSFER_FILES}")
    files = {}
    for guest, local in table.items():
        if not isinstance(local, str) or not guest.startswith("/") or "\0" in guest:
            raise bad(source, f"[files] {guest!r}: use an absolute guest path = a local file")
        path = (here / local).resolve()
        if not path.is_file():
            raise bad(source, f"[files] {guest!r}: {path} is not a file")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise bad(source, f"[files] {path} is larger than {MAX_FILE_BYTES} bytes")
        files[guest] = path
    return files


def _env(source: str, data: dict[str, Any]) -> dict[str, str]:
    env = data.get("env", {})
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and "=" not in k for k, v in env.items()
    ):
        raise bad(source, "[env] must map variable names to strings")
    return dict(env)


def _limits(source: str, data: dict[str, Any]) -> dict[str, Any]:
    limits = data.get("limits", {})
    if not isinstance(limits, dict):
        raise bad(source, "[limits] must be a table such as {timeout = 60, memory_mb = 512}")
    try:
        Limits(**limits)
    except TypeError as exc:
        raise bad(source, f"[limits]: {exc}") from exc
    except FissionError as exc:
        raise bad(source, f"[limits]: {exc}") from exc
    return dict(limits)


def read_toml(path: Path) -> dict[str, Any]:
    """The template file's table; InvalidInput naming the file when it is missing or not TOML."""
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        raise bad(str(path), f"cannot be read ({exc.strerror or exc})") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise bad(str(path), f"is not valid TOML ({exc})") from exc


# Finds a built template's source file by name (None when no template has that name).
Lookup = Callable[[str], Path | None]


def load(path: Path, lookup: Lookup = lambda _name: None) -> TemplateSpec:
    """Read the template at ``path`` with its bases merged in; InvalidInput on any problem."""
    return _load(path.resolve(), lookup, ())


def _load(path: Path, lookup: Lookup, chain: tuple[Path, ...]) -> TemplateSpec:
    source = str(path)
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        raise bad(source, f"its bases form a cycle ({cycle})")
    data = read_toml(path)
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise bad(source, f"unknown key(s) {', '.join(unknown)}: use {', '.join(sorted(KEYS))}")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not NAME.match(name):
        raise bad(source, f"name {name!r}: use lower-case letters, digits, '.', '_' and '-'")
    base_name = data.get("base")
    if not isinstance(base_name, str) or not base_name:
        raise bad(source, "base is missing: name a language (python, node, go, bash) or template")
    language_name = data.get("language")
    if language_name is not None and not base_name.startswith(OCI_PREFIX):
        raise bad(source, "language is for an oci: base; other bases bring their language")
    if base_name.startswith(OCI_PREFIX):
        base = _oci_base(source, base_name, path, language_name)
    else:
        base = _base(source, base_name, path, lookup, (*chain, path))
    language = base.language
    apt = _strings(source, data, "apt")
    _check_packages(source, "apt", apt, APT_PACKAGE)
    packages: tuple[str, ...] = ()
    for kind in ("pip", "npm", "go"):
        names = _strings(source, data, kind)
        if names and PACKAGE_KINDS.get(language.name) != kind:
            raise bad(source, f"{kind} packages need a {kind}-capable base, not {language.name}")
        _check_packages(source, kind, names, PACKAGE)
        packages += names
    index_url = data.get("index_url")
    if index_url is not None:
        if not isinstance(index_url, str):
            raise bad(source, "index_url must be a string")
        url_host(index_url, f"template {source}: index_url")
    start = data.get("start", "")
    if not isinstance(start, str):
        raise bad(source, "start must be a shell command (a string)")
    return TemplateSpec(
        name,
        language,
        apt=tuple(sorted({*base.apt, *apt})),
        packages=tuple(sorted({*base.packages, *packages})),
        index_url=index_url or base.index_url,
        start=(*base.start, *((start,) if start else ())),
        files=base.files | _files(source, data, path.parent),
        env=base.env | _env(source, data),
        limits=base.limits | _limits(source, data),
        oci=base.oci,
    )


def _oci_base(source: str, base: str, path: Path, language: object) -> TemplateSpec:
    """An empty template on the OCI image ``base`` names (``oci:PATH``, beside the file)."""
    image = (path.parent / base.removeprefix(OCI_PREFIX)).resolve()
    if not image.exists():
        raise bad(source, f"base {base!r}: {image} does not exist (an OCI archive or layout)")
    if language is None:
        language = "python"
    if not isinstance(language, str):
        raise bad(source, "language must be a string (python, node, go or bash)")
    try:
        resolved = resolve_language(language)
    except UnknownLanguage as exc:
        raise bad(source, str(exc)) from exc
    return TemplateSpec(base, resolved, oci=image)


def _base(
    source: str, base: str, path: Path, lookup: Lookup, chain: tuple[Path, ...]
) -> TemplateSpec:
    """The base, as an empty template of a language or a loaded template."""
    if base.endswith(".toml") or "/" in base:
        return _load((path.parent / base).resolve(), lookup, chain)
    try:
        return TemplateSpec(base, resolve_language(base))
    except UnknownLanguage:
        pass
    found = lookup(base)
    if found is None:
        raise bad(
            source,
            f"base {base!r} is neither a language (python, node, go, bash), a built template "
            "nor a .toml file",
        )
    return _load(found.resolve(), lookup, chain)
