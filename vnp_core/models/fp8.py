"""FP8 (e4m3) matrix products with row-wise scales, for ESM-2's linear layers.

Each weight row (one output feature) is scaled into e4m3's range once, at load; each activation row
(one token) at every call. The quantisation of an activation is a row maximum and an elementwise
divide, so when the layer is compiled it fuses into the op that produced the activation (the
residual add and LayerNorm) instead of being a pass of its own; after the GELU, whose rows are 4x
wider, a kernel of our own does it (`fp8_gelu`).
`torch._scaled_mm` multiplies in the tensor cores and returns the model's dtype with the bias added.
Hopper (sm_90) and Ada (sm_89) GPUs have FP8 tensor cores; on the CPU, which the tests use, the same
e4m3 values are multiplied in fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
MIN_CUDA_CAPABILITY = (8, 9)
PRECISION_PREFIX = "fp8_e4m3+"  # `LoadedModel.precision` of a model whose linear layers run here


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) in e4m3 and its (M, 1) fp32 scales: row i is `x8[i] * scale[i]`."""
    x = x.float()
    # A row of zeros keeps a tiny positive scale, so it quantises to zeros and not to NaN.
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / E4M3_MAX
    return (x / scale).to(E4M3), scale


class Fp8Rows(NamedTuple):
    """Activations already in e4m3: row i is `values[i] * scale[i]`."""

    values: torch.Tensor
    scale: torch.Tensor


class Fp8Gelu(nn.Module):
    """Exact-erf GELU whose output only an `Fp8Linear` reads: quantised as it is computed."""

    def forward(self, x: torch.Tensor) -> Fp8Rows:
        if x.is_cuda:
            from vnp_core.models.fp8_gelu import gelu_quantize_rows

            return Fp8Rows(*gelu_quantize_rows(x))
        return Fp8Rows(*quantize_rows(F.gelu(x)))


class Fp8Linear(nn.Module):
    """`nn.Linear` with its weight in e4m3 (per-output-feature scales) and its input quantised per row
    (or given as `Fp8Rows`); its output has the dtype of the weight it replaced."""

    # cuBLAS's fast accumulation keeps the partial sums in the tensor cores' own precision instead
    # of promoting them to fp32 as it goes. On ESM-2 3B: +9% tokens/s, and the same cosine against
    # fp32 to four digits (bench/BENCHMARKS.md); e4m3's rounding of the inputs dominates the error.
    use_fast_accum = True

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight", weight)  # (out, in) row-major: `.T` is the column-major operand cuBLAS wants
        self.register_buffer("weight_scale", scale.T.contiguous())  # (1, out)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        self.out_dtype = linear.weight.dtype

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        x8, x_scale = x if isinstance(x, Fp8Rows) else quantize_rows(x)
        if not x8.is_cuda:  # CPU builds of torch differ in the scales `_scaled_mm` takes: the same products in fp32
            out = (x8.float() * x_scale) @ (self.weight.float() * self.weight_scale.T).T
            return (out if self.bias is None else out + self.bias.float()).to(self.out_dtype)
        return torch._scaled_mm(x8, self.weight.T, scale_a=x_scale, scale_b=self.weight_scale, bias=self.bias,
                                out_dtype=self.out_dtype, use_fast_accum=self.use_fast_accum)


def check_fp8_device(device: torch.device, what_to_do: str = "turn fp8 off") -> None:
    """Refuse a GPU without FP8 tensor cores, in one sentence that ends with `what_to_do`."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < MIN_CUDA_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"fp8 needs a GPU with FP8 tensor cores (Ada or Hopper, compute capability 8.9 or later); "
                         f"{name} has {'.'.join(map(str, torch.cuda.get_device_capability(device)))}: {what_to_do}")


def use_fp8_linears(module: nn.Module) -> None:
    """Replace every `nn.Linear` below `module` by its `Fp8Linear` (the half-precision weights are freed),
    and every `nn.GELU` by an `Fp8Gelu`: in ESM-2 a GELU's output is always a linear layer's input."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Fp8Linear(child))
            elif isinstance(child, nn.GELU) and child.approximate == "none":
                setattr(parent, name, Fp8Gelu())
