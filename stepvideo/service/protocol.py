"""Wire format of the caption/VAE service: one safetensors file per message, no pickle.

Every POST body, request and response, is one safetensors file (content type
``application/x-safetensors``)::

    u64 little-endian N | N bytes of JSON header | raw little-endian tensor bytes

The header is the standard safetensors header (``name -> {dtype, shape, data_offsets}``). Its
``__metadata__`` map (str -> str) carries the non-tensor part of the message::

    "protocol": "stepvideo-service/1"
    "kind":     "caption_request" | "caption_response" | "vae_request" | "vae_response"
    "fields":   a JSON object with the message's fields (prompts, options, sizes)

A body is read in two steps: the header is parsed with ``json`` and checked from the header alone
(protocol, kind, ``fields``, that every tensor is one the message kind carries, with a dtype this
protocol knows, a shape that matches its byte range and data that fits the body), then the tensors
are read with ``safetensors.torch.load``. A body with unknown or too many tensors is refused before
any tensor is decoded. Nothing is ever unpickled. Errors are JSON (``{"error": ..., "status": ...,
"service": ...}``), at most :data:`MAX_ERROR_CHARS` long, and echo at most :data:`ECHO_CHARS` of any
value the client sent.

Statuses: :class:`MalformedMessage` (400) for a body that is not a well-formed message of the
expected kind; :class:`PayloadTooLarge` (413); :class:`InvalidPayload` (422) for a well-formed
message whose tensors or values do not fit the hosted models (shape, dtype, limits).
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Collection, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..vae.vae import FRAMES_PER_CHUNK, LATENTS_PER_CHUNK, SPATIAL_FACTOR, decoded_frames

PROTOCOL = "stepvideo-service/1"
DEFAULT_PORT = 8080
TOKEN_ENV = "STEPVIDEO_API_TOKEN"
CONTENT_TYPE = "application/x-safetensors"
ACCEPTED_CONTENT_TYPES = (CONTENT_TYPE, "application/octet-stream")
MAX_HEADER_BYTES = 16 << 20       # a caption_request's header holds its prompts
TENSOR_HEADER_BYTES = 64 << 10    # every other kind's header only describes its few tensors
# JSON outside string literals (braces, keys' colons, numbers) per header or 'fields': what makes
# json.loads slow (a 16 MB header of 250k tiny objects takes seconds and holds the GIL). Real
# messages have under 200 bytes of it; the prompts are strings.
MAX_JSON_STRUCTURE = 16 << 10
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
# The safetensors dtypes a message may carry (bits per element); anything else (F4, F6_E2M3,
# F8_E8M0, ...) is refused from the header. F64 and integers load, so that /vae-api can answer
# "wrong dtype" with a 422 that names the accepted ones.
WIRE_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16,
                   "I8": 8, "U8": 8, "BOOL": 8}
MAX_TENSORS = 8                  # per message when the kind does not name its tensors
OUTPUT_KINDS = ("float", "uint8")
MAX_ERROR_CHARS = 1000           # an error message is cut here (it never carries bulk data)
ECHO_CHARS = 64                  # at most this much of a client's value is quoted in an error

# The VAE endpoint's per-request cap. A full 204-frame 544x992 job is (1, 36, 64, 34, 62) = 4.86 M
# latent elements; the decoded float video is 68x that (17/3 frames, 3 colours, 16x16 pixels per
# latent element over 64 channels), so 2**23 already allows ~0.57 G output elements per request.
MAX_LATENT_ELEMENTS = 1 << 23
MAX_VAE_BATCH = 4
# Cost limits of one /vae-api request, in video pixels: the element cap alone does not bound cost
# (the mid-block attention is quadratic in 20 h w tokens per chunk). The defaults are what the
# largest supported videos need: 204 frames (the release's length), 1280x720 or 720x1280, and
# 544x992 (539,648 pixels per frame).
MAX_VIDEO_FRAMES = 204
MAX_VIDEO_SIDE = 1280
MAX_VIDEO_AREA = 1280 * 720


class ProtocolError(ValueError):
    """A message that cannot be served; ``status`` is the HTTP status to answer with."""

    status = 400


class MalformedMessage(ProtocolError):
    status = 400


class PayloadTooLarge(ProtocolError):
    status = 413


class InvalidPayload(ProtocolError):
    status = 422


def short(value: Any) -> str:
    """``repr`` of a client's value cut to :data:`ECHO_CHARS`: errors never echo bulk input."""
    if not isinstance(value, (str, bytes, int, float, bool, type(None))):
        return f"<{type(value).__name__}>"
    text = repr(value[:ECHO_CHARS + 1] if isinstance(value, (str, bytes)) else value)
    if len(text) <= ECHO_CHARS:
        return text
    size = f" of {len(value)} chars" if isinstance(value, (str, bytes)) else ""
    return f"{text[:ECHO_CHARS]}...(cut{size})"


