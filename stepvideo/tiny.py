"""A complete Step-Video model directory with tiny random weights, the default of demos and tests.

``python -m stepvideo.tiny DIR [--seed N]`` (or :func:`write_tiny_model`) writes the official layout
(SPEC section 1) -- ``model_index.json``, ``scheduler/``, ``transformer/`` (2 shards + index),
``step_llm/`` (2 shards + index + a sentencepiece ``step1_chat_tokenizer.model``), ``hunyuan_clip/``
(BertModel ``pytorch_model.bin`` + BERT vocab) and ``vae/vae_v2.safetensors`` (+ ``vae/config.json``
with its small widths) -- so every loader, the service and the runner work on it unchanged. Its
shapes are each model's ``PRESETS["tiny"]``, composed (and checked to fit) by :class:`TinySizes`.

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
from .modules.model import PRESETS as DIT_PRESETS, DiTConfig, StepVideoModel
from .text_encoder.clip import PRESETS as CLIP_PRESETS, ClipConfig, build_bert, write_clip_dir
from .text_encoder.stepllm import (BOS_ID, CONTROL_TOKENS, EOS_ID, MASK_TOKENS,
                                   PRESETS as STEP1_PRESETS, Step1Config, Step1Model,
                                   write_step1_dir)
from .vae.vae import PRESETS as VAE_PRESETS, AutoencoderKL, VAEConfig, state_dict_for_checkpoint

CORPUS = "tiny_corpus.txt"
BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass(frozen=True)
class TinySizes:
    """The tiny model: each part's ``PRESETS["tiny"]``. The DiT reads the text encoders' widths
    (caption_channels) and the VAE's latents (in/out channels); the presets must fit together."""

    dit: DiTConfig = DIT_PRESETS["tiny"]
    step1: Step1Config = STEP1_PRESETS["tiny"]
    clip: ClipConfig = CLIP_PRESETS["tiny"]
    vae: VAEConfig = VAE_PRESETS["tiny"]

    def __post_init__(self):
        widths = (self.step1.hidden_size, self.clip.hidden_size)
        if tuple(self.dit.caption_channels) != widths:
            raise ValueError(f"the DiT's caption_channels {list(self.dit.caption_channels)} must be "
                             f"the Step-1 and CLIP hidden sizes {list(widths)}")
        if not self.dit.in_channels == self.dit.out_channels == self.vae.z_channels:
            raise ValueError(f"the DiT's in/out channels ({self.dit.in_channels}, "
                             f"{self.dit.out_channels}) must be the VAE's z_channels "
                             f"{self.vae.z_channels}")

    @property
    def z_channels(self) -> int:
        return self.vae.z_channels


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
    """A unigram sentencepiece model with the released tokenizer's special pieces (unk 0, bos 1,
    eos 2, no pad; CONTROL_TOKENS as control pieces, MASK_TOKENS as user-defined ones) and at most
    ``vocab_size`` pieces, trained deterministically: one thread, corpus in order, no sampling,
    every character kept."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, hard_vocab_limit=False, num_threads=1,
        shuffle_input_sentence=False, input_sentence_size=0, unk_id=0, bos_id=BOS_ID,
        eos_id=EOS_ID, pad_id=-1, control_symbols=list(CONTROL_TOKENS),
        user_defined_symbols=list(MASK_TOKENS), minloglevel=2)
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


def write_transformer(root: str, cfg: DiTConfig, gen: torch.Generator) -> None:
    model = StepVideoModel.from_config(cfg)
    init_like_kit(model, gen)
    model.save_pretrained(os.path.join(root, TRANSFORMER.folder), num_shards=2,
                          dtype=torch.bfloat16)


def write_step_llm(root: str, cfg: Step1Config, gen: torch.Generator, lines: list[str]) -> None:
    sp_model = train_sentencepiece(lines, cfg.padded_vocab_size)
    model = Step1Model(cfg)
    init_like_kit(model, gen)
    with tempfile.TemporaryDirectory() as tmp:
        sp_path = os.path.join(tmp, "tokenizer.model")
        with open(sp_path, "wb") as f:
            f.write(sp_model)
        write_step1_dir(os.path.join(root, STEP_LLM.folder), cfg, _bf16(model.state_dict()),
                        sp_path, num_shards=2)


def write_hunyuan_clip(root: str, cfg: ClipConfig, gen: torch.Generator,
                       lines: list[str]) -> None:
    vocab = bert_vocab(lines)
    if len(vocab) > cfg.vocab_size:
        raise ValueError(f"the corpus needs {len(vocab)} BERT tokens, more than the tiny CLIP's "
                         f"vocab_size {cfg.vocab_size}: raise it in clip.PRESETS['tiny']")
    vocab += [f"[unused{i}]" for i in range(cfg.vocab_size - len(vocab))]
    model = build_bert(cfg.to_dict(), device="cpu")
    init_like_kit(model, gen)
    write_clip_dir(os.path.join(root, HUNYUAN_CLIP.folder), cfg.to_dict(), model.state_dict(),
                   vocab)


def write_vae(root: str, cfg: VAEConfig, gen: torch.Generator) -> None:
    model = AutoencoderKL.from_config(cfg)
    init_like_kit(model, gen)
    vae_dir = os.path.join(root, VAE.folder)
    os.makedirs(vae_dir, exist_ok=True)
    save_file(_bf16(state_dict_for_checkpoint(model)), os.path.join(vae_dir, VAE.single))
    write_json_atomic(os.path.join(vae_dir, VAE.config), cfg.to_dict())


def write_tiny_model(directory: str, seed: int = 0, sizes: TinySizes = TinySizes()) -> str:
    """Write the tiny model into ``directory`` (created if needed) and return ``directory``."""
    lines = corpus_lines()
    os.makedirs(directory, exist_ok=True)
    write_index_files(directory)
    # One generator per part, derived from the seed, so parts do not shift each other's weights.
    write_transformer(directory, sizes.dit, torch.Generator().manual_seed(seed * 1000))
    write_vae(directory, sizes.vae, torch.Generator().manual_seed(seed * 1000 + 1))
    write_step_llm(directory, sizes.step1, torch.Generator().manual_seed(seed * 1000 + 10), lines)
    write_hunyuan_clip(directory, sizes.clip, torch.Generator().manual_seed(seed * 1000 + 20),
                       lines)
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
