"""Variants of the kernels that write FP8 linear layers' inputs (`vnp_core/models/row_kernels.py`) at
ESM-2 3B's shapes (65,536 tokens; rows 10,240 wide after fc1, else 2,560): time per call, against the eager ops, Inductor's fusion of them and the HBM
floor, and how many e4m3 values differ from the eager ops'. GPU only.

    python3 bench/fp8_kernel_variants.py --out $OUT/fp8_kernel_variants.json
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
from vnp_core.models.fp8 import add_layer_norm_quantize_rows, gelu_quantize_rows, quantize_activation_rows  # noqa: E402
from vnp_core.models.row_kernels import (TINY, _add_layer_norm_quantize_rows_kernel, _gelu_quantize_rows_kernel,  # noqa: E402
                                        _quantize_rows_kernel, row_blocks)


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


def two_blocks_at(kernel, warps: int, layer_norm: bool = False):
    """A two-block kernel at `warps` warps instead of `row_blocks`'s choice (the LayerNorm's called with
    `(x, delta, weight, bias, eps)`); each returns the e4m3 values and scales."""
    def run(x, *norm_args):
        rows, cols = x.shape
        out = torch.empty((rows, cols), dtype=E4M3, device=x.device)
        scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
        meta = dict(E4M3_MAX=E4M3_MAX, TINY=TINY, **(row_blocks(cols) | {"num_warps": warps}))
        if layer_norm:
            delta, weight, bias, eps = norm_args
            kernel[(rows,)](x, delta, torch.empty_like(x), weight, bias, out, scale, cols, eps, **meta)
        else:
            kernel[(rows,)](x, out, scale, cols, **meta)
        return out, scale
    return run


def timed_ms(fn, args, reps: int = 20) -> float:
    fn(*args)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn(*args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def eager_gelu(x):
    return quantize_rows(F.gelu(x))


def eager_layer_norm(x, delta, weight, bias, eps):
    return quantize_rows(F.layer_norm(x + delta, weight.shape, weight, bias, eps))


def families(tokens: int) -> dict[str, tuple[tuple, dict]]:
    """Each kernel's inputs at ESM-2 3B's shapes, and its variants (eager and Inductor first)."""
    x_fc1 = (torch.randn(tokens, 10240, device="cuda") * 1.5).half()
    x, delta = torch.randn(tokens, 2560, device="cuda").half(), torch.randn(tokens, 2560, device="cuda").half()
    weight, bias = (torch.randn(2560, device="cuda") * 0.1 + 1).half(), (torch.randn(2560, device="cuda") * 0.1).half()
    gelu = {"eager": eager_gelu, "inductor": torch.compile(eager_gelu, dynamic=True),
            "one padded block, 8 warps (the product before)": launcher(_whole_row, BLOCK=16384, HALF_REGS=False, num_warps=8),
            "product": gelu_quantize_rows}
    gelu |= {f"two blocks, {w} warps": two_blocks_at(_gelu_quantize_rows_kernel, w) for w in (4, 8, 16)}
    for block, warps in ((2048, 4), (2048, 8)):
        gelu[f"looped {block}, {warps} warps"] = launcher(_looped, BLOCK=block, num_warps=warps)
    norm = {"eager": eager_layer_norm, "inductor": torch.compile(eager_layer_norm, dynamic=True),
            "product": lambda *a: add_layer_norm_quantize_rows(*a)[1:]}
    norm |= {f"two blocks, {w} warps": two_blocks_at(_add_layer_norm_quantize_rows_kernel, w, layer_norm=True) for w in (1, 2, 4, 8)}
    quant = {"eager": quantize_rows, "inductor": torch.compile(quantize_rows, dynamic=True), "product": quantize_activation_rows}
    quant |= {f"two blocks, {w} warps": two_blocks_at(_quantize_rows_kernel, w) for w in (1, 2, 4, 8)}
    # Bytes each must move at least: fp16 in, e4m3 out (the LayerNorm: two fp16 in, the fp16 sum out too).
    return {"gelu_quantize (fc2's input)": ((x_fc1,), gelu, x_fc1.numel() * 3),
            "add_layer_norm_quantize (q, k, v and fc1's input)": ((x, delta, weight, bias, 1e-5), norm, x.numel() * 7),
            "quantize (out_proj's input)": ((x,), quant, x.numel() * 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--tokens", type=int, default=65536)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"command": " ".join(sys.argv), "commit": args.commit, "gpu": torch.cuda.get_device_name(0),
               "versions": {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__},
               "tokens": args.tokens, "hbm_bandwidth_assumed_tb_s": 4.8, "kernels": {}}
    for family, (inputs, variants, floor_bytes) in families(args.tokens).items():
        expected = variants["eager"](*inputs)
        rows = results["kernels"][family] = {"hbm_floor_ms": round(floor_bytes / 4.8e12 * 1e3, 3), "variants": {}}
        for name, fn in variants.items():
            try:
                values, scale = fn(*inputs)
                steps = (values.view(torch.uint8).int() - expected[0].view(torch.uint8).int()).abs()
                rows["variants"][name] = {"ms": round(timed_ms(fn, inputs), 3), "values_differing": int((steps > 0).sum()),
                                          "max_code_difference": int(steps.max()),
                                          "scales_differing": int((scale != expected[1]).sum())}
            except Exception as error:  # a variant that fails to compile is recorded
                rows["variants"][name] = f"failed: {error!r}"
        del inputs, variants, expected
        torch.cuda.empty_cache()
    args.out.write_text(json.dumps(results, indent=1))
    for family, rows in results["kernels"].items():
        print(f"\n{family} ({args.tokens:,} rows): HBM floor {rows['hbm_floor_ms']} ms")
        print("| variant | ms | values differing | max code difference | scales differing |\n|---|---:|---:|---:|---:|")
        for name, row in rows["variants"].items():
            print(f"| {name} | " + (" | ".join(str(row[k]) for k in ("ms", "values_differing", "max_code_difference", "scales_differing"))
                                    if isinstance(row, dict) else row) + " |")


if __name__ == "__main__":
    main()
