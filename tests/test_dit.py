"""The DiT against the conformance vectors, its loader, and its bad-input errors."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from stepvideo.conformance import assert_close, load_json, load_tensors
from stepvideo.modules.layers import timestep_sinusoid
from stepvideo.modules.model import PRESETS, DiTConfig, StepVideoModel
from stepvideo.modules.rope import Rope, apply_rope, rope_tables
from stepvideo.synthetic import random_model
from stepvideo.memtrack import OpCensus
from stepvideo.weights import CheckpointError, load_state_dict_strict


@pytest.fixture(scope="module")
def spec():
    return load_json("dit_small.json")


@pytest.fixture(scope="module")
def model(spec):
    with torch.device("meta"):
        m = StepVideoModel(**spec["config"])
    load_state_dict_strict(m, load_tensors(spec["weights"]["file"], torch.float32))
    return m.eval()


@pytest.fixture(scope="module")
def io():
    return load_tensors("dit_small_io.safetensors")


def _call(model, io, return_dict=False):
    return model(io["hidden_states"], io["timestep"], io["encoder_hidden_states"],
                 io["encoder_hidden_states_2"], io["encoder_attention_mask"], return_dict=return_dict)


@torch.no_grad()
def test_forward_matches_official(model, io, spec):
    assert_close(_call(model, io), io["output"], spec["tolerance"], "DiT output")
    assert_close(_call(model, io, True)["x"], io["output"], spec["tolerance"], "return_dict")


@torch.no_grad()
def test_intermediates_match_official(model, io, spec):
    ref = load_tensors("dit_small_intermediates.safetensors")
    tol = spec["tolerance"]
    seen = {}
    hooks = [model.pos_embed.register_forward_hook(lambda m, a, o: seen.__setitem__("pos_embed_out", o)),
             model.transformer_blocks[0].register_forward_pre_hook(
                 lambda m, a: seen.__setitem__("block_input_hidden", a[0].clone()))]
    for i, blk in enumerate(model.transformer_blocks):
        hooks.append(blk.register_forward_hook(
            lambda m, a, o, i=i: seen.__setitem__(f"block{i}_out", o.clone())))  # blocks update in place
    _call(model, io)
    for h in hooks:
        h.remove()
    t_mod, t_emb = model.adaln_single(io["timestep"])
    seen["adaln_time_proj"] = timestep_sinusoid(io["timestep"] * 1000, 256)
    seen["adaln_timestep_mod"], seen["adaln_embedded_timestep"] = t_mod, t_emb
    seen["caption_projection_out"] = model.caption_projection(model.caption_norm(io["encoder_hidden_states"]))
    seen["clip_projection_out"] = model.clip_projection(io["encoder_hidden_states_2"])
    ctx, kv_lens = model.text_context(io["encoder_hidden_states"], io["encoder_hidden_states_2"],
                                      io["encoder_attention_mask"])
    seen["block_input_kv"] = ctx
    mask = torch.arange(ctx.shape[1])[None, None, :] < kv_lens[:, None, None]
    seen["block_attn_mask"] = mask.expand(-1, ref["block_attn_mask"].shape[1], -1).to(torch.uint8)
    assert set(ref) <= set(seen), f"untested intermediates: {set(ref) - set(seen)}"
    for name, expected in ref.items():
        if name == "adaln_time_proj":
            continue
        assert_close(seen[name].float(), expected.float(), tol, name)
    assert_sinusoid_close(seen["adaln_time_proj"], ref["adaln_time_proj"], io["timestep"] * 1000,
                          float(tol["atol"]))


def assert_sinusoid_close(actual: torch.Tensor, expected: torch.Tensor, t: torch.Tensor,
                          atol: float) -> None:
    """[cos, sin] of float32 arguments a = t * f_i, compared with a bound derived from |a|.

    Neither side can be recomputed in float64 (the reference is the release's float32 output), and
    a float32 argument near 850 rad is only known to ~6e-5 (its rounding step), which is more than
    the kit's atol: how close two float32 implementations land depends on the CPU's vectorised
    exp/sin/cos, not on correctness. Per side, the argument carries rounding from t*1000 (1/2 ulp),
    the product (1/2 ulp), exp (<= 1 ulp) and the constant ln(10000) inside exp (|ln f_i| / 2 ulp
    relative to f_i); sin/cos then add 1/2 ulp of a value <= 1. cos/sin have slope <= 1, so two
    implementations may differ by twice that sum. The kit's atol stays the floor.
    """
    half = actual.shape[-1] // 2
    ln_f = -math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half   # (half,)
    a = t.double()[:, None].abs() * ln_f.exp()[None]                            # (B, half)
    eps = 2.0 ** -24                                                              # float32 half ulp
    per_side = a * (4 + ln_f.abs()) * eps + eps
    bound = (atol + 2 * per_side).repeat(1, 2)                                    # (B, 2*half)
    err = (actual.double() - expected.double()).abs()
    worst = (err - bound).max().item()
    assert worst <= 0, (f"adaln_time_proj: max abs err {err.max().item():.3g}, exceeds the "
                        f"argument-derived bound by {worst:.3g}")
    # The bound must stay meaningful: a wrong frequency or phase moves values by O(1).
    assert bound.max().item() < 1e-3


def _rope_grid(spec) -> tuple[int, int, int]:
    f, h, w = re.search(r"rope_positions=\[(\d+),\s*(\d+),\s*(\d+)\]", spec["rope3d"]["call"]).groups()
    return int(f), int(h), int(w)


def test_rope3d_matches_official(spec):
    io = load_tensors(spec["rope3d"]["file"])
    rope = rope_tables(*_rope_grid(spec), io["x"].shape[-1])
    assert_close(apply_rope(io["x"], rope), io["output"], spec["tolerance"], "rope3d")


def test_rope_is_position_sensitive(spec):
    """Feeding the tokens of one frame another frame's positions must change the result."""
    io = load_tensors(spec["rope3d"]["file"])
    f, h, w = _rope_grid(spec)
    cos, sin = rope_tables(f, h, w, io["x"].shape[-1])
    shifted = apply_rope(io["x"], Rope(cos.roll(h * w, 0), sin.roll(h * w, 0)))
    assert (shifted - io["output"]).abs().max() > 1e-2


def test_rope_of_bf16_is_computed_in_float32():
    """A bf16 x is promoted inside the kernels (no float32 copy of it): the result is exactly
    float32 RoPE rounded once to bf16."""
    x = torch.randn(2, 60, 4, 128, generator=torch.Generator().manual_seed(0)).bfloat16()
    rope = rope_tables(3, 4, 5)
    got = apply_rope(x, rope)
    assert got.dtype == torch.bfloat16 and torch.equal(got, apply_rope(x.float(), rope).bfloat16())


def test_census_sees_layout_copies():
    x = torch.randn(4, 6)
    with torch.inference_mode(), OpCensus() as census:
        x.reshape(-1), x.t().reshape(-1), x.t().contiguous(), torch.cat([x, x])
    assert census.copies == 3 and census.copy_bytes == 4 * (24 + 24 + 48)


def test_block_forward_makes_no_copies():
    """A block (batch 2, text mask, uneven grid) runs without a copy op: no rotate-half cat in
    RoPE, no .contiguous() around attention (it had 8 RoPE cats per block)."""
    cfg = PRESETS["tiny"]
    model = random_model(cfg, torch.device("cpu"), torch.float32, seed=0)
    g = torch.Generator().manual_seed(0)
    d = cfg.inner_dim
    x, context = torch.randn(2, 60, d, generator=g), torch.randn(2, 9, d, generator=g)
    t_mod = 0.02 * torch.randn(2, 6 * d, generator=g)
    rope, kv_lens = rope_tables(3, 4, 5), torch.tensor([9, 6])
    with torch.inference_mode(), OpCensus() as census:
        out = model.transformer_blocks[0](x, context, t_mod, rope, kv_lens, model.plan, 60)
    assert out.shape == x.shape and out.isfinite().all()
    assert census.ops.get("scaled_dot_product_attention", 0) + census.ops.get(
        "_scaled_dot_product_flash_attention_for_cpu", 0) == 2  # the census saw the forward
    assert census.copies == 0, census.copy_sites


@pytest.mark.parametrize("batch_chunk", [0, 1])
def test_inplace_block_is_the_out_of_place_block(batch_chunk):
    """``inplace=True`` writes the block's result into its input (the tokens the model's blocks
    pass along) with the same values, bit for bit, as the default, which leaves its input as it
    was; also one sample at a time (``--cfg_sequential``)."""
    cfg = PRESETS["tiny"]
    model = random_model(cfg, torch.device("cpu"), torch.float32, seed=0)
    block = model.transformer_blocks[0]
    block.batch_chunk = batch_chunk
    g = torch.Generator().manual_seed(1)
    d = cfg.inner_dim
    x, context = torch.randn(2, 60, d, generator=g), torch.randn(2, 9, d, generator=g)
    t_mod = 0.02 * torch.randn(2, 6 * d, generator=g)
    args = (context, t_mod, rope_tables(3, 4, 5), torch.tensor([9, 6]), model.plan, 60)
    with torch.inference_mode():
        before = x.clone()
        out = block(x, *args)
        assert torch.equal(x, before) and not torch.equal(out, x)
        result = block(x, *args, inplace=True)
    assert result is x and torch.equal(x, out)


def test_full_size_keys_match_manifest():
    manifest = load_json("manifest_dit_full.json")
    with torch.device("meta"):
        m = StepVideoModel(**manifest["config"])
    ours = {k: list(v.shape) for k, v in m.state_dict().items()}
    theirs = {k["name"]: k["shape"] for k in manifest["keys"]}
    assert ours == theirs
    assert sum(v.numel() for v in m.state_dict().values()) == manifest["num_params"]
    assert len(ours) == manifest["num_keys"]
    assert m.config == PRESETS["base"] == DiTConfig()   # the defaults are the released model


# --- loading from the official layout -------------------------------------------------------

@pytest.fixture
def ckpt(tmp_path, model):
    d = tmp_path / "transformer"
    model.save_pretrained(str(d), num_shards=3, dtype=torch.bfloat16)
    return d


def test_from_pretrained_roundtrip(ckpt, model, io, spec):
    assert len(list(ckpt.glob("diffusion_pytorch_model-*-of-00003.safetensors"))) == 3
    loaded = StepVideoModel.from_pretrained(str(ckpt.parent))  # the model root works too
    with torch.no_grad():
        assert_close(_call(loaded, io), io["output"], spec["tolerance"], "reloaded")
    bf16 = StepVideoModel.from_pretrained(str(ckpt), dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16


def _rewrite_first_shard(ckpt, edit):
    index = json.loads((ckpt / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    tensors = load_tensors_file(ckpt / shard)
    edit(tensors)
    save_file(tensors, str(ckpt / shard))


def load_tensors_file(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def test_missing_tensor_is_named(ckpt):
    _rewrite_first_shard(ckpt, lambda t: t.pop("pos_embed.proj.bias"))
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): pos_embed.proj.bias"):
        StepVideoModel.from_pretrained(str(ckpt))


def test_extra_tensor_is_named(ckpt):
    _rewrite_first_shard(ckpt, lambda t: t.__setitem__("bogus.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): bogus.weight"):
        StepVideoModel.from_pretrained(str(ckpt))


def test_wrong_shape_is_named(ckpt):
    _rewrite_first_shard(ckpt, lambda t: t.__setitem__("pos_embed.proj.bias", torch.zeros(7)))
    with pytest.raises(CheckpointError, match=r"pos_embed.proj.bias: checkpoint \(7,\) vs model"):
        StepVideoModel.from_pretrained(str(ckpt))


def test_truncated_shard_is_reported(ckpt):
    shard = sorted(ckpt.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"cannot read .*{shard.name}.*truncated or corrupt"):
        StepVideoModel.from_pretrained(str(ckpt))


def test_missing_shard_and_directory(ckpt, tmp_path):
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"incomplete: 1 file\(s\) missing: \S*{shard.name}\. "
                                              r"Fix: `python -m stepvideo.download"):
        StepVideoModel.from_pretrained(str(ckpt))
    with pytest.raises(CheckpointError, match="does not exist"):
        StepVideoModel.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"2 file\(s\) missing: \S*empty/config.json, "
                                              r"\S*empty/diffusion_pytorch_model.safetensors.index.json"):
        StepVideoModel.from_pretrained(str(tmp_path / "empty"))


def test_bad_configs_are_explained(spec):
    with pytest.raises(ValueError, match="attention_head_dim must be 128"):
        DiTConfig(num_attention_heads=3, attention_head_dim=100)
    with pytest.raises(TypeError, match=r"unknown DiT config key\(s\) \['hidden'\]"):
        StepVideoModel(**spec["config"], hidden=3)
    # the official config keys that change nothing are accepted
    DiTConfig.from_dict({**spec["config"], "norm_type": "ada_norm_single", "dropout": 0.0,
                         "_class_name": "StepVideoModel", "_diffusers_version": "0.31.0"})


AFFINE_KEYS = ["caption_norm.bias", "caption_norm.weight", "norm_out.bias", "norm_out.weight"]


@torch.no_grad()
def test_norm_elementwise_affine_is_honoured(tmp_path, spec, io):
    """As in the release, the flag gives caption_norm and norm_out a weight and bias; a checkpoint
    with them loads, and they act: a caption_norm bias b is the same as adding W1 b to
    caption_projection.linear_1's bias (exact algebra, so the kit's fp32 tolerance applies)."""
    kit = load_tensors(spec["weights"]["file"], torch.float32)
    cfg = {**spec["config"], "norm_elementwise_affine": True}
    with torch.device("meta"):
        m = StepVideoModel(**cfg)
    assert sorted(set(m.state_dict()) - set(kit)) == AFFINE_KEYS
    with pytest.raises(CheckpointError, match=r"4 missing key\(s\): caption_norm.bias"):
        load_state_dict_strict(m, kit)
    gen = torch.Generator().manual_seed(0)
    beta = 0.1 * torch.randn(spec["config"]["caption_channels"][0], generator=gen)
    affine = {**kit, "caption_norm.weight": torch.ones_like(beta), "caption_norm.bias": beta,
              "norm_out.weight": torch.ones(m.norm_out.normalized_shape),
              "norm_out.bias": torch.zeros(m.norm_out.normalized_shape)}
    load_state_dict_strict(m, affine)
    StepVideoModel.from_config(m.config).load_state_dict(affine)
    m.eval().save_pretrained(str(tmp_path / "t"))
    loaded = StepVideoModel.from_pretrained(str(tmp_path / "t"))
    assert loaded.config.norm_elementwise_affine and torch.equal(loaded.caption_norm.bias, beta)

    folded = dict(kit)
    folded["caption_projection.linear_1.bias"] = (kit["caption_projection.linear_1.bias"]
                                                  + kit["caption_projection.linear_1.weight"] @ beta)
    with torch.device("meta"):
        plain = StepVideoModel(**spec["config"])
    load_state_dict_strict(plain, folded)
    assert_close(_call(loaded, io), _call(plain.eval(), io), spec["tolerance"], "affine caption_norm")
    loaded.norm_out.weight.mul_(2)
    assert not torch.allclose(_call(loaded, io), _call(plain, io), atol=1e-2)


def test_config_not_matching_weights(tmp_path, model, spec):
    d = tmp_path / "t"
    model.save_pretrained(str(d))
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_attention_heads"] += 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        StepVideoModel.from_pretrained(str(d))


def test_bad_input_shapes(model, io):
    x = io["hidden_states"]
    c = model.config.in_channels
    with pytest.raises(ValueError, match=rf"hidden_states must be \(B, F, {c}, H, W\)"):
        model(x[:, :, : c - 1], io["timestep"], io["encoder_hidden_states"], io["encoder_hidden_states_2"])
    llm_mask_only = io["encoder_attention_mask"][:, io["encoder_hidden_states_2"].shape[1]:]
    with pytest.raises(ValueError, match=r"encoder_attention_mask must be \(B, Lc \+ Ly\)"):
        model(x, io["timestep"], io["encoder_hidden_states"], io["encoder_hidden_states_2"], llm_mask_only)
    with pytest.raises(ValueError, match="timestep must hold 1 or"):
        model(x, io["timestep"].repeat(3), io["encoder_hidden_states"], io["encoder_hidden_states_2"])
    with pytest.raises(ValueError, match="encoder_hidden_states must be"):
        model(x, io["timestep"], io["encoder_hidden_states"][..., :5], io["encoder_hidden_states_2"])


def test_import_has_no_side_effects():
    """Importing any stepvideo module parses no command line (a bogus flag is ignored) and does
    not touch CUDA. (api/call_remote_server.py is a script, not a module: not imported here.)"""
    code = ("import pkgutil, importlib, stepvideo, torch\n"
            "names = [m.name for m in pkgutil.walk_packages(stepvideo.__path__, 'stepvideo.')]\n"
            "for name in names:\n"
            "    importlib.import_module(name)\n"
            "assert not torch.cuda.is_initialized()\n"
            "print(' '.join(names))")
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    out = subprocess.run([sys.executable, "-c", code, "--bogus-flag"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    imported = set(out.stdout.split())
    assert {"stepvideo.runner", "stepvideo.service.server", "stepvideo.parallel.xfuser_backend",
            "stepvideo.text_encoder.stepllm", "stepvideo.vae.vae", "stepvideo.suite_runner"} <= imported


@torch.no_grad()
def test_compiled_blocks_match_official(spec, io):
    """``--compile`` (torch.compile per block) gives the kit's numbers too."""
    with torch.device("meta"):
        m = StepVideoModel(**spec["config"])
    load_state_dict_strict(m, load_tensors(spec["weights"]["file"], torch.float32))
    m.eval().compile_blocks()
    assert_close(_call(m, io), io["output"], spec["tolerance"], "compiled DiT")


def test_inference_gelu_in_place_is_the_same_kernel():
    """Under no_grad the feed-forward's GELU runs in place (its (B, S, 4D) input and output never
    both alive); the values are those of the out-of-place GELU autograd uses, bit for bit."""
    from stepvideo.modules.model import FeedForward

    torch.manual_seed(0)
    ff = FeedForward(32)
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        fast = ff(x)
    reference = ff(x).detach()  # grad enabled: out-of-place
    assert torch.equal(fast, reference)
