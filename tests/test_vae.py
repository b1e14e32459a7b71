"""Video-VAE v2 against the conformance kit (vae_small*, manifest_vae_full.json).

Every config, shape, seed and tolerance comes from the kit's JSON, so another kit with the same
file names but different sizes is tested the same way.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from stepvideo.conformance import assert_close, load_json, load_tensors
from stepvideo.vae.vae import (CHECKPOINT_RENAMES, AutoencoderKL, VAEConfig, blend_seam,
                               decoded_frames, state_dict_for_checkpoint)
from stepvideo.weights import CheckpointError, load_state_dict_strict, rename_keys


# ---- kit fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kit() -> dict:
    return load_json("vae_small.json")


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_tensors("vae_small_io.safetensors", torch.float32)


@pytest.fixture(scope="module")
def tol(kit) -> dict:
    return kit["tolerance"]


def small_config(kit: dict) -> VAEConfig:
    widths = kit["inner_widths"]
    return VAEConfig(**kit["constructor_args"],
                     encoder_ch=widths["VideoEncoder"]["ch"],
                     encoder_ch_mult=widths["VideoEncoder"]["ch_mult"],
                     decoder_ch=widths["VideoDecoder"]["ch"],
                     decoder_ch_mult=widths["VideoDecoder"]["ch_mult"])


@pytest.fixture(scope="module")
def model(kit) -> AutoencoderKL:
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(small_config(kit))
    weights = load_tensors(kit["weights"]["file"], torch.float32)   # bf16 values, exact in fp32
    load_state_dict_strict(vae, weights, what="vae_small weights")
    return vae.eval()


def check(actual, expected, tol, what):
    err = assert_close(actual, expected, tol, what)
    print(f"{what}: max abs err {err:.3g} (atol {tol['atol']}, rtol {tol['rtol']})")


# ---- conformance -------------------------------------------------------------------------------

def test_small_model_matches_kit_weights(kit, model):
    assert sum(p.numel() for p in model.parameters()) == kit["weights"]["num_params"]


def test_decode1_and_intermediates(model, io, tol):
    captured = {}
    hooks = [
        model.decoder.mid.register_forward_pre_hook(
            lambda m, args: captured.__setitem__("after_unpatchify", args[0].clone())),
        model.decoder.mid.register_forward_hook(
            lambda m, args, out: captured.__setitem__("mid_out", out.clone())),
    ]
    try:
        video = model.decode(io["decode1_latent"])
    finally:
        for h in hooks:
            h.remove()
    check(captured["after_unpatchify"], io["decode1_dec_after_unpatchify"], tol,
          "decode1 after unpatchify")
    check(captured["mid_out"], io["decode1_dec_mid_out"], tol, "decode1 mid out")
    assert video.shape == io["decode1_video"].shape
    check(video, io["decode1_video"], tol, "decode1 video")


@pytest.fixture(scope="module")
def decode2(model, io):
    return model.decode(io["decode2_latent"])


def test_decode2_with_seam(model, io, tol, decode2):
    assert decode2.shape == io["decode2_video"].shape
    check(decode2, io["decode2_video"], tol, "decode2 video")

    # Frames around the seam before blending: decode the chunks independently.
    (name,) = [k for k in io if k.startswith("decode2_video_premix_frames")]
    first, last = map(int, re.search(r"frames(\d+)to(\d+)", name).groups())
    chunks = [model.decode_chunk(c) for c in io["decode2_latent"].split(model.latent_len, dim=1)]
    premix = torch.cat(chunks, dim=1)[:, first:last + 1]
    check(premix, io[name], tol, "decode2 premix frames")

    # Only the two frames at the seam change, as blend_seam says.
    seam = model.frame_len - 1 - first               # index of chunk 0's last frame in `premix`
    a, b = blend_seam(premix[:, seam], premix[:, seam + 1])
    check(torch.stack([a, b], 1), io["decode2_video"][:, first + seam:first + seam + 2], tol,
          "decode2 seam blend")
    untouched = [i for i in range(premix.shape[1]) if i not in (seam, seam + 1)]
    check(premix[:, untouched], io["decode2_video"][:, [first + i for i in untouched]], tol,
          "decode2 frames off the seam")


def test_encode(kit, model, io, tol):
    seed = int(re.search(r"manual_seed\((\d+)\)", kit["cases"]["encode"]["call"]).group(1))
    captured = {}
    hook = model.encoder.mid.register_forward_hook(
        lambda m, args, out: captured.__setitem__("mid_out", out.clone()))
    try:
        moments = model.encode_moments(io["decode1_video"])
    finally:
        hook.remove()
    check(captured["mid_out"], io["encode_enc_mid_out"], tol, "encode mid out")
    check(moments, io["encode_moments"], tol, "encode moments")
    mean, logvar = model.split_moments(moments)
    check(mean, io["encode_mean"], tol, "encode mean")
    check(logvar, io["encode_logvar"], tol, "encode logvar")

    # The stored noise is one randn of the latent shape from the seeded global RNG.
    torch.manual_seed(seed)
    assert torch.equal(torch.randn(io["encode_noise"].shape), io["encode_noise"])
    torch.manual_seed(seed)
    sample = model.encode(io["decode1_video"])
    check(sample, io["encode_sample"], tol, "encode sample (global RNG)")
    generator = torch.Generator().manual_seed(seed)
    assert torch.equal(model.encode(io["decode1_video"], generator=generator), sample)


def test_iter_decode_equals_decode(model, io, decode2):
    latent = io["decode2_latent"]
    pieces = list(model.iter_decode(latent))
    n = latent.shape[1] // model.latent_len
    assert len(pieces) == n
    assert torch.equal(torch.cat(pieces, dim=1), decode2)
    calls = []
    again = model.decode(latent, callback=lambda i, frames: calls.append((i, frames.shape[1])))
    assert torch.equal(again, decode2)
    assert [i for i, _ in calls] == list(range(n))
    assert sum(f for _, f in calls) == n * model.frame_len


# ---- every latent length the release decodes -------------------------------------------------

# The release's rule (stepfun-ai/Step-Video-T2V@675e08c, stepvideo/vae/vae.py, AutoencoderKL.decode
# and mix): ``chunks = z.split(3, dim=1)``, so the last chunk may hold 1 or 2 latent frames; every
# chunk goes through the same causal decoder (t latent frames -> 2t-1 after the unpatchify shuffle,
# which drops 1 frame in front -> x2 -> x2 -> drop 3 in front: 8t-7 frames), the outputs are
# concatenated and ``mix`` blends frames (17k-1, 17k) for every k with 17k < F. The pipeline asks
# for max(num_frames // 17 * 3, 1) latent frames, so --num_frames < 17 gives 1 latent frame -> 1
# frame. Because every layer of the decoder is causal in time (zero frames padded in front,
# per-frame GroupNorm, attention causal over (t, h, w)), a short chunk decodes to the first frames
# of the full chunk it is a prefix of: the kit's goldens pin the short chunks too.
RELEASE_FRAMES = {1: 1, 2: 9, 3: 17, 4: 18, 5: 26, 6: 34, 7: 35, 36: 204}


def test_decoded_frame_counts_follow_the_release():
    assert {t: decoded_frames(t) for t in RELEASE_FRAMES} == RELEASE_FRAMES
    with pytest.raises(ValueError, match="latent frame count must be >= 1"):
        decoded_frames(0)


@pytest.mark.parametrize("case,latent_frames", [("decode1", 1), ("decode2", 4)])
def test_short_last_chunk_matches_the_kit(model, io, tol, case, latent_frames):
    """1 latent frame -> the first frame of the kit's decode; 4 -> 18 frames = the kit's 2-chunk
    decode up to the first frame of chunk 1, seam blend included."""
    video = model.decode(io[f"{case}_latent"][:, :latent_frames])
    frames = RELEASE_FRAMES[latent_frames]
    assert video.shape[1] == frames
    check(video, io[f"{case}_video"][:, :frames], tol, f"{case} first {latent_frames} latent frames")


# ---- spatial tiles -----------------------------------------------------------------------------

# Tiled vs untiled on the kit's random-weight VAE (one latent frame of 4 x 6, tile 4 with the
# default overlap 1 -> 2 tiles overlapping by 2 latent pixels = 32 px): measured float max 1.27 /
# mean 0.13 on values up to |4.8|, uint8 max 156 / mean 13 (see the README for more tile sizes).
# Random weights make the causal mid-block attention (which a tile restricts to its own tokens)
# and every conv at a tile border count fully, so this bound is a regression guard for the blend,
# not a statement about the released weights.
TILE_BOUND = {"max": 2.0, "mean": 0.25}


@pytest.fixture(scope="module")
def image_latent():
    return torch.randn(1, 1, 4, 4, 6, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def image_ref(model, image_latent):
    return model.decode(image_latent)


def test_tile_covering_the_latent_is_exact(model, image_latent, image_ref):
    assert torch.equal(model.decode(image_latent, tile_size=6), image_ref)


def test_tiled_decode_within_bound(model, image_latent, image_ref):
    from stepvideo.video_io import uint8_per_sample

    tiled = model.decode(image_latent, tile_size=4)
    err = (tiled - image_ref).abs()
    u8 = (uint8_per_sample(tiled).int() - uint8_per_sample(image_ref).int()).abs()
    print(f"tile 4 on 4x6: float max {err.max():.3g} mean {err.mean():.3g}; uint8 max {u8.max()} "
          f"mean {u8.float().mean():.3g}")
    assert err.max() <= TILE_BOUND["max"] and err.mean() <= TILE_BOUND["mean"]
    # Away from the overlap (columns 0-31 px and 64-95 px) each pixel comes from one tile only.
    solo = model.decode(image_latent[..., :4], tile_size=4)
    assert torch.equal(tiled[..., :32], solo[..., :32])


def test_tile_layout_and_blend_weights():
    """Windows spread evenly with at least the overlap; the linear ramps of neighbours sum to 1."""
    from stepvideo.vae.vae import tile_ramp, tile_starts

    assert tile_starts(6, 4, 1) == [0, 2] and tile_starts(5, 8, 2) == [0]
    assert tile_starts(62, 24, 6) == [0, 13, 25, 38] and tile_starts(34, 24, 6) == [0, 10]
    for length, tile, overlap in ((6, 4, 1), (62, 24, 6), (15, 8, 2), (9, 4, 0)):
        starts = tile_starts(length, tile, overlap)
        total = torch.zeros(length * 16)
        for i, s in enumerate(starts):
            total[s * 16:(s + tile) * 16] += tile_ramp(starts, i, tile, length, 16)
        if all(b >= a + tile - (b - a) for a, b in zip(starts, starts[1:])) or len(starts) < 3:
            assert torch.allclose(total, torch.ones_like(total)), (length, tile, overlap)
        assert (total > 0).all()


def test_tiled_encode(model, io):
    """Encoding in 2 x 2 tiles of 48 px (overlap 32 px) against the kit's untiled moments:
    measured max 1.07, mean 0.196 (|moments| mean 0.45) on the random-weight VAE."""
    tiled = model.encode_moments(io["decode1_video"], tile_size=3, tile_overlap=1)
    err = (tiled - io["encode_moments"]).abs()
    print(f"encode tile 3/4: moments max {err.max():.3g} mean {err.mean():.3g} "
          f"(|moments| mean {io['encode_moments'].abs().mean():.3g})")
    assert tiled.shape == io["encode_moments"].shape
    assert err.max() <= 1.6 and err.mean() <= 0.3


# ---- full-size structure and checkpoint names --------------------------------------------------

def test_full_size_keys_shapes_and_checkpoint_names():
    manifest = load_json("manifest_vae_full.json")
    with torch.device("meta"):
        vae = AutoencoderKL(**manifest["constructor_args"])
    assert vae.config == VAEConfig()                            # defaults = the released model
    state = vae.state_dict()
    expected = {k["name"]: tuple(k["shape"]) for k in manifest["keys"]}
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert len(state) == manifest["num_keys"]
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(vae) == manifest["num_params"]
    assert count(vae.encoder) == manifest["num_params_encoder"]
    assert count(vae.decoder) == manifest["num_params_decoder"]

    to_ckpt = {k["name"]: k["checkpoint_name"] for k in manifest["keys"]}
    ckpt = state_dict_for_checkpoint(vae)
    assert sorted(ckpt) == sorted(to_ckpt.values())
    assert {to_ckpt[k]: tuple(v.shape) for k, v in state.items()} == \
        {k: tuple(v.shape) for k, v in ckpt.items()}
    assert set(rename_keys(ckpt, CHECKPOINT_RENAMES)) == set(expected)


def test_rename_table():
    t = torch.zeros(1)
    renamed = rename_keys({"decoder.conv_out.weight": t, "decoder.conv_out.conv.bias": t,
                           "encoder.conv_out.conv.weight": t}, CHECKPOINT_RENAMES)
    assert set(renamed) == {"decoder.conv_out.conv.weight", "decoder.conv_out.conv.bias",
                            "encoder.conv_out.conv.weight"}


# ---- loading -----------------------------------------------------------------------------------

def write_checkpoint(directory, state, config: VAEConfig | None):
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()},
              str(directory / "vae_v2.safetensors"))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config.to_dict()))
    return directory


def test_from_pretrained_roundtrip(kit, model, tmp_path):
    ckpt = state_dict_for_checkpoint(model)
    assert "decoder.conv_out.weight" in ckpt and "decoder.conv_out.conv.weight" not in ckpt
    vae_dir = write_checkpoint(tmp_path / "model" / "vae", ckpt, small_config(kit))
    for where in (tmp_path / "model", vae_dir, vae_dir / "vae_v2.safetensors"):
        loaded = AutoencoderKL.from_pretrained(where)
        assert loaded.config == small_config(kit)
        assert loaded.dtype == torch.float32 and not loaded.training
        mine, theirs = model.state_dict(), loaded.state_dict()
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    # An explicit config wins over config.json; without either the defaults apply (and fail here).
    assert AutoencoderKL.from_pretrained(vae_dir, config=small_config(kit).to_dict()).config == \
        small_config(kit)
    (vae_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match="shape mismatch"):
        AutoencoderKL.from_pretrained(vae_dir)


def test_strict_load_negatives(kit, model, tmp_path):
    cfg = small_config(kit)
    ckpt = state_dict_for_checkpoint(model)

    missing = dict(ckpt)
    del missing["decoder.mid.attn_1.q.conv.weight"]
    with pytest.raises(CheckpointError, match=r"missing key.*decoder\.mid\.attn_1\.q\.conv\."):
        AutoencoderKL.from_pretrained(write_checkpoint(tmp_path / "a", missing, cfg))

    wrong = dict(ckpt)
    wrong["decoder.conv_out.weight"] = torch.zeros(5, 5)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*decoder\.conv_out\.conv\.weight"):
        AutoencoderKL.from_pretrained(write_checkpoint(tmp_path / "b", wrong, cfg))

    extra = dict(ckpt, **{"decoder.temb_proj.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"unexpected key.*decoder\.temb_proj\.weight"):
        AutoencoderKL.from_pretrained(write_checkpoint(tmp_path / "c", extra, cfg))

    with pytest.raises(CheckpointError, match="does not exist"):
        AutoencoderKL.from_pretrained(tmp_path / "no_such_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"1 file\(s\) missing: \S*empty/vae_v2.safetensors"):
        AutoencoderKL.from_pretrained(tmp_path / "empty")


# ---- config and input validation ---------------------------------------------------------------

def test_config(tmp_path):
    with pytest.raises(ValueError, match="v1 VAE .* out of scope"):
        AutoencoderKL(version=1)
    with pytest.raises(ValueError, match="multiples of 32"):
        VAEConfig(decoder_ch=48)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(VAEConfig.tiny().to_dict()))
    assert VAEConfig.from_json(path) == VAEConfig.tiny()
    with pytest.raises(ValueError, match="unknown VAE config key"):
        VAEConfig.from_dict({"z_channel": 4})
    vae = AutoencoderKL.from_config(VAEConfig.tiny())
    assert all(m.per_frame for m in vae.modules() if isinstance(m, torch.nn.GroupNorm))


def test_bad_inputs(model):
    zc = model.config.z_channels
    c = model.config.in_channels
    with pytest.raises(ValueError, match=r"empty: frames, h and w must be >= 1"):
        model.decode(torch.zeros(1, 0, zc, 2, 2))
    with pytest.raises(ValueError, match=r"tile_size must be >= 2"):
        model.decode(torch.zeros(1, 1, zc, 2, 2), tile_size=1)
    with pytest.raises(ValueError, match=r"tile_overlap must be in \[0, tile_size=4\), got 4"):
        model.decode(torch.zeros(1, 1, zc, 2, 2), tile_size=4, tile_overlap=4)
    with pytest.raises(ValueError, match=rf"{zc + 1} channels .*z_channels={zc}"):
        model.decode(torch.zeros(1, 3, zc + 1, 2, 2))
    with pytest.raises(ValueError, match="5 dims"):
        model.decode(torch.zeros(3, zc, 2, 2))
    with pytest.raises(ValueError, match=r"empty"):
        next(model.iter_decode(torch.zeros(1, 3, zc, 0, 2)))
    with pytest.raises(ValueError, match=r"frame count 16 .*multiple of 17"):
        model.encode(torch.zeros(1, 16, c, 16, 16))
    with pytest.raises(ValueError, match=rf"{c + 1} channels .*in_channels={c}"):
        model.encode(torch.zeros(1, 17, c + 1, 16, 16))
    with pytest.raises(ValueError, match=r"multiples of 16; got H=24, W=16"):
        model.encode(torch.zeros(1, 17, c, 24, 16))


# ---- memory ------------------------------------------------------------------------------------

def peak_cpu_bytes(fn) -> int:
    """Peak of live CPU tensor bytes allocated while ``fn`` runs.

    torch's CPU allocations are invisible to tracemalloc, and RSS is dominated by the process
    baseline and by allocator caching. The profiler's memory events record every allocation and
    free of the CPU allocator with its size, so their running sum is the exact live-byte curve.
    """
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if results is None:  # private API: torch may rename it
        pytest.skip(f"torch {torch.__version__} has no profiler.kineto_results (private API this "
                    "test reads the allocator's memory events from)")
    events = [e for e in results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    assert events, "the profiler recorded no memory events"
    return peak


def test_decode_memory_does_not_grow_with_length(model, io):
    latent1 = io["decode2_latent"][:, :model.latent_len]               # one chunk (smallest case)
    latent4 = latent1.repeat(1, 4, 1, 1, 1)

    def stream(z):
        def run():
            for frames in model.iter_decode(z):
                del frames                                         # the consumer keeps nothing
        return run

    one = peak_cpu_bytes(stream(latent1))
    four = peak_cpu_bytes(stream(latent4))
    # Decoding chunks together would need ~4x; streaming holds one chunk plus one frame.
    print(f"peak live bytes: 1 chunk {one / 2**20:.2f} MiB, 4 chunks {four / 2**20:.2f} MiB")
    assert four <= 1.1 * one
    # decode() additionally holds only its (unavoidable) output.
    video = io["decode2_video"]
    out_bytes = video[:, 0].numel() * 4 * model.frame_len * video.element_size()
    assert peak_cpu_bytes(lambda: model.decode(latent4)) <= 1.1 * one + out_bytes


def test_decoder_width_must_hold_the_latent():
    from stepvideo.vae.vae import VAEConfig

    with pytest.raises(ValueError, match=r"top width .* = 32 must be >= 4 x z_channels = 64"):
        VAEConfig(z_channels=16, decoder_ch=32, decoder_ch_mult=(1, 1, 2, 1))


def test_tiled_decode_memory_is_flat_in_the_latent_size(model):
    """A latent 4x the tile's area decodes tile by tile: peak live bytes are those of one tile plus
    the float32 output and the weight map, not those of the whole latent."""
    g = torch.Generator().manual_seed(0)
    small = torch.randn(1, 1, 4, 4, 4, generator=g)
    large = torch.randn(1, 1, 4, 8, 8, generator=g)
    peak_small = peak_cpu_bytes(lambda: model.decode(small, tile_size=4, tile_overlap=0))
    peak_large = peak_cpu_bytes(lambda: model.decode(large, tile_size=4, tile_overlap=0))
    px = large.shape[-2] * large.shape[-1] * 16 * 16
    out = px * (3 * 4 * 3 + 4)       # float32 accumulator, result and decode() output; weights
    print(f"peak: tile 4 on 4x4 {peak_small / 2**20:.2f} MiB, on 8x8 {peak_large / 2**20:.2f} MiB")
    assert peak_large <= 1.1 * peak_small + out
