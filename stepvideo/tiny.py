"""A complete Step-Video model directory with tiny random weights, the default of demos and tests.

``python -m stepvideo.tiny DIR [--seed N]`` (or :func:`write_tiny_model`) writes the official layout
(SPEC section 1) -- ``model_index.json``, ``scheduler/``, ``transformer/`` (2 shards + index),
``step_llm/`` (2 shards + index + a sentencepiece ``step1_chat_tokenizer.model``), ``hunyuan_clip/``
(BertModel ``pytorch_model.bin`` + BERT vocab) and ``vae/vae_v2.safetensors`` (+ ``vae/config.json``
with its small widths) -- so every loader, the service and the runner work on it unchanged.

The tokenizers are trained on ``stepvideo/assets/tiny_corpus.txt`` (English and Chinese prose
shipped with the package). The same seed gives the same bytes: every tensor comes from one seeded
generator, sentencepiece trains single-threaded on an in-memory, unshuffled corpus, and no writer
embeds a path or a time. Weights follow the conformance kit's initialisation (norm weights about 1,
other matrices N(0, 1)/sqrt(fan_in)) and are rounded to bfloat16, so activations stay O(1) and the
bf16 files upcast to float32 exactly.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import os
import re
import tempfile
from dataclasses import dataclass
from importlib import resources

import torch
from safetensors.torch import save_file

from .fileio import write_json_atomic
from .layout import HUNYUAN_CLIP, MODEL_INDEX, SCHEDULER, STEP_LLM, TRANSFORMER, VAE

CORPUS = "tiny_corpus.txt"
BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass(frozen=True)
class TinySizes:
    """The tiny model's sizes. ``llm_hidden`` and ``clip_hidden`` are the DiT's caption_channels;
    ``z_channels`` is both the VAE latent width and the DiT's in/out channels."""

    dit_heads: int = 4
    dit_layers: int = 2
    llm_hidden: int = 128
    llm_heads: int = 2
    llm_groups: int = 1
    llm_layers: int = 2
    llm_ffn: int = 256
    llm_vocab: int = 1000            # sentencepiece pieces (a soft limit)
    clip_hidden: int = 64
    clip_layers: int = 2
    clip_heads: int = 2
    z_channels: int = 16
    vae_ch: int = 32                 # GroupNorm needs multiples of 32; the decoder's top width
    vae_mult: tuple[int, ...] = (1, 1, 2, 2)  # (vae_ch * 2 = 64) must be >= 4 * z_channels


def corpus_lines() -> list[str]:
    """The shipped bilingual corpus, one sentence per line."""
    text = resources.files("stepvideo").joinpath("assets", CORPUS).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------

def init_like_kit(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Fill every parameter in state_dict order from ``generator`` with the conformance kit's rule:
    norm weights 1 + 0.2 N(0,1) and biases 0.1 N(0,1); embeddings N(0,1); other biases 0.1 N(0,1);
    ``scale_shift_table`` N(0,1)/sqrt(last dim); other matrices N(0,1)/sqrt(fan_in). Values are
    rounded to bfloat16."""
    owners = {name: type(m) for name, m in module.named_modules()}
    with torch.no_grad():
        for name, p in module.named_parameters():
            owner_name, _, leaf = name.rpartition(".")
            owner = owners[owner_name]
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            if "Norm" in owner.__name__:
                value = 1 + 0.2 * noise if leaf == "weight" else 0.1 * noise
            elif issubclass(owner, torch.nn.Embedding):
                value = noise
            elif leaf == "bias" or p.dim() < 2:
                value = 0.1 * noise
            elif leaf == "scale_shift_table":
                value = noise / p.shape[-1] ** 0.5
            else:
                value = noise / p[0].numel() ** 0.5
            p.copy_(value.to(torch.bfloat16).to(p.dtype))


def _bf16(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------

def train_sentencepiece(lines: list[str], vocab_size: int) -> bytes:
    """A unigram sentencepiece model (unk 0, bos 1, eos 2, no pad) trained deterministically:
    one thread, corpus in order, no sampling, every character kept."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, hard_vocab_limit=False, num_threads=1,
        shuffle_input_sentence=False, input_sentence_size=0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2)
    return out.getvalue()


def bert_vocab(lines: list[str]) -> list[str]:
    """A BERT WordPiece vocab for the corpus: specials, every character (CJK characters are single
    tokens for BertTokenizer), lower-case words by frequency, then ``##`` continuations."""
    chars = sorted({c for line in lines for c in line.lower() if not c.isspace()})
    words = collections.Counter(w for line in lines for w in re.findall(r"[a-z]+", line.lower()))
    common = [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1]
    pieces = ["##" + c for c in chars if c.isascii() and c.isalnum()]
    return list(dict.fromkeys(BERT_SPECIAL + chars + common + pieces))


# --------------------------------------------------------------------------------------------
# The parts
# --------------------------------------------------------------------------------------------



