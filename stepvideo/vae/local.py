"""The Video-VAE as an in-process backend (the caption/VAE service hosts the same class).

Decoding streams: ``iter_uint8`` yields post-processed uint8 frames chunk by chunk (the float video
never exists whole), spatially tiled when ``tile`` says so, and ``iter_uint8_shared`` spreads the
chunks, and the tiles of each chunk, over the ranks of a job (``--vae_parallel``) with the same
frames as one rank.
"""

from __future__ import annotations

import os
from typing import Iterator, Protocol

import torch

from ..video_io import uint8_per_sample
from .vae import (FRAMES_PER_CHUNK, LATENTS_PER_CHUNK, SPATIAL_FACTOR, TileBlend, auto_tile_size,
                  check_tiles, decoded_frames, join_chunk)

AUTO = "auto"
# --vae_tile auto: the share of free memory a chunk's decode may plan to use
AUTO_MEMORY_SHARE = 0.85


class Gatherer(Protocol):
    """What ``iter_uint8_shared`` needs from the job's parallel layer (``ParallelContext``)."""

    rank: int
    world_size: int

    def gather_to_main(self, tensor: torch.Tensor, device: torch.device) -> list[torch.Tensor] | None:
        ...

    def broadcast_ints(self, values: list[int] | None, device: torch.device) -> list[int]:
        ...


def parse_tile(value: str | int | None) -> str | int | None:
    """``--vae_tile``: 'auto', 'off' (None) or a tile edge N >= 2 in latent pixels."""
    if value is None or value == "off":
        return None
    if value == AUTO:
        return AUTO
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--vae_tile must be auto, off or an integer >= 2 (latent pixels), "
                         f"got {value!r}") from None
    if n < 2:
        raise ValueError(f"--vae_tile {n} is below 2 latent pixels; use auto, off or N >= 2")
    return n


