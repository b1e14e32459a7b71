"""Step-1 LLM and HunyuanCLIP text encoders against the conformance kit.

Every config, shape and tolerance comes from the kit's JSON files (step1.json, clip_small.json,
tokenizer_wrapper.json, manifest_*_full.json), so another kit with the same file names works.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import types

import pytest
import torch
from stepvideo.conformance import assert_close, kit_dir, load_json, load_tensors

from stepvideo.text_encoder.clip import PRESETS as CLIP_PRESETS
from stepvideo.text_encoder.clip import HunyuanClip, build_bert, write_clip_dir
from stepvideo.text_encoder.stepllm import PRESETS as STEP1_PRESETS
from stepvideo.text_encoder.stepllm import (STEP1TextEncoder, SqrtAlibiAttention, Step1Config,
                                            Step1Model, StepTokenizer, alibi_slopes,
                                            pad_token_ids, sqrt_alibi_bias, write_step1_dir)
from stepvideo.weights import CheckpointError, load_state_dict_strict

STEP1 = load_json("step1.json")
STEP1_CASES = list(STEP1["cases"])
STEP1_TOL = STEP1["tolerance"]
SP_CORPUS = [
    "a cat walks on the moon.",
    "the big red dog runs in the city at night.",
    "an astronaut finds a stone tablet on the moon, glowing softly.",
    "small blue waves under a grey sky, filmed with a moving camera.",
]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def step1_case(case: str):
    """(case json, fp32 weights, io tensors)."""
    return (STEP1["cases"][case], load_tensors(f"{case}_weights.safetensors", torch.float32),
            load_tensors(f"{case}_io.safetensors"))


def build_step1(config, weights, attn_backend="sdpa") -> Step1Model:
    with torch.device("meta"):
        model = Step1Model(config, attn_backend=attn_backend)
    load_state_dict_strict(model, weights)
    return model.eval()


def run_with_intermediates(model: Step1Model, input_ids: torch.Tensor):
    """y (B, L, D) and {io-file name: tensor (L, B, D)} for the embedding and every layer."""
    seen = {}
    hooks = [model.tok_embeddings["word_embeddings"].register_forward_hook(
        lambda m, i, o: seen.__setitem__("embeddings_sbh", o.transpose(0, 1)))]
    for n, layer in enumerate(model.transformer["layers"]):
        hooks.append(layer.register_forward_hook(
            lambda m, i, o, n=n: seen.__setitem__(f"layer{n}_out_sbh", o.transpose(0, 1))))
    try:
        with torch.no_grad():
            y = model(input_ids)
    finally:
        for h in hooks:
            h.remove()
    return y, seen


def flex_unavailable_reason() -> str | None:
    """None when FlexAttention runs on CPU in this torch, else why not."""
    try:
        attend = SqrtAlibiAttention(2, backend="flex")
        q = torch.randn(1, 2, 4, 8)
        attend(q, q[:, :1], q[:, :1])
    except (ImportError, NotImplementedError, RuntimeError) as e:
        return f"FlexAttention does not run on CPU with torch {torch.__version__}: {e}"
    return None


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory) -> str:
    """A tiny sentencepiece model trained here (well under a second)."""
    sentencepiece = pytest.importorskip("sentencepiece")
    vocab = min(64, STEP1["cases"][STEP1_CASES[0]]["config"]["padded_vocab_size"])
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS * 10), model_writer=buf, vocab_size=vocab,
        hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "tiny.model"
    path.write_bytes(buf.getvalue())
    return str(path)


@pytest.fixture()
def step1_dir(tmp_path, sp_model_path):
    """The first step1 case written in the official step_llm layout (2 shards + index)."""
    case, weights, _ = step1_case(STEP1_CASES[0])
    write_step1_dir(str(tmp_path / "step_llm"), case["config"], weights, sp_model_path)
    return tmp_path / "step_llm"


# ---------------------------------------------------------------------------------------------
# Step-1 numerics
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case_name", STEP1_CASES)
def test_step1_golden_sqrt_alibi(case_name):
    case, weights, tensors = step1_case(case_name)
    model = build_step1(case["config"], weights)
    y, inter = run_with_intermediates(model, tensors["input_ids"])
    assert_close(y, tensors["y_sqrt_alibi"], STEP1_TOL, f"{case_name} y_sqrt_alibi")
    names = [k for k in tensors if k.endswith("_sbh")]
    assert len(names) == 1 + case["config"]["num_layers"]
    for name in names:
        assert_close(inter[name], tensors[name], STEP1_TOL, f"{case_name} {name}")
    # The attention variant matters: plain causal attention must NOT pass.
    assert (y - tensors["y_causal"]).abs().max() > 100 * STEP1_TOL["atol"]


@pytest.mark.parametrize("case_name", STEP1_CASES)
def test_step1_tokenizer_rule_reproduces_golden_ids(case_name):
    case, _, tensors = step1_case(case_name)
    ids, mask = pad_token_ids(case["prompt_token_ids"], case["max_length"])
    assert torch.equal(ids, tensors["input_ids"])
    assert torch.equal(mask, tensors["attention_mask"])


@pytest.mark.parametrize("case_name", STEP1_CASES)
def test_step1_flex_matches_sdpa(case_name):
    reason = flex_unavailable_reason()
    if reason:
        pytest.skip(reason)
    case, weights, tensors = step1_case(case_name)
    with torch.no_grad():
        y_sdpa = build_step1(case["config"], weights, "sdpa")(tensors["input_ids"])
        y_flex = build_step1(case["config"], weights, "flex")(tensors["input_ids"])
    assert_close(y_flex, y_sdpa, STEP1_TOL, f"{case_name} flex vs sdpa")
    assert_close(y_flex, tensors["y_sqrt_alibi"], STEP1_TOL, f"{case_name} flex vs golden")


@pytest.mark.parametrize("heads, expected", [
    (4, [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8]),
    (6, [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]),
    (8, [2 ** -1, 2 ** -2, 2 ** -3, 2 ** -4, 2 ** -5, 2 ** -6, 2 ** -7, 2 ** -8]),
    (12, [2 ** -1, 2 ** -2, 2 ** -3, 2 ** -4, 2 ** -5, 2 ** -6, 2 ** -7, 2 ** -8,
          2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5]),
])
def test_alibi_slopes_hand_computed(heads, expected):
    torch.testing.assert_close(alibi_slopes(heads), torch.tensor(expected), atol=0, rtol=1e-7)


def test_sqrt_alibi_bias_values():
    slopes = alibi_slopes(2)
    bias = sqrt_alibi_bias(slopes, 3)  # (H, L, L)
    assert bias.shape == (2, 3, 3)
    assert bias[1, 2, 0].item() == pytest.approx(-slopes[1].item() * math.sqrt(2))
    assert bias[0, 1, 1].item() == 0.0
    assert torch.isinf(bias[:, 0, 1]).all() and (bias[:, 0, 1] < 0).all()


def test_step1_runs_in_bfloat16():
    case, weights, tensors = step1_case(STEP1_CASES[0])
    model = build_step1(case["config"], {k: v.bfloat16() for k, v in weights.items()})
    with torch.no_grad():
        y = model(tensors["input_ids"])
    assert y.dtype == torch.bfloat16 and y.shape == tensors["y_sqrt_alibi"].shape
    assert torch.isfinite(y).all()


# ---------------------------------------------------------------------------------------------
# Step-1 config and API
# ---------------------------------------------------------------------------------------------

def test_step1_config_forms_agree():
    raw = STEP1["cases"][STEP1_CASES[0]]["config"]
    cfg = Step1Config.from_dict(raw)  # ignores seq_length, use_flash_attn, ...
    assert Step1Config.coerce(types.SimpleNamespace(**raw)) == cfg
    with torch.device("meta"):
        assert Step1Model(raw).config == Step1Model(cfg).config == cfg


def test_step1_config_validation_names_numbers():
    cfg = Step1Config.from_dict(STEP1["cases"][STEP1_CASES[0]]["config"])
    heads = cfg.num_attention_heads
    with pytest.raises(ValueError, match=f"{heads}.*{heads + 1}"):
        dataclasses.replace(cfg, num_attention_groups=heads + 1)
    with pytest.raises(ValueError, match=f"{cfg.hidden_size + 1}.*{heads}"):
        dataclasses.replace(cfg, hidden_size=cfg.hidden_size + 1)


def test_step1_config_refuses_what_it_cannot_honour():
    cfg = Step1Config.from_dict(STEP1["cases"][STEP1_CASES[0]]["config"])
    with pytest.raises(ValueError, match="fp32_residual_connection=true .* not supported"):
        dataclasses.replace(cfg, fp32_residual_connection=True)
    with pytest.raises(ValueError, match=r"params_dtype 'bf16' is not one of \['bfloat16'"):
        dataclasses.replace(cfg, params_dtype="bf16")


def test_unknown_attention_backend_lists_options():
    with pytest.raises(ValueError, match="sdpa.*flex"):
        with torch.device("meta"):
            Step1Model(STEP1["cases"][STEP1_CASES[0]]["config"], attn_backend="optimus")


def test_step1_full_size_manifest_on_meta():
    manifest = load_json("manifest_step1_full.json")
    with torch.device("meta"):
        model = Step1Model(manifest["config"])
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert got == [(k["name"], k["shape"]) for k in manifest["keys"]]
    assert len(got) == manifest["num_keys"]
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]
    # Defaults = the release; the kit ran with seq_length 320, the hub's config.json says 16384.
    assert dataclasses.replace(model.config, seq_length=16384) == STEP1_PRESETS["step1"] \
        == Step1Config()
    assert set(manifest["config"]) == {f.name for f in dataclasses.fields(Step1Config)}


# ---------------------------------------------------------------------------------------------
# Tokenizer wrapper
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("example", load_json("tokenizer_wrapper.json")["examples"],
                         ids=lambda e: e["description"])
def test_tokenizer_wrapper_examples(example):
    ids, mask = pad_token_ids(example["token_ids_per_text"], example["max_length"])
    assert ids.tolist() == example["input_ids"]
    assert mask.tolist() == example["attention_mask"]


def test_step_tokenizer_uses_sentencepiece(sp_model_path):
    tok = StepTokenizer(sp_model_path)
    length = STEP1["cases"][STEP1_CASES[0]]["max_length"]
    ids, mask = tok(SP_CORPUS[:2], length)
    expected = pad_token_ids([tok.sp.encode(t) for t in SP_CORPUS[:2]], length)
    assert torch.equal(ids, expected[0]) and torch.equal(mask, expected[1])
    empty_ids, empty_mask = tok([], length)
    assert empty_ids.shape == (1, length) and empty_mask.sum().item() == 2


# ---------------------------------------------------------------------------------------------
# STEP1TextEncoder through the official directory layout
# ---------------------------------------------------------------------------------------------

def test_step1_encoder_from_sharded_dir(step1_dir, sp_model_path):
    case, _, tensors = step1_case(STEP1_CASES[0])
    assert len(list(step1_dir.glob("model-*-of-*.safetensors"))) == 2
    encoder = STEP1TextEncoder(str(step1_dir), max_length=case["max_length"])
    y, y_mask = encoder(SP_CORPUS[:2])
    hidden = case["config"]["hidden_size"]
    assert y.shape == (2, case["max_length"], hidden) and y_mask.shape == (2, case["max_length"])
    ids, mask = StepTokenizer(sp_model_path)(SP_CORPUS[:2], case["max_length"])
    assert torch.equal(y_mask, mask)
    with torch.no_grad():
        assert torch.equal(y, encoder.model(ids))
        assert_close(encoder.model(tensors["input_ids"]), tensors["y_sqrt_alibi"], STEP1_TOL,
                     "STEP1TextEncoder loaded from shards")
    single, _ = encoder(SP_CORPUS[0])  # a bare string is a batch of one
    assert single.shape == (1, case["max_length"], hidden)


def test_step1_encoder_from_model(sp_model_path):
    case, weights, _ = step1_case(STEP1_CASES[0])
    encoder = STEP1TextEncoder.from_model(build_step1(case["config"], weights),
                                          StepTokenizer(sp_model_path), case["max_length"])
    y, y_mask = encoder([])
    assert y.shape == (1, case["max_length"], case["config"]["hidden_size"])
    assert y_mask[0].tolist()[:3] == [1, 1, 0]


def test_step1_missing_tokenizer_names_path(step1_dir):
    path = step1_dir / "step1_chat_tokenizer.model"
    path.unlink()
    with pytest.raises(CheckpointError, match=str(path)):
        STEP1TextEncoder(str(step1_dir))


def test_step1_config_not_matching_weights_lists_keys(step1_dir):
    config_path = step1_dir / "config.json"
    cfg = json.loads(config_path.read_text(encoding="utf-8"))
    layers = cfg["num_layers"]
    cfg["num_layers"] = layers + 1
    config_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"missing key.*transformer\.layers\.{layers}\."):
        STEP1TextEncoder(str(step1_dir))
    cfg.update(num_layers=layers, ffn_hidden_size=cfg["ffn_hidden_size"] + 256)
    config_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*feed_forward\.w1\.weight"):
        STEP1TextEncoder(str(step1_dir))


def test_step1_missing_shard_is_reported(step1_dir):
    shard = sorted(step1_dir.glob("model-*-of-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        STEP1TextEncoder(str(step1_dir))


# ---------------------------------------------------------------------------------------------
# HunyuanCLIP
# ---------------------------------------------------------------------------------------------

CLIP = load_json("clip_small.json")


def clip_vocab() -> list[str]:
    return (kit_dir() / "clip_small_vocab.txt").read_text(encoding="utf-8").splitlines()


@pytest.mark.parametrize("key_prefix, use_safetensors",
                         [("", False), ("bert.", False), ("", True)],
                         ids=["bin", "bin-bert-prefix", "safetensors"])
def test_clip_golden(tmp_path, key_prefix, use_safetensors):
    weights = load_tensors("clip_small_weights.safetensors", torch.float32)
    tensors = load_tensors("clip_small_io.safetensors")
    write_clip_dir(str(tmp_path), CLIP["config"], weights, clip_vocab(),
                   key_prefix=key_prefix, use_safetensors=use_safetensors)
    clip = HunyuanClip(str(tmp_path), max_length=tensors["input_ids"].shape[1])
    ids, mask = clip.tokenize(CLIP["prompts"])
    assert torch.equal(ids, tensors["input_ids"]) and torch.equal(mask, tensors["attention_mask"])
    hidden, pooled = clip(CLIP["prompts"])
    assert_close(hidden, tensors["last_hidden_state"], CLIP["tolerance"], "clip last_hidden_state")
    assert_close(pooled, tensors["pooler_output"], CLIP["tolerance"], "clip pooler_output")


def test_clip_wrong_config_lists_keys(tmp_path):
    weights = load_tensors("clip_small_weights.safetensors", torch.float32)
    config = dict(CLIP["config"], num_hidden_layers=CLIP["config"]["num_hidden_layers"] + 1)
    write_clip_dir(str(tmp_path), config, weights, clip_vocab())
    with pytest.raises(CheckpointError, match=rf"missing key.*encoder\.layer\."
                                              rf"{CLIP['config']['num_hidden_layers']}\."):
        HunyuanClip(str(tmp_path))


def test_clip_missing_files_are_named(tmp_path):
    weights = load_tensors("clip_small_weights.safetensors", torch.float32)
    write_clip_dir(str(tmp_path), CLIP["config"], weights, clip_vocab())
    os.remove(tmp_path / "clip_text_encoder" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        HunyuanClip(str(tmp_path))
    os.remove(tmp_path / "tokenizer" / "vocab.txt")
    with pytest.raises(CheckpointError, match="vocab.txt"):
        HunyuanClip(str(tmp_path))


def test_clip_full_size_manifest_on_meta():
    manifest = load_json("manifest_clip_full.json")
    model = build_bert(manifest["config"], device="meta")
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert got == [(k["name"], k["shape"]) for k in manifest["keys"]]
    assert len(got) == manifest["num_keys"]
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]
    base = CLIP_PRESETS["base"].to_dict()
    assert {k: base[k] for k in manifest["config"]} == manifest["config"]
