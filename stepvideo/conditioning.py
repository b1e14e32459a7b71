"""What flows between the stages: text conditioning, and the two backend interfaces.

The pipeline, the in-process encoders/VAE, the HTTP client and the server all speak these types,
so none of them needs to import another to agree on a shape.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Protocol

import torch


@dataclass
class TextEmbeddings:
    """Conditioning for a DiT batch: y (B, Ly, 6144), mask (B, Lc+Ly), clip (B, Lc, 1024)."""

    y: torch.Tensor
    mask: torch.Tensor
    clip: torch.Tensor

    def to(self, device=None, dtype=None) -> "TextEmbeddings":
        return TextEmbeddings(self.y.to(device, dtype), self.mask.to(device), self.clip.to(device, dtype))

    def select(self, index: slice | torch.Tensor) -> "TextEmbeddings":
        return TextEmbeddings(self.y[index], self.mask[index], self.clip[index])

    @staticmethod
    def cat(parts: Iterable["TextEmbeddings"]) -> "TextEmbeddings":
        parts = list(parts)
        return TextEmbeddings(*(torch.cat([getattr(p, f.name) for p in parts])
                                for f in dataclasses.fields(TextEmbeddings)))


class TextEncoderBackend(Protocol):
    """Step-1 + CLIP: in-process (``text_encoder.local``) or over HTTP (``service.client``)."""

    def encode(self, prompts: list[str]) -> TextEmbeddings: ...


class VAEBackend(Protocol):
    """The Video-VAE decoder: in-process (``vae.local``) or over HTTP (``service.client``).

    ``decode`` returns float video (B, F, 3, H, W); ``decode_uint8`` returns (B, F, H, W, 3)
    uint8 frames, post-processed chunk by chunk."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def decode_uint8(self, latents: torch.Tensor) -> torch.Tensor: ...
