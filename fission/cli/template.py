"""`fission template build|list|rm`: named environments built from TOML (docs/templates.md)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from fission.cli.errors import abort
from fission.errors import FissionError

app = typer.Typer(help="Build, list and remove templates.", no_args_is_help=True)


@app.command("build")
def build_command(
    file: Annotated[Path, typer.Argument(help="The template's TOML file.", show_default=False)],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Hide the set-up's output.")] = False,
) -> None:
    """Build FILE into a warm snapshot (cached by its content) and record it by name."""
    from fission.core import template_build, templates
    from fission.core.service import embedded_service

    def show(stream: str, data: bytes) -> None:
        if not quiet:
            sys.stderr.buffer.write(data)
            sys.stderr.buffer.flush()

    async def build() -> tuple[template_build.BuiltTemplate, bool]:
        async with embedded_service() as service:
            return await service.build_template(file, show)

    try:
        # Checked here first, so a bad file fails before a service or VM starts.
        spec = templates.load(file, template_build.source_of)
        template_build.plan_build(spec)
        print(f"building template {spec.name} on {spec.language.name} ...", file=sys.stderr)
        started = time.monotonic()
        built, cached = asyncio.run(build())
    except FissionError as exc:
        abort(exc)
    how = "already built (cached)" if cached else "built"
    elapsed = time.monotonic() - started
    print(f"template {built.name} {how} in {elapsed:.1f} s", file=sys.stderr)


@app.command("list")
def list_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the built templates."""
    from fission.core.template_build import built_templates

    rows = [built.to_json() for built in built_templates()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("no templates: build one with `fission template build FILE`", file=sys.stderr)
        return
    for row in rows:
        state = "ready" if row["ready"] else "needs rebuild"
        print(f"{row['name']}\t{row['language']}\t{state}\t{row['source']}")


@app.command("rm")
def remove_command(
    names: Annotated[list[str], typer.Argument(help="Template names.", show_default=False)],
) -> None:
    """Remove templates and their snapshots."""
    from fission.core.template_build import remove

    try:
        for name in names:
            remove(name)
    except FissionError as exc:
        abort(exc)
