"""HunyuanCLIP (`hunyuan_clip/`): a Hugging Face BertModel with its BertTokenizer (SPEC section 6).

Layout: ``hunyuan_clip/clip_text_encoder/{config.json, pytorch_model.bin}`` and
``hunyuan_clip/tokenizer/{vocab.txt, tokenizer_config.json, special_tokens_map.json}``.
Prompts are padded to max_length (77) and truncated; no token_type_ids are passed. The DiT uses
``last_hidden_state`` at every position, padding included.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import BertConfig, BertModel, BertTokenizer

from stepvideo.fileio import write_json_atomic
from stepvideo.layout import (CLIP_ENCODER_DIR, CLIP_SPECIAL_TOKENS_MAP, CLIP_TOKENIZER_CONFIG,
                              CLIP_TOKENIZER_DIR, CLIP_VOCAB, HUNYUAN_CLIP, check_part, part_dir)
from stepvideo.weights import CheckpointError, load_safetensors, load_state_dict_strict, read_json

logger = logging.getLogger(__name__)

# Checkpoints saved from a model with a head (BertFor...) prefix the trunk with "bert.".
_PREFIX = "bert."
# Keys that BertModel does not own: older transformers saved position_ids as a persistent
# buffer, and pre-training heads live under "cls.". They are dropped (and logged), nothing else.
_DROPPED_KEYS = ("embeddings.position_ids",)
_DROPPED_PREFIXES = ("cls.",)


@dataclass(frozen=True)
class ClipConfig:
    """The BertConfig keys of ``hunyuan_clip/clip_text_encoder/config.json`` that set the shapes.
    Defaults: the released text tower. hidden_size 1024 is certain (the DiT's caption_channels[1]);
    the rest is BERT-large with HunyuanDiT's bilingual vocab, as the conformance manifest assumes."""

    vocab_size: int = 47020
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.max_position_embeddings < 77:
            raise ValueError(f"max_position_embeddings {self.max_position_embeddings} is below the "
                             "77 tokens HunyuanClip encodes")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, ClipConfig] = {
    "base": ClipConfig(),
    # The tiny model's CLIP (stepvideo.tiny); its vocab.txt is padded with [unused] tokens to
    # vocab_size, as BERT vocabularies are.
    "tiny": dataclasses.replace(ClipConfig(), vocab_size=2048, hidden_size=64, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=128,
                                max_position_embeddings=128),
}


def build_bert(config: "BertConfig | Mapping[str, Any]",
               device: "str | torch.device" = "meta") -> BertModel:
    """BertModel with its pooler, SDPA attention and no dropout in eval mode."""
    if not isinstance(config, BertConfig):
        config = BertConfig(**dict(config))
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = BertModel(config, add_pooling_layer=True)
    return model.eval()


# What torch.load(weights_only=True) raises for a file holding more than tensors; taken from torch so
# this package never imports pickle itself.
_UNPICKLING_ERROR = torch.serialization.pickle.UnpicklingError


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``model.safetensors`` or (with weights_only=True) a ``pytorch_model.bin``."""
    if path.endswith(".safetensors"):
        return load_safetensors([path])
    bin_path = path
    try:
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
    except (_UNPICKLING_ERROR, RuntimeError, OSError, EOFError) as e:
        raise CheckpointError(f"cannot read {bin_path} with weights_only=True: {e}. The file is "
                              "corrupt or holds more than tensors; re-download it.") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{bin_path} holds a {type(state).__name__}, not a state dict.")
    return state


def to_bert_model_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip a leading "bert." and drop the keys BertModel does not own (see _DROPPED_*)."""
    out, dropped = {}, []
    for key, value in state.items():
        key = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if key in _DROPPED_KEYS or key.startswith(_DROPPED_PREFIXES):
            dropped.append(key)
            continue
        out[key] = value
    if dropped:
        logger.info("HunyuanClip: ignoring %d checkpoint key(s) BertModel does not own: %s",
                    len(dropped), ", ".join(sorted(dropped)[:10]))
    return out


def _materialise_buffers(model: BertModel, device: "str | torch.device") -> None:
    """Re-create BERT's non-persistent buffers (absent from checkpoints) after a meta build."""
    emb = model.embeddings
    length = model.config.max_position_embeddings
    position_ids = torch.arange(length, device=device).expand((1, -1))
    emb.register_buffer("position_ids", position_ids, persistent=False)
    emb.register_buffer("token_type_ids", torch.zeros_like(position_ids), persistent=False)
    left = [name for name, b in model.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"BertModel buffers {left} were not materialised; this transformers "
                           "version added buffers that _materialise_buffers must create.")


