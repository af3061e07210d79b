"""Small helpers shared by the integration tests."""

from __future__ import annotations

import time

from fission.agent.client import OutputSink
from fission.core.languages import resolve_language
from fission.core.limits import Limits
from fission.core.service import embedded_service
from fission.core.spec import RunResult, RunSpec


async def run_code(language: str, code: str, *, env: dict[str, str] | None = None,
                   stdin: bytes | None = None, events: list[tuple[float, str, bytes]] | None = None,
                   **limits: float) -> RunResult:
    """Run ``code`` in a fresh VM; record (time, stream, chunk) in ``events`` if given."""

    def sink(stream: str, data: bytes) -> None:
        if events is not None:
            events.append((time.monotonic(), stream, data))

    spec = RunSpec(resolve_language(language), code, Limits(**limits), env or {}, stdin)  # type: ignore[arg-type]
    return await run_spec(spec, sink)


async def run_spec(spec: RunSpec, on_output: OutputSink | None = None) -> RunResult:
    """Run ``spec`` embedded (a private Service in this process), as `fission run --no-daemon`."""
    async with embedded_service() as service:
        return await service.run(spec, on_output)
