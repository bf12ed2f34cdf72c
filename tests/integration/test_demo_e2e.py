"""A shortened end-to-end demo: synthetic data -> cache -> stages 1-3 -> exports -> samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DiTPipeline, PixArtAlphaPipeline

from tristage.demo import synthetic
from tristage.demo.run import run_demo

from ..conftest import run_cli


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    run_demo(out, fast=True)
    return out


def test_demo_writes_everything(demo_dir):
    for n in (1, 2, 3):
        stage = demo_dir / f"stage{n}"
        assert (stage / "config.yaml").is_file()
        assert (stage / "final" / "transformer" / "config.json").is_file()
        assert (stage / "loss.png").stat().st_size > 0
        assert list((stage / "wandb").glob("offline-run-*")), "no offline W&B run"
        assert len(list((stage / "validation").glob("step_*.png"))) == 1  # one grid, at the last step
        assert list((stage / "wandb").glob("offline-run-*/files/media/images/validation/grid_*.png"))
        assert (demo_dir / "cache" / f"stage{n}" / "manifest.json").is_file()
    report = json.loads((demo_dir / "report.json").read_text())
    assert report["stage1"]["samples"] == 18 * 2 and report["held_out"]["samples"] == 12 * 2
    assert report["seen"]["samples"] == 12  # the held-out prompts on a trained background, 1 each
    exports = {"stage1": str(demo_dir / "stage1" / "export"), "stage3": str(demo_dir / "export")}
    assert report["exports"] == exports
    assert [s["export"] for s in report["stages"]][::2] == [exports["stage1"], exports["stage3"]]
    assert (demo_dir / "samples.png").is_file() and (demo_dir / "stage1" / "samples.png").is_file()
    assert (demo_dir / "samples_seen.png").is_file()


def test_stage3_skipped_low_aesthetic(demo_dir):
    manifest = json.loads((demo_dir / "cache" / "stage3" / "manifest.json").read_text())
    assert manifest["skipped"].get("below_aesthetic_threshold", 0) > 0
    buckets = {tuple(b) for b in _buckets(demo_dir / "cache" / "stage3")}
    assert buckets == set(synthetic.STAGE3_SIZES)  # square only (synthetic.STAGE3_SIZES says why)


def _buckets(cache):
    import webdataset as wds

    for shard in sorted(cache.glob("features-*.tar")):
        for sample in wds.WebDataset([str(shard)], shardshuffle=False, empty_check=False):
            yield json.loads(sample["json"])["bucket"]


def test_dit_export_opens_and_maps_labels(demo_dir):
    pipe = DiTPipeline.from_pretrained(demo_dir / "stage1" / "export")
    assert pipe.labels["red circle"] == 0 and pipe.labels["orange triangle"] == 17
    assert pipe.transformer.config.num_embeds_ada_norm == 1000  # null class id 1000 exists
    g = torch.Generator().manual_seed(0)
    images = pipe(pipe.get_label_ids(["blue square"]), num_inference_steps=3, generator=g).images
    assert np.asarray(images[0]).shape == (64, 64, 3)


def test_pixart_export_opens_and_generates(demo_dir):
    pipe = PixArtAlphaPipeline.from_pretrained(demo_dir / "export")
    g = torch.Generator().manual_seed(0)
    out = pipe(
        "a red triangle on a black background",
        num_inference_steps=3,
        height=128,
        width=128,
        use_resolution_binning=False,
        generator=g,
    ).images
    assert np.asarray(out[0]).shape == (128, 128, 3)


def test_resolved_config_reruns_stage(demo_dir, tmp_path):
    result = run_cli(
        "train", str(demo_dir / "stage1" / "config.yaml"), f"run.dir={tmp_path}", "train.max_steps=2"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "final" / "transformer" / "config.json").is_file()


def test_export_cli(demo_dir, tmp_path):
    result = run_cli("export", str(demo_dir / "stage2"), str(tmp_path / "p"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        json.loads((tmp_path / "p" / "model_index.json").read_text())["_class_name"] == "PixArtAlphaPipeline"
    )


def test_sample_defaults_to_the_trained_size(demo_dir, tmp_path):
    from PIL import Image

    from tristage.cli import main

    args = ["sample", str(demo_dir / "export"), "--prompt", "a red circle", "--steps", "2"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    size = synthetic.STAGE3_RESOLUTION  # what stage 3 trains at (not the nominal 32 latents * 4)
    assert Image.open(tmp_path / "000_00.png").size == (size, size)
