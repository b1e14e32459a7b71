"""Random-weight DiTs and inputs at real shapes, for benchmarks and GPU checks (no checkpoint).

``benchmark/perf/dit_bench.py`` and ``benchmark/gpu_speed.py`` build their models and inputs here.
"""

from __future__ import annotations

import torch

from .diffusion.video_pipeline import VideoSize
from .modules.model import DiTConfig, StepVideoModel

# Public release README section 4.1 ("batch size = 1, w/o cfg distillation", "50 steps w
# flash-attn", "tested on four GPUs"; the GPU model is not named): (frames, height, width, s).
PUBLISHED_JOBS = {
    "544x992x204": (204, 544, 992, 743.0),
    "768x768x204": (204, 768, 768, 860.0),
    "544x992x136": (136, 544, 992, 408.0),
}


def latent_grid(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Video frames/pixels -> latent (frames, h, w), by the pipeline's own rounding rule."""
    _, f, _, h, w = VideoSize.rounded(frames, height, width).latent_shape(1, 1)
    return f, h, w


def token_grid(tokens: int) -> tuple[int, int, int]:
    """A (frames, h, w) grid with ``tokens`` cells: a published job's grid, else 1 x h x w."""
    for frames, height, width, _ in PUBLISHED_JOBS.values():
        f, h, w = latent_grid(frames, height, width)
        if f * h * w == tokens:
            return f, h, w
    h = max(d for d in range(1, int(tokens ** 0.5) + 1) if tokens % d == 0)
    return 1, h, tokens // h


@torch.no_grad()
def random_model(cfg: DiTConfig, device: torch.device, dtype: torch.dtype,
                 seed: int | None = None) -> StepVideoModel:
    """A model allocated directly on ``device`` in ``dtype``: norm weights 1, the rest N(0, .02);
    with ``seed`` the same weights on every call (drawn on ``device``)."""
    with torch.device("meta"):
        model = StepVideoModel.from_config(cfg).to(dtype)
    model = model.to_empty(device=device)
    gen = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            param.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def model_inputs(cfg: DiTConfig, batch: int, grid: tuple[int, int, int], text_len: int,
                 clip_len: int, device: torch.device, dtype: torch.dtype,
                 seed: int | None = None) -> dict:
    """Random forward() keywords; the text mask is all ones (every context token attended)."""
    f, h, w = grid
    llm_dim, clip_dim = cfg.caption_channels
    p = cfg.patch_size
    gen = None if seed is None else torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

    return {
        "hidden_states": randn(batch, f, cfg.in_channels, h * p, w * p),
        "timestep": torch.rand(batch, device=device, generator=gen).to(dtype),
        "encoder_hidden_states": randn(batch, text_len - clip_len, llm_dim),
        "encoder_hidden_states_2": randn(batch, clip_len, clip_dim),
        "encoder_attention_mask": torch.ones(batch, text_len, device=device),
    }


def block_inputs(cfg: DiTConfig, batch: int, tokens: int, text_len: int, device: torch.device,
                 dtype: torch.dtype, seed: int = 2) -> tuple:
    """Random inputs of one block's forward: x (B, N, D), context (B, L, D), t_mod (B, 6D) at
    AdaLN-Single's scale, the RoPE tables of ``token_grid(tokens)`` and kv_lens with the second
    sample's text masked to 2/3 (the cross-attention's masked path)."""
    from .modules.rope import rope_tables

    g = torch.Generator(device=device).manual_seed(seed)
    d = cfg.inner_dim

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g) * scale

    x = randn(batch, tokens, d)
    context = randn(batch, text_len, d)
    t_mod = randn(batch, 6 * d, scale=0.02)
    kv_lens = torch.tensor(([text_len, text_len * 2 // 3] + [text_len] * batch)[:batch], device=device)
    rope = rope_tables(*token_grid(tokens), cfg.attention_head_dim, device=device)
    return x, context, t_mod, rope, kv_lens
