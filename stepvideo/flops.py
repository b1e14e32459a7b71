"""Analytic FLOP count of a Step-Video DiT forward, and dense bf16 peaks of common accelerators.

Only matrix products are counted (2 FLOPs per multiply-add), the convention of MFU figures and of
``torch.utils.flop_counter.FlopCounterMode``. Norms, RoPE, softmax, GELU and the modulations are
O(tokens x D) each, under 0.1% of a full-size block, and left out.

Symbols: B batch, N video tokens per sample (latent frames x h x w), D = heads x head_dim,
L = cross-attention context length (77 CLIP + 320 LLM tokens = 397, or the masked maximum).
Per block, with a Linear(i -> o) over T tokens costing 2*T*i*o:

    attn1.wqkv  2*B*N*D*3D      attn1.sdpa  QK^T 2*B*N*N*D + PV 2*B*N*N*D = 4*B*N^2*D
    attn1.wo    2*B*N*D*D       attn2.wq    2*B*N*D*D
    attn2.wkv   2*B*L*D*2D      attn2.sdpa  4*B*N*L*D
    attn2.wo    2*B*N*D*D       ff          2*B*N*D*4D + 2*B*N*4D*D
  = 28*B*N*D^2 + 4*B*L*D^2 + 4*B*N^2*D + 4*B*N*L*D
"""

from __future__ import annotations

# Dense (no 2:4 sparsity) BF16 tensor-core peaks in TFLOP/s, SXM/OAM parts unless named.
# Sources: NVIDIA H100 datasheet (SXM 1,979 / PCIe 1,513 / NVL 1,671 "with sparsity", halved);
# H200 datasheet (1,979 sparse, same Hopper die and clocks as H100 SXM); H800 = H100 SXM compute;
# A100 datasheet 312; L40S datasheet 362.05 (733 sparse); L40 181.05; L4 121 (242 sparse);
# RTX 4090 165.2 (Ada whitepaper, FP32 accumulate); B200 2,250 (HGX B200, 4.5 PF sparse);
# H20 148; AMD MI300X 1,307.4 (AMD datasheet). Lookup is by substring of
# torch.cuda.get_device_name(), longest key first ("H100 PCIe" before "H100").
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "H200": 989.0,
    "H800": 989.0,
    "H20": 148.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "RTX 4090": 165.2,
    "B200": 2250.0,
    "MI300X": 1307.4,
}


def device_peak(name: str) -> float | None:
    """Dense bf16 peak TFLOP/s for a device name such as 'NVIDIA H100 80GB HBM3', or None."""
    upper = name.upper()
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key.upper() in upper:
            return PEAK_BF16_TFLOPS[key]
    return None


def _linear(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def block_flop_terms(cfg, batch: int, tokens: int, text_len: int) -> dict[str, int]:
    """FLOPs of one DiT block by matmul; ``tokens`` per sample, ``text_len`` = context length."""
    d = cfg.num_attention_heads * cfg.attention_head_dim
    bn, bl = batch * tokens, batch * text_len
    return {
        "attn1.wqkv": _linear(bn, d, 3 * d),
        "attn1.sdpa": 4 * batch * tokens * tokens * d,
        "attn1.wo": _linear(bn, d, d),
        "attn2.wq": _linear(bn, d, d),
        "attn2.wkv": _linear(bl, d, 2 * d),
        "attn2.sdpa": 4 * batch * tokens * text_len * d,
        "attn2.wo": _linear(bn, d, d),
        "ff": _linear(bn, d, 4 * d) + _linear(bn, 4 * d, d),
    }


def block_flops(cfg, batch: int, tokens: int, text_len: int) -> int:
    return sum(block_flop_terms(cfg, batch, tokens, text_len).values())


def embed_flop_terms(cfg, batch: int, tokens: int, text_len: int,
                     clip_len: int = 77) -> dict[str, int]:
    """The small terms outside the blocks: patch embed, AdaLN-Single, text projections, output.

    The caption projection runs over all ``text_len - clip_len`` LLM tokens (before the context
    is cut to the masked length), the CLIP projection over ``clip_len`` tokens.
    """
    d = cfg.num_attention_heads * cfg.attention_head_dim
    llm_dim, clip_dim = cfg.caption_channels
    patch = cfg.patch_size ** 2
    llm_len = text_len - clip_len
    return {
        "pos_embed": _linear(batch * tokens, cfg.in_channels * patch, d),
        "adaln_single": _linear(batch, 256, d) + _linear(batch, d, d) + _linear(batch, d, 6 * d),
        "caption_projection": _linear(batch * llm_len, llm_dim, d) + _linear(batch * llm_len, d, d),
        "clip_projection": _linear(batch * clip_len, clip_dim, d),
        "proj_out": _linear(batch * tokens, d, patch * cfg.out_channels),
    }


def dit_flop_terms(cfg, batch: int, tokens: int, text_len: int = 397, clip_len: int = 77,
                   kv_len: int | None = None, layers: int | None = None) -> dict[str, int]:
    """Per-part FLOPs of a whole forward; ``kv_len`` (default ``text_len``) is the masked
    cross-attention length, ``layers`` (default ``cfg.num_layers``) the block count."""
    layers = cfg.num_layers if layers is None else layers
    kv_len = text_len if kv_len is None else kv_len
    terms = embed_flop_terms(cfg, batch, tokens, text_len, clip_len)
    terms["blocks"] = layers * block_flops(cfg, batch, tokens, kv_len)
    return terms


def dit_forward_flops(cfg, batch: int, tokens: int, text_len: int = 397, **kwargs) -> int:
    """Total matmul FLOPs of one DiT forward (see ``dit_flop_terms`` for the keywords)."""
    return sum(dit_flop_terms(cfg, batch, tokens, text_len, **kwargs).values())
