"""The MCP tools: thin adapters over ``Service`` (one-shot runs) and ``SandboxManager``.

Each tool validates nothing the core validates; it converts arguments, calls one core method
and shapes the result (``outputs``). Its docstring is the description the LLM reads, and its
parameters' ``Field`` descriptions end up in the input schema.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field

from fission.core.languages import resolve_language
from fission.core.limits import RANGES, Limits
from fission.core.sandbox_spec import MAX_PAGE_SIZE, MAX_TTL, SandboxSpec
from fission.core.sandbox_templates import create_from_template
from fission.core.service import Service
from fission.core.spec import RunSpec
from fission.errors import NotReady
from fission.mcp.files import (
    MAX_INLINE_BYTES,
    Encoding,
    HostFiles,
    decode_content,
    encode_content,
    read_capped,
)
from fission.mcp.outputs import (
    Deleted,
    FileContent,
    FileList,
    FileWritten,
    Forked,
    RunOutput,
    SandboxInfo,
    SandboxList,
    SnapshotInfo,
    SnapshotList,
    StepOutput,
    Transfer,
    file_entry,
    run_output,
    sandbox_info,
    snapshot_info,
    step_output,
)
from fission.mcp.ports import PortTools
from fission.mcp.template_tools import TemplateTools

# Output for an LLM's context: far below the core's 10 MB default.
OUTPUT_LIMIT_MB = 1.0
DEFAULT_TTL = 600.0
LanguageName = Literal["python", "node", "bash", "go"]

Language = Annotated[
    LanguageName,
    Field(
        description="python (Python 3 with numpy and pandas), node (Node.js), bash or go "
        "(a main package, compiled in the VM)."
    ),
]
Template = Annotated[
    str | None,
    Field(
        description="A built template's name (template_list) to start from: its language, "
        "packages, files and env (language is then the template's)."
    ),
]
Timeout = Annotated[
    float,
    Field(
        ge=RANGES["timeout"].low,
        le=RANGES["timeout"].high,
        description="Seconds it may run before it is killed (VM start-up not included).",
    ),
]
SandboxId = Annotated[str, Field(description="The id sandbox_create returned (sbx_...).")]
SandboxPath = Annotated[
    str,
    Field(
        min_length=1,
        max_length=4096,
        description="Path in the sandbox; relative paths are under /home/sandbox.",
    ),
]
FileEncoding = Annotated[Encoding, Field(description="utf-8 for text, base64 for binary data.")]
Checkpoint = Annotated[
    bool,
    Field(description="Take a checkpoint after this step; sandbox_rewind can come back to it."),
]
HostPath = Annotated[
    str,
    Field(
        min_length=1,
        max_length=4096,
        description="Path on the MCP server's host, relative to its shared directory.",
    ),
]


def checkpoint_args(checkpoint: bool) -> dict[str, Any]:
    """The keyword that asks the core for a checkpoint after a step (none unless asked)."""
    return {"checkpoint": True} if checkpoint else {}


def shell_program(language: LanguageName, command: str) -> str:
    """A program in ``language`` that runs ``command`` with /bin/sh, passing on its exit status."""
    if language == "bash":
        return command
    literal = json.dumps(command)  # also a valid Python and JavaScript string literal
    if language == "python":
        return f'import os\nos.execv("/bin/sh", ["/bin/sh", "-c", {literal}])\n'
    return (
        'const r = require("child_process").spawnSync("/bin/sh", ["-c", '
        f'{literal}], {{stdio: "inherit"}});\n'
        "process.exit(r.status ?? 128 + (require('os').constants.signals[r.signal] || 0));\n"
    )


class FissionTools(TemplateTools, PortTools):
    """The tools of one MCP server; ``running`` is its service while the server runs."""

    def __init__(self, host_files: HostFiles | None = None) -> None:
        self.host_files = host_files
        self.running: Service | None = None

    @property
    def service(self) -> Service:
        """The running service; NotReady before the server started or after it stopped."""
        if self.running is None:
            raise NotReady("the fission MCP server has not started its service: retry shortly")
        return self.running

    @property
    def host(self) -> HostFiles:
        """The host directory of uploads and downloads (registered only when there is one)."""
        if self.host_files is None:
            raise NotReady("this server shares no host directory (start it --allow-host-files)")
        return self.host_files

    # -- one-shot runs ---------------------------------------------------------------------------
    async def run_code(
        self,
        code: Annotated[str, Field(description="The program's source code.")],
        language: Language = "python",
        timeout: Timeout = 30.0,
        template: Template = None,
    ) -> RunOutput:
        """Run a program once in a fresh, isolated microVM and return what it printed.

        The VM has its own Linux kernel and no network; it is destroyed after the run, so
        nothing (files, variables, installed packages) carries over to the next call: use
        sandbox_create for that. Returns stdout, stderr, exit_code, timed_out, oom and
        truncated. Print what you want to see: the value of a last expression is not shown.
        Programs get 256 MB of memory; stdout and stderr together are capped at 1 MiB (the rest
        is dropped and truncated is true).
        """
        spec = RunSpec(resolve_language(language), code, self._limits(timeout), template=template)
        return run_output(await self.service.run(spec))

    async def run_command(
        self,
        command: Annotated[str, Field(min_length=1, description="A shell command line.")],
        language: Annotated[
            LanguageName,
            Field(description="Which VM image: bash (coreutils), python or node."),
        ] = "bash",
        timeout: Timeout = 30.0,
    ) -> RunOutput:
        """Run one shell command line (/bin/sh -c) once in a fresh, isolated microVM.

        Like run_code, but for a command such as `ls -la /usr/lib/python3/dist-packages` or
        `python3 --version`. The VM has no network (no downloads, no package installs) and is
        destroyed afterwards. `language` picks the image whose tools the command can use.
        Returns stdout, stderr, exit_code, timed_out, oom and truncated; output is capped at 1
        MiB.
        """
        program = shell_program(language, command)
        spec = RunSpec(resolve_language(language), program, self._limits(timeout))
        return run_output(await self.service.run(spec))

    # -- sandboxes -------------------------------------------------------------------------------
    async def sandbox_create(
        self,
        language: Language = "python",
        ttl: Annotated[
            float,
            Field(
                ge=1,
                le=MAX_TTL,
                description="Seconds the sandbox lives before it is deleted with its files.",
            ),
        ] = DEFAULT_TTL,
        memory_mb: Annotated[
            int,
            Field(
                ge=RANGES["memory_mb"].low,
                le=RANGES["memory_mb"].high,
                description="Memory for programs in the sandbox, in MB.",
            ),
        ] = 256,
        metadata: Annotated[
            dict[str, str] | None,
            Field(description="Optional labels (up to 32 short strings) to recognise it by."),
        ] = None,
        from_snapshot: Annotated[
            str | None,
            Field(
                description="A snapshot id (snapshot_list) to start from: its language, "
                "memory (variables) and files; memory_mb is then the snapshot's."
            ),
        ] = None,
        on_timeout: Annotated[
            Literal["delete", "pause"],
            Field(description='At the end of the ttl: "delete" the sandbox, or "pause" it.'),
        ] = "delete",
        template: Template = None,
    ) -> SandboxInfo:
        """Create a persistent sandbox: an isolated microVM that keeps its files and state.

        Use it for work that spans several steps: run code that keeps variables between calls
        (sandbox_run_code), run shell commands (sandbox_exec), write and read files. Files live
        under /home/sandbox. There is no network. The sandbox is deleted with everything in it
        when its ttl runs out (see expires_at), or paused with on_timeout "pause"; pause it to
        keep it longer (a paused sandbox is kept for a retention period, see expires_at). Returns
        its id (pass it as sandbox_id) and expiry. Delete it with sandbox_delete when done.
        """
        if from_snapshot is not None:
            snapshots = self.service.sandboxes.snapshots
            record = await snapshots.create_from(from_snapshot, ttl=ttl, metadata=metadata)
            return sandbox_info(record)
        limits = Limits(memory_mb=memory_mb, output_limit_mb=OUTPUT_LIMIT_MB)
        spec = SandboxSpec(
            resolve_language(language),
            limits,
            ttl,
            metadata=metadata or {},
            on_timeout=on_timeout,
        )
        if template is not None:
            manager = self.service.sandboxes
            return sandbox_info(await create_from_template(manager, spec, template))
        return sandbox_info(await self.service.sandboxes.create(spec))

    async def sandbox_run_code(
        self,
        sandbox_id: SandboxId,
        code: Annotated[str, Field(description="Source code in the sandbox's language.")],
        context: Annotated[
            str | None,
            Field(
                description="Name of a persistent interpreter whose variables, imports and "
                "functions survive between calls, like a notebook kernel (Python sandboxes; in "
                "other languages the default runs each call as a fresh program); null runs the "
                "code as a fresh program instead."
            ),
        ] = "default",
        fresh_context: Annotated[
            bool, Field(description="Restart the context first, forgetting its variables.")
        ] = False,
        timeout: Timeout = 30.0,
        checkpoint: Checkpoint = False,
    ) -> StepOutput:
        """Run code in a sandbox, by default statefully: variables persist between calls.

        With the default context, `x = 41` in one call and `print(x + 1)` in the next prints
        42. The code runs in /home/sandbox and sees the files earlier calls wrote. Returns
        stdout, stderr, exit_code, timed_out, oom and truncated (output is capped at 1 MiB).
        A timeout kills only this call's code. Fails with sandbox_not_running when the sandbox
        is paused (call sandbox_resume) and sandbox_not_found when it was deleted or expired.
        """
        language = self.service.sandboxes.get(sandbox_id).spec.language
        if context == "default" and language.mode != "python":
            context = None  # code contexts are Python interpreters; other languages run afresh
        result = await self.service.sandboxes.run_code(
            sandbox_id,
            code,
            timeout=timeout,
            context=context,
            fresh_context=fresh_context,
            **checkpoint_args(checkpoint),
        )
        return step_output(result)

    async def sandbox_exec(
        self,
        sandbox_id: SandboxId,
        command: Annotated[str, Field(min_length=1, description="A shell command line.")],
        timeout: Timeout = 30.0,
        checkpoint: Checkpoint = False,
    ) -> StepOutput:
        """Run a shell command line (/bin/sh -c) in a sandbox, in /home/sandbox.

        Files it creates stay in the sandbox for later calls. Use it to inspect or move files
        (ls, cat, head, grep, tar), run scripts, or check the environment. There is no network.
        Returns stdout, stderr, exit_code, timed_out, oom and truncated (output capped at 1
        MiB).
        """
        sandboxes = self.service.sandboxes
        result = await sandboxes.exec_command(
            sandbox_id, command, timeout=timeout, **checkpoint_args(checkpoint)
        )
        return step_output(result)

    async def sandbox_write_file(
        self,
        sandbox_id: SandboxId,
        path: SandboxPath,
        content: Annotated[str, Field(description="The whole new content of the file.")],
        encoding: FileEncoding = "utf-8",
    ) -> FileWritten:
        """Create or replace a file in a sandbox with the given content (up to 1 MiB).

        Relative paths are under /home/sandbox, the working directory of code and commands;
        paths outside it are refused. Use encoding=base64 for binary data. Returns the path and
        the number of bytes written.
        """
        data = decode_content(content, encoding)
        await self.service.sandboxes.write_file(sandbox_id, path, data)
        return FileWritten(path=path, size=len(data))

    async def sandbox_read_file(
        self,
        sandbox_id: SandboxId,
        path: SandboxPath,
        encoding: FileEncoding = "utf-8",
    ) -> FileContent:
        """Read a file from a sandbox.

        Returns at most the first 1 MiB; truncated is true when the file is larger (read parts
        of it with sandbox_exec and head, tail or grep). Text files come back as UTF-8; use
        encoding=base64 for binary files (a non-UTF-8 file read as utf-8 is an error).
        """
        chunks = self.service.sandboxes.read_file(sandbox_id, path)
        data, truncated = await read_capped(chunks, MAX_INLINE_BYTES)
        return FileContent(
            path=path,
            encoding=encoding,
            content=encode_content(data, encoding, truncated),
            size=len(data),
            truncated=truncated,
        )

    async def sandbox_list_files(
        self,
        sandbox_id: SandboxId,
        path: Annotated[
            str,
            Field(min_length=1, description="Directory in the sandbox; . is /home/sandbox."),
        ] = ".",
    ) -> FileList:
        """List a directory in a sandbox: each entry's name, kind (file, dir...) and size."""
        entries = await self.service.sandboxes.list_files(sandbox_id, path)
        return FileList(path=path, entries=[file_entry(entry) for entry in entries])

    async def sandbox_pause(self, sandbox_id: SandboxId) -> SandboxInfo:
        """Pause a sandbox: save it to disk and stop its VM, keeping files and memory state.

        A paused sandbox uses no memory or CPU and does not expire; resume it with
        sandbox_resume before running anything in it. Returns the sandbox, now paused.
        """
        return sandbox_info(await self.service.sandboxes.pause(sandbox_id))

    async def sandbox_resume(self, sandbox_id: SandboxId) -> SandboxInfo:
        """Resume a paused sandbox exactly as it was (files, running contexts' variables).

        Its ttl starts again from now. Returns the sandbox, now running, with its new expiry.
        """
        return sandbox_info(await self.service.sandboxes.resume(sandbox_id))

    async def sandbox_delete(self, sandbox_id: SandboxId) -> Deleted:
        """Delete a sandbox now: its VM and all its files are destroyed, for good."""
        await self.service.sandboxes.delete(sandbox_id)
        return Deleted(id=sandbox_id, deleted=True)

    async def sandbox_snapshot(
        self,
        sandbox_id: SandboxId,
        name: Annotated[str | None, Field(description="A label of your own.")] = None,
    ) -> SnapshotInfo:
        """Save a running sandbox (memory and files) as a snapshot; the sandbox keeps running.

        Start new sandboxes from it with sandbox_create(from_snapshot=id).
        """
        return snapshot_info(
            await self.service.sandboxes.snapshots.snapshot(sandbox_id, None, name)
        )

    async def sandbox_fork(
        self,
        sandbox_id: SandboxId,
        n: Annotated[int, Field(ge=1, le=16, description="How many copies (1 to 16).")] = 1,
    ) -> Forked:
        """Copy a running sandbox n times: each copy starts with the same variables and files
        and then goes its own way (its own disk, clock and randomness). Use it to try several
        approaches from one state. Delete each copy when done."""
        snapshot, clones = await self.service.sandboxes.snapshots.fork(sandbox_id, n)
        return Forked(snapshot=snapshot_info(snapshot), sandboxes=[sandbox_info(c) for c in clones])

    async def sandbox_rewind(
        self,
        sandbox_id: SandboxId,
        checkpoint_id: Annotated[
            str, Field(description="A checkpoint_id a step with checkpoint=true returned.")
        ],
    ) -> SandboxInfo:
        """Put a sandbox back to a checkpoint: its variables and files as they were then.

        Later checkpoints stay available. Returns the sandbox, running.
        """
        return sandbox_info(
            await self.service.sandboxes.snapshots.rewind(sandbox_id, checkpoint_id)
        )

    async def snapshot_list(
        self,
        sandbox_id: Annotated[
            str | None, Field(description="Only the snapshots taken from this sandbox.")
        ] = None,
    ) -> SnapshotList:
        """List saved sandboxes (snapshots, checkpoints, forks), oldest first."""
        records = self.service.sandboxes.snapshots.list_snapshots(sandbox_id=sandbox_id)
        return SnapshotList(snapshots=[snapshot_info(r) for r in records])

    async def snapshot_delete(
        self,
        snapshot_id: Annotated[str, Field(description="The snapshot's id (snap_...).")],
    ) -> Deleted:
        """Delete a snapshot for good (refused while a sandbox started from it exists)."""
        await self.service.sandboxes.snapshots.delete(snapshot_id)
        return Deleted(id=snapshot_id, deleted=True)

    async def sandbox_list(self) -> SandboxList:
        """List this server's sandboxes (running and paused) with their expiry."""
        records, cursor = self.service.sandboxes.list_sandboxes(limit=MAX_PAGE_SIZE)
        return SandboxList(
            sandboxes=[sandbox_info(record) for record in records], more=cursor is not None
        )

    # -- host files (only with --allow-host-files) -----------------------------------------------
    async def sandbox_upload(
        self, sandbox_id: SandboxId, host_path: HostPath, path: SandboxPath
    ) -> Transfer:
        """Copy a file of any size from the MCP server's shared host directory into a sandbox.

        host_path is relative to the directory the server's operator shared
        (--allow-host-files); nothing outside it can be read. path is where the file goes in
        the sandbox (relative paths are under /home/sandbox). Returns the size and SHA-256.
        """
        reader = self.host.open(host_path)
        try:
            await self.service.sandboxes.write_file(sandbox_id, path, reader.chunks())
        finally:
            reader.close()
        host = str(self.host.resolve(host_path))
        return Transfer(
            path=path, host_path=host, size=reader.size, sha256=reader.digest.hexdigest()
        )

    async def sandbox_download(
        self, sandbox_id: SandboxId, path: SandboxPath, host_path: HostPath
    ) -> Transfer:
        """Copy a file of any size from a sandbox to the MCP server's shared host directory.

        host_path is relative to the directory the server's operator shared
        (--allow-host-files); an existing file there is replaced. Returns the size and SHA-256.
        """
        chunks = self.service.sandboxes.read_file(sandbox_id, path)
        try:
            done = await self.host.write(host_path, chunks)
        finally:
            await chunks.aclose()
        host = str(self.host.resolve(host_path))
        return Transfer(path=path, host_path=host, size=done.size, sha256=done.sha256)

    @staticmethod
    def _limits(timeout: float) -> Limits:
        return Limits(timeout=timeout, output_limit_mb=OUTPUT_LIMIT_MB)
