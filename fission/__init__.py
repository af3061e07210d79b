"""fission: run untrusted code inside throwaway microVMs.

``fission.run``, ``fission.sandbox``, ``fission.Sandbox``, ``fission.AsyncSandbox`` and
``fission.RunResult`` come from ``fission.sdk``, imported on first use so that ``import
fission`` (and so the CLI) stays cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["AsyncSandbox", "RunResult", "Sandbox", "__version__", "run", "sandbox"]

_FROM_SDK = frozenset({"AsyncSandbox", "RunResult", "Sandbox", "run", "sandbox"})

TYPE_CHECKING = False  # not typing's: importing typing costs ~5 ms of every command's start-up
if TYPE_CHECKING:
    from typing import Any

    from fission.sdk import AsyncSandbox, RunResult, Sandbox, run, sandbox


def __getattr__(name: str) -> Any:
    if name in _FROM_SDK:
        from fission import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'fission' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_FROM_SDK})
