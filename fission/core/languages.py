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
}

_BY_NAME = {alias: lang for lang in LANGUAGES.values() for alias in (lang.name, *lang.aliases)}


def resolve_language(name: str) -> Language:
    """The language called ``name`` (or one of its aliases), case-insensitively."""
    language = _BY_NAME.get(name.strip().lower())
    if language is None:
        known = ", ".join(f"{lang.name} ({', '.join(lang.aliases)})" for lang in LANGUAGES.values())
        raise UnknownLanguage(f"unknown language {name!r}: choose one of {known}")
    return language
