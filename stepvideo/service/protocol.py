"""Wire format of the caption/VAE service: one safetensors file per message, no pickle.

Every POST body, request and response, is one safetensors file (content type
``application/x-safetensors``)::

    u64 little-endian N | N bytes of JSON header | raw little-endian tensor bytes

The header is the standard safetensors header (``name -> {dtype, shape, data_offsets}``). Its
``__metadata__`` map (str -> str) carries the non-tensor part of the message::

    "protocol": "stepvideo-service/1"
    "kind":     "caption_request" | "caption_response" | "vae_request" | "vae_response"
    "fields":   a JSON object with the message's fields (prompts, options, sizes)

A body is read in two steps: the header is parsed with ``json`` and checked (protocol, kind, that
the tensor data fits the body), then the tensors are read with ``safetensors.torch.load``. Nothing
is ever unpickled. Errors are JSON (``{"error": ..., "status": ..., "service": ...}``).

Statuses: :class:`MalformedMessage` (400) for a body that is not a well-formed message of the
expected kind; :class:`PayloadTooLarge` (413); :class:`InvalidPayload` (422) for a well-formed
message whose tensors or values do not fit the hosted models (shape, dtype, limits).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..vae.vae import FRAMES_PER_CHUNK, LATENTS_PER_CHUNK, SPATIAL_FACTOR

PROTOCOL = "stepvideo-service/1"
DEFAULT_PORT = 8080
TOKEN_ENV = "STEPVIDEO_API_TOKEN"
CONTENT_TYPE = "application/x-safetensors"
ACCEPTED_CONTENT_TYPES = (CONTENT_TYPE, "application/octet-stream")
MAX_HEADER_BYTES = 16 << 20
FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
OUTPUT_KINDS = ("float", "uint8")

# The VAE endpoint's per-request cap. A full 204-frame 544x992 job is (1, 36, 64, 34, 62) = 4.86 M
# latent elements; the decoded float video is 68x that (17/3 frames, 3 colours, 16x16 pixels per
# latent element over 64 channels), so 2**23 already allows ~0.57 G output elements per request.
MAX_LATENT_ELEMENTS = 1 << 23
MAX_VAE_BATCH = 4


class ProtocolError(ValueError):
    """A message that cannot be served; ``status`` is the HTTP status to answer with."""

    status = 400


class MalformedMessage(ProtocolError):
    status = 400


class PayloadTooLarge(ProtocolError):
    status = 413


class InvalidPayload(ProtocolError):
    status = 422


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


def read_header(body: bytes) -> dict[str, Any]:
    """The JSON header of a safetensors body, checked against the body's length."""
    if len(body) < 8:
        raise MalformedMessage(f"body of {len(body)} bytes is too short for a safetensors message "
                               "(8-byte header length, JSON header, tensor data)")
    (n,) = struct.unpack("<Q", body[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(body):
        raise MalformedMessage(f"not a safetensors message: the first 8 bytes announce a {n}-byte "
                               f"header but the body has {len(body)} bytes (truncated, or not "
                               f"{CONTENT_TYPE} at all)")
    try:
        header = json.loads(body[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MalformedMessage(f"safetensors header is not valid UTF-8 JSON: {e}") from e
    if not isinstance(header, dict):
        raise MalformedMessage("safetensors header must be a JSON object")
    _check_data_size(header, len(body) - 8 - n)
    return header


def _check_data_size(header: Mapping[str, Any], available: int) -> None:
    needed = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and o >= 0 for o in offsets)):
            raise MalformedMessage(f"tensor {name!r} in the header has no valid data_offsets")
        needed = max(needed, offsets[1])
    if needed > available:
        raise MalformedMessage(f"truncated body: the header declares {needed} bytes of tensor "
                               f"data but only {available} follow it")


def decode_message(body: bytes, kind: str) -> Message:
    """Parse and check the envelope of a message that must be of ``kind``."""
    meta = read_header(body).get("__metadata__")
    if not isinstance(meta, dict) or meta.get("protocol") != PROTOCOL:
        found = meta.get("protocol") if isinstance(meta, dict) else None
        raise MalformedMessage(f"expected a {PROTOCOL} message (safetensors __metadata__ "
                               f"'protocol'), found {found!r}")
    if meta.get("kind") != kind:
        raise MalformedMessage(f"expected a {kind!r} message, got {meta.get('kind')!r}")
    try:
        fields = json.loads(meta.get("fields", "{}"))
    except json.JSONDecodeError as e:
        raise MalformedMessage(f"'fields' metadata is not valid JSON: {e}") from e
    if not isinstance(fields, dict):
        raise MalformedMessage("'fields' metadata must be a JSON object")
    try:
        tensors = st_load(body)
    except (SafetensorError, ValueError, TypeError) as e:
        raise MalformedMessage(f"cannot read the tensors of the message: {e}") from e
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
        msg = decode_message(body, cls.KIND)
        prompts = _field(msg, "prompts", list)
        if not all(isinstance(p, str) for p in prompts):
            raise MalformedMessage("caption_request 'prompts' must be a list of strings")
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
        msg = decode_message(body, cls.KIND)
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
        msg = decode_message(body, cls.KIND)
        return cls(_tensor(msg, "latents"), _field(msg, "output", str, "float"))

    def validate(self, limits: VAELimits) -> None:
        z, lat = limits.z_channels, self.latents
        if self.output not in OUTPUT_KINDS:
            raise InvalidPayload(f"output must be one of {list(OUTPUT_KINDS)}, got {self.output!r}")
        names = {v: k for k, v in FLOAT_DTYPES.items()}
        if names.get(lat.dtype) not in limits.dtypes:
            allowed = [str(FLOAT_DTYPES[d]).replace("torch.", "") for d in limits.dtypes]
            raise InvalidPayload(f"latents have dtype {_dtype_name(lat)}; send one of {allowed}")
        if lat.dim() != 5 or lat.shape[2] != z or min(lat.shape) < 1:
            raise InvalidPayload(f"latents must be (B, frames, {z}, h, w) with every size >= 1; "
                                 f"got {tuple(lat.shape)}")
        if lat.shape[1] % limits.latent_frames_per_chunk:
            raise InvalidPayload(f"latent frame count {lat.shape[1]} must be a multiple of "
                                 f"{limits.latent_frames_per_chunk}")
        if lat.shape[0] > limits.max_batch:
            raise InvalidPayload(f"latents have a batch of {lat.shape[0]}; this server decodes at "
                                 f"most {limits.max_batch} videos per request (split the batch)")
        if lat.numel() > limits.max_latent_elements:
            raise InvalidPayload(f"latents have {lat.numel()} elements; this server decodes at "
                                 f"most max_latent_elements={limits.max_latent_elements} per "
                                 "request (split the batch, or start the server with a larger "
                                 "--max_latent_elements)")


@dataclass
class VAEResponse:
    video: torch.Tensor
    output: str = "float"
    KIND = "vae_response"

    def to_bytes(self) -> bytes:
        return encode_message(self.KIND, {"output": self.output}, {"video": self.video})

    @classmethod
    def from_bytes(cls, body: bytes) -> "VAEResponse":
        msg = decode_message(body, cls.KIND)
        return cls(_tensor(msg, "video"), _field(msg, "output", str, "float"))

    def check(self, latent_shape: tuple[int, ...], output: str) -> None:
        """The answer to latents of ``latent_shape`` (B, F, z, h, w) asked as ``output``: float
        (B, F/3*17, 3, 16h, 16w) or uint8 (B, F/3*17, 16h, 16w, 3); InvalidPayload otherwise."""
        b, f, _, h, w = latent_shape
        frames = f // LATENTS_PER_CHUNK * FRAMES_PER_CHUNK
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
        return {"error": self.error, "status": self.status, "service": self.service, **self.extra}
