"""The full ``fission`` command line (typer): every command, its options, help and errors."""

from __future__ import annotations

import typer

from fission.cli import (
    audit,
    cluster,
    doctor,
    gc,
    images,
    install,
    keys,
    mcp,
    run,
    serve,
    shell,
    template,
)

app = typer.Typer(
    name="fission",
    help="Run untrusted code inside throwaway microVMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("run", context_settings={"allow_interspersed_args": True})(run.run_command)
app.command("install")(install.install_command)
app.command("repo")(install.repo_command)
app.command("shell")(shell.shell_command)
app.add_typer(images.app, name="images")
app.add_typer(template.app, name="template")
app.command("serve")(serve.serve_command)
app.add_typer(serve.pool_app, name="pool")
app.add_typer(cluster.app, name="cluster")
app.add_typer(keys.app, name="keys")
app.command("audit")(audit.audit_command)
app.command("mcp")(mcp.mcp_command)
app.command("doctor")(doctor.doctor_command)
app.command("gc")(gc.gc_command)


@app.command("version")
def version_command() -> None:
    """Print fission's version."""
    from fission import __version__

    typer.echo(__version__)
