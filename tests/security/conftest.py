"""The hostile-code suite shares the integration fixtures: a private runtime dir, images built,
and the check that no VMM process or VM file outlives a test."""

from __future__ import annotations

from tests.integration.conftest import data_dir, images_built, no_leftovers, runtime_dir

__all__ = ["data_dir", "images_built", "no_leftovers", "runtime_dir"]
