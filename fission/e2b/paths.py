"""E2B's paths in fission's sandboxes: E2B's user home, ``/home/user``, is ``/home/sandbox``."""

from __future__ import annotations

E2B_HOME = "/home/user"
FISSION_HOME = "/home/sandbox"


def guest_path(path: str) -> str:
    """The fission path of an E2B path (``/home/user/x`` -> ``/home/sandbox/x``; ``~`` too)."""
    if path == "~" or path.startswith("~/"):
        path = E2B_HOME + path[1:]
    if path == E2B_HOME or path.startswith(E2B_HOME + "/"):
        return FISSION_HOME + path[len(E2B_HOME) :]
    return path


def e2b_path(path: str) -> str:
    """The absolute path E2B shows for a fission path (relative ones are under the home)."""
    if not path.startswith("/"):
        path = E2B_HOME if path in ("", ".") else f"{E2B_HOME}/{path}"
    if path == FISSION_HOME or path.startswith(FISSION_HOME + "/"):
        return E2B_HOME + path[len(FISSION_HOME) :]
    return path
