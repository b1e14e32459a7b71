"""Decoded video -> uint8 frames -> H.264 mp4 (and a PNG contact sheet).

The frame conversion, the 540p centre crop and the writer settings are the public release's
(``VideoProcessor.postprocess_video``; conformance kit section 9, quirks 31-33):

    x = (clamp(v, -1, 1) + 1) * 127.5; batch items stacked along the HEIGHT;
    clamp to [0, 255] and truncate to uint8;  (B, F, 3, H, W) -> (F, B*H, W, 3)
    centre crop: 540x960 if W//2 > H//2 (landscape), 960x540 if W//2 < H//2, square kept;
    imageio-ffmpeg, libx264, yuv420p, 25 fps, ``-vf atadenoise=0a=0.1:0b=0.1:1a=0.1:1b=0.1``.

Files are written atomically: into a temporary file in the target directory, then
``os.replace``d over the target, so a reader never sees a half-written video.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch

from .fileio import atomic_path

FPS = 25
CODEC = "libx264"
PIX_FMT = "yuv420p"
DENOISE_FILTER = "atadenoise=0a=0.1:0b=0.1:1a=0.1:1b=0.1"
CROP_LANDSCAPE = (540, 960)  # (height, width)


# --- frames ---------------------------------------------------------------------------------

def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(B, F, 3, H, W) float in ~[-1, 1] -> uint8 (F, B*H, W, 3), batch stacked along the height.

    Computed in float32 (the kit's dtype; bf16 input is upcast first). NaNs, which would hit an
    undefined float->uint8 cast, become 0.0 (mid grey) with a warning.
    """
    return stack_batch(uint8_per_sample(video))


def uint8_per_sample(video: torch.Tensor) -> torch.Tensor:
    """(B, F, 3, H, W) float -> uint8 (B, F, H, W, 3): the release's arithmetic, per sample.

    The VAE service sends this (a quarter of the float32 bytes); ``stack_batch`` finishes it.
    """
    video = torch.as_tensor(video)
    if video.dim() != 5 or video.shape[2] != 3:
        raise ValueError(f"video must be (B, F, 3, H, W), got {tuple(video.shape)}")
    x = video.detach().cpu().float()
    if torch.isnan(x).any():
        warnings.warn("video contains NaN values; writing them as mid grey", RuntimeWarning)
        x = torch.nan_to_num(x, nan=0.0)
    x = (x.clamp(-1, 1) + 1) * 127.5
    x = x.clamp(0, 255).to(torch.uint8)  # truncation toward zero, not rounding
    return x.permute(0, 1, 3, 4, 2).contiguous()


def stack_batch(frames) -> np.ndarray:
    """uint8 (B, F, H, W, 3) -> (F, B*H, W, 3): the batch stacked along the height."""
    frames = np.asarray(frames.cpu() if isinstance(frames, torch.Tensor) else frames)
    return np.concatenate(list(frames), axis=1)


