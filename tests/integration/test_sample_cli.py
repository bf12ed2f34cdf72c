"""`tristage sample`: PNGs per prompt x image, settings.json, every sampler, both pipelines, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tristage.cli import main
from tristage.train.inference.sample import SAMPLERS

from ..conftest import run_cli
from ..tiny_exports import dit_export, pixart_export
from ..unit.test_pixart_interop import SAMPLE

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    return {"dit": dit_export(root / "dit"), "pixart": pixart_export(root / "pixart")}


def pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


def test_pixart_prompts_times_images_and_settings(exports, tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a green triangle\n\n")
    out = tmp_path / "out"
    args = ["sample", str(exports["pixart"]), "--prompt", "a red circle", "--prompt", "a blue square"]
    args += ["--prompt-file", str(prompt_file), "--num-images", "2", "--steps", "2", "--seed", "3"]
    args += ["--negative-prompt", "blurry", "--aspect", "0.5", "--out", str(out)]
    assert main(args) == 0
    assert pngs(out) == [f"{p:03d}_{i:02d}.png" for p in range(3) for i in range(2)]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["prompt"] == ["a red circle", "a blue square"]
    assert settings["seed"] == 3 and settings["steps"] == 2 and settings["num_images"] == 2
    assert settings["negative_prompt"] == "blurry" and settings["sampler"] == "dpm-solver++"
    assert (settings["width"], settings["height"]) == (64, 32)  # native 64 px, aspect h/w 0.5
    assert len(settings["files"]) == 6
    assert Image.open(out / "000_00.png").size == (64, 32)


def test_dit_class_labels(exports, tmp_path):
    out = tmp_path / "out"
    args = ["sample", str(exports["dit"]), "--prompt", "red circle", "--prompt", "cube"]
    assert main([*args, "--num-images", "3", "--steps", "2", "--out", str(out)]) == 0
    assert len(pngs(out)) == 6
    side = SAMPLE * 4  # DiTPipeline draws at the transformer's sample_size x the demo VAE's factor 4
    assert Image.open(out / "001_02.png").size == (side, side)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_each_sampler_runs(exports, tmp_path, sampler):
    out = tmp_path / sampler
    args = ["sample", str(exports["pixart"]), "--prompt", "a red circle", "--steps", "2"]
    assert main([*args, "--sampler", sampler, "--out", str(out)]) == 0
    assert pngs(out) == ["000_00.png"]
    assert json.loads((out / "settings.json").read_text())["sampler"] == sampler


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_no_sampler_clips_the_latents(exports, sampler):
    """DDIM / DDPM default to clipping x0 to [-1, 1]: the demo's latents have std 4, SD's about 1."""
    from diffusers import PixArtAlphaPipeline

    from tristage.train.inference.sample import set_sampler

    pipe = PixArtAlphaPipeline.from_pretrained(exports["pixart"])
    set_sampler(pipe, sampler)
    assert type(pipe.scheduler).__name__ == SAMPLERS[sampler]
    assert not pipe.scheduler.config.get("clip_sample", False)
    assert not pipe.scheduler.config.get("thresholding", False)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "2"], "give at least one --prompt"),
        (["--prompt", "purple", "--steps", "2"], "unknown class label 'purple'"),
        (["--prompt", "cube", "--num-images", "0"], "num-images must be >= 1"),
    ],
)
def test_bad_input_is_one_line_exit_2(exports, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["sample", str(exports["dit"]), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not pngs(out) if out.exists() else True


def test_not_a_pipeline_folder_from_the_command_line(tmp_path):
    result = run_cli("sample", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith("not a pipeline folder (model_index.json missing)")
    assert "Traceback" not in result.stderr


def test_pixart_export_with_a_null_buffer_samples_with_it(exports, tmp_path):
    """data.null_caption: buffer exports keep the buffer; `tristage sample` guides against it, under the
    prompt's mask, exactly as the pipeline does when handed those embeddings."""
    import shutil

    import numpy as np
    import torch

    from tristage.train.inference.sample import load_pipeline
    from tristage.train.models.null_caption import save_buffer

    export = tmp_path / "export"
    shutil.copytree(exports["pixart"], export)
    base = ["--prompt", "a red circle", "--steps", "2", "--seed", "1"]
    assert main(["sample", str(export), *base, "--out", str(tmp_path / "t5")]) == 0
    buffer = torch.randn(32, 64) * 3  # the demo T5: 32 tokens of 64 channels
    save_buffer(buffer, export)
    assert main(["sample", str(export), *base, "--out", str(tmp_path / "buffer")]) == 0
    got = np.asarray(Image.open(tmp_path / "buffer" / "000_00.png"), dtype=np.int16)
    t5_null = np.asarray(Image.open(tmp_path / "t5" / "000_00.png"), dtype=np.int16)
    assert np.abs(got - t5_null).max() > 0  # the buffer changed the guidance

    pipe = load_pipeline(str(export))
    embeds, mask, _, _ = pipe.encode_prompt(
        "a red circle", do_classifier_free_guidance=False, max_sequence_length=32
    )
    want = pipe(
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        negative_prompt=None,
        negative_prompt_embeds=buffer[None],
        negative_prompt_attention_mask=mask,
        num_inference_steps=2,
        guidance_scale=4.5,
        height=got.shape[0],
        width=got.shape[1],
        generator=torch.Generator().manual_seed(1),
        use_resolution_binning=False,
    ).images[0]
    assert np.abs(np.asarray(want, dtype=np.int16) - got).max() <= 1
