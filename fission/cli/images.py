"""`fission images build|list`: make and inspect the kernel, initramfs and root disks."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fission.cli.errors import abort
from fission.errors import FissionError

if TYPE_CHECKING:
    from fission.images.build import StepReporter

app = typer.Typer(help="Build and list the VM images.", no_args_is_help=True)


@app.command("build")
def build_command(
    languages: Annotated[
        list[str] | None, typer.Argument(help="python, node, bash, go or all.")
    ] = None,
    snapshots: Annotated[
        bool, typer.Option(help="Also boot, warm and save each language's warm snapshot.")
    ] = True,
) -> None:
    """Build the kernel, initramfs, root disks and warm snapshots (cached by their inputs)."""
    from fission.core.snapshots import build_warm_snapshot
    from fission.images.build import build_images, resolve_targets

    names = languages or ["all"]
    try:
        with _progress() as step:
            build_images(names, step)
            if snapshots:
                for name in resolve_targets(names):
                    with step(f"{name} warm snapshot (booted, warmed, saved)"):
                        asyncio.run(build_warm_snapshot(name))
    except FissionError as exc:
        abort(exc)


@contextmanager
def _progress() -> Iterator[StepReporter]:
    """A live progress display on stderr; yields the ``step`` reporter the builds call."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:

        @contextmanager
        def step(description: str) -> Iterator[None]:
            task = progress.add_task(description, total=None)
            started = time.monotonic()
            try:
                yield
            except BaseException:
                failed = f"{description} [red]failed"
                progress.update(task, total=1, completed=1, description=failed)
                raise
            done = f"{description} [green]{time.monotonic() - started:.1f}s"
            progress.update(task, total=1, completed=1, description=done)

        yield step


@app.command("list")
def list_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the built images and whether each is ready to run."""
    from rich.console import Console
    from rich.table import Table

    from fission.images.recipes import RECIPES
    from fission.images.store import image_set, load_manifest

    manifest = load_manifest()
    rows: list[dict[str, Any]] = []
    for name, recipe in RECIPES.items():
        entry = manifest.get("rootfs", {}).get(name)
        try:
            image_set(name)
            status = "ready"
        except FissionError as exc:
            status = "not built" if entry is None else f"stale: {exc.message}"
        path = Path(entry["path"]) if entry else None
        size = path.stat().st_blocks * 512 if path and path.exists() else 0
        rows.append(
            {
                "language": name,
                "status": status,
                "packages": list(recipe.packages),
                "path": str(path) if path else None,
                "size_mb": round(size / 2**20, 1),
            }
        )
    kernel = manifest.get("kernel", {})
    if as_json:
        typer.echo(json.dumps({"kernel": kernel.get("package"), "images": rows}, indent=2))
        return
    table = Table(title=f"fission images (kernel: {kernel.get('package', 'not built')})")
    for column in ("language", "status", "packages", "size MB", "path"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["language"],
            row["status"],
            " ".join(row["packages"]),
            str(row["size_mb"]),
            row["path"] or "-",
        )
    Console().print(table)
