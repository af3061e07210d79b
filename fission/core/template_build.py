"""Building templates into named derived snapshots, and the record of the built ones.

A template is ``fission install``'s derived snapshot with a name: a clone of its language's
warm VM gets the template's files, packages and start command, then its whole state is saved
(``fission.core.derived``), keyed by everything that went in. The record of a built template
(``cache_dir()/templates/<name>.json``) names that snapshot and carries what applies at run
time: the language, environment and default limits. ``Service.build_template`` runs the plan.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fission.config import cache_dir
from fission.core import derived
from fission.core.languages import Language, resolve_language
from fission.core.limits import Limits
from fission.core.provision import (
    REGISTRY_HOSTS,
    WORKDIR,
    install_script,
    package_env,
    url_host,
)
from fission.core.spec import RunResult, RunSpec
from fission.core.templates import NAME, TemplateSpec
from fission.core.transfers import Upload
from fission.errors import ImageBuildFailed, InvalidInput, NotFound
from fission.images import apt_images, oci
from fission.images.store import images_dir
from fission.net.policy import NetworkPolicy

BUILD_TIMEOUT = 900.0
FORMAT = "template-1"


@dataclass(frozen=True)
class TemplatePlan:
    """What building a template does: uploads, then a set-up script (if it has one to run),
    saved if it succeeds."""

    spec: TemplateSpec
    language: Language  # the spec's, on the OCI image's root disk when it has one
    setup: RunSpec | None
    uploads: tuple[Upload, ...]
    key_parts: tuple[str, ...]  # with the language's warm template, the cache key

    @property
    def snapshot_name(self) -> str:
        """The derived snapshot's name prefix."""
        return f"{derived.NAMED_PREFIX}{self.spec.name}"


def setup_script(spec: TemplateSpec) -> str:
    """The shell script that installs the packages and runs the start commands, in order."""
    lines = ["set -e"]
    if spec.packages:
        lines.append(install_script(spec.language, list(spec.packages)))
    lines += spec.start
    return "\n".join(lines) + "\n"


def plan_build(spec: TemplateSpec) -> TemplatePlan:
    """The template's build plan; InvalidInput for what a plain language image cannot hold."""
    language = spec.language
    if spec.apt and spec.oci is not None:
        raise InvalidInput(
            f"template {spec.name}: Debian packages go on a language image, not on an OCI "
            "image: install them in the OCI image itself"
        )
    if spec.apt:
        apt_images.check_packages(spec.name, spec.apt)
        language = replace(language, image=apt_images.image_name(language.name, spec.apt))
    if spec.oci is not None:
        language = replace(language, image=oci.image_name(language.name, spec.oci))
    uploads = tuple(Upload(guest, path.read_bytes()) for guest, path in sorted(spec.files.items()))
    hosts: list[str] = []
    if spec.packages:
        hosts = (
            [url_host(spec.index_url, "index_url")]
            if spec.index_url
            else list(REGISTRY_HOSTS.get(spec.language.name, ()))
        )
    network = NetworkPolicy.allowing(hosts) if hosts else NetworkPolicy()
    env = package_env(spec.language, spec.index_url) if spec.packages else {}
    script = setup_script(spec)
    setup = None
    if spec.packages or spec.start:
        # sh, not bash: an OCI image may have no bash.
        shell = Language(
            f"{language.name}-setup", language.image, ("sh",), "setup.sh", env=language.env
        )
        setup = RunSpec(shell, script, Limits(timeout=BUILD_TIMEOUT), env, network=network)
    digests = [f"{upload.remote}={hashlib.sha256(upload.data).hexdigest()}" for upload in uploads]
    key_parts = (FORMAT, script, spec.index_url or "", *digests)
    return TemplatePlan(spec, language, setup, uploads, key_parts)


def prepare_image(plan: TemplatePlan) -> None:
    """Build the root disk of the template's OCI image, or of its language with its Debian
    packages, unless cached (blocking: run it in a thread)."""
    if plan.spec.apt:
        log = images_dir() / "logs" / f"apt-{plan.spec.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        built = apt_images.build_apt_rootfs(plan.spec.language.name, plan.spec.apt, log)
        assert built == plan.language.image
    if plan.spec.oci is not None:
        log = images_dir() / "logs" / f"oci-{plan.spec.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        built = oci.build_oci_rootfs(plan.spec.oci, plan.spec.language.name, log)
        assert built == plan.language.image


def run_env(spec: TemplateSpec) -> dict[str, str]:
    """The environment the template's runs get: its own, and where its npm packages are
    (``npm install`` put them in the workdir; node resolves from the script's directory)."""
    extra = {"NODE_PATH": f"{WORKDIR}/node_modules"} if spec.language.name == "node" else {}
    return extra | spec.env if spec.packages else dict(spec.env)


