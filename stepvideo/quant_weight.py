"""``--quantize fp8_weight``: linear weights stored as float8 e4m3 with one float32 scale per output
channel, dequantised to the compute dtype at use. Halves the weight bytes of the DiT's blocks (and
of Step-1's layers), so half the memory resident and half the bytes streamed under ``--offload``.

Library: torchao's ``Float8WeightOnlyConfig`` (torchao >= 0.18, ``pip install 'stepvideo[quant]'``)
through ``torchao.quantization.quantize_``; its default granularity is per row (per output
channel), its weights are ``Float8Tensor``s that move with ``Module.to`` and clone like any
tensor, and it runs on CPU and CUDA. The dequantisation is torchao's (a separate op before the
matmul; ``--compile`` lets inductor fuse it into the matmul's prologue where it can).

INTEGRATION POINT: ``stepvideo/quant.py`` (the ``--quantize`` module of the speed branch, dynamic
FP8) should take this as its ``fp8_weight`` mode; until then the runner calls ``quantize_fp8_weight``
directly. Only the blocks/layers are quantised: the embedders, projections and the final layer
are small (0.7 GB of the DiT's 58.7 GB) and sit where errors would touch every token.
"""

from __future__ import annotations

import torch
from torch import nn


def require_torchao():
    """(Float8WeightOnlyConfig, quantize_), or a RuntimeError saying what to install."""
    try:
        from torchao.quantization import Float8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise RuntimeError("--quantize fp8_weight needs torchao (>= 0.18): "
                           "pip install 'stepvideo[quant]' (or pip install torchao)") from e
    return Float8WeightOnlyConfig, quantize_


def block_linears(prefix: str):
    """A torchao ``filter_fn``: the nn.Linear layers under ``prefix`` (e.g. ``transformer_blocks.``)."""
    def keep(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and fqn.startswith(prefix)
    return keep


@torch.no_grad()
def quantize_fp8_weight(model: nn.Module, prefix: str) -> nn.Module:
    """Store the weights of the linears under ``prefix`` as float8 e4m3 + per-output-channel
    scale, in place. The DiT: ``prefix="transformer_blocks."``; Step-1:
    ``"transformer.layers."``."""
    config, quantize_ = require_torchao()
    quantize_(model, config(), filter_fn=block_linears(prefix))
    return model


def quantize_dit(model: nn.Module) -> nn.Module:
    return quantize_fp8_weight(model, "transformer_blocks.")


def quantize_step1(model: nn.Module) -> nn.Module:
    return quantize_fp8_weight(model, "transformer.layers.")


def error_stats(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """max and mean |out - ref|, relative L2 and cosine similarity (float64)."""
    a, b = out.double().flatten(), ref.double().flatten()
    return {"max_abs": (a - b).abs().max().item(), "mean_abs": (a - b).abs().mean().item(),
            "rel_l2": ((a - b).norm() / b.norm()).item(),
            "cosine": torch.nn.functional.cosine_similarity(a, b, dim=0).item()}
