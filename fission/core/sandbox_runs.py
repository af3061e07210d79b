"""What a run or a command in a sandbox asks of its guest: the run spec (the sandbox's spec with
the call's code, timeout, env and stdin) and, for commands, the argv and the agent request.
"""

from __future__ import annotations

from dataclasses import replace

from fission.agent.client import ExecRequest
from fission.core.limits import MB
from fission.core.sandbox_spec import SandboxSpec
from fission.core.spec import RunSpec
from fission.errors import InvalidInput
from fission.net.egress import proxy_env

SHELL = "/bin/sh"


def run_spec(
    spec: SandboxSpec,
    code: str = "",
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    stdin: bytes | None = None,
) -> RunSpec:
    """The run spec of one call in a sandbox made from ``spec``."""
    limits = spec.limits if timeout is None else replace(spec.limits, timeout=timeout)
    return RunSpec(spec.language, code, limits, spec.env | (env or {}), stdin, network=spec.network)


def command_argv(command: str | list[str]) -> list[str]:
    """The argv of a shell command line (a string) or of an argv (a list), checked."""
    if isinstance(command, str):
        if not command.strip():
            raise InvalidInput("the command is empty")
        return [SHELL, "-c", command]
    if not command or not all(isinstance(part, str) and part for part in command):
        raise InvalidInput("the command must be a non-empty list of non-empty strings")
    return list(command)


def command_request(spec: RunSpec, argv: list[str], cwd: str | None) -> ExecRequest:
    """The agent request running ``argv`` under ``spec``'s limits, env and network."""
    limits = spec.limits
    return ExecRequest(
        argv=argv,
        env=spec.language.env | proxy_env(spec.network) | spec.env,
        timeout=limits.timeout,
        memory_bytes=limits.memory_mb * MB,
        pids_max=limits.pids,
        output_limit=limits.output_limit_bytes,
        cwd=cwd,
    )
