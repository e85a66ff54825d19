"""The FLOP/s that MFU is a fraction of: a GPU's dense bf16 tensor peak, or a measured matmul limit.

Why a table: MFU on a GPU is by convention (PaLM, nanoGPT, torchtitan) model FLOP/s over the
vendor's dense bf16 tensor-core peak, so figures compare across runs and papers; a measured GEMM
rate on a GPU falls short of that peak (clocks, shapes) and would flatter the ratio. A GPU the
table does not know gets the measured square bf16 matmul rate instead, and says so. On a CPU there
is no vendor figure to trust (AVX-512/AMX clocks vary with load), so MFU stays against the square
matmul limit measured in the same sitting, per precision.

Figures are the vendors' dense (non-sparse) bf16 tensor figures, FLOP/s:
- H100 SXM5 989.4 T, H100 PCIe 756 T, H100 NVL 835.5 T: NVIDIA H100 Tensor Core GPU datasheet
  (www.nvidia.com/en-us/data-center/h100/; its table gives 2x these "with sparsity").
- H200 SXM 989 T, H200 NVL 835.5 T: NVIDIA H200 datasheet (www.nvidia.com/en-us/data-center/h200/).
- A100 40GB and 80GB, SXM and PCIe, 312 T: NVIDIA A100 datasheet (www.nvidia.com/en-us/data-center/a100/).
- L40S 362.05 T: NVIDIA L40S datasheet (www.nvidia.com/en-us/data-center/l40s/).
- RTX 4090 165.2 T (bf16, fp32 accumulate): NVIDIA Ada GPU architecture whitepaper, appendix table.
- RTX 3090 71 T (bf16, fp32 accumulate): NVIDIA Ampere GA102 GPU architecture whitepaper, table 9.
- RTX 3060 25.5 T: not in the whitepaper; GA102's rate per SM per clock (512 bf16 FLOP, from the
  3090's 71 T over 82 SMs at 1.695 GHz) x the 3060's 28 SMs at its 1.777 GHz boost clock.
"""

from __future__ import annotations

import re

import torch

_T = 1e12
# (pattern over the lower-cased name torch reports, dense bf16 FLOP/s); the first match wins, so
# the specific variants come before the family.
DENSE_BF16_PEAKS: tuple[tuple[str, float], ...] = (
    (r"\bh200 nvl\b", 835.5 * _T),
    (r"\bh200\b", 989e12),
    (r"\bh100 nvl\b", 835.5 * _T),
    (r"\bh100 pcie\b", 756e12),
    (r"\bh100\b", 989.4 * _T),  # "NVIDIA H100 80GB HBM3" is the SXM5 part
    (r"\ba100\b", 312e12),  # "NVIDIA A100-SXM4-80GB", "NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe"
    (r"\bl40s\b", 362.05 * _T),
    (r"\brtx 4090\b(?! (ti|laptop|d)\b)", 165.2 * _T),
    (r"\brtx 3090\b(?! (ti|laptop)\b)", 71e12),
    (r"\brtx 3060\b(?! (ti|laptop)\b)", 25.5 * _T),
)


def dense_bf16_peak(name: str) -> float | None:
    """The vendor's dense bf16 tensor FLOP/s for a GPU named as `torch.cuda.get_device_name()`
    names it, or None for a GPU not in the table."""
    key = re.sub(r"[\s_-]+", " ", name.lower()).strip()
    for pattern, peak in DENSE_BF16_PEAKS:
        if re.search(pattern, key):
            return peak
    return None


def mfu_peaks(device: torch.device, limits: dict) -> tuple[dict[str, float], dict]:
    """MFU's denominator per precision ("fp32", "bf16"), and how it was found (for the JSON).

    `limits` holds `bench train`'s measured `square_limit_fp32` / `square_limit_bf16` (FLOP/s).
    """
    if device.type != "cuda":
        return ({p: limits[f"square_limit_{p}"] for p in ("fp32", "bf16")},
                {"gpu": None, "mfu_peak_flops_per_s": None, "mfu_peak_source": "measured square matmul, per precision"})
    name = torch.cuda.get_device_name(device)
    table = dense_bf16_peak(name)
    peak = table if table is not None else limits["square_limit_bf16"]
    source = "vendor dense bf16 table" if table is not None else "measured square bf16 matmul (GPU not in the table)"
    # Both precisions against the chip's bf16 peak: an fp32 run's MFU then shows what bf16 leaves unused.
    return {"fp32": peak, "bf16": peak}, {"gpu": name, "mfu_peak_flops_per_s": peak, "mfu_peak_source": source}