def _names(names: Collection[str], at_most: int = 3) -> str:
    shown = ", ".join(short(n) for n in list(names)[:at_most])
    return shown + (f" and {len(names) - at_most} more" if len(names) > at_most else "")


def parse_json(text: str | bytes, what: str) -> Any:
    """``json.loads`` whose every failure (syntax, nesting past the recursion limit, integers over
    Python's 4300-digit conversion limit, bad UTF-8) is a :class:`MalformedMessage`; text with more
    than :data:`MAX_JSON_STRUCTURE` bytes outside its strings is refused before parsing."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    structure = len(_JSON_STRING.sub(b"", raw))
    if structure > MAX_JSON_STRUCTURE:
        raise MalformedMessage(f"{what} has {structure} bytes of JSON outside strings (objects, "
                               f"keys, numbers); a message has at most {MAX_JSON_STRUCTURE} (too "
                               "many tensors or fields?)")
    try:
        return json.loads(text)
    except RecursionError as e:
        raise MalformedMessage(f"{what} is nested too deeply to parse") from e
    except ValueError as e:   # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise MalformedMessage(f"{what} is not valid JSON: {str(e)[:200]}") from e


# --------------------------------------------------------------------------------------------
# Envelope
# --------------------------------------------------------------------------------------------

@dataclass
class Message:
    kind: str
    fields: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def encode_message(kind: str, fields: Mapping[str, Any],
                   tensors: Mapping[str, torch.Tensor] | None = None) -> bytes:
    """Serialise one message (tensors are moved to CPU and made contiguous)."""
    metadata = {"protocol": PROTOCOL, "kind": kind,
                "fields": json.dumps(dict(fields), ensure_ascii=False)}
    data = {k: v.detach().to("cpu").contiguous() for k, v in (tensors or {}).items()}
    return st_save(data, metadata=metadata)


def read_header(body: bytes, max_header: int = MAX_HEADER_BYTES) -> dict[str, Any]:
    """The JSON header of a safetensors body, checked against the body's length."""
    if len(body) < 8:
        raise MalformedMessage(f"body of {len(body)} bytes is too short for a safetensors message "
                               "(8-byte header length, JSON header, tensor data)")
    (n,) = struct.unpack("<Q", body[:8])
    if n > max_header:
        raise MalformedMessage(f"not a safetensors message of this kind: the first 8 bytes "
                               f"announce a {n}-byte header, over its limit of {max_header}")
    if 8 + n > len(body):
        raise MalformedMessage(f"not a safetensors message: the first 8 bytes announce a {n}-byte "
                               f"header but the body has {len(body)} bytes (truncated, or not "
                               f"{CONTENT_TYPE} at all)")
    header = parse_json(body[8:8 + n], "safetensors header")
    if not isinstance(header, dict):
        raise MalformedMessage("safetensors header must be a JSON object")
    return header


