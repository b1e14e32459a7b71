"""Fuzzing the service's wire format with a seeded mutator of valid bodies (bit flips, truncations,
header edits, dtype / shape / offset swaps, fields and metadata edits, length-prefix edits).

In process, thousands of mutants go through the decoders and validators: the only exception
allowed is a ProtocolError (a 4xx), with a short message. Against the live server a few hundred go
through real sockets: every answer is a 2xx or a 4xx JSON error, never a 500, and the server stays
healthy with nothing in its log but warnings. A failing case prints its seed."""

from __future__ import annotations

import copy
import json
import random
import struct
import time

import pytest
import requests
import torch

from tests.helpers import running_service
from stepvideo.service.protocol import (CONTENT_TYPE, MAX_ERROR_CHARS, CaptionLimits,
                                        CaptionRequest, ProtocolError, VAELimits, VAERequest)
from stepvideo.tiny import TinySizes

Z = TinySizes().z_channels
IN_PROCESS_CASES = 20_000
LIVE_CASES = 1000
DTYPES = ["F32", "BF16", "F16", "F64", "I64", "U8", "BOOL", "F4", "F6_E2M3", "F8_E8M0", "F8_E4M3",
          "C64", "X", "", 5, None, ["F32"]]
ODD_VALUES = [None, 5, -1, 2 ** 70, 1.5, "x", "", [], {}, [1, 2], "\ud800", "9" * 5000, True]


def seeds() -> list[tuple[str, bytes]]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 3, Z, 1, 1, generator=g)
    return [("/vae-api", VAERequest(z.bfloat16(), "uint8").to_bytes()),
            ("/vae-api", VAERequest(z, "float").to_bytes()),
            ("/caption-api", CaptionRequest(("a cat", "一只猫")).to_bytes())]


def odd(rng: random.Random):
    return copy.deepcopy(rng.choice(ODD_VALUES))


