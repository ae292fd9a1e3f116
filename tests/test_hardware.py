"""'The GPU in this box': nvidia-smi output matched to the catalog (a stand-in nvidia-smi on PATH, since
this machine has no GPU; the parsing, subprocess and matching code are the real ones)."""

import os
import stat

import pytest

from advisor.catalog import default_catalog
from advisor.errors import UnknownGpuError
from advisor.hardware import match_catalog, query_nvidia_smi
from advisor.service import AdvisorService

CAT = default_catalog()


@pytest.mark.parametrize(
    "name,mib,gid",
    [
        ("NVIDIA A100-SXM4-80GB", 81920, "a100-80gb"),
        ("NVIDIA A100-SXM4-40GB", 40960, "a100-40gb"),
        ("NVIDIA H100 80GB HBM3", 81559, "h100-sxm"),
        ("NVIDIA H100 PCIe", 81559, "h100-pcie"),
        ("NVIDIA GeForce RTX 4090", 24564, "rtx-4090"),
        ("Tesla T4", 15360, "t4"),
    ],
)
def test_driver_names_match_the_catalog(name, mib, gid):
    spec = match_catalog(name, mib, CAT)
    assert spec.id == gid and spec.memory_gib == pytest.approx(mib / 1024, abs=1e-3)


def test_unknown_local_gpu_says_what_to_do():
    with pytest.raises(UnknownGpuError, match="--gpu-file"):
        match_catalog("Quadro RTX 8000", 49152, CAT)


def test_local_detection_through_nvidia_smi(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA GeForce RTX 3090, 24576'\necho 'NVIDIA GeForce RTX 3090, 24576'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert query_nvidia_smi() == [("NVIDIA GeForce RTX 3090", 24576.0)] * 2
    assert AdvisorService().gpu("local").id == "rtx-3090"


def test_no_gpu_in_this_box_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UnknownGpuError, match="no NVIDIA GPU found"):
        AdvisorService().gpu("local")
