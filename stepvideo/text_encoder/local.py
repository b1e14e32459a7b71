"""Step-1 + HunyuanCLIP as an in-process text-encoder backend (the caption/VAE service hosts the
same class)."""

from __future__ import annotations

import collections
import threading

import torch

from ..conditioning import TextEmbeddings


class LocalTextEncoder:
    """Step-1 LLM + HunyuanCLIP in this process: ``encode(prompts) -> TextEmbeddings`` with
    y (B, 320, llm_dim), mask (B, 77 + 320) (the 77 CLIP ones first) and clip (B, 77, clip_dim).

    Each prompt is encoded on its own (batch 1), so a prompt's embedding never depends on the
    other prompts of a request or on the cache. ``dtype`` is the output dtype (the release sends
    bf16; CLIP itself runs in float32). ``cache_size`` > 0 keeps that many prompts' embeddings
    (bounded LRU keyed by text and both max lengths): the negative prompt repeats on every call.
    """

    def __init__(self, llm, clip, dtype: torch.dtype | None = None, cache_size: int = 0):
        self.llm, self.clip, self.dtype = llm, clip, dtype
        self.cache_size = cache_size
        self._cache: collections.OrderedDict[tuple, TextEmbeddings] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @classmethod
    def from_dirs(cls, llm_dir: str, clip_dir: str, dtype: torch.dtype = torch.bfloat16,
                  device: str | torch.device = "cpu", cache_size: int = 0,
                  llm_max_length: int = 320, clip_max_length: int = 77) -> "LocalTextEncoder":
        from .clip import HunyuanClip
        from .stepllm import STEP1TextEncoder

        llm = STEP1TextEncoder(llm_dir, max_length=llm_max_length, dtype=dtype, device=device)
        clip = HunyuanClip(clip_dir, max_length=clip_max_length, dtype=torch.float32, device=device)
        return cls(llm, clip, dtype=dtype, cache_size=cache_size)

    def residency_parts(self) -> list[tuple[str, torch.nn.Module, torch.nn.ModuleList | None]]:
        """(name, module, block list) for ``--offload``: Step-1 streams its layers, CLIP moves whole."""
        return [("step_llm", self.llm, self.llm.model.transformer["layers"]), ("clip", self.clip, None)]

    @property
    def max_lengths(self) -> tuple[int, int]:
        return self.llm.max_length, self.clip.max_length

    def encode(self, prompts: list[str]) -> TextEmbeddings:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        return TextEmbeddings.cat(self._encode_cached(p) for p in prompts)

    def _encode_cached(self, prompt: str) -> TextEmbeddings:
        key = (prompt, *self.max_lengths)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return hit
            self.misses += 1
        out = self._encode_one(prompt)
        if self.cache_size > 0:
            with self._lock:
                self._cache[key] = out
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return out

    @torch.inference_mode()
    def _encode_one(self, prompt: str) -> TextEmbeddings:
        y, y_mask = self.llm([prompt])            # (1, Ly, D), (1, Ly)
        clip, _ = self.clip([prompt])             # (1, Lc, C)
        y_mask = y_mask.cpu()
        mask = torch.cat([torch.ones(1, clip.shape[1], dtype=y_mask.dtype), y_mask], dim=1)
        dtype = self.dtype or y.dtype
        return TextEmbeddings(y.cpu().to(dtype), mask, clip.cpu().to(dtype))

    def cache_info(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "size": len(self._cache),
                    "capacity": self.cache_size}




def prompt_length_notes(model_dir: str, text: str, llm_max_length: int = 320,
                        clip_max_length: int = 77) -> list[str]:
    """Notes for a ``text`` longer than the encoders read (Step-1: 320 tokens with BOS/EOS; CLIP:
    77 with [CLS]/[SEP]): the rest is cut silently by both. Only the tokenizers are loaded; a part
    whose tokenizer is not in ``model_dir`` (a DiT-only host) is skipped."""
    import os

    from ..layout import CLIP_TOKENIZER_DIR, HUNYUAN_CLIP, STEP1_TOKENIZER, STEP_LLM
    from .clip import load_tokenizer
    from .stepllm import StepTokenizer

    notes = []
    sp_path = os.path.join(model_dir, STEP_LLM.folder, STEP1_TOKENIZER)
    if os.path.isfile(sp_path):
        n = len(StepTokenizer(sp_path).encode(text)) + 2
        if n > llm_max_length:
            notes.append(f"the prompt is {n} Step-1 tokens; the encoder reads the first "
                         f"{llm_max_length} (with the magic string appended) and drops the rest")
    bert_dir = os.path.join(model_dir, HUNYUAN_CLIP.folder, CLIP_TOKENIZER_DIR)
    if os.path.isdir(bert_dir):
        n = len(load_tokenizer(bert_dir)(text)["input_ids"])
        if n > clip_max_length:
            notes.append(f"the prompt is {n} CLIP tokens; CLIP reads the first {clip_max_length} "
                         "and drops the rest")
    return notes