def split(body: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", body[:8])
    return json.loads(body[8:8 + n]), body[8 + n:]


def join(header: dict, data: bytes, rng: random.Random) -> bytes:
    raw = json.dumps(header, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
    n = len(raw) if rng.random() < 0.9 else rng.choice([0, len(raw) - 1, len(raw) + 7, 2 ** 63])
    return struct.pack("<Q", n % 2 ** 64) + raw + data


def edit_header(header: dict, rng: random.Random) -> None:
    tensors = [k for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    meta = header.get("__metadata__")
    choice = rng.randrange(9)
    entry = header[rng.choice(tensors)] if tensors else {}
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if choice == 0 and tensors:
        entry["dtype"] = rng.choice(DTYPES)
    elif choice == 1 and isinstance(shape, list) and shape:
        if rng.random() < 0.5:
            shape[rng.randrange(len(shape))] = rng.choice([0, 1, 2, 3, 17, 64, -1, 2 ** 40])
        else:
            rng.shuffle(shape)
    elif choice == 2 and isinstance(offsets, list) and len(offsets) == 2 \
            and all(isinstance(o, int) for o in offsets):
        offsets[rng.randrange(2)] += rng.choice([-4, -1, 1, 4, 2 ** 33])
    elif choice == 3 and isinstance(meta, dict):
        meta[rng.choice(["kind", "protocol", "fields"])] = odd(rng)
    elif choice == 4 and isinstance(meta, dict):
        meta["fields"] = rng.choice(['{"output": "png"}', '{"output": 5}', '{"prompts": "x"}',
                                     '{"prompts": [1]}', '{"prompts": ["\\ud800"]}', "[]",
                                     "null", '{"prompts": []}', '{"a":' * 2000 + "1" + "}" * 2000,
                                     '{"prompts": ["' + "x" * 30_000 + '"]}'])
    elif choice == 5:
        value = rng.choice(ODD_VALUES + [{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}])
        header[rng.choice(["extra", "latents", "y", "__metadata__"])] = copy.deepcopy(value)
    elif choice == 6 and tensors:
        del header[rng.choice(tensors)]
    elif choice == 7:
        header.pop("__metadata__", None)
    elif tensors:
        entry[rng.choice(["dtype", "shape", "data_offsets"])] = odd(rng)


def mutate(body: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind <= 1:                                          # header edits, re-framed
        header, data = split(body)
        for _ in range(rng.randint(1, 3)):
            edit_header(header, rng)
        out = join(header, data, rng)
    elif kind == 2:                                        # bit flips
        out = bytearray(body)
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(len(out))
            out[pos] ^= 1 << rng.randrange(8)
        out = bytes(out)
    elif kind == 3:                                        # truncation
        out = body[:rng.randrange(len(body))]
    elif kind == 4:                                        # data edits: too much, too little
        out = body + bytes(rng.randint(1, 64)) if rng.random() < 0.5 else body[:-rng.randint(1, 8)]
    else:                                                  # length prefix edits
        (n,) = struct.unpack("<Q", body[:8])
        out = struct.pack("<Q", max(0, n + rng.choice([-3, -1, 1, 3, 1 << 20]))) + body[8:]
    return out


def decode(endpoint: str, body: bytes) -> None:
    if endpoint == "/vae-api":
        VAERequest.from_bytes(body).validate(VAELimits(z_channels=Z))
    else:
        CaptionRequest.from_bytes(body).validate(CaptionLimits())


def test_decoders_raise_only_protocol_errors():
    rng, start = random.Random(1234), time.monotonic()
    outcomes = {"accepted": 0, "refused": 0}
    for case in range(IN_PROCESS_CASES):
        endpoint, body = rng.choice(seeds_cache)
        mutant = mutate(body, rng)
        try:
            decode(endpoint, mutant)
            outcomes["accepted"] += 1
        except ProtocolError as e:
            assert 400 <= e.status < 500 and len(str(e)) <= 2 * MAX_ERROR_CHARS, (case, str(e))
            outcomes["refused"] += 1
        except Exception as e:  # noqa: BLE001 - the failure this test looks for
            pytest.fail(f"case {case}: {type(e).__name__}: {str(e)[:300]} for {mutant[:300]!r}")
    print(f"in-process fuzz: {IN_PROCESS_CASES} cases, {outcomes}, "
          f"{time.monotonic() - start:.1f} s")
    assert outcomes["refused"] > IN_PROCESS_CASES // 2 and outcomes["accepted"] > 0


seeds_cache = seeds()


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    with running_service(tiny_model_dir, "--device", "cpu", "--threads", "6", "--max_body_mb",
                         "4", log=log) as (proc, url):
        yield proc, url


def test_live_server_answers_mutants_with_2xx_or_4xx(server):
    proc, url = server
    rng, start = random.Random(99), time.monotonic()
    statuses: dict[int, int] = {}
    with requests.Session() as session:
        for case in range(LIVE_CASES):
            endpoint, body = rng.choice(seeds_cache)
            mutant = mutate(body, rng)
            r = session.post(url + endpoint, data=mutant, timeout=30,
                             headers={"Content-Type": CONTENT_TYPE})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code == 200 or 400 <= r.status_code < 500, \
                (case, r.status_code, r.text[:300])
            if r.status_code != 200:
                assert r.json()["error"] and len(r.content) < 2 * MAX_ERROR_CHARS, case
            if case % 50 == 0:
                assert requests.get(url + "/health", timeout=2).status_code == 200
    print(f"live fuzz: {LIVE_CASES} cases, statuses {statuses}, {time.monotonic() - start:.1f} s")
    assert requests.get(url + "/health", timeout=2).json()["status"] == "ready"
    log = proc.log.read_text(errors="replace")
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    assert statuses.get(200, 0) > 0 and sum(v for k, v in statuses.items() if k >= 400) > 0