def check_tensor_entries(header: Mapping[str, Any], available: int, kind: str,
                         names: Collection[str] | None = None) -> None:
    """From the header alone: the tensors are ``names`` (or at most :data:`MAX_TENSORS` of any
    name), each with a known dtype, a shape whose byte size is its data range, inside the body."""
    given = [k for k in header if k != "__metadata__"]
    unknown = [k for k in given if names is not None and k not in names]
    if unknown:
        raise MalformedMessage(f"{kind} carries unexpected tensor(s) {_names(unknown)}; it "
                               f"takes only {sorted(names) or 'no tensors'}")
    if len(given) > MAX_TENSORS:
        raise MalformedMessage(f"{kind} carries {len(given)} tensors; at most {MAX_TENSORS}")
    needed = 0
    for name in given:
        entry = header[name]
        if not isinstance(entry, dict):
            raise MalformedMessage(f"tensor {short(name)} in the header is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in WIRE_DTYPE_BITS:
            raise MalformedMessage(f"tensor {short(name)} has dtype {short(dtype)}; this protocol "
                                   f"carries {sorted(WIRE_DTYPE_BITS)}")
        if not (isinstance(shape, list) and len(shape) <= 8
                and all(type(d) is int and 0 <= d < 1 << 40 for d in shape)):
            raise MalformedMessage(f"tensor {short(name)} has no valid shape (a list of at most "
                                   "8 non-negative integers)")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int and o >= 0 for o in offsets) and offsets[0] <= offsets[1]):
            raise MalformedMessage(f"tensor {short(name)} in the header has no valid data_offsets")
        size = math.prod(shape) * WIRE_DTYPE_BITS[dtype] // 8
        if offsets[1] - offsets[0] != size:
            raise MalformedMessage(f"tensor {short(name)} of shape {shape} and dtype {dtype} "
                                   f"needs {size} bytes but its data_offsets span "
                                   f"{offsets[1] - offsets[0]}")
        needed = max(needed, offsets[1])
    if needed > available:
        raise MalformedMessage(f"truncated body: the header declares {needed} bytes of tensor "
                               f"data but only {available} follow it")


def decode_message(body: bytes, kind: str, names: Collection[str] | None = None,
                   max_header: int = MAX_HEADER_BYTES) -> Message:
    """Parse and check the envelope of a message that must be of ``kind`` and carry only the
    tensors ``names`` (None: any, at most :data:`MAX_TENSORS`); all checks before decoding."""
    header = read_header(body, max_header)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("protocol") != PROTOCOL:
        found = meta.get("protocol") if isinstance(meta, dict) else None
        raise MalformedMessage(f"expected a {PROTOCOL} message (safetensors __metadata__ "
                               f"'protocol'), found {short(found)}")
    if meta.get("kind") != kind:
        raise MalformedMessage(f"expected a {kind!r} message, got {short(meta.get('kind'))}")
    if not all(isinstance(v, str) for v in meta.values()):
        raise MalformedMessage("safetensors __metadata__ values must all be strings")
    fields = parse_json(meta.get("fields", "{}"), "'fields' metadata")
    if not isinstance(fields, dict):
        raise MalformedMessage(f"'fields' metadata must be a JSON object, got "
                               f"{type(fields).__name__}")
    check_tensor_entries(header, len(body) - 8 - struct.unpack("<Q", body[:8])[0], kind, names)
    try:
        tensors = st_load(body)
    except (SafetensorError, ValueError, TypeError, KeyError) as e:
        raise MalformedMessage(f"cannot read the tensors of the message: {str(e)[:200]}") from e
    return Message(kind, fields, tensors)


def _tensor(msg: Message, name: str) -> torch.Tensor:
    if name not in msg.tensors:
        raise MalformedMessage(f"{msg.kind} needs a tensor {name!r}; found "
                               f"{sorted(msg.tensors) or 'none'}")
    return msg.tensors[name]


def _field(msg: Message, name: str, types: type | tuple[type, ...], default: Any = ...) -> Any:
    if name not in msg.fields:
        if default is ...:
            raise MalformedMessage(f"{msg.kind} needs the field {name!r}")
        return default
    value = msg.fields[name]
    if not isinstance(value, types):
        raise MalformedMessage(f"{msg.kind} field {name!r} has type {type(value).__name__}")
    return value


