"""Step-1 text encoder (`step_llm/`): a decoder-only LLM whose last hidden states condition the DiT.

Architecture (SPEC section 5, conformance quirks 27-29):
  token embedding -> N x [x += attn(attention_norm(x)); x += swiglu(ffn_norm(x))] -> output
with no final norm and no output head. Attention is causal GQA with a square-root ALiBi bias,
score[h, i, j] = q_i.k_j / sqrt(d) - slope_h * sqrt(i - j) for j <= i. The public release hides
that attention in a proprietary CUDA op; here it is plain PyTorch (SDPA with an additive bias, or
FlexAttention with a score_mod) on every device.

Tokenizer wrapper: ids = [1] + pieces[:max_length-2] + [2], padded with 2, mask 1 on real ids.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from stepvideo.fileio import write_json_atomic
from stepvideo.layout import STEP1_TOKENIZER, STEP_LLM, check_part, part_dir
from stepvideo.modules.layers import RMSNorm
from stepvideo.weights import (CheckpointError, load_safetensors, load_state_dict_strict, read_json,
                               save_sharded)

BOS_ID = 1
EOS_ID = 2
PAD_ID = 2  # the same id as EOS
# Special pieces of the released step1_chat_tokenizer.model, as the release's StepChatTokenizer
# checks them on load: these are control pieces (never produced from text) ...
CONTROL_TOKENS = ("<|BOT|>", "<|EOT|>", "<|CALL_START|>", "<|CALL_END|>", "<|THINK_START|>",
                  "<|THINK_END|>")
# ... and these two are only required to be in the vocabulary.
MASK_TOKENS = ("<|MASK_1e69f|>", "<|UNMASK_1e69f|>")
PARAMS_DTYPES = ("bfloat16", "float16", "float32")


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Step1Config:
    """Every key of the published `step_llm/config.json`; defaults are the released model.

    The last seven do not change inference here: seq_length (no position embeddings: ALiBi),
    use_flash_attn (the kernel choice), the dropouts (off in eval), params_dtype (the loader's
    ``dtype`` decides; the release runs in bf16), embedding_weights_in_fp32 (a float32 embedding
    lookup of the same weights gives the same values). fp32_residual_connection=True (a float32
    residual stream) is not implemented and is refused.
    """

    hidden_size: int = 6144
    num_layers: int = 48
    num_attention_heads: int = 48
    num_attention_groups: int = 8
    ffn_hidden_size: int = 16896
    padded_vocab_size: int = 65536
    layernorm_epsilon: float = 1e-5
    seq_length: int = 16384
    use_flash_attn: bool = True
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    params_dtype: str = "bfloat16"
    fp32_residual_connection: bool = False
    embedding_weights_in_fp32: bool = False

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_attention_heads", "num_attention_groups",
                     "ffn_hidden_size", "padded_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Step1Config.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_attention_groups:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not divisible by "
                             f"num_attention_groups {self.num_attention_groups}")
        if not self.layernorm_epsilon > 0:
            raise ValueError(f"layernorm_epsilon must be > 0, got {self.layernorm_epsilon}")
        if self.params_dtype not in PARAMS_DTYPES:
            raise ValueError(f"params_dtype {self.params_dtype!r} is not one of {list(PARAMS_DTYPES)}")
        if self.fp32_residual_connection:
            raise ValueError("fp32_residual_connection=true (a float32 residual stream) is not "
                             "supported; the released step_llm/config.json has false")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_inner_size(self) -> int:
        """SwiGLU width: ffn_hidden_size rounded up to a multiple of 256."""
        return 256 * math.ceil(self.ffn_hidden_size / 256)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Step1Config":
        """Build from a config.json dict; keys that are not fields are ignored (as the release's
        PretrainedConfig keeps them without effect)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def coerce(cls, config: "Step1Config | Mapping[str, Any] | Any") -> "Step1Config":
        """Accept a Step1Config, a config dict, or any object with the same attributes."""
        if isinstance(config, cls):
            return config
        if isinstance(config, Mapping):
            return cls.from_dict(config)
        names = [f.name for f in dataclasses.fields(cls)]
        return cls.from_dict({n: getattr(config, n) for n in names if hasattr(config, n)})


