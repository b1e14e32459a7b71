"""The memory planner's answers for the full video (204 x 544 x 992) with every model in the process,
per card class and option set: the table in the README's "One GPU" section.

    python benchmark/perf/planner_table.py

Pure arithmetic over the full-size configs built on the meta device (no weights, no device):
the DiT, Step-1 and the VAE from their presets, HunyuanCLIP as 1.3 GiB of float32 (its config ships
with the weights). Estimates, not measurements: ``benchmark/one_gpu.py`` checks them on a GPU.
"""

from __future__ import annotations

import dataclasses

import torch

from stepvideo.memory_plan import (CARD_CLASSES, GiB, OffloadConfig, PlanError, Workload, plan,
                                   resolve_vae_tile, sizes_of)
from stepvideo.modules.model import DiTConfig, StepVideoModel
from stepvideo.text_encoder.stepllm import Step1Config, Step1Model
from stepvideo.vae.vae import AutoencoderKL

CLIP_BYTES = int(1.3 * GiB)
COLUMNS = {"bf16, CFG batch 2": (False, {}),
           "bf16, `--cfg_sequential`": (False, {"cfg_sequential": True}),
           "`--quantize fp8_weight --cfg_sequential`": (True, {"cfg_sequential": True})}


def full_sizes() -> dict:
    with torch.device("meta"):
        dit, llm, vae = StepVideoModel.from_config(DiTConfig()), Step1Model(Step1Config()), AutoencoderKL()
    return {fp8: dataclasses.replace(sizes_of(dit, llm, None, vae, fp8_dit=fp8, fp8_llm=fp8),
                                     clip=CLIP_BYTES) for fp8 in (False, True)}


def answer(free: int, sizes, work: Workload) -> str:
    try:
        p = plan(free, sizes, work, OffloadConfig("auto"))
    except PlanError as e:
        return f"does not fit ({str(e).split('; ')[0]})"
    mode = p.offload.mode
    text = f"`{mode}`" + (f", {p.offload.resident_blocks} resident" if mode == "block" else "")
    tiled = resolve_vae_tile(free, sizes, work, p.offload).vae_tile is not None
    return text + (", tiled VAE" if tiled else "") + f" ({p.peak / GiB:.1f} GiB)"


def main() -> list[str]:
    sizes = full_sizes()
    lines = ["| card (usable) | " + " | ".join(COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for name, usable in reversed(CARD_CLASSES):
        cells = [answer(usable, sizes[fp8], Workload(vae_tile="auto", **opts))
                 for fp8, opts in COLUMNS.values()]
        lines.append(f"| {name} ({usable / GiB:g} GiB) | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
