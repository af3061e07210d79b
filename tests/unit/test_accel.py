"""Choosing the accelerator: the FISSION_ACCEL override and the TSC frequency for TCG."""

from __future__ import annotations

from pathlib import Path

import pytest

from fission.errors import InvalidInput
from fission.vmm import accel
from fission.vmm.accel import accel_override, detect_accel, tsc_khz

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) CPU @ 2.10GHz
cpu MHz\t\t: 2100.000
cache size\t: 16384 KB

processor\t: 1
cpu MHz\t\t: 1800.000
"""


@pytest.mark.parametrize(
    ("text", "khz"),
    [
        (CPUINFO, 2100000),
        ("cpu MHz : 2399.998\n", 2399998),
        ("cpu MHz: 3000\n", 3000000),
        ("  cpu MHz  :  1234.5  \n", 1234500),
        ("flags : fpu\ncpu MHz : 800.000\n", 800000),
    ],
)
def test_tsc_khz_reads_the_first_cpu_mhz_line(text: str, khz: int) -> None:
    assert tsc_khz(text) == khz


@pytest.mark.parametrize(
    "text",
    [
        "",
        "processor : 0\n",
        "cpu MHz : fast\n",
        "cpu MHz :\n",
        "cpu MHz\n",
        "cpu MHz max : 3000\n",
        "cpu mhz : 3000\n",
    ],
)
def test_tsc_khz_without_a_usable_line_is_none(text: str) -> None:
    assert tsc_khz(text) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("kvm", "kvm"),
        ("tcg", "tcg"),
        ("KVM", "kvm"),
        ("Tcg", "tcg"),
        (" tcg\n", "tcg"),
        ("", None),
        ("   ", None),
    ],
)
def test_accel_override(monkeypatch: pytest.MonkeyPatch, value: str, expected: str | None) -> None:
    monkeypatch.setenv("FISSION_ACCEL", value)
    assert accel_override() == expected


def test_no_override_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FISSION_ACCEL", raising=False)
    assert accel_override() is None


@pytest.mark.parametrize("value", ["xen", "hvf", "kvm,tcg", "kv", "tcg0", "1"])
def test_an_invalid_override_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("FISSION_ACCEL", value)
    with pytest.raises(InvalidInput, match="FISSION_ACCEL") as caught:
        accel_override()
    assert "kvm or tcg" in str(caught.value)


@pytest.mark.parametrize("forced", ["kvm", "tcg"])
async def test_an_override_skips_the_probe(
    monkeypatch: pytest.MonkeyPatch, forced: str, tmp_path: Path
) -> None:
    async def no_probe(*args: object) -> bool:
        raise AssertionError("probe_kvm must not run when FISSION_ACCEL is set")

    monkeypatch.setattr(accel, "probe_kvm", no_probe)
    monkeypatch.setenv("FISSION_ACCEL", forced)
    assert await detect_accel("/nonexistent/qemu", "0", tmp_path / "k", tmp_path / "i") == forced


async def test_without_kvm_the_answer_is_tcg(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    async def no_probe(*args: object) -> bool:
        raise AssertionError("probe_kvm must not run without /dev/kvm")

    monkeypatch.setattr(accel, "probe_kvm", no_probe)
    monkeypatch.setattr(accel, "kvm_device_usable", lambda: False)
    assert await detect_accel("/nonexistent/qemu", "0", tmp_path / "k", tmp_path / "i") == "tcg"


async def test_the_probe_answer_is_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[str] = []

    async def fake_probe(qemu: str, kernel: Path, initramfs: Path) -> bool:
        calls.append(qemu)
        return True

    monkeypatch.setattr(accel, "probe_kvm", fake_probe)
    monkeypatch.setattr(accel, "kvm_device_usable", lambda: True)
    args = ("/nonexistent/qemu", "7.2", tmp_path / "k", tmp_path / "i")
    assert await detect_accel(*args) == "kvm"
    assert await detect_accel(*args) == "kvm"
    assert len(calls) == 1
    assert await detect_accel("/nonexistent/qemu", "8.0", tmp_path / "k", tmp_path / "i") == "kvm"
    assert len(calls) == 2  # a new QEMU version probes again