PRESETS: dict[str, Step1Config] = {
    "step1": Step1Config(),   # the released model
    # The tiny model's Step-1 (stepvideo.tiny): 0.8 M parameters, multi-query attention.
    "tiny": dataclasses.replace(Step1Config(), hidden_size=128, num_layers=2,
                                num_attention_heads=2, num_attention_groups=1,
                                ffn_hidden_size=256, padded_vocab_size=1024),
}


# ----------------------------------------------------------------------------------------------
# Square-root ALiBi attention
# ----------------------------------------------------------------------------------------------

def alibi_slopes(num_heads: int) -> torch.Tensor:
    """(heads,) float32. n = largest power of two <= heads: 2^(-8k/n) for k = 1..n, then
    2^(-4(2m-1)/n) for m = 1..heads-n appended (not interleaved)."""
    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    n = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]
    slopes += [2.0 ** (-4.0 * (2 * m - 1) / n) for m in range(1, num_heads - n + 1)]
    return torch.tensor(slopes, dtype=torch.float64, device="cpu").float()


def sqrt_alibi_bias(slopes: torch.Tensor, length: int) -> torch.Tensor:
    """(heads, L, L) float32 additive bias: -slope_h * sqrt(i - j) for j <= i, -inf above."""
    pos = torch.arange(length, device=slopes.device)
    dist = (pos[:, None] - pos[None, :]).float()                             # (L, L): i - j
    bias = -slopes.float()[:, None, None] * dist.clamp(min=0).sqrt()[None]  # (H, L, L)
    return bias.masked_fill(dist[None] < 0, float("-inf"))


class SqrtAlibiAttention:
    """Causal GQA attention with square-root ALiBi; the backend is chosen once.

    Call with q (B, H, L, d) and k, v (B, G, L, d); query head h uses kv group h // (H / G).
    Backends:
    - ``sdpa``: F.scaled_dot_product_attention with the (H, L, L) float bias, cached per
      (L, device). Inputs in reduced precision are upcast to float32 for the attention so that the
      bias is not rounded to bf16 (at L = 320 this costs nothing measurable).
    - ``flex``: torch.nn.attention.flex_attention with a score_mod and a causal block mask;
      compiled on CUDA, the unfused eager implementation elsewhere (a parity path on CPU).
    """

    BACKENDS = ("sdpa", "flex")

    def __init__(self, num_heads: int, backend: str = "sdpa"):
        if backend not in self.BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of "
                             f"{list(self.BACKENDS)}")
        self.num_heads = num_heads
        self.backend = backend
        self._slopes = alibi_slopes(num_heads)
        self._cache: dict[tuple, Any] = {}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[1] != self.num_heads:
            raise ValueError(f"expected {self.num_heads} query heads, got q of shape "
                             f"{tuple(q.shape)}")
        if self.backend == "flex":
            return self._flex(q, k, v)
        return self._sdpa(q, k, v)

    def slopes(self, device: torch.device) -> torch.Tensor:
        key = ("slopes", str(device))
        if key not in self._cache:
            self._cache[key] = self._slopes.to(device)
        return self._cache[key]

    def bias(self, length: int, device: torch.device) -> torch.Tensor:
        key = ("bias", length, str(device))
        if key not in self._cache:
            self._cache[key] = sqrt_alibi_bias(self.slopes(device), length)
        return self._cache[key]

    def _sdpa(self, q, k, v):
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, L, d)
        bias = self.bias(q.shape[2], q.device)                                   # (H, L, L)
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias)
        return out.to(q.dtype)

    def _flex(self, q, k, v):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        length, device = q.shape[2], q.device
        mask_key, mod_key = ("block_mask", length, str(device)), ("score_mod", str(device))
        if mask_key not in self._cache:
            self._cache[mask_key] = create_block_mask(_causal, None, None, length, length,
                                                      device=device)
        if mod_key not in self._cache:  # one function object per device: no recompiles
            self._cache[mod_key] = _sqrt_alibi_score_mod(self.slopes(device))
        kwargs = dict(score_mod=self._cache[mod_key], block_mask=self._cache[mask_key],
                      enable_gqa=True)
        if device.type == "cuda":
            return _compiled_flex()(q, k, v, **kwargs)
        with warnings.catch_warnings():  # the unfused CPU path is intentional here
            warnings.filterwarnings("ignore", message="flex_attention called without")
            return flex_attention(q, k, v, **kwargs)


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _sqrt_alibi_score_mod(slopes: torch.Tensor) -> Callable:
    def score_mod(score, b, h, q_idx, kv_idx):
        dist = (q_idx - kv_idx).clamp(min=0).to(score.dtype)
        return score - slopes[h] * torch.sqrt(dist)
    return score_mod


