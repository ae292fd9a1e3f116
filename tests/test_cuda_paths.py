"""The CUDA code paths of the torch edge (advisor.stack.device, advisor.stack.meters), checked on a
machine without a GPU by standing in for torch.cuda and NVML: what each reads, from which device."""

from __future__ import annotations

import os
import sys
import types
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from advisor.errors import InvalidInputError  # noqa: E402
from advisor.stack import device as sdev  # noqa: E402
from advisor.stack import meters  # noqa: E402

GIB = 2**30


def fake_cuda(monkeypatch, capability=(8, 0), name="NVIDIA Tesla P100-PCIE-16GB", count=1, uuid="abc-123"):
    props = SimpleNamespace(total_memory=16 * GIB, uuid=uuid)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # emulated
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(sdev, "measure_matmul_tflops", lambda dev, dtype, n, repeats=5: 1.0)
    monkeypatch.setattr(sdev, "measure_bandwidth_gbps", lambda dev, n, repeats=5: 100.0)


def test_bf16_is_the_devices_native_support_not_emulation(monkeypatch):
    """torch.cuda.is_bf16_supported() says True on a pre-Ampere card (emulated bf16) and asks about the
    current device: an unknown Pascal card was described as bf16-capable."""
    fake_cuda(monkeypatch, capability=(6, 0))
    spec, _ = sdev.describe("cuda:0")
    assert spec.bf16_supported is False and spec.bf16_tflops is None
    fake_cuda(monkeypatch, capability=(9, 0), name="NVIDIA Future GPU 200GB")
    spec, _ = sdev.describe("cuda:0")
    assert spec.bf16_supported is True


def test_a_cuda_index_torch_does_not_see_is_an_input_error(monkeypatch):
    fake_cuda(monkeypatch, count=1)
    assert sdev.resolve_device("cuda") == "cuda:0" and sdev.resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(InvalidInputError, match="sees 1 CUDA device"):
        sdev.resolve_device("cuda:3")


def fake_nvml(monkeypatch, processes, device_used=10 * GIB):
    calls: dict[str, object] = {}
    mod = types.ModuleType("pynvml")
    mod.nvmlInit = lambda: None
    mod.nvmlShutdown = lambda: calls.setdefault("shutdown", True)
    mod.nvmlDeviceGetHandleByUUID = lambda u: calls.setdefault("uuid", u) and "handle"
    mod.nvmlDeviceGetHandleByIndex = lambda i: calls.setdefault("index", i) and "handle"
    mod.nvmlDeviceGetComputeRunningProcesses = lambda h: processes
    mod.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(used=device_used)
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    return calls


def test_nvml_reads_this_process_on_the_device_torch_uses(monkeypatch):
    """NVML numbers GPUs in PCI order and ignores CUDA_VISIBLE_DEVICES: the device is found by UUID, and
    the figure is this process' own (the device-wide one counts every other process on the GPU)."""
    fake_cuda(monkeypatch)
    mine = SimpleNamespace(pid=os.getpid(), usedGpuMemory=3 * GIB)
    other = SimpleNamespace(pid=os.getpid() + 1, usedGpuMemory=5 * GIB)
    calls = fake_nvml(monkeypatch, [other, mine])
    used, meter = meters.cuda_device_used_bytes(torch.device("cuda:0"))
    assert used == 3 * GIB and meter == "nvml:process.usedGpuMemory"
    assert calls["uuid"] == "GPU-abc-123" and "index" not in calls and calls.get("shutdown")
    fake_nvml(monkeypatch, [other])  # our pid not listed (a container's PID namespace): device-wide, said so
    used, meter = meters.cuda_device_used_bytes(torch.device("cuda:0"))
    assert used == 10 * GIB and "device-wide" in meter


def test_device_total_is_read_at_the_peak_of_the_allocator_pools(monkeypatch):
    """The driver's figure is read after the step; the pools were larger at the peak."""
    fake_cuda(monkeypatch)
    monkeypatch.setattr(meters, "cuda_device_used_bytes", lambda d: (2 * GIB, "nvml:process.usedGpuMemory"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: GIB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d=None: 3 * GIB // 2)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: GIB // 2)
    r = meters.cuda_reading(torch.device("cuda:0"), rss_baseline=0)
    assert r.peak_bytes == GIB and r.reserved_bytes == 3 * GIB // 2
    assert r.device_total_bytes == 3 * GIB  # 2 GiB now + (1.5 - 0.5) GiB the pools held more at the peak
