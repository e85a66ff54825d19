"""Process-wide CPU settings the trainer makes."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from tinyllm.runtime.device import keep_freed_memory


@pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc", reason="glibc only")
def test_freed_memory_is_reused_without_page_faults():
    """A step's large tensors come back to the same pages: no fault per 4 KB every step."""
    assert keep_freed_memory()
    size = 64 * 2**20 // 4  # 64 MB of fp32: above glibc's largest mmap threshold (32 MB)
    for _ in range(12):  # first touches fault pages in; freed blocks settle into the heap
        torch.empty(size).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        torch.empty(size).fill_(1.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 3 * 16384 // 10, faults  # 16,384 pages per tensor if each were mapped afresh
