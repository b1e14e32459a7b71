"""The tiny model (layout, determinism, loaders, an end-to-end video) and the download helpers
(file selection, completeness check), all offline."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stepvideo.download import (BASE_REPO, SERVICE_PARTS, TURBO_REPO, check_model_dir, download,
                                download_plan, missing_files, select_files)
from stepvideo.tiny import corpus_lines, write_tiny_model
from stepvideo.weights import CheckpointError

ROOT = Path(__file__).resolve().parents[1]

# The public repositories' file lists (as published), for the selection tests.
BASE_FILES = [
    ".gitattributes", "README.md", "assets/demo.png", "model_index.json",
    "scheduler/scheduler_config.json", "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    *[f"transformer/diffusion_pytorch_model-0000{i}-of-00006.safetensors" for i in range(1, 7)],
    "step_llm/config.json", "step_llm/model.safetensors.index.json",
    "step_llm/step1_chat_tokenizer.model",
    *[f"step_llm/model-0000{i}-of-00009.safetensors" for i in range(1, 10)],
    "hunyuan_clip/clip_text_encoder/config.json",
    "hunyuan_clip/clip_text_encoder/pytorch_model.bin", "hunyuan_clip/tokenizer/vocab.txt",
    "hunyuan_clip/tokenizer/tokenizer_config.json",
    "hunyuan_clip/tokenizer/special_tokens_map.json",
    "vae/vae.safetensors", "vae/vae_v2.safetensors",
    "lib/liboptimus_ths-torch2.2-cu121.cpython-310-x86_64-linux-gnu.so",
    "lib/liboptimus_ths-torch2.5-cu124.cpython-310-x86_64-linux-gnu.so",
]
TURBO_FILES = [".gitattributes", "README.md", "model_index.json", "scheduler/scheduler_config.json",
               "transformer/config.json",
               "transformer/diffusion_pytorch_model.safetensors.index.json",
               *[f"transformer/diffusion_pytorch_model-0000{i}-of-00006.safetensors"
                 for i in range(1, 7)]]
NEEDED = [f for f in BASE_FILES if not f.startswith(("lib/", "assets/", ".git", "README"))
          and f != "vae/vae.safetensors"]


def digests(directory: str) -> dict[str, str]:
    out = {}
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file():
            out[str(path.relative_to(directory))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return write_tiny_model(str(tmp_path_factory.mktemp("tiny_a")), seed=0)


# --------------------------------------------------------------------------------------------
# Tiny model
# --------------------------------------------------------------------------------------------

def test_tiny_layout_is_official_and_complete(tiny_dir):
    files = set(digests(tiny_dir))
    expected = {"model_index.json", "scheduler/scheduler_config.json", "transformer/config.json",
                "transformer/diffusion_pytorch_model.safetensors.index.json",
                "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
                "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
                "step_llm/config.json", "step_llm/model.safetensors.index.json",
                "step_llm/model-00001-of-00002.safetensors",
                "step_llm/model-00002-of-00002.safetensors", "step_llm/step1_chat_tokenizer.model",
                "hunyuan_clip/clip_text_encoder/config.json",
                "hunyuan_clip/clip_text_encoder/pytorch_model.bin",
                "hunyuan_clip/tokenizer/vocab.txt", "vae/vae_v2.safetensors", "vae/config.json"}
    assert expected <= files
    assert check_model_dir(tiny_dir)["vae"] == os.path.join(tiny_dir, "vae")


def test_same_seed_same_bytes(tiny_dir, tmp_path):
    again = digests(write_tiny_model(str(tmp_path / "b"), seed=0))
    assert again == digests(tiny_dir)
    other = digests(write_tiny_model(str(tmp_path / "c"), seed=1))
    assert other["transformer/diffusion_pytorch_model-00001-of-00002.safetensors"] != \
        again["transformer/diffusion_pytorch_model-00001-of-00002.safetensors"]
    # The tokenizers come from the corpus, not the seed.
    sp = "step_llm/step1_chat_tokenizer.model"
    assert other[sp] == again[sp]


def test_tiny_same_bytes_across_processes(tiny_dir, tmp_path):
    out = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "stepvideo.tiny", str(out), "--seed", "0"], check=True,
                   capture_output=True, timeout=300, cwd=ROOT)
    assert digests(str(out)) == digests(tiny_dir)


def test_tiny_loads_with_every_loader(tiny_dir):
    from stepvideo.modules.model import StepVideoModel
    from stepvideo.text_encoder.clip import HunyuanClip
    from stepvideo.text_encoder.stepllm import STEP1TextEncoder
    from stepvideo.vae.vae import AutoencoderKL

    dit = StepVideoModel.from_pretrained(tiny_dir)
    llm = STEP1TextEncoder(os.path.join(tiny_dir, "step_llm"))
    clip = HunyuanClip(os.path.join(tiny_dir, "hunyuan_clip"))
    vae = AutoencoderKL.from_pretrained(os.path.join(tiny_dir, "vae"))
    y, mask = llm(["一只猫在月球上行走。", "a cat walks on the moon"])
    c, _ = clip(["一只猫在月球上行走。", "a cat walks on the moon"])
    assert tuple(dit.config.caption_channels) == (y.shape[-1], c.shape[-1])
    assert dit.config.in_channels == vae.config.z_channels == dit.config.out_channels
    assert y.shape == (2, 320, y.shape[-1]) and torch.isfinite(y).all()
    assert 0.3 < float(y.std()) < 10 and 0.3 < float(c.std()) < 10
    state = torch.load(os.path.join(tiny_dir, "hunyuan_clip/clip_text_encoder/pytorch_model.bin"),
                       weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_tokenizers_cover_the_corpus(tiny_dir):
    from stepvideo.text_encoder.clip import load_tokenizer
    from stepvideo.text_encoder.stepllm import StepTokenizer

    sp = StepTokenizer(os.path.join(tiny_dir, "step_llm", "step1_chat_tokenizer.model"))
    bert = load_tokenizer(os.path.join(tiny_dir, "hunyuan_clip", "tokenizer"))
    lines = corpus_lines()
    assert len(lines) >= 300
    assert any("\u4e00" <= ch <= "\u9fff" for ch in "".join(lines))
    for line in lines[::25]:
        assert 0 not in sp.encode(line), line  # no unknown pieces
        assert bert.unk_token_id not in bert(line)["input_ids"], line


def test_tiny_video_end_to_end(tiny_dir):
    from stepvideo.diffusion.video_pipeline import NEG_MAGIC, POS_MAGIC, StepVideoPipeline
    from stepvideo.text_encoder.local import LocalTextEncoder
    from stepvideo.vae.local import LocalVAE

    start = time.monotonic()
    pipe = StepVideoPipeline.from_pretrained(tiny_dir)
    pipe.text_encoder = LocalTextEncoder.from_dirs(os.path.join(tiny_dir, "step_llm"),
                                                   os.path.join(tiny_dir, "hunyuan_clip"),
                                                   torch.float32)
    pipe.vae = LocalVAE.from_dir(os.path.join(tiny_dir, "vae"), torch.float32)
    video = pipe("a cat walks on the moon", height=128, width=128, num_frames=17,
                 num_inference_steps=3, output_type="tensor", neg_magic=NEG_MAGIC,
                 pos_magic=POS_MAGIC)["video"]
    elapsed = time.monotonic() - start
    assert video.shape == (1, 17, 3, 128, 128)
    assert torch.isfinite(video).all() and 0.05 < float(video.float().std()) < 5
    assert elapsed < 120, f"tiny end-to-end run took {elapsed:.1f} s"


def test_cli_help():
    for module in ("stepvideo.tiny", "stepvideo.download"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                             text=True, timeout=120, cwd=ROOT)
        assert out.returncode == 0 and "usage" in out.stdout


# --------------------------------------------------------------------------------------------
# Download selection
# --------------------------------------------------------------------------------------------

def test_base_selection_skips_lib_and_v1_vae():
    (fetch,) = download_plan(turbo=False)
    assert fetch.repo_id == BASE_REPO
    assert sorted(select_files(BASE_FILES, fetch)) == sorted(NEEDED)


def test_turbo_selection_takes_dit_from_turbo_and_the_rest_from_base():
    turbo, base = download_plan(turbo=True)
    assert (turbo.repo_id, base.repo_id) == (TURBO_REPO, BASE_REPO)
    got_turbo = select_files(TURBO_FILES, turbo)
    got_base = select_files(BASE_FILES, base)
    assert sorted(got_turbo) == sorted(f for f in TURBO_FILES if not f.startswith((".", "README")))
    assert not any(f.startswith(("transformer/", "scheduler/", "model_index")) for f in got_base)
    assert sorted(got_turbo + got_base) == sorted(NEEDED)


def test_service_parts_selection():
    (fetch,) = download_plan(parts=SERVICE_PARTS)
    got = select_files(BASE_FILES, fetch)
    assert got and all(f.split("/")[0] in SERVICE_PARTS for f in got)
    assert "vae/vae.safetensors" not in got
    with pytest.raises(ValueError, match="unknown part"):
        download_plan(parts=["transformer", "text"])


def test_download_fetches_the_plan_then_checks(tiny_dir, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, local_dir, allow_patterns, ignore_patterns, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        calls.append(repo_id)
        files = [str(p.relative_to(tiny_dir)) for p in Path(tiny_dir).rglob("*") if p.is_file()]
        for rel in filter_repo_objects(files, allow_patterns=allow_patterns,
                                       ignore_patterns=ignore_patterns):
            os.makedirs(os.path.dirname(os.path.join(local_dir, rel)), exist_ok=True)
            shutil.copy(os.path.join(tiny_dir, rel), os.path.join(local_dir, rel))
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = download(str(tmp_path / "turbo"), turbo=True)
    assert calls == [TURBO_REPO, BASE_REPO]
    assert missing_files(out) == []


# --------------------------------------------------------------------------------------------
# Completeness check
# --------------------------------------------------------------------------------------------

def test_completeness_check_lists_missing_files(tiny_dir, tmp_path):
    broken = str(tmp_path / "broken")
    shutil.copytree(tiny_dir, broken)
    removed = ["step_llm/model-00002-of-00002.safetensors", "step_llm/step1_chat_tokenizer.model",
               "hunyuan_clip/clip_text_encoder/pytorch_model.bin", "vae/vae_v2.safetensors",
               "transformer/diffusion_pytorch_model-00001-of-00002.safetensors"]
    for rel in removed:
        os.remove(os.path.join(broken, rel))
    assert sorted(missing_files(broken)) == sorted(os.path.join(broken, r) for r in removed)
    with pytest.raises(CheckpointError) as err:
        check_model_dir(broken, SERVICE_PARTS)
    message = str(err.value)
    assert "incomplete for step_llm, hunyuan_clip, vae: 4 file(s) missing" in message
    assert "python -m stepvideo.download" in message and "\n" not in message
    assert "transformer" not in message.split("missing:")[1].split("Fix")[0]
    assert check_model_dir(tiny_dir, SERVICE_PARTS)


def test_completeness_check_with_separate_part_dirs(tiny_dir, tmp_path):
    dit_only = tmp_path / "turbo_like"
    shutil.copytree(os.path.join(tiny_dir, "transformer"), dit_only / "transformer")
    shutil.copytree(os.path.join(tiny_dir, "scheduler"), dit_only / "scheduler")
    with pytest.raises(CheckpointError, match="step_llm"):
        check_model_dir(str(dit_only))
    dirs = check_model_dir(str(dit_only), part_dirs={
        "step_llm": os.path.join(tiny_dir, "step_llm"),
        "hunyuan_clip": os.path.join(tiny_dir, "hunyuan_clip"),
        "vae": os.path.join(tiny_dir, "vae")})
    assert dirs["vae"] == os.path.join(tiny_dir, "vae")
    assert dirs["transformer"] == os.path.join(str(dit_only), "transformer")


def test_missing_index_is_reported(tiny_dir, tmp_path):
    broken = tmp_path / "noindex"
    shutil.copytree(tiny_dir, broken)
    os.remove(broken / "transformer" / "diffusion_pytorch_model.safetensors.index.json")
    assert missing_files(str(broken), ["transformer"]) == [
        str(broken / "transformer" / "diffusion_pytorch_model.safetensors.index.json")]


def test_loaders_and_downloader_share_one_check(tiny_dir, tmp_path):
    """A loader names every missing file of its part (before reading weights), exactly those the
    downloader's check lists, with the same fix."""
    from stepvideo.text_encoder.stepllm import STEP1TextEncoder

    broken = tmp_path / "partial"
    shutil.copytree(tiny_dir, broken)
    for rel in ("step_llm/model-00001-of-00002.safetensors", "step_llm/step1_chat_tokenizer.model"):
        os.remove(broken / rel)
    expected = missing_files(str(broken), ["step_llm"])
    assert len(expected) == 2
    with pytest.raises(CheckpointError) as err:
        STEP1TextEncoder(str(broken))          # the model root: the part folder is found in it
    message = str(err.value)
    assert "\n" not in message and f"2 file(s) missing: {', '.join(expected)}." in message
    assert f"python -m stepvideo.download {broken}`" in message
    out = subprocess.run([sys.executable, "-m", "stepvideo.download", str(broken), "--check",
                          "--parts", "step_llm"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 1 and f"2 file(s) missing: {', '.join(expected)}." in out.stderr


def test_tiny_model_is_the_presets(tiny_dir):
    """Every part of the tiny model has its module's PRESETS["tiny"] shapes, and they must fit."""
    import dataclasses
    import json

    from stepvideo.modules.model import PRESETS as DIT, DiTConfig
    from stepvideo.text_encoder.clip import PRESETS as CLIP
    from stepvideo.text_encoder.stepllm import PRESETS as STEP1, Step1Config
    from stepvideo.tiny import TinySizes
    from stepvideo.vae.vae import PRESETS as VAE, VAEConfig

    def read(rel):
        return json.loads(Path(tiny_dir, rel).read_text(encoding="utf-8"))

    assert DiTConfig.from_dict(read("transformer/config.json")) == DIT["tiny"]
    assert Step1Config.from_dict(read("step_llm/config.json")) == STEP1["tiny"]
    assert VAEConfig.from_dict(read("vae/config.json")) == VAE["tiny"]
    clip = read("hunyuan_clip/clip_text_encoder/config.json")
    assert {k: clip[k] for k in CLIP["tiny"].to_dict()} == CLIP["tiny"].to_dict()
    vocab = Path(tiny_dir, "hunyuan_clip/tokenizer/vocab.txt").read_text(encoding="utf-8")
    assert len(vocab.splitlines()) == CLIP["tiny"].vocab_size
    assert TinySizes().z_channels == VAE["tiny"].z_channels
    with pytest.raises(ValueError, match=r"caption_channels \[128, 64\] must be .* \[256, 64\]"):
        TinySizes(step1=dataclasses.replace(STEP1["tiny"], hidden_size=256))
    with pytest.raises(ValueError, match=r"in/out channels \(16, 16\) .* z_channels 8"):
        TinySizes(vae=dataclasses.replace(VAE["tiny"], z_channels=8))


def test_tiny_step_llm_is_a_faithful_miniature(tiny_dir):
    """step_llm/config.json carries every key of the published config (the release's loader reads
    e.g. params_dtype), and the tokenizer passes the release's StepChatTokenizer checks: the six
    control pieces are special (control), the mask markers exist, BOS 1 and EOS 2."""
    import json

    import sentencepiece

    from stepvideo.text_encoder.stepllm import BOS_ID, CONTROL_TOKENS, EOS_ID, MASK_TOKENS

    from stepvideo.conformance import load_json

    published = load_json("manifest_step1_full.json")["config"]
    config = json.loads(Path(tiny_dir, "step_llm/config.json").read_text(encoding="utf-8"))
    assert set(published) <= set(config), sorted(set(published) - set(config))
    assert all(type(config[k]) is type(published[k]) for k in published)
    sp = sentencepiece.SentencePieceProcessor(
        model_file=os.path.join(tiny_dir, "step_llm", "step1_chat_tokenizer.model"))
    special = {sp.id_to_piece(i) for i in range(sp.get_piece_size())
               if sp.is_control(i) or sp.is_unknown(i)}
    vocab = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
    assert set(CONTROL_TOKENS) <= special and set(MASK_TOKENS) <= vocab
    assert (sp.bos_id(), sp.eos_id(), sp.unk_id()) == (BOS_ID, EOS_ID, 0)
    assert sp.get_piece_size() <= config["padded_vocab_size"]
