"""stepvideo.video_io: the kit's post-processing vectors and real H.264 files read back."""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from stepvideo.conformance import load_json, load_tensors
from stepvideo.video_io import (SHEET_BACKGROUND, SHEET_GAP, SHEET_LABEL, contact_sheet, crop_540p,
                                read_frames, read_video_info, save_video, to_uint8_frames)


@pytest.fixture(scope="module")
def spec():
    return load_json("postprocess.json")


@pytest.fixture(scope="module")
def vectors():
    return load_tensors("postprocess.safetensors")


def _case_a_geometry(spec) -> tuple[int, tuple[int, ...]]:
    """The kit's caseA recipe, "caseA_base (..) repeat_interleave(N) on H and W -> (shape)":
    the upsampling factor N and the input shape it makes."""
    recipe = spec["caseA"]["input"]
    factor = re.search(r"repeat_interleave\((\d+)\) on H and W", recipe)
    shape = re.search(r"-> \(([\d, ]+)\)", recipe)
    assert factor and shape, f"unexpected caseA recipe in postprocess.json: {recipe!r}"
    return int(factor.group(1)), tuple(int(n) for n in shape.group(1).split(","))


def _case_a_input(spec, vectors):
    """caseA_base upsampled by nearest neighbour on H and W (kit section 9)."""
    factor, shape = _case_a_geometry(spec)
    base = vectors["caseA_base"]
    video = base.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    assert tuple(video.shape) == shape
    return video


# --- kit vectors ----------------------------------------------------------------------------

def test_case_a_writer_array(spec, vectors):
    video = _case_a_input(spec, vectors)
    frames = crop_540p(to_uint8_frames(video))
    assert list(frames.shape) == spec["caseA"]["output_shape"]
    assert frames.dtype == np.uint8
    every8th = vectors["caseA_writer_array_every8th"].numpy()
    np.testing.assert_array_equal(frames[:, ::8, ::8], every8th)
    digest = hashlib.sha256(np.ascontiguousarray(frames).tobytes()).hexdigest()
    assert digest == spec["caseA"]["output_sha256"]


def test_case_b_batch_stacked_and_not_cropped(vectors):
    frames = crop_540p(to_uint8_frames(vectors["caseB_input"]))
    np.testing.assert_array_equal(frames, vectors["caseB_writer_array"].numpy())


def test_truncation_not_rounding():
    # -0.99 -> 1.275 -> 1 ; 0.999 -> 254.8725 -> 254 ; beyond [-1, 1] is clamped.
    video = torch.tensor([-2.0, -0.99, 0.0, 0.999, 3.0]).view(1, 1, 1, 1, 5).expand(1, 1, 3, 1, 5)
    assert to_uint8_frames(video)[0, 0, :, 0].tolist() == [0, 1, 127, 254, 255]


def test_crop_orientation():
    def shape(h, w):
        return crop_540p(np.zeros((1, h, w, 3), np.uint8)).shape[1:3]

    assert shape(544, 992) == (540, 960)  # landscape
    assert shape(992, 544) == (960, 540)  # portrait
    assert shape(1088, 992) == (960, 540)  # batch 2 at 544x992 stacked: portrait (quirk 32)
    assert shape(768, 768) == (768, 768)  # square kept
    # Smaller than the crop: kept whole (the release's raw slicing would keep 30 rows here).
    assert shape(480, 832) == (480, 832)


# --- real files -----------------------------------------------------------------------------

def _gradient_video(frames=6, height=64, width=96, batch=1):
    """(B, F, 3, H, W) in [-1, 1] that brightens over time."""
    ramp = torch.linspace(-1, 1, width).view(1, 1, 1, 1, width)
    time = torch.linspace(-0.5, 0.5, frames).view(1, frames, 1, 1, 1)
    return (ramp + time).clamp(-1, 1).expand(batch, frames, 3, height, width).contiguous()


def test_h264_written_and_read_back(tmp_path):
    path = save_video(_gradient_video(frames=6, batch=2), tmp_path / "sub" / "dir" / "v.mp4")
    assert os.path.isfile(path)
    info = read_video_info(path)
    assert info == {"frames": 6, "width": 96, "height": 128, "fps": 25.0, "codec": "h264"}
    assert [p.name for p in (tmp_path / "sub" / "dir").iterdir()] == ["v.mp4"]  # no temp left


def test_crop_on_and_off(tmp_path, spec, vectors):
    video = _case_a_input(spec, vectors).expand(1, 3, -1, -1, -1)
    height, width = video.shape[-2:]
    _, crop_h, crop_w, _ = spec["caseA"]["output_shape"]
    assert (crop_h, crop_w) != (height, width)  # the kit's case is one the crop changes
    cropped = read_video_info(save_video(video, tmp_path / "c.mp4"))
    full = read_video_info(save_video(video, tmp_path / "f.mp4", crop=False))
    assert (cropped["width"], cropped["height"]) == (crop_w, crop_h)
    assert (full["width"], full["height"]) == (width, height)


