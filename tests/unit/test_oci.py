"""OCI images as root disks: the checks and the agent's additions, without umoci or a VM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fission.core.templates import load
from fission.errors import ImageBuildFailed, InvalidInput
from fission.images import oci


def index(layout: Path, *manifests: dict[str, object]) -> Path:
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": manifests}))
    return layout


MANIFEST = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:ab"}


def test_a_single_untagged_manifest_gets_a_tag(tmp_path: Path) -> None:
    layout = index(tmp_path / "l", dict(MANIFEST))
    assert oci._tag_single_manifest(layout, tmp_path) == oci.TAG
    tagged = json.loads((layout / "index.json").read_text())["manifests"][0]
    assert tagged["annotations"][oci.REF_NAME] == oci.TAG
    assert oci._tag_single_manifest(layout, tmp_path) == oci.TAG  # now read back


def test_a_multi_platform_index_is_refused_with_what_to_do(tmp_path: Path) -> None:
    nested = {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": "sha256:cd"}
    with pytest.raises(InvalidInput, match="multi-platform index: save one platform"):
        oci._tag_single_manifest(index(tmp_path / "l", nested), tmp_path)
    with pytest.raises(InvalidInput, match="holds 2 manifests"):
        oci._tag_single_manifest(index(tmp_path / "m", MANIFEST, MANIFEST), tmp_path)


def test_the_key_follows_the_archive_s_bytes(tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    archive.write_bytes(b"one")
    first = oci.image_name("python", archive)
    assert first.startswith("python@oci-")
    archive.write_bytes(b"two")
    assert oci.image_name("python", archive) != first
    with pytest.raises(InvalidInput, match="no such file"):
        oci.image_name("python", tmp_path / "absent.tar")
    with pytest.raises(InvalidInput, match=r"no index\.json"):
        oci.image_name("python", tmp_path)


def test_an_image_without_python_is_refused(tmp_path: Path) -> None:
    (tmp_path / "usr/bin").mkdir(parents=True)
    with pytest.raises(ImageBuildFailed, match="has no python3"):
        oci.adapt_for_agent(tmp_path, Path("image.tar"))


def test_the_agent_s_needs_are_added(tmp_path: Path) -> None:
    (tmp_path / "usr/local/bin").mkdir(parents=True)
    (tmp_path / "usr/local/bin/python3").write_text("")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh")  # no final newline
    oci.adapt_for_agent(tmp_path, Path("image.tar"))
    assert (tmp_path / "usr/bin/python3").readlink() == Path("/usr/local/bin/python3")
    assert (tmp_path / "etc/passwd").read_text().splitlines()[-1].startswith("sandbox:x:1000:1000")
    assert "sandbox:x:1000:" in (tmp_path / "etc/group").read_text()
    assert (tmp_path / "opt/fission/agent.py").is_file()
    assert (tmp_path / "home/sandbox").stat().st_uid == 1000
    assert (tmp_path / "etc/resolv.conf").read_text() == ""
    for mount_point in ("dev", "proc", "sys", "run", "tmp"):
        assert (tmp_path / mount_point).is_dir()
    oci.adapt_for_agent(tmp_path, Path("image.tar"))  # twice: the user is not added again
    lines = (tmp_path / "etc/passwd").read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["root", "sandbox"]


def test_an_oci_base_is_checked_before_any_vm(tmp_path: Path) -> None:
    toml = tmp_path / "t.toml"
    toml.write_text('base = "oci:missing.tar"\n')
    with pytest.raises(InvalidInput, match=r"missing\.tar does not exist"):
        load(toml)
    (tmp_path / "image.tar").write_bytes(b"x")
    toml.write_text('base = "oci:image.tar"\nlanguage = "cobol"\n')
    with pytest.raises(InvalidInput, match="unknown language 'cobol'"):
        load(toml)
    toml.write_text('base = "python"\nlanguage = "node"\n')
    with pytest.raises(InvalidInput, match="language is for an oci: base"):
        load(toml)
    toml.write_text('base = "oci:image.tar"\nlanguage = "node"\n')
    spec = load(toml)
    assert (spec.language.name, spec.oci) == ("node", tmp_path / "image.tar")
