"""The Step-Video-T2V DiT: 48 blocks of self-attention (3D RoPE, QK-norm), text cross-attention
and a GELU MLP, modulated by AdaLN-Single, over frame-major video tokens.

Module and parameter names are the checkpoint's names, so the official
``transformer/diffusion_pytorch_model-*.safetensors`` load without a key table.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from ..fileio import write_json_atomic
from ..layout import TRANSFORMER, check_part, part_dir
from ..weights import load_safetensors, load_state_dict_strict, read_json, save_sharded
from .attention import LocalPlan, SequencePlan, attention, prepare_compile
from .layers import RMSNorm, modulate, timestep_sinusoid
from .rope import ROPE_SPLIT, Rope, apply_rope, rope_tables

# Keys of the official transformer/config.json that do not change the computation here.
IGNORED_CONFIG_KEYS = ("_class_name", "_diffusers_version", "attention_type", "norm_type",
                       "dropout")


@dataclass(frozen=True)
class DiTConfig:
    """``transformer/config.json``; defaults are the released 30B model."""

    num_attention_heads: int = 48
    attention_head_dim: int = 128
    in_channels: int = 64
    out_channels: int = 64
    num_layers: int = 48
    patch_size: int = 1
    norm_eps: float = 1e-6
    norm_elementwise_affine: bool = False   # weight and bias on caption_norm and norm_out
    use_additional_conditions: bool = False
    caption_channels: tuple[int, int] = (6144, 1024)

    def __post_init__(self):
        object.__setattr__(self, "caption_channels", tuple(self.caption_channels))
        if len(self.caption_channels) != 2:
            raise ValueError(f"caption_channels must be [llm_dim, clip_dim], got {self.caption_channels}")
        if self.attention_head_dim != sum(ROPE_SPLIT):
            raise ValueError(f"attention_head_dim must be {sum(ROPE_SPLIT)} (3D RoPE splits a head "
                             f"into {list(ROPE_SPLIT)}), got {self.attention_head_dim}")
        for name in ("num_attention_heads", "in_channels", "out_channels", "num_layers", "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.use_additional_conditions:
            raise ValueError("use_additional_conditions=True is not part of any released "
                             "Step-Video checkpoint and is not supported")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, cfg: dict) -> "DiTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known - set(IGNORED_CONFIG_KEYS))
        if unknown:
            raise TypeError(f"unknown DiT config key(s) {unknown}; expected keys of "
                            f"transformer/config.json: {sorted(known)}")
        return cls(**{k: v for k, v in cfg.items() if k in known})

    def to_dict(self) -> dict:
        """The ``transformer/config.json`` keywords."""
        d = dataclasses.asdict(self)
        return {**d, "caption_channels": list(d["caption_channels"])}


PRESETS: dict[str, DiTConfig] = {
    "base": DiTConfig(),   # the released 30B model (Turbo has the same shapes)
    # The tiny model's DiT (stepvideo.tiny): caption_channels are the tiny Step-1 and CLIP widths,
    # in/out channels the tiny VAE's latent width.
    "tiny": dataclasses.replace(DiTConfig(), num_attention_heads=4, num_layers=2, in_channels=16,
                                out_channels=16, caption_channels=(128, 64)),
}


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(256, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t_freq: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(t_freq)))


class _Embedders(nn.Module):
    """Holds ``timestep_embedder`` so the checkpoint path ``adaln_single.emb.*`` matches."""

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(dim)


class AdaLNSingle(nn.Module):
    """t in [0,1] -> (block modulation (B, 6D), embedded timestep (B, D))."""

    def __init__(self, dim: int):
        super().__init__()
        self.emb = _Embedders(dim)
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t_freq = timestep_sinusoid(timestep * 1000, 256).to(self.linear.weight.dtype)  # (B, 256)
        emb = self.emb.timestep_embedder(t_freq)  # (B, D)
        return self.linear(self.silu(emb)), emb


class CaptionProjection(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(y)))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B*F, C, H, W) -> (B*F, h*w, D)."""
        return self.proj(x).flatten(2).transpose(1, 2)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, eps=1e-6)
        self.k_norm = RMSNorm(head_dim, eps=1e-6)

    def forward(self, x: torch.Tensor, rope: Rope, plan: SequencePlan, seq_len: int,
                pre: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, S, D): this rank's S of the video's ``seq_len`` tokens; ``pre(x)`` (the block's
        norm and modulation) is applied inside the projection, so its output is freed once q, k
        and v exist instead of living through the attention. q and k are normed and rotated in
        place in the projection's output, and the plan is handed q, k, v to own (a list it
        empties), so a plan that repacks them (Ulysses) frees the projection before attending."""
        b, s, _ = x.shape
        qkv = self.wqkv(x if pre is None else pre(x)).view(b, s, -1, 3 * self.head_dim)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # (B, S, H, d) each, per head [q_h | k_h | v_h]
        del qkv
        norm_rope(self.q_norm, q, rope, out=q)
        norm_rope(self.k_norm, k, rope, out=k)
        parts = [q, k, v]
        del q, k, v
        out = plan.self_attention(parts, seq_len)  # (B, S, H, d)
        return self.wo(out.reshape(b, s, -1))


HEADS_PER_PASS = 8  # norm_rope's float32 temporaries span this many heads at a time


def norm_rope(norm: nn.Module, x: torch.Tensor, rope: Rope | None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """``apply_rope(norm(x), rope)`` (just ``norm(x)`` without ``rope``) for x (B, S, H, d),
    ``HEADS_PER_PASS`` heads at a time into one output (``out``, which may be x itself: each pass
    reads its heads into the norm's new tensor before writing them): both are per head, so the
    values are the same, and the float32 temporaries (the norm's and RoPE's) cover a few heads
    instead of all of them."""
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    for h in range(0, x.shape[2], HEADS_PER_PASS):
        part = slice(h, h + HEADS_PER_PASS)
        if rope is None:
            norm(x[:, :, part], out=out[:, :, part])
        else:
            apply_rope(norm(x[:, :, part]), rope, out=out[:, :, part])
    return out


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wkv = nn.Linear(dim, 2 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, eps=1e-6)
        self.k_norm = RMSNorm(head_dim, eps=1e-6)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                kv_lens: torch.Tensor | None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, -1, self.head_dim)  # (B, S, H, d)
        norm_rope(self.q_norm, q, None, out=q)  # in place, a few heads at a time
        kv = self.wkv(context).view(b, context.shape[1], -1, 2 * self.head_dim)
        k, v = kv.split(self.head_dim, dim=-1)  # per head [k_h | v_h]
        out = attention(q, self.k_norm(k), v, kv_lens)
        return self.wo(out.reshape(b, s, -1))


class FeedForward(nn.Module):
    """GELU MLP. ``chunk_tokens`` > 0 runs it over that many tokens at a time: every token's row
    is computed by the same kernels, and the (B, S, 4D) hidden state is never whole."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(_GeluProj(dim, mult * dim), nn.Identity(),
                                 nn.Linear(mult * dim, dim, bias=False))
        self.chunk_tokens = 0

    def forward(self, x: torch.Tensor,
                pre: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """``pre(x)`` (the block's norm and modulation) is applied inside, per chunk of tokens,
        and freed once the up-projection has run."""
        pre = pre or (lambda t: t)
        if self.chunk_tokens <= 0 or x.shape[1] <= self.chunk_tokens:
            return self._mlp(pre(x))
        return torch.cat([self._mlp(pre(part)) for part in x.split(self.chunk_tokens, dim=1)], dim=1)

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        """``self.net(h)``, layer by layer: ``h`` (the caller's temporary) is released once the
        up-projection has run instead of living through the down-projection (``self.net(h)``
        keeps its argument until it returns)."""
        up, mid, down = self.net
        h = mid(up(h))
        return down(h)


class _GeluProj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)  # (B, S, 4D)
        if torch.is_grad_enabled():  # autograd needs GELU's input for its backward
            return nn.functional.gelu(h, approximate="tanh")
        # inference: the same kernel, in place, so the (B, S, 4D) input and output of GELU are
        # never both alive (4 rows of D per token less at the feed-forward's peak)
        return torch.ops.aten.gelu_(h, approximate="tanh")


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim, heads, hd = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
        self.scale_shift_table = nn.Parameter(torch.zeros(6, dim))
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = SelfAttention(dim, heads, hd)
        self.attn2 = CrossAttention(dim, heads, hd)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)
        self.batch_chunk = 0  # > 0: run that many samples at a time (see StepVideoModel.set_batch_chunk)

    def modulations(self, t_mod: torch.Tensor, batch: int) -> tuple[torch.Tensor, ...]:
        """shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, each (B, 1, D)."""
        mods = self.scale_shift_table[None] + t_mod.view(batch, 6, -1)  # (B, 6, D)
        return mods.chunk(6, dim=1)

    def attn_input(self, x: torch.Tensor, t_mod: torch.Tensor) -> torch.Tensor:
        """What self-attention sees: modulate(norm1(x)) (TeaCache's indicator on the first block)."""
        shift_msa, scale_msa = self.modulations(t_mod, x.shape[0])[:2]
        return modulate(self.norm1(x), shift_msa, scale_msa)

    def forward(self, x: torch.Tensor, context: torch.Tensor, t_mod: torch.Tensor, rope: Rope,
                kv_lens: torch.Tensor | None, plan: SequencePlan, seq_len: int,
                inplace: bool = False) -> torch.Tensor:
        """x (B, S, D) this rank's tokens; context (B, L, D) text; t_mod (B, 6D) AdaLN-Single.
        ``inplace``: the residual updates are written into x (the caller gives x up: one row of
        (B, S, D) less at the feed-forward's peak, and under ``batch_chunk`` the waiting samples
        hold only their rows of x); the result is x. Otherwise x is left as it is."""
        n = self.batch_chunk
        if n <= 0 or x.shape[0] <= n:
            return self._forward(x, context, t_mod, rope, kv_lens, plan, seq_len, inplace)
        chunks = [(x[i:i + n], context[i:i + n], t_mod[i:i + n],
                   None if kv_lens is None else kv_lens[i:i + n]) for i in range(0, x.shape[0], n)]
        if inplace:  # each chunk is a view of x, updated in place
            for xi, ci, ti, ki in chunks:
                self._forward(xi, ci, ti, rope, ki, plan, seq_len, True)
            return x
        return torch.cat([self._forward(xi, ci, ti, rope, ki, plan, seq_len, False)
                          for xi, ci, ti, ki in chunks])

    def _forward(self, x: torch.Tensor, context: torch.Tensor, t_mod: torch.Tensor, rope: Rope,
                 kv_lens: torch.Tensor | None, plan: SequencePlan, seq_len: int,
                 inplace: bool) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulations(
            t_mod, x.shape[0])
        # x + gate_msa * attn, written into x (inplace) or a new tensor that is this block's from
        # here on; each sub-layer's output is a temporary, freed once added
        attn = self.attn1(x, rope, plan, seq_len,
                          pre=lambda t: modulate(self.norm1(t), shift_msa, scale_msa))
        x = x.addcmul_(gate_msa, attn) if inplace else torch.addcmul(x, gate_msa, attn)
        del attn
        x += self.attn2(x, context, kv_lens)
        return x.addcmul_(gate_mlp, self.ff(x, pre=lambda t: modulate(self.norm2(t), shift_mlp,
                                                                       scale_mlp)))


