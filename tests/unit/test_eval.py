"""`tristage eval`: FID (self ~ 0, grows with noise, per class), CLIP score (tiny local CLIP), errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tristage.cli import main
from tristage.train.inference import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyFeatures(torch.nn.Module):
    """A random conv net: (B, 3, H, W) uint8 -> (B, 8) features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.pool = torch.nn.AdaptiveAvgPool2d(2)
        self.proj = torch.nn.Linear(32, 8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1
        return self.proj(torch.tanh(self.pool(self.conv(x))).flatten(1))


def shapes(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    """(n, 3, size, size) uint8: random colour blocks on noise, a varied but fixed image set."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g) * 60
    for i in range(n):
        y, x = torch.randint(0, size // 2, (2,), generator=g).tolist()
        images[i, :, y : y + size // 2, x : x + size // 2] = torch.rand(3, 1, 1, generator=g) * 255
    return images.to(torch.uint8)


def noisy(images: torch.Tensor, std: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (images.float() + std * torch.randn(images.shape, generator=g)).clamp(0, 255).to(torch.uint8)


def test_fid_of_a_set_against_itself_is_about_0():
    images = shapes(64)
    assert abs(evaluate.fid_score(TinyFeatures().eval(), images, images)) < 1e-3


def test_fid_grows_with_added_noise():
    feature, images = TinyFeatures().eval(), shapes(64)
    scores = [evaluate.fid_score(feature, noisy(images, std), images) for std in (0, 10, 30, 60, 100)]
    assert scores == sorted(scores) and scores[-1] > 10 * max(scores[1], 1e-6), scores


def test_reference_statistics_give_the_same_fid():
    feature, images = TinyFeatures().eval(), shapes(64)
    stats = evaluate.statistics(feature, images)
    generated = noisy(images, 30)
    assert evaluate.fid_score(feature, generated, stats) == pytest.approx(
        evaluate.fid_score(feature, generated, images), rel=1e-6
    )


def save_images(images: torch.Tensor, folder: Path, prompt_names: list[str]) -> Path:
    """A `tristage sample`-like folder: PPP_II.png per prompt and image, and settings.json."""
    folder.mkdir(parents=True)
    files = []
    per = len(images) // len(prompt_names)
    for i, image in enumerate(images):
        name = f"{i // per:03d}_{i % per:02d}.png"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / name)
        files.append(name)
    (folder / "settings.json").write_text(json.dumps({"prompt": prompt_names, "files": files}))
    return folder


def test_cli_fid_per_class_and_stats(tmp_path, capsys):
    feature = torch.jit.script(TinyFeatures().eval())
    feature.save(str(tmp_path / "features.pt"))
    classes = ["red circle", "cube"]
    reference = {c: shapes(24, seed=10 + k) for k, c in enumerate(classes)}
    for c, images in reference.items():
        for i, image in enumerate(images):
            (tmp_path / "ref" / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "ref" / c / f"{i}.png")
    samples = save_images(torch.cat([reference[c] for c in classes]), tmp_path / "samples", classes)
    features = ["--features", str(tmp_path / "features.pt")]
    assert main(["eval", str(samples), "--reference", str(tmp_path / "ref"), "--per-class", *features]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["fid_per_class"]["per_class"]) == set(classes)
    assert abs(result["fid_per_class"]["mean"]) < 1e-3  # each class's samples are its references
    stats = tmp_path / "ref.npz"
    ref_dir = str(tmp_path / "ref" / "cube")
    assert main(["eval", "--reference", ref_dir, "--save-stats", str(stats), *features]) == 0
    assert np.load(stats)["mu"].shape == (8,)
    assert (
        main(["eval", str(samples), "--reference", str(stats), *features, "--out", str(tmp_path / "r.json")])
        == 0
    )
    assert json.loads((tmp_path / "r.json").read_text())["fid"] > 0


def tiny_clip(folder: Path) -> Path:
    """A random 2-layer CLIP with a character-level BPE vocabulary, saved like a hub folder."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPTokenizer,
        CLIPVisionConfig,
    )

    folder.mkdir(parents=True)
    chars = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["<|startoftext|>", "<|endoftext|>", "<unk>"] + list(chars) + [c + "</w>" for c in chars]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>"
    )
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    torch.manual_seed(0)
    text = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    model = CLIPModel(
        CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    )
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_score_on_a_tiny_local_clip_is_deterministic(tmp_path):
    clip = tiny_clip(tmp_path / "clip")
    images, prompts = shapes(4), ["a red circle", "a blue square", "a cube", "green"]
    first = evaluate.clip_score(clip, images, prompts)
    assert np.isfinite(first) and 0 <= first <= 100
    assert evaluate.clip_score(clip, images, prompts) == first
    samples = save_images(images, tmp_path / "samples", prompts)
    out = tmp_path / "r.json"
    assert main(["eval", str(samples), "--clip", str(clip), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["clip_score"] == pytest.approx(first, rel=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give a samples folder"),
        (["SAMPLES"], "nothing to measure"),
        (["SAMPLES", "--reference", "REF"], "FID needs a feature extractor"),
        (["SAMPLES", "--clip", "NOWHERE"], "is not a saved CLIP folder"),
        (["NOWHERE", "--clip", "x"], "not a `tristage sample` output"),
        (["--adherence", "NOWHERE"], "not a pipeline folder"),
        (["--adherence", "NOWHERE", "--scorer", "nope"], "no scorer named 'nope'"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, message):
    samples = save_images(shapes(2), tmp_path / "samples", ["x"])
    subs = {"SAMPLES": str(samples), "REF": str(samples), "NOWHERE": str(tmp_path / "nowhere")}
    assert main(["eval", *[subs.get(a, a) for a in args]]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_the_demo_registers_its_adherence_scorer_by_name():
    """``tristage eval --adherence`` finds the demo's scorer through the installed entry point, so the
    evaluator (``train/``) names no demo module (tests/unit/test_layout.py holds that)."""
    from tristage.demo.adherence import score_pipeline
    from tristage.train.inference.scorers import load_scorer, scorer_names

    assert "adherence" in scorer_names() and load_scorer("adherence") is score_pipeline


def test_a_scorer_gets_the_export_loaded_as_users_load_it(tmp_path):
    """The evaluator takes the scorer as an argument and hands it the pipeline ``from_pretrained`` gives."""
    from diffusers import DiTPipeline

    from ..tiny_exports import dit_export

    export, calls = dit_export(tmp_path), []

    def scorer(pipe, per_prompt: int, seed: int) -> dict:
        calls.append((type(pipe), pipe.get_label_ids(["cube"]), per_prompt, seed))
        return {"rate": 0.5}

    assert evaluate.score_export(export, scorer, 3, 7) == {"rate": 0.5}
    assert calls == [(DiTPipeline, [1], 3, 7)]