def write_index_files(root: str) -> None:
    write_json_atomic(os.path.join(root, MODEL_INDEX), {
        "_class_name": "StepVideoPipeline",
        SCHEDULER.folder: ["stepvideo.diffusion.scheduler", "FlowMatchDiscreteScheduler"],
        TRANSFORMER.folder: ["stepvideo.modules.model", "StepVideoModel"]})
    write_json_atomic(os.path.join(root, SCHEDULER.folder, SCHEDULER.config), {
        "_class_name": "FlowMatchDiscreteScheduler", "num_train_timesteps": 1000,
        "reverse": False, "solver": "euler"})


def write_transformer(root: str, sizes: TinySizes, gen: torch.Generator) -> None:
    from .modules.model import StepVideoModel

    model = StepVideoModel(num_attention_heads=sizes.dit_heads, attention_head_dim=128,
                           in_channels=sizes.z_channels, out_channels=sizes.z_channels,
                           num_layers=sizes.dit_layers,
                           caption_channels=[sizes.llm_hidden, sizes.clip_hidden])
    init_like_kit(model, gen)
    model.save_pretrained(os.path.join(root, TRANSFORMER.folder), num_shards=2,
                          dtype=torch.bfloat16)


def write_step_llm(root: str, sizes: TinySizes, gen: torch.Generator, lines: list[str]) -> None:
    from .text_encoder.stepllm import Step1Config, Step1Model, write_step1_dir

    sp_model = train_sentencepiece(lines, sizes.llm_vocab)
    config = Step1Config(hidden_size=sizes.llm_hidden, num_layers=sizes.llm_layers,
                         num_attention_heads=sizes.llm_heads,
                         num_attention_groups=sizes.llm_groups, ffn_hidden_size=sizes.llm_ffn,
                         padded_vocab_size=-(-sizes.llm_vocab // 256) * 256)
    model = Step1Model(config)
    init_like_kit(model, gen)
    with tempfile.TemporaryDirectory() as tmp:
        sp_path = os.path.join(tmp, "tokenizer.model")
        with open(sp_path, "wb") as f:
            f.write(sp_model)
        write_step1_dir(os.path.join(root, STEP_LLM.folder), dataclasses.asdict(config),
                        _bf16(model.state_dict()), sp_path, num_shards=2)


def write_hunyuan_clip(root: str, sizes: TinySizes, gen: torch.Generator,
                       lines: list[str]) -> None:
    from .text_encoder.clip import build_bert, write_clip_dir

    vocab = bert_vocab(lines)
    config = {"vocab_size": len(vocab), "hidden_size": sizes.clip_hidden,
              "num_hidden_layers": sizes.clip_layers, "num_attention_heads": sizes.clip_heads,
              "intermediate_size": 2 * sizes.clip_hidden, "max_position_embeddings": 128,
              "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
              "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    model = build_bert(config, device="cpu")
    init_like_kit(model, gen)
    write_clip_dir(os.path.join(root, HUNYUAN_CLIP.folder), config, model.state_dict(), vocab)


def write_vae(root: str, sizes: TinySizes, gen: torch.Generator) -> None:
    from .vae.vae import AutoencoderKL, VAEConfig, state_dict_for_checkpoint

    config = VAEConfig(z_channels=sizes.z_channels, num_res_blocks=1, encoder_ch=sizes.vae_ch,
                       encoder_ch_mult=sizes.vae_mult, decoder_ch=sizes.vae_ch,
                       decoder_ch_mult=sizes.vae_mult)
    model = AutoencoderKL.from_config(config)
    init_like_kit(model, gen)
    vae_dir = os.path.join(root, VAE.folder)
    os.makedirs(vae_dir, exist_ok=True)
    save_file(_bf16(state_dict_for_checkpoint(model)), os.path.join(vae_dir, VAE.single))
    write_json_atomic(os.path.join(vae_dir, VAE.config), config.to_dict())


def write_tiny_model(directory: str, seed: int = 0, sizes: TinySizes = TinySizes()) -> str:
    """Write the tiny model into ``directory`` (created if needed) and return ``directory``."""
    lines = corpus_lines()
    os.makedirs(directory, exist_ok=True)
    write_index_files(directory)
    # One generator per part, derived from the seed, so parts do not shift each other's weights.
    parts = [("transformer", write_transformer), ("vae", write_vae)]
    for offset, (_, write) in enumerate(parts):
        write(directory, sizes, torch.Generator().manual_seed(seed * 1000 + offset))
    write_step_llm(directory, sizes, torch.Generator().manual_seed(seed * 1000 + 10), lines)
    write_hunyuan_clip(directory, sizes, torch.Generator().manual_seed(seed * 1000 + 20), lines)
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stepvideo.tiny",
        description="Write a complete Step-Video model directory (official layout) with tiny "
                    "random weights, for tests and the CPU demo. Same seed, same bytes.")
    parser.add_argument("directory", help="output directory (created; existing files overwritten)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    args = parser.parse_args(argv)
    print(write_tiny_model(args.directory, args.seed))


if __name__ == "__main__":
    main()
