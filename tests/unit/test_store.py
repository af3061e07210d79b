"""The image store: what is built, whether it is current, and how to fix it when it is not."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fission.errors import ImagesNotBuilt, NotReady
from fission.images import store
from fission.images.store import (
    ImageSet,
    agent_key,
    built_languages,
    image_set,
    load_manifest,
    manifest_path,
    save_manifest,
)

HOW = "fission images build python"


def built(
    cache_dir: Path, key: str | None = None, languages: tuple[str, ...] = ("python",)
) -> dict[str, Any]:
    """Fake image files and a manifest naming them, as `fission images build` leaves them."""
    images = cache_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    files = {"kernel": images / "vmlinuz", "initramfs": images / "initramfs.cpio.gz"}
    for path in files.values():
        path.write_bytes(b"fake")
    manifest: dict[str, Any] = {
        "kernel": {"path": str(files["kernel"]), "release": "6.1.0-28-cloud-amd64"},
        "initramfs": {"path": str(files["initramfs"])},
        "rootfs": {},
    }
    for language in languages:
        rootfs = images / f"rootfs-{language}.ext4"
        rootfs.write_bytes(b"fake")
        manifest["rootfs"][language] = {"path": str(rootfs), "agent_key": key or agent_key()}
    save_manifest(manifest)
    return manifest


def test_the_cache_dir_comes_from_the_environment(cache_dir: Path) -> None:
    assert manifest_path() == cache_dir / "images" / "manifest.json"


def test_nothing_built(cache_dir: Path) -> None:
    with pytest.raises(ImagesNotBuilt, match=HOW) as caught:
        image_set("python")
    assert "not built" in str(caught.value)
    assert isinstance(caught.value, NotReady)


def test_the_command_names_the_language_asked_for(cache_dir: Path) -> None:
    built(cache_dir, languages=("python",))
    with pytest.raises(ImagesNotBuilt, match="fission images build node"):
        image_set("node")


@pytest.mark.parametrize("drop", ["kernel", "initramfs", "rootfs"])
def test_a_manifest_without_a_part_is_not_built(cache_dir: Path, drop: str) -> None:
    manifest = built(cache_dir)
    del manifest[drop]
    save_manifest(manifest)
    with pytest.raises(ImagesNotBuilt, match=HOW):
        image_set("python")


@pytest.mark.parametrize("text", ["", "{not json", "[1, 2]", '"manifest"', "null"])
def test_an_unreadable_manifest_is_not_built(cache_dir: Path, text: str) -> None:
    built(cache_dir)
    manifest_path().write_text(text)
    assert load_manifest() == {}
    with pytest.raises(ImagesNotBuilt, match=HOW):
        image_set("python")


@pytest.mark.parametrize("stale", ["old", "", None])
def test_a_stale_agent_key_asks_for_a_rebuild(cache_dir: Path, stale: str | None) -> None:
    manifest = built(cache_dir)
    manifest["rootfs"]["python"]["agent_key"] = stale
    save_manifest(manifest)
    with pytest.raises(ImagesNotBuilt, match=HOW) as caught:
        image_set("python")
    assert "older guest agent" in str(caught.value)


@pytest.mark.parametrize("part", ["kernel", "initramfs", "rootfs"])
def test_missing_files_are_named(cache_dir: Path, part: str) -> None:
    manifest = built(cache_dir)
    entry = manifest["rootfs"]["python"] if part == "rootfs" else manifest[part]
    Path(entry["path"]).unlink()
    with pytest.raises(ImagesNotBuilt, match=HOW) as caught:
        image_set("python")
    assert "missing" in str(caught.value) and entry["path"] in str(caught.value)


def test_a_directory_in_place_of_a_file_is_missing(cache_dir: Path) -> None:
    manifest = built(cache_dir)
    rootfs = Path(manifest["rootfs"]["python"]["path"])
    rootfs.unlink()
    rootfs.mkdir()
    with pytest.raises(ImagesNotBuilt, match="missing"):
        image_set("python")


def test_a_current_build_gives_its_image_set(cache_dir: Path) -> None:
    manifest = built(cache_dir)
    assert image_set("python") == ImageSet(
        "python",
        Path(manifest["kernel"]["path"]),
        Path(manifest["initramfs"]["path"]),
        Path(manifest["rootfs"]["python"]["path"]),
        "6.1.0-28-cloud-amd64",
    )


def test_save_manifest_round_trips_and_leaves_no_temp_file(cache_dir: Path) -> None:
    manifest = built(cache_dir)
    assert load_manifest() == manifest
    assert json.loads(manifest_path().read_text()) == manifest
    assert not manifest_path().with_suffix(".tmp").exists()


def test_built_languages_follow_recipe_order(cache_dir: Path) -> None:
    assert built_languages() == []
    built(cache_dir, languages=("bash", "python"))
    assert built_languages() == ["python", "bash"]


def test_the_agent_key_covers_every_agent_file(monkeypatch: pytest.MonkeyPatch) -> None:
    sources = store.agent_sources()
    assert set(sources) == set(store.AGENT_FILES)
    current = agent_key()
    assert current == agent_key()
    for name in store.AGENT_FILES:
        changed = sources | {name: sources[name] + b"\n# changed\n"}
        monkeypatch.setattr(store, "agent_sources", lambda changed=changed: changed)
        assert agent_key() != current, f"a change to {name} keeps the old images"
