"""The pure parts of `fission install`, `fission repo` and file transfers."""

from __future__ import annotations

from pathlib import Path

import pytest

from fission.core.languages import resolve_language
from fission.core.provision import (
    WORKDIR,
    check_packages,
    install_script,
    plan_install,
    plan_repo,
    repo_script,
    url_host,
)
from fission.core.transfers import MAX_TRANSFER_BYTES, Upload, check_transfers
from fission.errors import InvalidInput
from fission.sdk._local import directory_uploads, parse_download, parse_upload, save_downloads


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


def test_directory_uploads_skip_symlinks(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "link").symlink_to("/etc/passwd")
    uploads = directory_uploads(tmp_path, WORKDIR)
    assert [(u.data, u.remote) for u in uploads] == [(b"x = 1\n", "/home/sandbox/work/pkg/a.py")]


def test_transfer_specs(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_text("a\n")
    upload = parse_upload(f"{source}:/data/input.csv")
    assert (upload.data, upload.remote) == (b"a\n", "/data/input.csv")
    download = parse_download(f"/data/out.txt:{tmp_path / 'out.txt'}")
    assert (download.remote, download.local) == ("/data/out.txt", tmp_path / "out.txt")
    for bad in ("nocolon", f"{tmp_path / 'missing'}:/x"):
        with pytest.raises(InvalidInput):
            parse_upload(bad)
    with pytest.raises(InvalidInput, match="directory"):
        parse_download(f"/x:{tmp_path}")
    with pytest.raises(InvalidInput):
        parse_download(f"/x:{tmp_path / 'no' / 'such' / 'f'}")


def test_cloning_needs_an_image_with_git() -> None:
    with pytest.raises(InvalidInput, match="git"):
        plan_repo(resolve_language("bash"), "http://127.0.0.1:1/r.git", "true")


def test_repo_plans() -> None:
    cloned = plan_repo(resolve_language("python"), "http://127.0.0.1:8/r.git", "ls", ref="v1")
    assert cloned.network.allows_name("127.0.0.1", 8) and "git clone" in cloned.code
    assert "checkout -q v1" in cloned.code
    local = plan_repo(resolve_language("bash"), None, "ls")
    assert not local.network.enabled and "git clone" not in local.code
    with pytest.raises(InvalidInput, match="--ref"):
        plan_repo(resolve_language("python"), None, "ls", ref="--upload-pack=x")


def test_install_plans() -> None:
    plan = plan_install(resolve_language("python"), ["b", "a", "a"], "python3 -c 1")
    assert plan.key_parts == ("install", "a", "b", "")
    assert plan.setup.network.allows_name("pypi.org", 443)
    assert plan.command.code == "python3 -c 1" and plan.command.language.name == "python-shell"
    local = plan_install(
        resolve_language("node"), ["x"], "true", index_url="http://127.0.0.1:4873/"
    )
    assert local.setup.env["npm_config_registry"] == "http://127.0.0.1:4873/"
    assert local.setup.network.allows_name("127.0.0.1", 4873)
    assert not local.setup.network.allows_name("registry.npmjs.org", 443)


def test_transfers_are_checked_before_any_vm() -> None:
    check_transfers([Upload("/data/a", b"x")], ["/data/b"])
    for bad in ([Upload("", b"x")], [Upload("/a\0b", b"")]):
        with pytest.raises(InvalidInput):
            check_transfers(bad, [])
    with pytest.raises(InvalidInput, match="at most"):
        check_transfers([Upload("/big", b"\0" * (MAX_TRANSFER_BYTES + 1))], [])


def test_downloads_are_written_only_to_their_own_paths(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.symlink_to(tmp_path / "elsewhere")
    downloads = [parse_download(f"/data/out.txt:{target}")]
    save_downloads(downloads, {"/data/out.txt": b"result\n"})
    assert not target.is_symlink() and target.read_bytes() == b"result\n"
    assert not (tmp_path / "elsewhere").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
