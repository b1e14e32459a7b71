"""Quantized DiT linears: every ``--quantize`` mode lives here.

Modes (``MODES``):
- ``none``        the linears as loaded (bf16 on CUDA): the reference.
- ``fp8``         dynamic float8 e4m3 activations and weights with per-row scales (a scale per token
                  row of the activation, per output channel of the weight; per-tensor scaling is
                  known to wreck some diffusion models), through torchao's
                  ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``: the matmul
                  runs on the FP8 tensor cores (``torch._scaled_mm``). CUDA, compute capability
                  >= 8.9 (H100/H200/L40S/4090), torchao >= 0.18 (``pip install 'stepvideo[fp8]'``).
- ``fp8_weight``  weights stored as float8 e4m3 with a per-output-channel scale and dequantised at use
                  (``Float8WeightLinear``): half the weight memory of bf16, the matmul in the
                  activation dtype, any device.
Only the blocks' linears are quantized (attention projections and MLP: all but ~0.1% of the matmul
FLOPs); the embedders, AdaLN-Single and the output projection keep the model dtype. 8-bit attention is
a separate choice: ``--attn_backend sage`` (see ``stepvideo.modules.attention``).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

MODES = ("none", "fp8", "fp8_weight")
E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
# e4m3 keeps 3 mantissa bits: a normal value rounds within 2^-4 of itself; below the smallest
# normal (2^-6) the spacing is 2^-9, so the rounding error is at most 2^-10 there.
E4M3_REL, E4M3_ABS = 2.0 ** -4, 2.0 ** -10


def quantize_rowwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> (e4m3 weight, float32 scale (out,)) with w ~ w8 * scale[:, None]."""
    amax = w.detach().float().abs().amax(dim=1).clamp(min=1e-12)
    scale = amax / E4M3_MAX
    w8 = (w.detach().float() / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return w8, scale


def dequantize_rowwise(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (w8.float() * scale[:, None]).to(dtype)


def rowwise_error_bound(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |dequantize(quantize(w)) - w| (in float32, before the final cast)."""
    return w.float().abs() * E4M3_REL + scale[:, None] * E4M3_ABS


class Float8WeightLinear(nn.Module):
    """A Linear whose weight is stored as e4m3 + a per-output-channel scale (``fp8_weight``)."""

    def __init__(self, weight8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight8.shape
        self.dtype = dtype  # the compute dtype: the model's
        self.register_buffer("weight", weight8)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Float8WeightLinear":
        w8, scale = quantize_rowwise(linear.weight)
        return cls(w8, scale, linear.bias, linear.weight.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_rowwise(self.weight, self.weight_scale, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, storage=float8_e4m3fn+rowscale, compute={self.dtype}")


def check_mode(mode: str, device: torch.device | str, tensor_parallel: int = 1) -> None:
    """Raise with one line when ``mode`` cannot run here; say what to do instead."""
    device = torch.device(device)
    if mode not in MODES:
        raise ValueError(f"unknown --quantize mode {mode!r}; choose one of {list(MODES)}")
    if mode != "none" and tensor_parallel > 1:
        raise ValueError(f"--quantize {mode} is not combined with tensor parallelism yet "
                         f"(degree {tensor_parallel}); use --quantize none or ulysses/cfg parallelism")
    if mode != "fp8":
        return
    if device.type != "cuda":
        raise RuntimeError("--quantize fp8 needs a CUDA GPU of compute capability >= 8.9 (FP8 "
                           f"tensor cores; torch._scaled_mm has no {device.type} kernel); on this "
                           "device use --quantize fp8_weight (weight storage only) or none")
    cc = torch.cuda.get_device_capability(device)
    if cc < (8, 9):
        raise RuntimeError(f"--quantize fp8 needs compute capability >= 8.9 (H100/H200/L40S/4090), "
                           f"this GPU has {cc[0]}.{cc[1]}; use --quantize fp8_weight or none")
    if importlib.util.find_spec("torchao") is None:
        raise RuntimeError("--quantize fp8 needs torchao >= 0.18: pip install 'stepvideo[fp8]'")


DIT_BLOCKS, STEP1_LAYERS = "transformer_blocks.", "transformer.layers."  # what is quantised


def linears_under(model: nn.Module, prefix: str) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of every nn.Linear whose name starts with ``prefix``."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith(prefix)]


def quantize_linears(model: nn.Module, prefix: str) -> int:
    """``fp8_weight`` for every nn.Linear under ``prefix``, in place; returns how many."""
    targets = linears_under(model, prefix)
    for qualname, linear in targets:
        parent_name, _, attr = qualname.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, Float8WeightLinear.from_linear(linear))
    return len(targets)


def quantize_step1(model: nn.Module) -> int:
    """``fp8_weight`` for Step-1's transformer layers (``Step1Model``), in place."""
    return quantize_linears(model, STEP1_LAYERS)


def error_stats(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """max and mean |out - ref|, relative L2 and cosine similarity, in float64."""
    a, b = out.double().flatten(), ref.double().flatten()
    return {"max_abs": (a - b).abs().max().item(), "mean_abs": (a - b).abs().mean().item(),
            "rel_l2": ((a - b).norm() / b.norm().clamp_min(1e-30)).item(),
            "cosine": torch.nn.functional.cosine_similarity(a, b, dim=0).item()}


def quantize_dit(model: nn.Module, mode: str) -> int:
    """Quantize the blocks' linears of ``model`` in place for ``mode``; returns how many."""
    if mode not in MODES:
        raise ValueError(f"unknown --quantize mode {mode!r}; choose one of {list(MODES)}")
    if mode == "none":
        return 0
    if mode == "fp8_weight":
        return quantize_linears(model, DIT_BLOCKS)
    check_mode(mode, next(model.parameters()).device)
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    names = {n for n, _ in linears_under(model, DIT_BLOCKS)}
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda m, fqn: fqn in names)
    return len(names)
