"""stepvideo/flops.py: hand-computed counts and torch's FlopCounterMode on a real forward."""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from stepvideo import flops
from stepvideo.conformance import load_json, load_tensors
from stepvideo.modules.model import DiTConfig, StepVideoModel


def test_block_flops_by_hand():
    # 1 head of 128 -> D = 128; B = 1, N = 4 video tokens, L = 3 text tokens.
    cfg = DiTConfig(num_attention_heads=1, num_layers=1)
    terms = flops.block_flop_terms(cfg, batch=1, tokens=4, text_len=3)
    assert terms == {
        "attn1.wqkv": 2 * 4 * 128 * 384,  # 393,216
        "attn1.sdpa": 2 * 4 * 4 * 128 * 2,  # QK^T + PV: 8,192
        "attn1.wo": 2 * 4 * 128 * 128,  # 131,072
        "attn2.wq": 2 * 4 * 128 * 128,  # 131,072
        "attn2.wkv": 2 * 3 * 128 * 256,  # over the 3 text tokens: 196,608
        "attn2.sdpa": 2 * 4 * 3 * 128 * 2,  # 6,144
        "attn2.wo": 2 * 4 * 128 * 128,  # 131,072
        "ff": 2 * 4 * 128 * 512 * 2,  # up and down: 1,048,576
    }
    assert flops.block_flops(cfg, 1, 4, 3) == 2_045_952
    # Batch is linear: every term scales by B.
    assert flops.block_flops(cfg, 3, 4, 3) == 3 * 2_045_952


def test_embed_flops_by_hand():
    # D = 128, in = out = 4 channels, patch 1, text dims (16, 8); B = 2, N = 6, 3 clip + 5 llm.
    cfg = DiTConfig(num_attention_heads=1, in_channels=4, out_channels=4, caption_channels=(16, 8))
    terms = flops.embed_flop_terms(cfg, batch=2, tokens=6, text_len=8, clip_len=3)
    assert terms == {
        "pos_embed": 2 * 12 * 4 * 128,  # 12,288
        "adaln_single": 2 * 2 * (256 * 128 + 128 * 128 + 128 * 768),  # 589,824
        "caption_projection": 2 * 10 * (16 * 128 + 128 * 128),  # 368,640
        "clip_projection": 2 * 6 * 8 * 128,  # 12,288
        "proj_out": 2 * 12 * 128 * 4,  # 12,288
    }


def test_full_size_block_flops():
    # 544x992x204 -> 36 x 34 x 62 = 75,888 tokens; CFG batch 2; 397 text tokens; D = 6144.
    cfg = DiTConfig()
    linear = 28 * 2 * 75_888 * 6144 ** 2 + 4 * 2 * 397 * 6144 ** 2  # 1.605e14
    attention = 4 * 2 * 75_888 ** 2 * 6144 + 4 * 2 * 75_888 * 397 * 6144  # 2.845e14
    assert linear + attention == 445_088_383_893_504
    assert flops.block_flops(cfg, 2, 75_888, 397) == 445_088_383_893_504
    # Embedding terms are small next to 48 blocks.
    terms = flops.dit_flop_terms(cfg, 2, 75_888, 397)
    assert sum(v for k, v in terms.items() if k != "blocks") < 1e-3 * terms["blocks"]


def test_device_peak_matches_by_substring():
    assert flops.device_peak("NVIDIA H100 80GB HBM3") == 989.0
    assert flops.device_peak("NVIDIA H100 PCIe") == 756.0
    assert flops.device_peak("NVIDIA H200") == 989.0
    assert flops.device_peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert flops.device_peak("NVIDIA L40S") == 362.0
    assert flops.device_peak("cpu") is None


def _count_small_forward(math_sdpa: bool):
    """FlopCounterMode on the kit's small DiT -> (counter, analytic total, its sdpa part)."""
    spec = load_json("dit_small.json")
    io = load_tensors("dit_small_io.safetensors")
    model = StepVideoModel(**spec["config"]).eval()
    b, f, _, h, w = io["hidden_states"].shape
    kernel = sdpa_kernel(SDPBackend.MATH) if math_sdpa else contextlib.nullcontext()
    with torch.inference_mode(), kernel, FlopCounterMode(display=False) as counter:
        model(io["hidden_states"], io["timestep"], io["encoder_hidden_states"],
              io["encoder_hidden_states_2"], io["encoder_attention_mask"])
    cfg, tokens = model.config, f * h * w
    kv_len = int(io["encoder_attention_mask"].sum(-1).max())  # context cut to the longest mask
    total = flops.dit_forward_flops(cfg, b, tokens, text_len=io["encoder_attention_mask"].shape[1],
                                    clip_len=io["encoder_hidden_states_2"].shape[1], kv_len=kv_len)
    block = flops.block_flop_terms(cfg, b, tokens, kv_len)
    sdpa = cfg.num_layers * (block["attn1.sdpa"] + block["attn2.sdpa"])
    return counter, total, sdpa


def test_matches_flop_counter_mode_exactly():
    """With SDPA on its MATH backend (plain bmm) torch counts everything: exact agreement.

    The Conv2d patch embed is counted by torch as 2 * out_pixels * C_in * D * k * k, the same as
    the Linear(C_in*p*p -> D) it is, so it agrees too.
    """
    counter, total, _ = _count_small_forward(math_sdpa=True)
    assert counter.get_total_flops() == total


def test_matmul_part_matches_with_default_sdpa():
    """The fused CPU attention kernel is not an op torch's counter knows (it counts 0 for it):
    the Linear/Conv part still agrees exactly."""
    counter, total, sdpa = _count_small_forward(math_sdpa=False)
    matmuls = sum(v for op, v in counter.get_flop_counts()["Global"].items()
                  if str(op).split(".")[1] in ("mm", "addmm", "convolution"))
    assert matmuls == total - sdpa


def test_layers_override():
    cfg = dataclasses.replace(DiTConfig(), num_layers=48)
    one = flops.dit_flop_terms(cfg, 1, 100, 397, layers=1)["blocks"]
    assert flops.dit_flop_terms(cfg, 1, 100, 397)["blocks"] == 48 * one