def check_text(text: str, what: str) -> None:
    """A string that UTF-8 can carry: JSON's ``\\ud800`` escapes give lone surrogates, which no
    tokenizer (and no safetensors header) accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MalformedMessage(f"{what} is not valid Unicode text: {e.reason} at character "
                               f"{e.start} (a lone surrogate such as \\ud800)") from e


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


# --------------------------------------------------------------------------------------------
# Caption service
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CaptionLimits:
    """What the caption endpoint accepts."""

    max_batch: int = 64
    max_prompt_chars: int = 20_000


@dataclass(frozen=True)
class CaptionRequest:
    """``prompts`` -> text embeddings. Fields only, no tensors."""

    prompts: tuple[str, ...]
    KIND = "caption_request"

    def to_bytes(self) -> bytes:
        return encode_message(self.KIND, {"prompts": list(self.prompts)})

    @classmethod
    def from_bytes(cls, body: bytes) -> "CaptionRequest":
        msg = decode_message(body, cls.KIND, names=())
        prompts = _field(msg, "prompts", list)
        if not all(isinstance(p, str) for p in prompts):
            raise MalformedMessage("caption_request 'prompts' must be a list of strings")
        for i, p in enumerate(prompts):
            check_text(p, f"prompt {i}")
        return cls(tuple(prompts))

    def validate(self, limits: CaptionLimits) -> None:
        if not 1 <= len(self.prompts) <= limits.max_batch:
            raise InvalidPayload(f"caption_request has {len(self.prompts)} prompts; send 1 to "
                                 f"{limits.max_batch} per request")
        long = [i for i, p in enumerate(self.prompts) if len(p) > limits.max_prompt_chars]
        if long:
            raise InvalidPayload(f"prompt(s) {long} exceed {limits.max_prompt_chars} characters")


@dataclass
class CaptionResponse:
    """y (B, Ly, llm_dim), y_mask (B, Lc + Ly) with the Lc CLIP ones first, clip_embedding
    (B, Lc, clip_dim)."""

    y: torch.Tensor
    y_mask: torch.Tensor
    clip_embedding: torch.Tensor
    KIND = "caption_response"

    def to_bytes(self) -> bytes:
        return encode_message(self.KIND, {}, {"y": self.y, "y_mask": self.y_mask,
                                              "clip_embedding": self.clip_embedding})

    @classmethod
    def from_bytes(cls, body: bytes) -> "CaptionResponse":
        msg = decode_message(body, cls.KIND, names=("y", "y_mask", "clip_embedding"),
                             max_header=TENSOR_HEADER_BYTES)
        out = cls(_tensor(msg, "y"), _tensor(msg, "y_mask"), _tensor(msg, "clip_embedding"))
        out.check_shapes()
        return out

    def check_shapes(self, batch: int | None = None) -> None:
        y, m, c = self.y, self.y_mask, self.clip_embedding
        ok = (y.dim() == 3 and c.dim() == 3 and m.dim() == 2 and y.shape[0] == c.shape[0]
              == m.shape[0] and m.shape[1] == y.shape[1] + c.shape[1])
        if not ok or (batch is not None and y.shape[0] != batch):
            raise InvalidPayload(f"inconsistent caption_response: y {tuple(y.shape)}, y_mask "
                                 f"{tuple(m.shape)}, clip_embedding {tuple(c.shape)}"
                                 + (f", expected batch {batch}" if batch is not None else ""))


# --------------------------------------------------------------------------------------------
# VAE service
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VAELimits:
    """What the VAE endpoint accepts: the hosted VAE's latent width and size caps."""

    z_channels: int
    latent_frames_per_chunk: int = LATENTS_PER_CHUNK
    max_latent_elements: int = MAX_LATENT_ELEMENTS
    max_batch: int = MAX_VAE_BATCH
    dtypes: tuple[str, ...] = tuple(FLOAT_DTYPES)
    max_frames: int = MAX_VIDEO_FRAMES
    max_side: int = MAX_VIDEO_SIDE
    max_area: int = MAX_VIDEO_AREA

    def __post_init__(self):
        for name in ("max_latent_elements", "max_batch", "max_frames", "max_side", "max_area"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_frames < FRAMES_PER_CHUNK or self.max_side < SPATIAL_FACTOR \
                or self.max_area < SPATIAL_FACTOR ** 2:
            raise ValueError(f"max_frames {self.max_frames}, max_side {self.max_side} and "
                             f"max_area {self.max_area} must allow one {FRAMES_PER_CHUNK}-frame "
                             f"chunk of {SPATIAL_FACTOR}x{SPATIAL_FACTOR} pixels")


@dataclass
class VAERequest:
    """latents (B, 3n, z, h, w) -> video. ``output`` "float": (B, 17n, 3, 16h, 16w) in the VAE's
    dtype, in [-1, 1] (not clamped); "uint8": (B, 17n, 16h, 16w, 3) post-processed frames."""

    latents: torch.Tensor
    output: str = "float"
    KIND = "vae_request"

    def to_bytes(self) -> bytes:
        return encode_message(self.KIND, {"output": self.output}, {"latents": self.latents})

    @classmethod
    def from_bytes(cls, body: bytes) -> "VAERequest":
        msg = decode_message(body, cls.KIND, names=("latents",),
                             max_header=TENSOR_HEADER_BYTES)
        return cls(_tensor(msg, "latents"), _field(msg, "output", str, "float"))

    def validate(self, limits: VAELimits) -> None:
        z, lat = limits.z_channels, self.latents
        if self.output not in OUTPUT_KINDS:
            raise InvalidPayload(f"output must be one of {list(OUTPUT_KINDS)}, got "
                                 f"{short(self.output)}")
        names = {v: k for k, v in FLOAT_DTYPES.items()}
        if names.get(lat.dtype) not in limits.dtypes:
            allowed = [str(FLOAT_DTYPES[d]).replace("torch.", "") for d in limits.dtypes]
            raise InvalidPayload(f"latents have dtype {_dtype_name(lat)}; send one of {allowed}")
        if lat.dim() != 5 or lat.shape[2] != z or min(lat.shape) < 1:
            raise InvalidPayload(f"latents must be (B, frames, {z}, h, w) with every size >= 1; "
                                 f"got {tuple(lat.shape)}")
        if lat.shape[0] > limits.max_batch:
            raise InvalidPayload(f"latents have a batch of {lat.shape[0]}; this server decodes at "
                                 f"most {limits.max_batch} videos per request (split the batch)")
        if lat.numel() > limits.max_latent_elements:
            raise InvalidPayload(f"latents have {lat.numel()} elements; this server decodes at "
                                 f"most max_latent_elements={limits.max_latent_elements} per "
                                 "request (split the batch, or start the server with a larger "
                                 "--max_latent_elements)")
        self._check_cost(limits)

    def _check_cost(self, limits: VAELimits) -> None:
        """Frames, sides and pixels per frame of the decoded video: what a decode costs."""
        _, f, _, h, w = self.latents.shape
        frames = decoded_frames(f)
        hh, ww = h * SPATIAL_FACTOR, w * SPATIAL_FACTOR
        if frames > limits.max_frames or max(hh, ww) > limits.max_side \
                or hh * ww > limits.max_area:
            raise InvalidPayload(
                f"latents {tuple(self.latents.shape)} decode to {frames} frames of {hh}x{ww} "
                f"pixels; this server decodes at most {limits.max_frames} frames "
                f"(--max_video_frames), sides of {limits.max_side} (--max_video_side) and "
                f"{limits.max_area} pixels per frame (--max_video_area)")


@dataclass
class VAEResponse:
    video: torch.Tensor
    output: str = "float"
    KIND = "vae_response"

    def to_bytes(self) -> bytes:
        return encode_message(self.KIND, {"output": self.output}, {"video": self.video})

    @classmethod
    def from_bytes(cls, body: bytes) -> "VAEResponse":
        msg = decode_message(body, cls.KIND, names=("video",),
                             max_header=TENSOR_HEADER_BYTES)
        return cls(_tensor(msg, "video"), _field(msg, "output", str, "float"))

    def check(self, latent_shape: tuple[int, ...], output: str) -> None:
        """The answer to latents of ``latent_shape`` (B, F, z, h, w) asked as ``output``: float
        (B, frames, 3, 16h, 16w) or uint8 (B, frames, 16h, 16w, 3) with the release's frame rule
        (``decoded_frames``: 3 -> 17, 4 -> 18, 1 -> 1); InvalidPayload otherwise."""
        b, f, _, h, w = latent_shape
        frames = decoded_frames(f)
        hh, ww = h * SPATIAL_FACTOR, w * SPATIAL_FACTOR
        if output == "uint8":
            shape, wanted = (b, frames, hh, ww, 3), "uint8"
            dtype_ok = self.video.dtype == torch.uint8
        else:
            shape, wanted = (b, frames, 3, hh, ww), "a float dtype"
            dtype_ok = self.video.dtype in FLOAT_DTYPES.values()
        problems = []
        if self.output != output:
            problems.append(f"output {self.output!r} instead of {output!r}")
        if tuple(self.video.shape) != shape:
            problems.append(f"shape {tuple(self.video.shape)} instead of {shape}")
        if not dtype_ok:
            problems.append(f"dtype {_dtype_name(self.video)} instead of {wanted}")
        if problems:
            raise InvalidPayload(f"vae_response for latents {tuple(latent_shape)} has "
                                 + ", ".join(problems))


@dataclass
class ErrorBody:
    """The JSON body of every error answer."""

    error: str
    status: int
    service: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        error = self.error if len(self.error) <= MAX_ERROR_CHARS else \
            self.error[:MAX_ERROR_CHARS] + "...(cut)"
        return {"error": error, "status": self.status, "service": self.service, **self.extra}