def free_memory(device: torch.device) -> int:
    """Bytes a decode on ``device`` may use: free CUDA memory plus what PyTorch's allocator holds
    unused (after denoising it caches much of the DiT's activations), or available host memory."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class LocalVAE:
    """The Video-VAE in this process. ``decode`` returns (B, F, 3, H, W) in the VAE's dtype on the
    CPU; ``decode_uint8`` post-processes chunk by chunk, so the float video is never whole.

    ``tile``: None (untiled), an edge in latent pixels, or 'auto' (tile only when an untiled chunk
    would not fit the free memory, ``auto_tile_size``). ``tile_overlap``: latent pixels (default
    a quarter of the tile). ``replicas``: copies of the VAE on further devices (the service's
    ``--devices``); ``iter_uint8`` then decodes that many chunks at once, one per device, with the
    frames of one device."""

    def __init__(self, vae, tile: str | int | None = None, tile_overlap: int | None = None,
                 replicas=()):
        self.vae = vae
        self.tile = parse_tile(tile)
        self.tile_overlap = tile_overlap
        self.replicas = [vae, *replicas]

    @classmethod
    def from_dir(cls, vae_dir: str, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu", tile: str | int | None = None,
                 tile_overlap: int | None = None, devices=()) -> "LocalVAE":
        """Load on ``device``, plus one replica on each further device in ``devices``."""
        from .vae import AutoencoderKL

        extra = [d for d in devices if torch.device(d) != torch.device(device)]
        load = lambda d: AutoencoderKL.from_pretrained(vae_dir, dtype=dtype, device=d)  # noqa: E731
        return cls(load(device), tile, tile_overlap, [load(d) for d in extra])

    def residency_parts(self) -> list[tuple[str, torch.nn.Module, None]]:
        """(name, module, block list) for ``--offload``: the VAE moves whole."""
        return [("vae", self.vae, None)]

    @property
    def z_channels(self) -> int:
        return self.vae.config.z_channels

    def tiles_for(self, latents: torch.Tensor) -> tuple[int | None, int | None]:
        """(tile_size, tile_overlap) for decoding ``latents`` (B, f, z, h, w) with this policy."""
        if self.tile is None:
            return None, None
        if self.tile == AUTO:
            b, _, _, h, w = latents.shape
            budget = int(AUTO_MEMORY_SHARE * free_memory(self.vae.device))
            size = auto_tile_size(self.vae.config, h, w, self.vae.dtype, budget, b)
            return (None, None) if size is None else (size, self.tile_overlap)
        return self.tile, self.tile_overlap

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents, None, *self.tiles_for(latents)).cpu()

    @torch.inference_mode()
    def iter_uint8(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """uint8 (B, n, H, W, 3) pieces, one per chunk, as they are decoded and seam-blended."""
        if len(self.replicas) > 1:
            yield from self._iter_uint8_replicas(latents)
            return
        for piece in self.vae.iter_decode(latents, *self.tiles_for(latents)):
            yield uint8_per_sample(piece.cpu())

    def _iter_uint8_replicas(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """``iter_uint8`` with one chunk per replica at a time (threads: the kernels run
        concurrently on their devices); each chunk's seam is joined on the first device in
        order, as ``iter_decode`` does, so the frames are those of one device."""
        from concurrent.futures import ThreadPoolExecutor

        chunks = latents.split(LATENTS_PER_CHUNK, dim=1)
        tiles = self.tiles_for(latents)
        held = None

        def decode(job):
            vae, chunk = job
            with torch.inference_mode():
                return vae.decode_chunk(chunk, *tiles)                      # (B, n, 3, H, W)

        with ThreadPoolExecutor(len(self.replicas)) as pool:
            for start in range(0, len(chunks), len(self.replicas)):
                batch = chunks[start:start + len(self.replicas)]
                for i, x in enumerate(pool.map(decode, zip(self.replicas, batch))):
                    x, held = join_chunk(x.to(self.vae.device), held,
                                         last=start + i + 1 == len(chunks))
                    yield uint8_per_sample(x.cpu())

    def decode_uint8(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.cat(list(self.iter_uint8(latents)), dim=1)

    @torch.inference_mode()
    def iter_uint8_shared(self, latents: torch.Tensor, comm: Gatherer,
                          device: torch.device) -> Iterator[torch.Tensor]:
        """Decode on every rank of ``comm``; on rank 0 yield the same uint8 pieces as
        ``iter_uint8`` on one rank (other ranks yield nothing).

        The work is a list of units, chunk by chunk and, when the chunks are tiled, tile by tile
        within a chunk (row-major, ``TileBlend.windows``): so a single chunk of 16 tiles keeps 16
        ranks busy, not one. Units go round-robin: in round r rank i decodes unit r*W + i and rank 0
        gathers the outputs (the VAE's dtype, padded to one shape). Rank 0 blends each chunk's tiles
        in ``tiled``'s order and dtype, then joins the chunk's seam as ``iter_decode`` does, so the
        frames equal a one-rank decode. The tile size is rank 0's choice (``auto`` may differ per
        rank's free memory), broadcast. Every rank calls this with the same latents; memory per
        round: one unit per rank and, on rank 0, W unit outputs and one chunk being blended."""
        vae = self.vae
        world = comm.world_size
        size, overlap = self.tiles_for(latents) if comm.rank == 0 else (None, None)
        size, overlap = comm.broadcast_ints([size or 0, -1 if overlap is None else overlap], device)
        tiles = check_tiles(size or None, None if overlap < 0 else overlap)
        chunks = latents.split(LATENTS_PER_CHUNK, dim=1)
        b, _, _, h, w = latents.shape
        plan = TileBlend(h, w, *tiles, SPATIAL_FACTOR) if tiles else None
        windows = 1 if plan is None or plan.single else len(plan.windows)
        units = [(k, j) for k in range(len(chunks)) for j in range(windows)]
        th, tw = (h, w) if windows == 1 else (min(plan.tile, h), min(plan.tile, w))
        shape = (b, vae.config.out_channels, FRAMES_PER_CHUNK, th * SPATIAL_FACTOR, tw * SPATIAL_FACTOR)
        held = blend = None
        for start in range(0, len(units), world):
            part = torch.zeros(shape, dtype=vae.dtype, device=vae.device)
            if start + comm.rank < len(units):
                k, j = units[start + comm.rank]
                z = chunks[k].to(device=vae.device, dtype=vae.dtype).transpose(1, 2)  # (B, z, t, h, w)
                if windows > 1:
                    ys, xs = plan.window(j, 1)
                    z = z[..., ys, xs]
                out = vae.decoder(z)                                    # (B, 3, n, th16, tw16)
                part[:, :, :out.shape[2]] = out
                del out
            got = comm.gather_to_main(part, device)
            if got is None:
                continue
            for i in range(min(world, len(units) - start)):
                k, j = units[start + i]
                n = decoded_frames(chunks[k].shape[1])
                out = got[i][:, :, :n].to(vae.device)
                if windows > 1:
                    if j == 0:
                        blend = TileBlend(h, w, *tiles, SPATIAL_FACTOR)
                    blend.add(out)
                    if j + 1 < windows:
                        continue
                    out = blend.result(vae.dtype)
                x, held = join_chunk(out.transpose(1, 2), held, last=k + 1 == len(chunks))
                yield uint8_per_sample(x.cpu())
