"""What this CPU can run fast: its vector/matrix extensions, after any cap on torch's kernels.

One place decides the CPU kind for training (autocast dtype), serving (compute dtype, quantised
kernels) and the benchmarks' machine line. The kinds that matter (issue 19):

- `amx` / `avx512_bf16`: native bf16 dot products (Intel Sapphire Rapids and later, AMD Zen 4+):
  bf16 weights and activations are fast;
- `avx512`, `avx2`: no native bf16: oneDNN and MKL emulate bf16 by converting to fp32, which is
  slower than fp32 itself, so everything runs in fp32 (most laptops, older servers, many cloud
  instances: a 2-core AVX2 EPYC in issue 19).

`ATEN_CPU_CAPABILITY` and `ONEDNN_MAX_CPU_ISA` cap the kernels torch uses below what the CPU has;
they cap the kind here too, so a run with `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2` makes every choice an AVX2 machine would.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

Kind = Literal["amx", "avx512_bf16", "avx512", "avx2", "baseline"]
_ORDER: tuple[Kind, ...] = ("baseline", "avx2", "avx512", "avx512_bf16", "amx")
# /proc/cpuinfo flag -> the kind it makes possible, and its label in reports.
_FLAGS = {"avx2": ("avx2", "AVX2"), "avx512f": ("avx512", "AVX-512"), "avx512_bf16": ("avx512_bf16", "AVX-512 BF16"),
          "amx_bf16": ("amx", "AMX-BF16")}
# ONEDNN_MAX_CPU_ISA values (oneDNN's dnnl_cpu_isa names) -> the highest kind they allow.
_ONEDNN_CAP = {"SSE41": "baseline", "AVX": "baseline", "AVX2": "avx2", "AVX2_VNNI": "avx2", "AVX2_VNNI_2": "avx2",
               "AVX512_CORE": "avx512", "AVX512_CORE_VNNI": "avx512", "AVX512_CORE_BF16": "avx512_bf16",
               "AVX10_1_512": "avx512_bf16", "AVX512_CORE_FP16": "avx512_bf16", "AVX512_CORE_AMX": "amx",
               "AVX512_CORE_AMX_FP16": "amx", "AVX10_1_512_AMX": "amx", "AVX10_1_512_AMX_FP16": "amx", "ALL": "amx"}
# ATen's own vectorised kernels; "avx512" leaves oneDNN's bf16/AMX paths alone.
_ATEN_CAP = {"default": "baseline", "avx2": "avx2", "avx512": "amx"}
_MKL_CAP = {"SSE4_2": "baseline", "AVX": "baseline", "AVX2": "avx2"}  # MKL_ENABLE_INSTRUCTIONS


class CpuInfo(BaseModel):
    """The CPU as the kernels see it."""

    model: str  # "Intel(R) Xeon(R) ..." or "" where /proc/cpuinfo has none
    flags: list[str]  # labels of the extensions present: AVX2, AVX-512, AVX-512 BF16, AMX-BF16
    kind: Kind  # the best kind the kernels may use (after caps)
    caps: list[str]  # the environment caps in force, "NAME=value"

    @property
    def fast_bf16(self) -> bool:
        return self.kind in ("avx512_bf16", "amx")

    def describe(self) -> str:
        caps = f"; kernels capped: {' '.join(self.caps)}" if self.caps else ""
        return f"{self.kind} ({', '.join(self.flags) or 'no AVX2'}){caps}"


def _lower(a: Kind, b: Kind) -> Kind:
    return a if _ORDER.index(a) <= _ORDER.index(b) else b


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    model, have = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not have:
                have = set(value.split())
    except OSError:
        pass
    kind: Kind = "baseline"
    flags = []
    for flag, (k, label) in _FLAGS.items():
        if flag in have:
            flags.append(label)
            kind = k if _ORDER.index(k) > _ORDER.index(kind) else kind
    caps = []
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if onednn in _ONEDNN_CAP:
        kind = _lower(kind, _ONEDNN_CAP[onednn])
        caps.append(f"ONEDNN_MAX_CPU_ISA={onednn}")
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    if aten in _ATEN_CAP:
        kind = _lower(kind, _ATEN_CAP[aten])
        caps.append(f"ATEN_CPU_CAPABILITY={aten}")
    mkl = os.environ.get("MKL_ENABLE_INSTRUCTIONS", "").upper()
    if mkl in _MKL_CAP:
        kind = _lower(kind, _MKL_CAP[mkl])
        caps.append(f"MKL_ENABLE_INSTRUCTIONS={mkl}")
    return CpuInfo(model=model, flags=flags, kind=kind, caps=caps)
