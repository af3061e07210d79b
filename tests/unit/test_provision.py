"""The pure parts of `fission install`, `fission repo` and file transfers."""

from __future__ import annotations

from pathlib import Path

import pytest

from fission.core.languages import resolve_language
from fission.core.provision import (
    check_packages,
    install_script,
    local_uploads,
    repo_script,
    url_host,
)
from fission.core.transfers import parse_download, parse_upload
from fission.errors import InvalidInput


def test_url_host() -> None:
    assert url_host("http://127.0.0.1:8080/simple/", "x") == "127.0.0.1:8080"
    assert url_host("https://pypi.org/simple", "x") == "pypi.org:443"
    assert url_host("http://[::1]/r.git", "x") == "[::1]:80"
    with pytest.raises(InvalidInput):
        url_host("file:///etc/passwd", "x")


@pytest.mark.parametrize("bad", ["-e .", "--index-url=x", "a;rm", "$(x)", "a b", ""])
def test_packages_that_are_not_names_are_refused(bad: str) -> None:
    with pytest.raises(InvalidInput):
        check_packages([bad])


def test_install_script_sorts_and_quotes() -> None:
    packages = check_packages(["scipy", "numpy>=1.2", "numpy>=1.2"])
    assert packages == ["numpy>=1.2", "scipy"]
    script = install_script(resolve_language("python"), packages)
    assert "pip install --user" in script and "-- 'numpy>=1.2' scipy" in script


def test_repo_script() -> None:
    script = repo_script("http://h/r.git", "broken", "pytest -q")
    assert "git clone -q -- http://h/r.git /home/sandbox/work" in script
    assert "checkout -q broken --" in script
    assert script.rstrip().endswith("set +e\npytest -q")
    assert "git clone" not in repo_script(None, None, "ls")


def test_local_uploads_skip_symlinks(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "link").symlink_to("/etc/passwd")
    uploads = local_uploads(tmp_path)
    assert [(u.local.name, u.remote) for u in uploads] == [("a.py", "/home/sandbox/work/pkg/a.py")]


def test_transfer_specs(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_text("a\n")
    upload = parse_upload(f"{source}:/data/input.csv")
    assert (upload.local, upload.remote) == (source, "/data/input.csv")
    download = parse_download(f"/data/out.txt:{tmp_path / 'out.txt'}")
    assert (download.remote, download.local) == ("/data/out.txt", tmp_path / "out.txt")
    for bad in ("nocolon", f"{tmp_path / 'missing'}:/x"):
        with pytest.raises(InvalidInput):
            parse_upload(bad)
    with pytest.raises(InvalidInput, match="directory"):
        parse_download(f"/x:{tmp_path}")
    with pytest.raises(InvalidInput):
        parse_download(f"/x:{tmp_path / 'no' / 'such' / 'f'}")


async def test_cloning_needs_an_image_with_git() -> None:
    from fission.core.provision import repo

    with pytest.raises(InvalidInput, match="git"):
        await repo(resolve_language("bash"), "http://127.0.0.1:1/r.git", "true")