_COMPILED_FLEX: list[Callable] = []


def _compiled_flex() -> Callable:
    if not _COMPILED_FLEX:
        from torch.nn.attention.flex_attention import flex_attention
        _COMPILED_FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _COMPILED_FLEX[0]


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------

class Step1Attention(nn.Module):
    """wqkv: D -> [q (H*d) | kv (G * [k_g (d) | v_g (d)])]; wo: D -> D. No biases."""

    def __init__(self, cfg: Step1Config):
        super().__init__()
        self.num_heads, self.num_groups, self.head_dim = (
            cfg.num_attention_heads, cfg.num_attention_groups, cfg.head_dim)
        kv_size = 2 * cfg.head_dim * cfg.num_attention_groups
        self.wqkv = nn.Linear(cfg.hidden_size, cfg.hidden_size + kv_size, bias=False)
        self.wo = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, attend: SqrtAlibiAttention) -> torch.Tensor:
        b, length, dim = x.shape
        q, kv = self.wqkv(x).split([dim, 2 * self.head_dim * self.num_groups], dim=-1)
        q = q.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)   # (B, H, L, d)
        kv = kv.view(b, length, self.num_groups, 2 * self.head_dim).transpose(1, 2)
        k, v = kv.split(self.head_dim, dim=-1)                                 # (B, G, L, d)
        out = attend(q, k, v).transpose(1, 2).reshape(b, length, dim)          # (B, L, D)
        return self.wo(out)


class Step1FeedForward(nn.Module):
    """SwiGLU: w1 (D -> 2F) split into halves a, b; w2(silu(a) * b). F = ffn rounded up to 256."""

    def __init__(self, cfg: Step1Config):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, 2 * cfg.ffn_inner_size, bias=False)
        self.w2 = nn.Linear(cfg.ffn_inner_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w1(x).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)


class Step1Block(nn.Module):
    def __init__(self, cfg: Step1Config):
        super().__init__()
        # Registration order = the released state_dict order.
        self.attention = Step1Attention(cfg)
        self.feed_forward = Step1FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.ffn_norm = RMSNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)

    def forward(self, x: torch.Tensor, attend: SqrtAlibiAttention) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), attend)
        return x + self.feed_forward(self.ffn_norm(x))


