"""The languages fission runs, how each runs a program, and which image holds it."""

from __future__ import annotations

from dataclasses import dataclass, field

from fission.errors import UnknownLanguage


@dataclass(frozen=True)
class Language:
    """How to run a program in one language: the interpreter, the script's file name, env."""

    name: str
    image: str
    argv: tuple[str, ...]
    script_name: str
    aliases: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    # "python": warm snapshots run the script in a pre-forked interpreter (the guest's fork
    # server) that has already imported ``preload``; "exec": the agent execs ``argv``.
    mode: str = "exec"
    preload: tuple[str, ...] = ()
    # Run once in each template and each pooled clone, so real runs find warm caches.
    warm_up: str = "true"


# Go's caches in the sandbox user's home (on the VM's disk, so a warm snapshot keeps them); no
# module downloads unless asked (`fission install --lang go` sets GOPROXY). No -trimpath: it
# changes every package's build ID, so Debian's precompiled standard library goes unused and
# `fmt` recompiles the runtime (12 s natively instead of 0.4 s, minutes under TCG). -s leaves
# out the symbol table and DWARF, which halves the link (most of a warm run); panics still
# print their stack traces.
GO_ENV = {
    "GOCACHE": "/home/sandbox/.cache/go-build",
    "GOPATH": "/home/sandbox/go",
    "GOFLAGS": "-ldflags=-s",
    "GOPROXY": "off",
    "GOTOOLCHAIN": "local",
    "CGO_ENABLED": "0",
}

LANGUAGES: dict[str, Language] = {
    "python": Language(
        "python",
        "python",
        ("python3",),
        "main.py",
        aliases=("py", "python3"),
        # Unbuffered, so output streams live through the pipe instead of arriving at exit.
        env={"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"},
        mode="python",
        preload=("numpy", "pandas"),
        warm_up="import json, os\nprint(json.dumps({'ok': os.getpid() > 0}))\n",
    ),
    "node": Language(
        "node",
        "node",
        ("node",),
        "main.js",
        aliases=("javascript", "js", "nodejs"),
        warm_up="console.log(JSON.stringify({ok: true}))",
    ),
    "bash": Language(
        "bash", "bash", ("bash",), "main.sh", aliases=("sh", "shell"), warm_up="echo ok"
    ),
    "go": Language(
        "go",
        "go",
        # Compiled inside the VM, then exec'd so the program's own exit code is the run's
        # (`go run` would turn every failure into 1). The run dir is root's, so the binary
        # goes to a fresh directory under /tmp.
        (
            "sh",
            "-c",
            'out=$(mktemp -d) && go build -o "$out/main" "$1" && exec "$out/main"',
            "go",
        ),
        "main.go",
        aliases=("golang",),
        env=GO_ENV,
        # Compiles fmt into the build cache, which the warm snapshot keeps: real runs only link.
        warm_up='package main\n\nimport "fmt"\n\nfunc main() { fmt.Println("ok") }\n',
    ),
}

_BY_NAME = {alias: lang for lang in LANGUAGES.values() for alias in (lang.name, *lang.aliases)}


def resolve_language(name: str) -> Language:
    """The language called ``name`` (or one of its aliases), case-insensitively."""
    language = _BY_NAME.get(name.strip().lower())
    if language is None:
        known = ", ".join(f"{lang.name} ({', '.join(lang.aliases)})" for lang in LANGUAGES.values())
        raise UnknownLanguage(f"unknown language {name!r}: choose one of {known}")
    return language