@dataclass
class Embedded:
    """The blocks' inputs for one call: this rank's tokens x (B, S, D), the text context
    (B, L, D) and its lengths, AdaLN-Single's t_mod (B, 6D) and t_emb (B, D), the sharded RoPE
    tables and the latent grid (F, h, w)."""

    x: torch.Tensor | None  # None once ``blocks()`` has taken the tokens
    context: torch.Tensor
    kv_lens: torch.Tensor | None
    t_mod: torch.Tensor
    t_emb: torch.Tensor
    rope: Rope
    grid: tuple[int, int, int]

    @property
    def seq_len(self) -> int:
        """Tokens of the whole video (all ranks together, no padding)."""
        f, h, w = self.grid
        return f * h * w


class StepVideoModel(nn.Module):
    """The DiT. Keywords are the keys of ``transformer/config.json`` (as in the release);
    :meth:`from_config` builds one from a :class:`DiTConfig`.

    ``forward(hidden_states (B,F,C,H,W), timestep (B,) in [0,1], encoder_hidden_states (B,Ly,6144),
    encoder_hidden_states_2 (B,Lc,1024), encoder_attention_mask (B, Lc+Ly))`` predicts the
    flow-matching velocity (B,F,C,H,W).
    """

    def __init__(self, **config):
        super().__init__()
        self.config = cfg = DiTConfig.from_dict(config)
        dim = cfg.inner_dim
        llm_dim, clip_dim = cfg.caption_channels
        self.pos_embed = PatchEmbed(cfg.patch_size, cfg.in_channels, dim)
        self.adaln_single = AdaLNSingle(dim)
        self.caption_norm = nn.LayerNorm(llm_dim, eps=cfg.norm_eps,
                                         elementwise_affine=cfg.norm_elementwise_affine)
        self.caption_projection = CaptionProjection(llm_dim, dim)
        self.clip_projection = nn.Linear(clip_dim, dim)
        self.transformer_blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.num_layers))
        self.norm_out = nn.LayerNorm(dim, eps=cfg.norm_eps,
                                     elementwise_affine=cfg.norm_elementwise_affine)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, dim))
        self.proj_out = nn.Linear(dim, cfg.patch_size ** 2 * cfg.out_channels)
        self.plan = LocalPlan()

    @classmethod
    def from_config(cls, cfg: DiTConfig) -> "StepVideoModel":
        return cls(**cfg.to_dict())

    # --- loading -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model_dir: str, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "StepVideoModel":
        """Load ``model_dir`` (the ``transformer/`` folder, or a model root holding one)."""
        model_dir = part_dir(TRANSFORMER, model_dir)
        files = check_part(TRANSFORMER, model_dir)
        cfg = DiTConfig.from_dict(read_json(os.path.join(model_dir, TRANSFORMER.config),
                                            "DiT config"))
        with torch.device("meta"):
            model = cls.from_config(cfg)
        state = load_safetensors(files, dtype=dtype, device=device)
        load_state_dict_strict(model, state, what=f"DiT checkpoint {model_dir}")
        return model.eval()

    def save_pretrained(self, transformer_dir: str, num_shards: int = 2,
                        dtype: torch.dtype | None = None) -> None:
        """Write ``config.json`` + sharded safetensors + index in the official layout."""
        os.makedirs(transformer_dir, exist_ok=True)
        write_json_atomic(os.path.join(transformer_dir, TRANSFORMER.config),
                          {"_class_name": "StepVideoModel", **self.config.to_dict()})
        save_sharded(self.state_dict(), transformer_dir, TRANSFORMER.index, TRANSFORMER.shard_name,
                     num_shards, dtype)

    def set_ff_chunk(self, tokens: int) -> None:
        """Run every block's feed-forward over ``tokens`` tokens at a time (0: all at once)."""
        if tokens < 0:
            raise ValueError(f"--ff_chunk must be >= 0 tokens, got {tokens}")
        for block in self.transformer_blocks:
            block.ff.chunk_tokens = tokens

    def set_batch_chunk(self, samples: int) -> None:
        """Run each block over ``samples`` samples at a time (0: the whole batch). With 1, the
        CFG halves go through a block one after the other (``--cfg_sequential``): half the
        activations, the same weights in use (a streamed block is loaded once for both), and the
        time/text conditioning still computed for the whole batch, so its small matmuls run the
        same kernels as without."""
        if samples < 0:
            raise ValueError(f"batch chunk must be >= 0 samples, got {samples}")
        for block in self.transformer_blocks:
            block.batch_chunk = samples

    def compile_blocks(self, **options) -> None:
        """``torch.compile`` every block in place: fuses the element-wise work around the matmuls
        (norms, modulation, RoPE, gates). Blocks share code, so one compilation serves all."""
        prepare_compile()  # the attention seam's eager-only parts (auto's timing, Triton/CuTe calls)
        for block in self.transformer_blocks:
            block.compile(**options)

    # --- forward -------------------------------------------------------------------------

    def text_context(self, y: torch.Tensor, clip: torch.Tensor,
                     mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[CLIP tokens, LLM tokens] projected to D, cut to the longest valid length."""
        context = torch.cat([self.clip_projection(clip),
                             self.caption_projection(self.caption_norm(y))], dim=1)  # (B, Lc+Ly, D)
        if mask is None:
            return context, None
        kv_lens = mask.sum(dim=-1).long()  # the mask is a prefix of ones
        return context[:, : int(kv_lens.max())], kv_lens

    def unpatchify(self, x: torch.Tensor, frames: int, h: int, w: int) -> torch.Tensor:
        """(B, F*h*w, p*p*C) -> (B, F, C, h*p, w*p)."""
        p = self.config.patch_size
        return rearrange(x, "b (f h w) (p q c) -> b f c (h p) (w q)", f=frames, h=h, w=w, p=p, q=p)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor, encoder_hidden_states_2: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None, return_dict: bool = True):
        e = self.embed(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_2,
                       encoder_attention_mask)
        x = self.blocks(e)  # (B, S, D)
        out = self.head(e, x)  # (B, F, C, H, W)
        return {"x": out} if return_dict else out

    # The three parts of ``forward``, public so a step cache (``diffusion.cache``) can run the
    # blocks or reuse their residual; ``forward`` is exactly embed -> blocks -> head.

    def patchify(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(B, F, C, H, W) -> tokens (B, F*h*w, D), frame-major, and the grid (F, h, w)."""
        b, f, _, hh, ww = hidden_states.shape
        p = self.config.patch_size
        x = self.pos_embed(hidden_states.flatten(0, 1))  # (B*F, h*w, D)
        return x.reshape(b, f * (hh // p) * (ww // p), -1), (f, hh // p, ww // p)

    def shard_tokens(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """This rank's tokens of ``patchify`` (B, S, D), zero-padded as ``plan.shard`` pads, and the
        grid. Sharded, only the frames that hold the rank's tokens are embedded (the patch
        embedding is per frame), so the whole sequence never exists at width D."""
        if self.plan.world_size == 1:
            x, grid = self.patchify(hidden_states)
            return self.plan.shard(x, 1), grid
        b, f, _, hh, ww = hidden_states.shape
        p = self.config.patch_size
        per_frame = (hh // p) * (ww // p)
        start, stop, size = self.plan.token_range(f * per_frame)
        x = hidden_states.new_zeros(b, size, self.config.inner_dim)
        if stop > start:
            f0, f1 = start // per_frame, -(-stop // per_frame)
            part, _ = self.patchify(hidden_states[:, f0:f1])  # (B, (f1-f0)*h*w, D)
            x[:, : stop - start] = part[:, start - f0 * per_frame: stop - f0 * per_frame]
        return x, (f, hh // p, ww // p)

    def embed(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
              encoder_hidden_states: torch.Tensor, encoder_hidden_states_2: torch.Tensor,
              encoder_attention_mask: torch.Tensor | None = None) -> "Embedded":
        """Everything the blocks need, with this rank's shard of the tokens."""
        self._check_inputs(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_2,
                           encoder_attention_mask)
        x, (f, h, w) = self.shard_tokens(hidden_states)  # (B, S, D): this rank's tokens
        t_mod, t_emb = self.adaln_single(timestep.reshape(-1).expand(x.shape[0]))  # (B, 6D), (B, D)
        context, kv_lens = self.text_context(encoder_hidden_states, encoder_hidden_states_2,
                                             encoder_attention_mask)
        rope = rope_tables(f, h, w, self.config.attention_head_dim, device=x.device).shard(self.plan)
        return Embedded(x, context, kv_lens, t_mod, t_emb, rope, (f, h, w))

    def blocks(self, e: "Embedded", x: torch.Tensor | None = None, start: int = 0,
               stop: int | None = None) -> torch.Tensor:
        """Blocks ``start:stop`` on this rank's tokens x (B, S, D). Without ``x`` the tokens are
        taken out of ``e`` (``e.x`` becomes None) and every block updates them in place
        (``inplace=True``): the running tokens are the only (B, S, D) state between blocks. A
        caller that needs its input afterwards (a step cache's residual) passes ``x``: the first
        block then leaves it as it is and the later ones update their own tensor. A forward hook
        that keeps a block's output must clone it (the next block writes into it)."""
        owned = x is None  # the embedded tokens are nobody else's: blocks update them in place
        if owned:
            x, e.x = e.x, None
        for i, block in enumerate(self.transformer_blocks[start:stop]):
            x = block(x, e.context, e.t_mod, e.rope, e.kv_lens, self.plan, e.seq_len,
                      inplace=owned or i > 0)
        return x

    def head(self, e: "Embedded", x: torch.Tensor) -> torch.Tensor:
        """Final modulation and projection of this rank's tokens (per token, so the same values
        as on the whole sequence), gather, unpatchify: (B, S, D) -> (B, F, C, H, W). Gathering the
        projected tokens (p*p*C = 64 wide) instead of the D-wide ones moves D/64 = 96x fewer bytes
        and never holds the whole sequence at width D."""
        shift, scale = (self.scale_shift_table[None] + e.t_emb[:, None]).chunk(2, dim=1)
        x = self.proj_out(modulate(self.norm_out(x), shift, scale))  # (B, S, p*p*C)
        x = self.plan.gather(x, 1, e.seq_len)  # (B, F*h*w, p*p*C)
        return self.unpatchify(x, *e.grid)

    def valid_tokens(self, e: "Embedded") -> torch.Tensor:
        """(1, S, 1): 1 for this rank's real tokens, 0 for the padding of an uneven split."""
        return self.plan.shard(e.context.new_ones(1, e.seq_len, 1), 1)

    def first_block_input(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """This rank's tokens as the first block's self-attention sees them (B, S, D), padding
        zeroed: TeaCache's change indicator. Needs no text, so one copy of the latents serves CFG."""
        x, (f, h, w) = self.shard_tokens(hidden_states)
        t_mod, _ = self.adaln_single(timestep.reshape(-1).expand(x.shape[0]))
        x = self.transformer_blocks[0].attn_input(x, t_mod)
        return x * self.plan.shard(x.new_ones(1, f * h * w, 1), 1)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, clip: torch.Tensor,
                      mask: torch.Tensor | None) -> None:
        cfg = self.config
        if t.numel() not in (1, x.shape[0]):
            raise ValueError(f"timestep must hold 1 or {x.shape[0]} values, got {tuple(t.shape)}")
        if mask is not None and tuple(mask.shape) != (x.shape[0], clip.shape[1] + y.shape[1]):
            raise ValueError(
                f"encoder_attention_mask must be (B, Lc + Ly) = ({x.shape[0]}, {clip.shape[1]} + "
                f"{y.shape[1]}), got {tuple(mask.shape)}: prepend the CLIP length of ones to the "
                "LLM mask")
        if x.dim() != 5 or x.shape[2] != cfg.in_channels:
            raise ValueError(f"hidden_states must be (B, F, {cfg.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        if x.shape[3] % cfg.patch_size or x.shape[4] % cfg.patch_size:
            raise ValueError(f"latent H, W {tuple(x.shape[3:])} must be multiples of the patch "
                             f"size {cfg.patch_size}")
        llm_dim, clip_dim = cfg.caption_channels
        if y.dim() != 3 or y.shape[-1] != llm_dim or y.shape[0] != x.shape[0]:
            raise ValueError(f"encoder_hidden_states must be ({x.shape[0]}, L, {llm_dim}), "
                             f"got {tuple(y.shape)}")
        if clip.dim() != 3 or clip.shape[-1] != clip_dim or clip.shape[0] != x.shape[0]:
            raise ValueError(f"encoder_hidden_states_2 must be ({x.shape[0]}, L, {clip_dim}), "
                             f"got {tuple(clip.shape)}")