class Step1Model(nn.Module):
    """The Step-1 LLM trunk. ``forward(input_ids (B, L)) -> (B, L, hidden)``, batch-first."""

    def __init__(self, config: "Step1Config | Mapping[str, Any] | Any", attn_backend: str = "sdpa"):
        super().__init__()
        self.config = cfg = Step1Config.coerce(config)
        self.attend = SqrtAlibiAttention(cfg.num_attention_heads, attn_backend)
        self.tok_embeddings = nn.ModuleDict(
            {"word_embeddings": nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size)})
        self.transformer = nn.ModuleDict(
            {"layers": nn.ModuleList(Step1Block(cfg) for _ in range(cfg.num_layers))})

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attention_mask`` is accepted for API compatibility and not used: padding sits after
        the text and attention is causal, so real tokens never see it (as in the release)."""
        x = self.tok_embeddings["word_embeddings"](input_ids)  # (B, L, D)
        for layer in self.transformer["layers"]:
            x = layer(x, self.attend)
        return x


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

def pad_token_ids(token_ids: Sequence[Sequence[int]],
                  max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per text: [BOS] + ids[:max_length-2] + [EOS], padded with PAD to max_length.

    Returns (input_ids, mask), both (B, max_length) int64; mask is 1 on BOS..EOS. An empty list
    of texts still gives one row [BOS, EOS, PAD, ...].
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (BOS and EOS), got {max_length}")
    rows, masks = [], []
    for ids in (token_ids if len(token_ids) else [[]]):
        row = [BOS_ID, *list(ids)[:max_length - 2], EOS_ID]
        masks.append([1] * len(row) + [0] * (max_length - len(row)))
        rows.append(row + [PAD_ID] * (max_length - len(row)))
    return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long)


class StepTokenizer:
    """The Step-1 sentencepiece tokenizer with the release's BOS/EOS/padding rule."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise CheckpointError(f"Step-1 tokenizer {model_path} does not exist; the "
                                  f"{STEP_LLM.folder} directory must contain {STEP1_TOKENIZER}.")
        import sentencepiece

        self.model_path = model_path
        self.sp = sentencepiece.SentencePieceProcessor(model_file=model_path)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def __call__(self, prompts: "str | Sequence[str]",
                 max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return pad_token_ids([self.encode(p) for p in prompts], max_length)


# ----------------------------------------------------------------------------------------------
# Encoder = tokenizer + model, loaded from the official directory
# ----------------------------------------------------------------------------------------------

def load_step1_model(model_dir: str, dtype: torch.dtype = torch.float32,
                     device: "str | torch.device" = "cpu", attn_backend: str = "sdpa") -> Step1Model:
    """Build Step1Model from ``model_dir/config.json`` on meta and load the shards strictly
    (``model_dir``: the ``step_llm/`` folder or a model root holding one)."""
    model_dir = part_dir(STEP_LLM, model_dir)
    files = check_part(STEP_LLM, model_dir)
    config = Step1Config.from_dict(read_json(os.path.join(model_dir, STEP_LLM.config),
                                             "Step-1 config"))
    with torch.device("meta"):
        model = Step1Model(config, attn_backend=attn_backend)
    state = load_safetensors(files, dtype=dtype, device=device)
    load_state_dict_strict(model, state, what=f"Step-1 checkpoint in {model_dir}")
    return model.eval()


class STEP1TextEncoder(nn.Module):
    """``STEP1TextEncoder(model_dir)(prompts) -> (y (B, max_length, hidden), y_mask (B, max_length))``."""

    def __init__(self, model_dir: str, max_length: int = 320, dtype: torch.dtype = torch.float32,
                 device: "str | torch.device" = "cpu", attn_backend: str = "sdpa"):
        super().__init__()
        model_dir = part_dir(STEP_LLM, model_dir)
        check_part(STEP_LLM, model_dir)  # every missing file named before anything is read
        tokenizer = StepTokenizer(os.path.join(model_dir, STEP1_TOKENIZER))
        self._setup(load_step1_model(model_dir, dtype, device, attn_backend), tokenizer,
                    max_length)

    @classmethod
    def from_model(cls, model: Step1Model, tokenizer: StepTokenizer,
                   max_length: int = 320) -> "STEP1TextEncoder":
        """Wrap an already-built model and tokenizer (tests, custom loading)."""
        encoder = cls.__new__(cls)
        nn.Module.__init__(encoder)
        encoder._setup(model, tokenizer, max_length)
        return encoder

    def _setup(self, model: Step1Model, tokenizer: StepTokenizer, max_length: int) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length

    @torch.no_grad()
    def forward(self, prompts: "str | Sequence[str]") -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, mask = self.tokenizer(prompts, self.max_length)  # (B, L) each
        device = self.model.tok_embeddings["word_embeddings"].weight.device
        input_ids, mask = input_ids.to(device), mask.to(device)
        return self.model(input_ids, mask), mask


# ----------------------------------------------------------------------------------------------
# Writing the official layout (tests, the tiny model)
# ----------------------------------------------------------------------------------------------

def write_step1_dir(path: str, config: "Step1Config | Mapping[str, Any]",
                    state_dict: Mapping[str, torch.Tensor], tokenizer_model_path: str,
                    num_shards: int = 2) -> None:
    """Write a `step_llm/` directory: config.json, model-0000i-of-0000n.safetensors plus
    model.safetensors.index.json (or one model.safetensors when num_shards == 1), and the
    sentencepiece model as step1_chat_tokenizer.model. Tensors are written as given."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    os.makedirs(path, exist_ok=True)
    config_dict = (dataclasses.asdict(config) if isinstance(config, Step1Config)
                   else dict(config))
    write_json_atomic(os.path.join(path, STEP_LLM.config), config_dict)
    shutil.copyfile(tokenizer_model_path, os.path.join(path, STEP1_TOKENIZER))
    tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
    if num_shards == 1:
        save_file(tensors, os.path.join(path, STEP_LLM.single))
        return
    save_sharded(tensors, path, STEP_LLM.index, STEP_LLM.shard_name, num_shards)