# -- the record of built templates ---------------------------------------------------------------
def templates_dir() -> Path:
    """Directory holding one JSON record per built template."""
    path = cache_dir() / "templates"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class BuiltTemplate:
    """A built template: its snapshot, and the language, env and limits its runs get."""

    name: str
    language: Language
    key: str
    snapshot: Path
    source: str
    env: dict[str, str]
    limits: dict[str, Any]

    def default_limits(self) -> Limits:
        """The template's default limits."""
        return Limits(**self.limits)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "name": self.name,
            "language": self.language.name,
            "image": self.language.image,
            "key": self.key,
            "snapshot": str(self.snapshot),
            "source": self.source,
            "env": self.env,
            "limits": self.limits,
            "ready": (self.snapshot / "meta.json").is_file(),
        }


def save(plan: TemplatePlan, key: str, snapshot: Path, source: Path) -> BuiltTemplate:
    """Record ``plan``'s template as built into ``snapshot``."""
    spec = plan.spec
    built = BuiltTemplate(
        spec.name, plan.language, key, snapshot, str(source), run_env(spec), spec.limits
    )
    path = templates_dir() / f"{spec.name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(built.to_json(), indent=2, sort_keys=True))
    os.replace(tmp, path)
    for older in derived.derived_dir().glob(f"{plan.snapshot_name}-*"):
        if older != snapshot:  # the same template built from other content before
            shutil.rmtree(older, ignore_errors=True)
    return built


def _from_json(data: dict[str, Any]) -> BuiltTemplate:
    language = resolve_language(str(data["language"]))
    return BuiltTemplate(
        str(data["name"]),
        replace(language, image=str(data.get("image") or language.image)),
        str(data["key"]),
        Path(data["snapshot"]),
        str(data.get("source", "")),
        dict(data.get("env", {})),
        dict(data.get("limits", {})),
    )


def built_templates() -> list[BuiltTemplate]:
    """Every recorded template, by name."""
    found = []
    for path in sorted(templates_dir().glob("*.json")):
        try:
            found.append(_from_json(json.loads(path.read_text())))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # half-written or damaged: `fission template build` writes it again
    return found


def get(name: str) -> BuiltTemplate:
    """The built template called ``name``; NotFound naming the command that builds one."""
    if not NAME.match(name):
        raise InvalidInput(f"{name!r} is not a template name")
    for built in built_templates():
        if built.name == name:
            if not (built.snapshot / "meta.json").is_file():
                raise NotFound(
                    f"template {name!r} must be rebuilt (its snapshot is gone, e.g. after an "
                    f"image rebuild): run `fission template build {built.source or 'FILE'}`"
                )
            return built
    raise NotFound(f"no template named {name!r}: build one with `fission template build FILE`")


def source_of(name: str) -> Path | None:
    """The TOML file a built template called ``name`` came from (for ``base = "name"``)."""
    for built in built_templates():
        if built.name == name and built.source:
            return Path(built.source)
    return None


def remove(name: str) -> None:
    """Forget the template called ``name`` and delete its snapshot."""
    built = next((b for b in built_templates() if b.name == name), None)
    if built is None:
        raise NotFound(f"no template named {name!r}: `fission template list` shows them")
    if built.snapshot.parent == derived.derived_dir():
        shutil.rmtree(built.snapshot, ignore_errors=True)
    (templates_dir() / f"{name}.json").unlink(missing_ok=True)


def setup_failed(plan: TemplatePlan, result: RunResult) -> ImageBuildFailed:
    """The error for a set-up that failed, naming the packages and quoting its output."""
    tail = result.stderr.decode("utf-8", errors="replace").strip()[-1500:]
    what = f"installing {', '.join(plan.spec.packages)}" if plan.spec.packages else "set-up"
    if plan.spec.start:
        what += " or the start command"
    how = "timed out" if result.timed_out else f"exited with {result.exit_code}"
    return ImageBuildFailed(f"template {plan.spec.name}: {what} {how}: {tail}")


def run_spec(name: str, spec: RunSpec) -> RunSpec:
    """``spec`` made to run in the built template ``name``: its language, env and the limits
    the caller left at their defaults."""
    built = get(name)
    defaults, chosen = Limits(), spec.limits
    overrides = {
        key: value
        for key, value in built.limits.items()
        if getattr(chosen, key) == getattr(defaults, key)
    }
    return replace(
        spec,
        language=built.language,
        env=built.env | spec.env,
        limits=replace(chosen, **overrides),
        template=name,
    )
