"""Scheduler and denoising loop against the conformance vectors and hand-computed values."""

from __future__ import annotations

import re

import pytest
import torch

from stepvideo.conformance import assert_close, load_json, load_tensors
from stepvideo.diffusion.scheduler import FlowMatchDiscreteScheduler, cfg_combine, euler_step, flow_sigmas
from stepvideo.conditioning import TextEmbeddings
from stepvideo.diffusion.video_pipeline import (NEG_MAGIC, POS_MAGIC, StepVideoPipeline, VideoSize,
                                                cfg_prompts, denoise, initial_noise)
from stepvideo.modules.model import StepVideoModel
from stepvideo.weights import load_state_dict_strict


@pytest.fixture(scope="module")
def spec():
    return load_json("scheduler.json")


def test_schedules_match_official(spec):
    ref = load_tensors("scheduler.safetensors")
    for case in spec["cases"]:
        if case["reverse"]:
            continue  # the released config uses reverse=false; the reverse variant is for contrast
        s = FlowMatchDiscreteScheduler(**spec["default_config"])
        s.set_timesteps(case["num_inference_steps"], time_shift=case["time_shift"])
        assert_close(s.sigmas, ref[f"{case['tag']}_sigmas"], spec["tolerance"], case["tag"])
        assert_close(s.timesteps, ref[f"{case['tag']}_timesteps"], spec["tolerance"], case["tag"])


def test_step_chain_matches_official(spec):
    ref = load_tensors("scheduler.safetensors")
    n, shift = (float(x) for x in re.search(r"set_timesteps\((\d+),\s*([\d.]+)\)",
                                            spec["step_test"]["config"]).groups())
    s = FlowMatchDiscreteScheduler(**spec["default_config"])
    s.set_timesteps(int(n), time_shift=shift)
    sample = ref["step_sample0"]
    i = 0
    while f"step{i}_model_output" in ref:
        sample = s.step(ref[f"step{i}_model_output"], s.timesteps[i], sample)
        assert sample.dtype == torch.float32
        assert_close(sample, ref[f"step{i}_prev_sample"], spec["tolerance"], f"step {i}")
        i += 1
    assert i >= 2
    s.set_timesteps(int(n), time_shift=shift)
    out = s.step(ref["bf16_step_model_output"], s.timesteps[0], ref["bf16_step_sample"].bfloat16())
    assert out.dtype == torch.float32
    assert_close(out, ref["bf16_step_prev_sample"], spec["tolerance"], "bf16 step")


def test_pure_functions_by_hand():
    # n=2, shift=3: s = [1, .5, 0] -> 3s/(1+2s) = [1, .75, 0] -> 1 - s' = [0, .25, 1]
    assert torch.allclose(flow_sigmas(2, 3.0), torch.tensor([0.0, 0.25, 1.0]))
    assert torch.allclose(flow_sigmas(2, 3.0, reverse=True), torch.tensor([1.0, 0.75, 0.0]))
    x, v = torch.tensor([1.0, 2.0]), torch.tensor([4.0, -2.0])
    assert torch.equal(euler_step(x, v, 0.25, 1.0), torch.tensor([4.0, 0.5]))
    assert torch.equal(cfg_combine(torch.tensor([3.0]), torch.tensor([1.0]), 9.0), torch.tensor([19.0]))
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        flow_sigmas(0, 13.0)
    with pytest.raises(ValueError, match="not in the schedule"):
        s = FlowMatchDiscreteScheduler()
        s.set_timesteps(3)
        s.step(x, 0.5, x)


def _small_dit():
    spec = load_json("dit_small.json")
    with torch.device("meta"):
        m = StepVideoModel(**spec["config"])
    load_state_dict_strict(m, load_tensors(spec["weights"]["file"], torch.float32))
    return m.eval()


@torch.no_grad()
def test_pipeline_loop_matches_official():
    spec = load_json("pipeline_loop.json")
    ref = load_tensors("pipeline_loop.safetensors")
    n = spec["args"]["num_inference_steps"]
    s = FlowMatchDiscreteScheduler()
    s.set_timesteps(n, time_shift=spec["args"]["time_shift"])
    assert_close(s.sigmas, ref["sigmas"], load_json("scheduler.json")["tolerance"], "sigmas")
    text = TextEmbeddings(ref["prompt_embeds"], ref["prompt_attention_mask"], ref["prompt_embeds_2"])
    steps = {}
    out = denoise(_small_dit(), ref["latents_init"], text, s, spec["args"]["guidance_scale"],
                  on_step=lambda i, x: steps.__setitem__(i, x))
    for i in range(n):
        assert_close(steps[i], ref[f"step{i}_latents"], spec["tolerance"], f"step {i}")
    assert_close(out, ref["latents_final"], spec["tolerance"], "final latents")
    assert_close(out, ref["latents_final_official_call"], spec["tolerance"], "official call")


