"""The Video-VAE as an in-process backend (the caption/VAE service hosts the same class)."""

from __future__ import annotations

import torch

from ..video_io import uint8_per_sample


class LocalVAE:
    """The Video-VAE in this process. ``decode`` returns (B, F, 3, H, W) in the VAE's dtype on the
    CPU; ``decode_uint8`` post-processes chunk by chunk, so the float video is never whole."""

    def __init__(self, vae):
        self.vae = vae

    @classmethod
    def from_dir(cls, vae_dir: str, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu") -> "LocalVAE":
        from .vae import AutoencoderKL

        return cls(AutoencoderKL.from_pretrained(vae_dir, dtype=dtype, device=device))

    def residency_parts(self) -> list[tuple[str, torch.nn.Module, None]]:
        """(name, module, block list) for ``--offload``: the VAE moves whole."""
        return [("vae", self.vae, None)]

    @property
    def z_channels(self) -> int:
        return self.vae.config.z_channels

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents).cpu()

    @torch.inference_mode()
    def decode_uint8(self, latents: torch.Tensor) -> torch.Tensor:
        pieces = [uint8_per_sample(piece.cpu()) for piece in self.vae.iter_decode(latents)]
        return torch.cat(pieces, dim=1)


