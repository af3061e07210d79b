"""Template files: read, merged with their bases and checked before any VM starts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fission.core import template_build
from fission.core.languages import resolve_language
from fission.core.limits import Limits
from fission.core.spec import RunSpec
from fission.core.templates import load
from fission.errors import InvalidInput, NotFound
from fission.images import apt_images


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_template_reads_its_packages_files_env_and_limits(tmp_path: Path) -> None:
    write(tmp_path / "data.csv", "a,b\n")
    spec = load(
        write(
            tmp_path / "t.toml",
            'name = "analysis"\nbase = "python"\npip = ["fissiondemo"]\n'
            'start = "mkdir -p ~/work"\n[files]\n"/home/sandbox/data.csv" = "data.csv"\n'
            '[env]\nMODE = "fast"\n[limits]\ntimeout = 60\n',
        )
    )
    assert (spec.name, spec.language.name, spec.packages) == (
        "analysis",
        "python",
        ("fissiondemo",),
    )
    assert spec.files == {"/home/sandbox/data.csv": tmp_path / "data.csv"}
    assert spec.env == {"MODE": "fast"}
    assert spec.default_limits().timeout == 60
    plan = template_build.plan_build(spec)
    assert "pip install" in plan.setup.code and "mkdir -p ~/work" in plan.setup.code
    assert [u.remote for u in plan.uploads] == ["/home/sandbox/data.csv"]
    assert plan.setup.network.allows_name("pypi.org", 443)


def test_a_base_template_is_merged_in(tmp_path: Path) -> None:
    write(tmp_path / "base.toml", 'base = "node"\nnpm = ["left-pad"]\n[env]\nA = "1"\nB = "1"\n')
    spec = load(write(tmp_path / "top.toml", 'base = "base.toml"\nnpm = ["x"]\n[env]\nB = "2"\n'))
    assert spec.language.name == "node"
    assert spec.packages == ("left-pad", "x")
    assert spec.env == {"A": "1", "B": "2"}


def test_a_base_by_name_is_looked_up(tmp_path: Path) -> None:
    base = write(tmp_path / "b.toml", 'base = "go"\ngo = ["example.com/m@v1.0.0"]\n')
    spec = load(write(tmp_path / "t.toml", 'base = "mine"\n'), {"mine": base}.get)
    assert (spec.language.name, spec.packages) == ("go", ("example.com/m@v1.0.0",))


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("base = ", "is not valid TOML"),
        ('name = "x"\n', "base is missing"),
        ('base = "cobol"\n', "base 'cobol' is neither"),
        ('base = "python"\nflavour = 1\n', "unknown key(s) flavour"),
        ('base = "python"\npip = ["ok", "-e ."]\n', "pip package '-e .'"),
        ('base = "bash"\npip = ["requests"]\n', "pip packages need a pip-capable base"),
        ('base = "python"\napt = ["Not A Package"]\n', "apt package 'Not A Package'"),
        ('base = "python"\n[files]\n"/x" = "missing.txt"\n', "missing.txt is not a file"),
        ('base = "python"\n[files]\n"relative" = "t.toml"\n', "use an absolute guest path"),
        ('base = "python"\n[limits]\ntimeout = -1\n', "[limits]"),
        ('base = "python"\n[limits]\nspeed = 3\n', "[limits]"),
        ('base = "python"\nindex_url = "ftp://x"\n', "http:// or https://"),
        ('name = "Bad Name"\nbase = "python"\n', "name 'Bad Name'"),
    ],
)
def test_a_bad_template_names_the_file_and_the_problem(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = write(tmp_path / "t.toml", text)
    with pytest.raises(InvalidInput) as caught:
        load(path)
    assert problem in str(caught.value)
    assert str(path) in str(caught.value)


def test_a_missing_template_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"nothere\.toml: cannot be read"):
        load(tmp_path / "nothere.toml")


def test_a_cycle_of_bases_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "a.toml", 'base = "b.toml"\n')
    write(tmp_path / "b.toml", 'base = "c.toml"\n')
    write(tmp_path / "c.toml", 'base = "a.toml"\n')
    with pytest.raises(InvalidInput, match=r"cycle \(a.toml -> b.toml -> c.toml -> a.toml\)"):
        load(tmp_path / "a.toml")


needs_apt = pytest.mark.skipif(
    shutil.which("apt-cache") is None, reason="no apt-cache on this host to look packages up"
)


@needs_apt
def test_debian_packages_give_the_template_an_image_of_its_own(tmp_path: Path) -> None:
    plan = template_build.plan_build(
        load(write(tmp_path / "t.toml", 'base = "bash"\napt = ["jq"]\n'))
    )
    assert plan.language.name == "bash"
    assert plan.language.image == apt_images.image_name("bash", ("jq",))
    assert plan.language.image.startswith("bash@apt-")
    again = load(write(tmp_path / "u.toml", 'base = "bash"\napt = ["jq", "jq"]\n'))
    assert template_build.plan_build(again).language.image == plan.language.image
    other = load(write(tmp_path / "v.toml", 'base = "bash"\napt = ["file"]\n'))
    assert template_build.plan_build(other).language.image != plan.language.image


@needs_apt
def test_an_unknown_debian_package_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    spec = load(write(tmp_path / "t.toml", 'base = "bash"\napt = ["jq", "no-such-package-xyz"]\n'))
    with pytest.raises(InvalidInput, match=r"Debian has no package no-such-package-xyz \(check"):
        template_build.plan_build(spec)


def test_debian_packages_on_an_oci_base_are_refused(tmp_path: Path) -> None:
    from dataclasses import replace

    spec = replace(load(write(tmp_path / "t.toml", 'base = "bash"\napt = ["jq"]\n')), oci=tmp_path)
    with pytest.raises(InvalidInput, match="install them in the OCI image itself"):
        template_build.plan_build(spec)


def test_the_key_changes_with_a_file_s_content(tmp_path: Path) -> None:
    data = write(tmp_path / "d.txt", "one")
    path = write(tmp_path / "t.toml", 'base = "python"\n[files]\n"/home/sandbox/d" = "d.txt"\n')
    first = template_build.plan_build(load(path)).key_parts
    data.write_text("two")
    assert template_build.plan_build(load(path)).key_parts != first


def test_a_private_index_is_the_only_host_the_build_reaches(tmp_path: Path) -> None:
    path = write(
        tmp_path / "t.toml",
        'base = "go"\ngo = ["example.com/m@v1.0.0"]\nindex_url = "http://127.0.0.1:9999/"\n',
    )
    plan = template_build.plan_build(load(path))
    assert plan.setup.env == {"GOPROXY": "http://127.0.0.1:9999/", "GOSUMDB": "off"}
    assert plan.setup.network.allows_name("127.0.0.1", 9999)
    assert not plan.setup.network.allows_name("proxy.golang.org", 443)
    assert "go get" in plan.setup.code


def test_unknown_and_unbuilt_templates_say_how_to_build_one(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="fission template build"):
        template_build.get("nothing-here")
    with pytest.raises(InvalidInput):
        template_build.get("../etc")


def test_a_run_takes_the_template_s_language_env_and_default_limits(tmp_path: Path) -> None:
    snapshot = tmp_path / "snap"
    snapshot.mkdir()
    (snapshot / "meta.json").write_text("{}")
    spec = load(
        write(
            tmp_path / "t.toml",
            'name = "t1"\nbase = "node"\n[env]\nA = "1"\n[limits]\ntimeout = 90\nmemory_mb = 300\n',
        )
    )
    plan = template_build.plan_build(spec)
    template_build.save(plan, "k", snapshot, tmp_path / "t.toml")
    try:
        asked = RunSpec(resolve_language("python"), "1", Limits(memory_mb=200), {"B": "2"})
        run = template_build.run_spec("t1", asked)
        assert run.language.name == "node"
        assert run.env == {"A": "1", "B": "2"}
        assert (run.limits.timeout, run.limits.memory_mb) == (90, 200)  # the caller's wins
        assert run.template == "t1"
        assert [b.name for b in template_build.built_templates()] == ["t1"]
    finally:
        template_build.remove("t1")
    with pytest.raises(NotFound):
        template_build.remove("t1")
