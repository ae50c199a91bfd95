"""Variants of the fused GELU + e4m3 row quantisation kernel (`vnp_core/models/fp8_gelu.py`) on ESM-2 3B's
fc1 output shape (65,536 tokens x 10,240): time per call, and how many e4m3 values differ from the eager
`quantize_rows(F.gelu(x))`. GPU only.

    python3 bench/fp8_gelu_variants.py --out $OUT/fp8_gelu_variants.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vnp_core.models.fp8 import E4M3, E4M3_MAX, quantize_rows  # noqa: E402
from vnp_core.models.fp8_gelu import TINY, gelu_quantize_rows  # noqa: E402


@triton.jit
def _whole_row(x_ptr, out_ptr, scale_ptr, n_cols, E4M3_MAX: tl.constexpr, TINY: tl.constexpr, BLOCK: tl.constexpr,
               HALF_REGS: tl.constexpr):
    """One program per row, held in registers; times by the reciprocal of the scale."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    in_row = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=in_row, other=0.0).to(tl.float32)
    gelu = (0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))).to(x_ptr.dtype.element_ty)
    if not HALF_REGS:
        gelu = gelu.to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(gelu.to(tl.float32)), axis=0), TINY) / E4M3_MAX
    tl.store(out_ptr + row * n_cols + cols, (gelu.to(tl.float32) * (1.0 / scale)).to(out_ptr.dtype.element_ty), mask=in_row)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _looped(x_ptr, out_ptr, scale_ptr, n_cols, E4M3_MAX: tl.constexpr, TINY: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row, two passes over it in blocks (the second from L2), the GELU computed twice."""
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * n_cols + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        gelu = (0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))).to(x_ptr.dtype.element_ty).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(gelu))
    scale = tl.maximum(tl.max(amax, axis=0), TINY) / E4M3_MAX
    inverse = 1.0 / scale
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * n_cols + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        gelu = (0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))).to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * n_cols + cols, (gelu * inverse).to(out_ptr.dtype.element_ty), mask=cols < n_cols)
    tl.store(scale_ptr + row, scale)


def launcher(kernel, **meta):
    def run(x):
        rows, cols = x.shape
        out = torch.empty((rows, cols), dtype=E4M3, device=x.device)
        scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
        kernel[(rows,)](x, out, scale, cols, E4M3_MAX=E4M3_MAX, TINY=TINY, **meta)
        return out, scale
    return run


def timed_ms(fn, x, reps: int = 20) -> float:
    fn(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn(x)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--commit", default="unknown")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = (torch.randn(65536, 10240, device="cuda") * 1.5).half()
    expected = quantize_rows(F.gelu(x))
    compiled = torch.compile(lambda x: quantize_rows(F.gelu(x)), dynamic=True)
    variants = {"eager": lambda x: quantize_rows(F.gelu(x)), "inductor": compiled, "product (div_rn, 16 warps)": gelu_quantize_rows}
    for warps in (4, 8, 16, 32):
        variants[f"whole row, reciprocal, {warps} warps"] = launcher(_whole_row, BLOCK=16384, HALF_REGS=False, num_warps=warps)
        variants[f"whole row, reciprocal, fp16 registers, {warps} warps"] = launcher(_whole_row, BLOCK=16384, HALF_REGS=True, num_warps=warps)
    for block, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8)):
        variants[f"looped {block}, {warps} warps"] = launcher(_looped, BLOCK=block, num_warps=warps)
    results = {"command": " ".join(sys.argv), "commit": args.commit, "gpu": torch.cuda.get_device_name(0),
               "versions": {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__},
               "shape": list(x.shape), "ms_gelu_alone": round(timed_ms(F.gelu, x), 3),
               "hbm_floor_ms": round(x.numel() * 3 / 4.8e12 * 1e3, 3), "variants": {}}
    for name, fn in variants.items():
        try:
            values, scale = fn(x)
            differing = values.view(torch.uint8) != expected[0].view(torch.uint8)
            ulps = (values.view(torch.uint8).int() - expected[0].view(torch.uint8).int()).abs()
            results["variants"][name] = {"ms": round(timed_ms(fn, x), 3), "values_differing": int(differing.sum()),
                                         "max_code_difference": int(ulps.max()),
                                         "scales_differing": int((scale != expected[1]).sum())}
        except Exception as error:  # a variant that fails to compile is recorded
            results["variants"][name] = f"failed: {error!r}"
    args.out.write_text(json.dumps(results, indent=1))
    print(f"gelu alone {results['ms_gelu_alone']} ms; HBM floor {results['hbm_floor_ms']} ms")
    print("| variant | ms | values differing | max code difference | scales differing |\n|---|---:|---:|---:|---:|")
    for name, row in results["variants"].items():
        print(f"| {name} | " + (" | ".join(str(row[k]) for k in ("ms", "values_differing", "max_code_difference", "scales_differing"))
                                if isinstance(row, dict) else row) + " |")


if __name__ == "__main__":
    main()