def load_bert(model_dir: str, dtype: torch.dtype = torch.float32,
              device: "str | torch.device" = "cpu") -> BertModel:
    """BertModel from ``hunyuan_clip/clip_text_encoder/config.json`` built on meta, loaded
    strictly (``model_dir``: the ``hunyuan_clip/`` folder or a model root holding one)."""
    model_dir = part_dir(HUNYUAN_CLIP, model_dir)
    (weights,) = check_part(HUNYUAN_CLIP, model_dir)
    config = BertConfig.from_dict(read_json(os.path.join(model_dir, HUNYUAN_CLIP.config),
                                            "HunyuanClip config"))
    model = build_bert(config, device="meta")
    state = to_bert_model_keys(_read_state_dict(weights))
    state = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
             for k, v in state.items()}
    load_state_dict_strict(model, state, what=f"HunyuanClip checkpoint {weights}")
    _materialise_buffers(model, device)
    return model.eval()


def load_tokenizer(tokenizer_dir: str) -> BertTokenizer:
    if not os.path.isfile(os.path.join(tokenizer_dir, CLIP_VOCAB)):
        raise CheckpointError(f"HunyuanClip tokenizer: {tokenizer_dir}/{CLIP_VOCAB} does not "
                              f"exist; {HUNYUAN_CLIP.folder}/{CLIP_TOKENIZER_DIR} must hold the "
                              "BertTokenizer files.")
    return BertTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


class HunyuanClip(nn.Module):
    """``HunyuanClip(model_dir)(prompts) -> (last_hidden_state (B, L, C), pooler_output (B, C))``."""

    def __init__(self, model_dir: str, max_length: int = 77, dtype: torch.dtype = torch.float32,
                 device: "str | torch.device" = "cpu"):
        super().__init__()
        self.max_length = max_length
        model_dir = part_dir(HUNYUAN_CLIP, model_dir)
        check_part(HUNYUAN_CLIP, model_dir)  # every missing file named before anything is read
        self.tokenizer = load_tokenizer(os.path.join(model_dir, CLIP_TOKENIZER_DIR))
        self.text_encoder = load_bert(model_dir, dtype, device)

    def tokenize(self, prompts: "str | Sequence[str]") -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both (B, max_length) int64."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        batch = self.tokenizer(prompts, padding="max_length", max_length=self.max_length,
                               truncation=True, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]

    @torch.no_grad()
    def forward(self, prompts: "str | Sequence[str]") -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, mask = self.tokenize(prompts)
        device = self.text_encoder.embeddings.word_embeddings.weight.device
        out = self.text_encoder(input_ids=input_ids.to(device), attention_mask=mask.to(device))
        return out.last_hidden_state, out.pooler_output


def write_clip_dir(path: str, bert_config_dict: Mapping[str, Any],
                   state_dict: Mapping[str, torch.Tensor], vocab_lines: Sequence[str],
                   key_prefix: str = "", use_safetensors: bool = False) -> None:
    """Write a `hunyuan_clip/` directory in the official layout (pytorch_model.bin by default;
    ``key_prefix="bert."`` imitates a checkpoint saved from a model with a head)."""
    enc_dir = os.path.join(path, CLIP_ENCODER_DIR)
    tok_dir = os.path.join(path, CLIP_TOKENIZER_DIR)
    os.makedirs(enc_dir, exist_ok=True)
    os.makedirs(tok_dir, exist_ok=True)
    config = {"architectures": ["BertModel"], "model_type": "bert", **dict(bert_config_dict)}
    write_json_atomic(os.path.join(path, HUNYUAN_CLIP.config), config)
    tensors = {key_prefix + k: v.detach().contiguous().clone() for k, v in state_dict.items()}
    bin_file, st_file = HUNYUAN_CLIP.weights
    if use_safetensors:
        save_file(tensors, os.path.join(path, st_file))
    else:
        torch.save(tensors, os.path.join(path, bin_file))
    with open(os.path.join(tok_dir, CLIP_VOCAB), "w", encoding="utf-8") as f:
        f.write("".join(line.rstrip("\n") + "\n" for line in vocab_lines))
    write_json_atomic(os.path.join(tok_dir, CLIP_TOKENIZER_CONFIG),
                {"tokenizer_class": "BertTokenizer", "do_lower_case": True,
                 "tokenize_chinese_chars": True, "strip_accents": None})
    write_json_atomic(os.path.join(tok_dir, CLIP_SPECIAL_TOKENS_MAP),
                {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                 "cls_token": "[CLS]", "mask_token": "[MASK]"})


