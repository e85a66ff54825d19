"""MFU on a GPU is against the vendor's dense bf16 peak, looked up by the name torch reports; a GPU
not in the table falls back to the measured matmul rate, and a CPU keeps its measured limits."""

from __future__ import annotations

import pytest
import torch

from tinyllm.bench import peaks
from tinyllm.bench.peaks import dense_bf16_peak, mfu_peaks

LIMITS = {"square_limit_fp32": 1.0e12, "square_limit_bf16": 2.0e12}


@pytest.mark.parametrize(("name", "tflops"), [
    ("NVIDIA H100 80GB HBM3", 989.4),
    ("NVIDIA H100 PCIe", 756),
    ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989),
    ("NVIDIA H200 NVL", 835.5),
    ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA A100-SXM4-40GB", 312),
    ("NVIDIA A100-PCIE-40GB", 312),
    ("NVIDIA A100 80GB PCIe", 312),
    ("NVIDIA L40S", 362.05),
    ("NVIDIA GeForce RTX 4090", 165.2),
    ("NVIDIA GeForce RTX 3090", 71),
    ("NVIDIA GeForce RTX 3060", 25.5),
])
def test_known_gpus_get_their_dense_bf16_peak(name, tflops):
    assert dense_bf16_peak(name) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 3090 Ti", "NVIDIA GeForce RTX 3060 Laptop GPU",
                                  "NVIDIA GeForce RTX 4090 D", "NVIDIA L40", "Tesla V100-SXM2-16GB",
                                  "NVIDIA GeForce RTX 4080", "AMD Instinct MI300X"])
def test_variants_and_unknown_gpus_are_not_guessed(name):
    assert dense_bf16_peak(name) is None


def test_on_a_known_gpu_both_precisions_are_against_the_bf16_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    by_precision, info = mfu_peaks(torch.device("cuda", 0), LIMITS)
    assert by_precision == {"fp32": 989.4e12, "bf16": 989.4e12}
    assert info == {"gpu": "NVIDIA H100 80GB HBM3", "mfu_peak_flops_per_s": 989.4e12,
                    "mfu_peak_source": "vendor dense bf16 table"}


def test_an_unknown_gpu_uses_the_measured_bf16_matmul_rate(monkeypatch):
    monkeypatch.setattr(peaks.torch.cuda, "get_device_name", lambda device=None: "NVIDIA Future 9000")
    by_precision, info = mfu_peaks(torch.device("cuda", 0), LIMITS)
    assert by_precision == {"fp32": 2.0e12, "bf16": 2.0e12}
    assert info["mfu_peak_source"].startswith("measured") and info["gpu"] == "NVIDIA Future 9000"


def test_a_cpu_keeps_its_measured_limit_per_precision():
    by_precision, info = mfu_peaks(torch.device("cpu"), LIMITS)
    assert by_precision == {"fp32": 1.0e12, "bf16": 2.0e12} and info["gpu"] is None
