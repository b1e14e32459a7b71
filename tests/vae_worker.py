"""Run by tests under ``torchrun``: decode latents with ``LocalVAE.iter_uint8_shared`` over the
ranks (gloo) and save rank 0's uint8 frames.

Usage: vae_worker.py VAE_DIR LATENTS.safetensors OUT.safetensors [--tile N]
"""

import argparse

import torch
from safetensors.torch import load_file, save_file

from stepvideo.parallel import LaunchEnv, ParallelConfig, ParallelContext
from stepvideo.vae.local import LocalVAE


def main():
    p = argparse.ArgumentParser()
    p.add_argument("vae_dir")
    p.add_argument("latents")
    p.add_argument("out")
    p.add_argument("--tile", default="off")
    a = p.parse_args()
    env = LaunchEnv.from_environ()
    if env.world_size > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    ctx = ParallelContext(ParallelConfig(), env)
    vae = LocalVAE.from_dir(a.vae_dir, torch.float32, "cpu", tile=a.tile)
    latents = load_file(a.latents)["latents"]
    pieces = list(vae.iter_uint8_shared(latents, ctx, torch.device("cpu")))
    if ctx.is_main:
        save_file({"frames": torch.cat(pieces, dim=1).contiguous(),
                   "sizes": torch.tensor([p.shape[1] for p in pieces])}, a.out)
    else:
        assert not pieces, "only rank 0 yields frames"
    ctx.close()


if __name__ == "__main__":
    main()