def test_denoise_on_and_off(tmp_path):
    # Grey frames with +-12 levels of brightness flicker: atadenoise averages it away over time.
    rng = np.random.default_rng(0)
    flicker = rng.integers(-12, 13, size=(16, 1, 1, 1))
    frames = (np.full((16, 64, 96, 3), 128) + flicker).astype(np.uint8)

    def decoded_flicker(denoise):
        out = read_frames(save_video(frames, tmp_path / f"d{denoise}.mp4", denoise=denoise))
        return np.abs(np.diff(out.astype(float).mean(axis=(1, 2, 3)))).mean()

    raw = np.abs(np.diff(frames.astype(float).mean(axis=(1, 2, 3)))).mean()
    assert decoded_flicker(False) == pytest.approx(raw, abs=1.0)
    assert decoded_flicker(True) < 0.7 * raw


def test_uint8_input_and_odd_size(tmp_path):
    # An already post-processed uint8 (F, H, W, 3) array, odd height and width: padded to even.
    frames = np.random.default_rng(1).integers(0, 256, size=(4, 33, 45, 3), dtype=np.uint8)
    info = read_video_info(save_video(frames, tmp_path / "odd.mp4", crop=False))
    assert (info["frames"], info["width"], info["height"]) == (4, 46, 34)


def test_overwrites_existing_file(tmp_path):
    target = tmp_path / "v.mp4"
    target.write_bytes(b"old")
    save_video(_gradient_video(frames=2), target)
    assert read_video_info(target)["frames"] == 2


def test_unwritable_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="cannot create output directory"):
        save_video(_gradient_video(frames=2), blocker / "v.mp4")


def test_read_only_directory_is_a_clear_error(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root ignores the mode bits: make the access check say what it would
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, m: False if os.fspath(p) == str(locked)
                            else real_access(p, m))
    with pytest.raises(PermissionError, match="not writable"):
        save_video(_gradient_video(frames=2), locked / "v.mp4")
    assert list(locked.iterdir()) == []


def test_contact_sheet(tmp_path):
    frames = to_uint8_frames(_gradient_video(frames=10, height=20, width=30))
    path = contact_sheet(frames, tmp_path / "sheet.png", n=8, cols=4)
    g, label = SHEET_GAP, SHEET_LABEL
    with Image.open(path) as sheet:
        assert sheet.format == "PNG"
        assert sheet.size == (4 * 30 + 5 * g, 2 * (20 + label + g) + g)
        pixels = np.asarray(sheet.convert("RGB"))
    np.testing.assert_array_equal(pixels[g:g + 20, g:g + 30], frames[0])      # tile 1 = frame 0
    x2 = g + 30 + g                                                           # tile 2 = frame 1
    np.testing.assert_array_equal(pixels[g:g + 20, x2:x2 + 30], frames[1])
    assert (pixels[:g] == SHEET_BACKGROUND).all()                             # visible gaps
    assert (pixels[g:g + 20, g + 30:x2] == SHEET_BACKGROUND).all()
    strips = [pixels[g + 20:g + 20 + label, x:x + 30] for x in (g, x2)]       # the index labels
    assert all((s.max(axis=-1) > 200).any() for s in strips)
    assert not np.array_equal(*strips)                                        # "frame 0" vs "frame 1"
    with Image.open(contact_sheet(frames[:3], tmp_path / "few.png", n=8, cols=4)) as few:
        assert few.size == (3 * 30 + 4 * g, 20 + label + 2 * g)  # fewer frames than n: one row


def test_streamed_writer_gives_the_same_file(tmp_path):
    """Pieces of uneven length (as the VAE yields them: 16, 17, ... frames) through VideoWriter give
    the byte-identical file of save_video on the whole video: same crop, padding and denoise
    filter, the same frame stream into ffmpeg. A batch of 2 is stacked along the height per piece."""
    from stepvideo.video_io import VideoWriter, sheet_indices, uint8_per_sample

    video = _gradient_video(frames=20, height=34, width=69, batch=2)   # odd width: padded
    whole = save_video(video, tmp_path / "whole.mp4")
    per_sample = uint8_per_sample(video)                               # (B, F, H, W, 3)
    keep = sheet_indices(20)
    with VideoWriter(tmp_path / "stream.mp4", keep=keep) as writer:
        for a, b in ((0, 7), (7, 8), (8, 20)):
            writer.write(per_sample[:, a:b])
    assert writer.frames == 20 and sorted(writer.kept) == keep
    data = [open(p, "rb").read() for p in (whole, writer.path)]
    assert hashlib.sha256(data[0]).digest() == hashlib.sha256(data[1]).digest()
    sheet_all = contact_sheet(per_sample, tmp_path / "all.png")
    sheet_kept = contact_sheet(np.stack([writer.kept[i] for i in keep]), tmp_path / "kept.png",
                               indices=keep)
    assert np.array_equal(np.asarray(Image.open(sheet_all)), np.asarray(Image.open(sheet_kept)))


def test_streamed_writer_failure_leaves_no_file(tmp_path):
    from stepvideo.video_io import VideoWriter

    frames = to_uint8_frames(_gradient_video(frames=3, height=16, width=16))
    with pytest.raises(ValueError, match="same size"):
        with VideoWriter(tmp_path / "v.mp4") as writer:
            writer.write(frames)
            writer.write(frames[:, :8])
    assert list(tmp_path.iterdir()) == []