class _FixedText:
    """A text backend returning the kit's embeddings (positive, negative) for any prompts."""

    def __init__(self, ref):
        self.ref = ref
        self.seen = None

    def encode(self, prompts):
        self.seen = prompts
        return TextEmbeddings(self.ref["prompt_embeds"], self.ref["prompt_attention_mask"],
                              self.ref["prompt_embeds_2"])


@torch.no_grad()
def test_pipeline_call_seeds_and_prompt_order():
    spec = load_json("pipeline_loop.json")
    ref = load_tensors("pipeline_loop.safetensors")
    text = _FixedText(ref)
    pipe = StepVideoPipeline(_small_dit(), text_encoder=text)
    kw = dict(num_inference_steps=spec["args"]["num_inference_steps"],
              guidance_scale=spec["args"]["guidance_scale"], time_shift=spec["args"]["time_shift"],
              pos_magic="+P", neg_magic="N", output_type="latent", return_dict=False)
    out = pipe("a cat", latents=ref["latents_init"], **kw)
    assert_close(out, ref["latents_final"], spec["tolerance"], "pipeline call")
    assert text.seen == ["a cat+P", "N"]
    _, f, c, h, w = ref["latents_init"].shape
    size = dict(num_frames=f // 3 * 17, height=h * 16, width=w * 16)
    a = pipe("a cat", seed=1, **size, **kw)
    b = pipe("a cat", seed=1, **size, **kw)
    d = pipe("a cat", seed=2, **size, **kw)
    assert a.shape == ref["latents_init"].shape
    assert torch.equal(a, b) and not torch.equal(a, d)


def test_size_rounding_examples():
    spec = load_json("pipeline_loop.json")
    for ex in spec["size_rounding_examples"]:
        size = VideoSize.rounded(ex["num_frames"], ex["height"], ex["width"])
        assert [size.num_frames, size.height, size.width] == ex["rounded_frames_height_width"]
        assert list(size.latent_shape(1, ex["latent_shape_bfchw"][2])) == ex["latent_shape_bfchw"]


def test_magic_and_noise():
    magic = load_json("pipeline_loop.json")["magic_prompts_default"]
    assert (POS_MAGIC, NEG_MAGIC) == (magic["pos_magic"], magic["neg_magic"])
    assert cfg_prompts(["a", "b"], "+", "-") == ["a+", "b+", "-", "-"]
    n1, n2 = initial_noise((2, 3), 7), initial_noise((2, 3), 7)
    assert torch.equal(n1, n2) and not torch.equal(n1, initial_noise((2, 3), 8))
    bf = initial_noise((64,), 7, torch.bfloat16)
    assert torch.equal(bf, bf.bfloat16().float())


@torch.no_grad()
def test_bf16_transformer_gets_a_float32_timestep():
    """The release rounds t to bf16 before the x1000 (0.3 -> 0.30078); we keep it float32, so a
    bf16 DiT stays within bf16 noise of the float32 reference."""
    from stepvideo.diffusion.video_pipeline import guided_velocity

    ref = load_tensors("pipeline_loop.safetensors")
    text = TextEmbeddings(ref["prompt_embeds"], ref["prompt_attention_mask"], ref["prompt_embeds_2"])
    t = torch.tensor(0.3)
    fp32 = guided_velocity(_small_dit(), ref["latents_init"], t, text, 1.0)
    bf16_model = _small_dit().to(torch.bfloat16)
    bf16 = guided_velocity(bf16_model, ref["latents_init"], t, text.to(dtype=torch.bfloat16), 1.0)
    rounded_t = guided_velocity(_small_dit(), ref["latents_init"], t.bfloat16().float(), text, 1.0)
    scale = fp32.abs().max()
    assert (bf16 - fp32).abs().max() < 0.05 * scale
    assert (rounded_t - fp32).abs().max() > (bf16 - fp32).abs().max()
