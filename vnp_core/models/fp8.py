"""FP8 (e4m3) matrix products with row-wise scales, for ESM-2's linear layers.

Each weight row (one output feature) is scaled into e4m3's range once, at load; each activation row
(one token) at every call. The quantisation of an activation is a row maximum and an elementwise
divide, fused into the op that produced the activation so that it is not a pass of its own: the
residual add and LayerNorm, the GELU, or (out_proj's input) none. Each is a custom op
(`torch.ops.vnp.*`): on a GPU a Triton kernel (`row_kernels`), on the CPU the eager ops. torch.compile
calls them as they are, with concrete shapes: a Triton launch traced into a compiled layer needs
a static row width, which the layer's input does not have under `dynamic=True`.
`torch._scaled_mm` multiplies in the tensor cores and returns the model's dtype with the bias added.
Hopper (sm_90) and Ada (sm_89) GPUs have FP8 tensor cores; on the CPU, which the tests use, the same
e4m3 values are multiplied in fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vnp_core.models.esm2 import ResidualLayerNorm

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


def _rows_like(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty e4m3 rows shaped as x, and their scales."""
    return (torch.empty(x.shape, dtype=E4M3, device=x.device),
            torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device))


def _quantized_by(launch, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The e4m3 rows and scales that the Triton launcher `launch(x, out, scale)` writes for x."""
    x = x.contiguous()
    out, scale = _rows_like(x)
    if x.shape[0]:
        launch(x, out, scale)
    return out, scale


@torch.library.custom_op("vnp::quantize_activation_rows", mutates_args=())
def quantize_activation_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows(x)`, in one kernel on a GPU."""
    from vnp_core.models import row_kernels

    return _quantized_by(row_kernels.quantize_rows, x)


@torch.library.custom_op("vnp::gelu_quantize_rows", mutates_args=())
def gelu_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows(F.gelu(x))`, in one kernel on a GPU."""
    from vnp_core.models import row_kernels

    return _quantized_by(row_kernels.gelu_quantize_rows, x)


@torch.library.custom_op("vnp::add_layer_norm_quantize_rows", mutates_args=())
def add_layer_norm_quantize_rows(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`x + delta` and `quantize_rows(F.layer_norm(x + delta, ...))`, in one kernel on a GPU."""
    from vnp_core.models import row_kernels

    x, delta = x.contiguous(), delta.contiguous()
    total, (out, scale) = torch.empty_like(x), _rows_like(x)
    if x.shape[0]:
        row_kernels.add_layer_norm_quantize_rows(x, delta, weight, bias, eps, total, out, scale)
    return total, out, scale


@quantize_activation_rows.register_kernel("cpu")
def _(x):
    return quantize_rows(x)


@gelu_quantize_rows.register_kernel("cpu")
def _(x):
    return quantize_rows(F.gelu(x))


@add_layer_norm_quantize_rows.register_kernel("cpu")
def _(x, delta, weight, bias, eps):
    total = x + delta
    return total, *quantize_rows(F.layer_norm(total, weight.shape, weight, bias, eps))


quantize_activation_rows.register_fake(_rows_like)
gelu_quantize_rows.register_fake(_rows_like)


@add_layer_norm_quantize_rows.register_fake
def _(x, delta, weight, bias, eps):
    return torch.empty_like(x), *_rows_like(x)


class Fp8Gelu(nn.Module):
    """Exact-erf GELU whose output only an `Fp8Linear` reads: quantised as it is computed."""

    def forward(self, x: torch.Tensor) -> Fp8Rows:
        return Fp8Rows(*gelu_quantize_rows(x))


class Fp8ResidualLayerNorm(ResidualLayerNorm):
    """A `ResidualLayerNorm` whose normalised output only `Fp8Linear`s read: quantised as it is computed."""

    @classmethod
    def replacing(cls, norm: ResidualLayerNorm) -> Fp8ResidualLayerNorm:
        fp8_norm = cls(norm.normalized_shape, eps=norm.eps, device="meta")
        fp8_norm.weight, fp8_norm.bias = norm.weight, norm.bias
        return fp8_norm

    def forward(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, Fp8Rows]:
        total, values, scale = add_layer_norm_quantize_rows(x, delta, self.weight, self.bias, self.eps)
        return total, Fp8Rows(values, scale)


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
        x8, x_scale = x if isinstance(x, Fp8Rows) else quantize_activation_rows(x)
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
    every `nn.GELU` by an `Fp8Gelu` and every `ResidualLayerNorm` by an `Fp8ResidualLayerNorm`: in
    ESM-2's layers the outputs of both are only ever linear layers' inputs."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Fp8Linear(child))
            elif isinstance(child, nn.GELU) and child.approximate == "none":
                setattr(parent, name, Fp8Gelu())
            elif type(child) is ResidualLayerNorm:
                setattr(parent, name, Fp8ResidualLayerNorm.replacing(child))