def crop_540p(frames: np.ndarray) -> np.ndarray:
    """Centre-crop (F, H, W, 3) to 540x960 (landscape) or 960x540 (portrait); square is kept.

    Orientation compares W//2 with H//2, so a batch of 2 at 544x992 (stacked height 1088) counts
    as portrait. Bounds beyond the array are clipped, so videos smaller than the crop are kept
    whole. Deviation from the release: it slices with raw numpy bounds, where a negative start
    WRAPS AROUND (a 480x832 video would keep only its last 30 rows); here starts are clamped at 0.
    Both kit cases give identical results either way.
    """
    _, height, width, _ = frames.shape
    hc, wc = height // 2, width // 2
    if wc > hc:
        crop_h, crop_w = CROP_LANDSCAPE
    elif wc < hc:
        crop_w, crop_h = CROP_LANDSCAPE
    else:
        return frames
    rows = slice(max(hc - crop_h // 2, 0), hc + crop_h // 2)
    cols = slice(max(wc - crop_w // 2, 0), wc + crop_w // 2)
    return frames[:, rows, cols]


def as_frames(video, crop: bool = False) -> np.ndarray:
    """A float tensor (B,F,3,H,W), or post-processed uint8 (F,H,W,3) or (B,F,H,W,3) -> uint8 (F,H,W,3)."""
    if isinstance(video, (np.ndarray, torch.Tensor)) and video.dtype in (np.uint8, torch.uint8):
        frames = np.asarray(video.cpu() if isinstance(video, torch.Tensor) else video)
        if frames.ndim == 5:  # (B, F, H, W, 3) from the VAE service
            frames = stack_batch(frames)
    else:
        frames = to_uint8_frames(video)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be uint8 (F, H, W, 3) with F >= 1, got {frames.shape}")
    return crop_540p(frames) if crop else frames


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """yuv420p stores chroma at half resolution, so libx264 needs an even width and height.

    An odd size gets one replicated edge row/column. (imageio's own fix, ``macro_block_size``,
    rescales the picture with an extra ``-vf scale`` that would clash with the denoise ``-vf``,
    so the writer runs with ``macro_block_size=1`` and the padding is done here.)
    """
    _, height, width, _ = frames.shape
    pad = ((0, 0), (0, height % 2), (0, width % 2), (0, 0))
    return np.pad(frames, pad, mode="edge") if any(p[1] for p in pad) else frames


# --- writers --------------------------------------------------------------------------------

class VideoWriter:
    """An H.264 mp4 written piece by piece, so the whole video never has to be in memory.

    ``write(frames)`` takes uint8 (F, H, W, 3) or (B, F, H, W, 3) (batch stacked along the height)
    or float (B, F, 3, H, W); every piece is converted, cropped and padded exactly as
    ``save_video`` does it, and ffmpeg sees the same frame stream, so the file is byte-identical to
    writing the whole video at once. ``keep`` lists frame indices to retain (e.g. for a contact
    sheet): ``kept`` maps them to their frames as given (batch stacked, not cropped). The file appears atomically on ``close``;
    leaving the ``with`` block on an exception discards it.
    """

    def __init__(self, path: str, fps: int = FPS, denoise: bool = True, crop: bool = True,
                 keep=()):
        self.path, self.fps, self.denoise, self.crop = os.fspath(path), fps, denoise, crop
        self.keep, self.kept, self.frames = set(keep), {}, 0
        self._atomic = self._writer = None

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(discard=exc_type is not None)

    def _start(self, height: int, width: int) -> None:
        import imageio_ffmpeg

        self._atomic = atomic_path(self.path)
        tmp = self._atomic.__enter__()
        output_params = ["-vf", DENOISE_FILTER] if self.denoise else []
        self._writer = imageio_ffmpeg.write_frames(
            tmp, (width, height), fps=self.fps, codec=CODEC, pix_fmt_out=PIX_FMT,
            macro_block_size=1, ffmpeg_log_level="error", output_params=output_params)
        self._writer.send(None)  # start ffmpeg
        self.size = (height, width)

    def write(self, video) -> None:
        frames = as_frames(video)
        for i in self.keep.intersection(range(self.frames, self.frames + len(frames))):
            self.kept[i] = frames[i - self.frames].copy()
        frames = pad_to_even(crop_540p(frames) if self.crop else frames)
        if self._writer is None:
            self._start(*frames.shape[1:3])
        elif frames.shape[1:3] != self.size:
            raise ValueError(f"frames of {frames.shape[1:3]} after {self.size}: every piece of a "
                             "video must have the same size")
        for frame in frames:
            self._writer.send(np.ascontiguousarray(frame))
        self.frames += len(frames)

    def close(self, discard: bool = False) -> str:
        """Finish the file (or drop it with ``discard``) and return its path."""
        if self._writer is None:
            if not discard:
                raise ValueError(f"no frames were written to {self.path}")
            return self.path
        writer, self._writer = self._writer, None
        try:
            writer.close()
        finally:
            error = RuntimeError("discarded") if discard else None
            if error is None:
                self._atomic.__exit__(None, None, None)
            else:
                self._atomic.__exit__(type(error), error, None)
        return self.path


def save_video(video, path: str, fps: int = FPS, denoise: bool = True, crop: bool = True) -> str:
    """Write an H.264 mp4 and return ``path``.

    ``video``: a float tensor (B, F, 3, H, W) in ~[-1, 1] (converted and, with ``crop``,
    centre-cropped here) or an already post-processed uint8 array (F, H, W, 3), e.g. from the VAE
    service (cropped too when ``crop``; the crop of an already cropped video is a no-op). For
    pieces arriving one at a time use :class:`VideoWriter`.
    """
    with VideoWriter(path, fps, denoise, crop) as writer:
        writer.write(video)
    return writer.path


SHEET_GAP = 4             # pixels between and around tiles
SHEET_LABEL = 14          # pixel strip under each tile holding its frame index
SHEET_BACKGROUND = (24, 24, 24)


def sheet_indices(total: int, n: int = 8) -> list[int]:
    """The ``n`` evenly spaced frame indices (first and last included) a contact sheet shows."""
    if n < 1 or total < 1:
        raise ValueError(f"n and the frame count must be >= 1, got n={n}, total={total}")
    return [int(i) for i in np.linspace(0, total - 1, min(n, total)).round().astype(int)]


def contact_sheet(frames, path: str, n: int = 8, cols: int = 4, indices=None) -> str:
    """A PNG grid of ``n`` evenly spaced frames (first and last included), ``cols`` per row, each
    tile separated by a dark gap and labelled with its frame index underneath.

    With ``indices`` (``sheet_indices`` of the whole video), ``frames`` are only those frames,
    e.g. ``VideoWriter.kept`` of a streamed video."""
    from PIL import Image, ImageDraw, ImageFont

    frames = as_frames(frames)
    if n < 1 or cols < 1:
        raise ValueError(f"n and cols must be >= 1, got n={n}, cols={cols}")
    if indices is None:
        picks = sheet_indices(len(frames), n)
    else:
        picks = list(indices)
        if len(picks) != len(frames):
            raise ValueError(f"{len(picks)} indices for {len(frames)} frames")
    cols = min(cols, len(picks))
    rows = math.ceil(len(picks) / cols)
    height, width = frames.shape[1:3]
    g, label = SHEET_GAP, SHEET_LABEL
    sheet = Image.new("RGB", (cols * width + (cols + 1) * g, rows * (height + label + g) + g),
                      SHEET_BACKGROUND)
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for i, idx in enumerate(picks):
        x, y = g + (i % cols) * (width + g), g + (i // cols) * (height + label + g)
        sheet.paste(Image.fromarray(frames[i if indices is not None else idx]), (x, y))
        draw.text((x + 2, y + height + 2), f"frame {idx}", fill=(235, 235, 235), font=font)
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


def save_image(frame, path: str) -> str:
    """One uint8 frame (H, W, 3) as a PNG (the output of a one-frame, image-mode generation)."""
    from PIL import Image

    path = os.fspath(path)
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(frame)).save(tmp, format="PNG")
    return path


# --- reader ---------------------------------------------------------------------------------

def read_video_info(path: str) -> dict:
    """{frames, width, height, fps, codec} of a video file; frames are counted by decoding."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(os.fspath(path))
    try:
        meta = next(reader)
        count = sum(1 for _ in reader)
    finally:
        reader.close()
    width, height = meta["size"]
    return {"frames": count, "width": width, "height": height, "fps": meta["fps"],
            "codec": meta["codec"]}


def read_frames(path: str) -> np.ndarray:
    """All frames of a video file as uint8 (F, H, W, 3)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(os.fspath(path))
    try:
        width, height = next(reader)["size"]
        frames = [np.frombuffer(b, np.uint8).reshape(height, width, 3) for b in reader]
    finally:
        reader.close()
    return np.stack(frames)
