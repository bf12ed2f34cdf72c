"""The demo world's layouts: stage 1 object-centric; in the text stages the caption fixes the layout."""

from __future__ import annotations

import io
import json
import random
import re
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from tristage.demo import synthetic
from tristage.demo.adherence import classify

SIZE_WORDS = ("small", "large")


@pytest.mark.parametrize("height,width", [(64, 64), *synthetic.STAGE3_SIZES])
def test_centred_scenes_sit_at_the_middle_at_one_size(height: int, width: int) -> None:
    rng = random.Random(0)
    scenes = [synthetic.centred_scene(rng, "red", "square", "white", height, width) for _ in range(50)]
    assert {(s.cx, s.cy) for s in scenes} == {(width / 2, height / 2)}
    assert {s.side for s in scenes} == {synthetic.OBJECT_SIDE * min(height, width)}
    assert not any(s.placed for s in scenes)


@pytest.mark.parametrize("height,width", [(64, 64), *synthetic.STAGE3_SIZES])
def test_placed_scenes_fit_and_land_in_every_cell_at_both_sizes(height: int, width: int) -> None:
    rng = random.Random(1)
    scenes = [synthetic.placed_scene(rng, "blue", "circle", "gray", height, width) for _ in range(400)]
    short = min(height, width)
    assert {round(s.side / short, 2) for s in scenes} == set(synthetic.SIDES.values())
    cells = set()
    for s in scenes:
        assert s.side / 2 <= s.cx <= width - s.side / 2 and s.side / 2 <= s.cy <= height - s.side / 2
        cells.add((min(int(3 * s.cy / height), 2), min(int(3 * s.cx / width), 2), s.side))
    assert len(cells) == 18  # 9 cells x 2 sizes, a large shape in a corner cell included


def test_captions_name_size_and_position_only_for_placed_shapes() -> None:
    rng = random.Random(2)
    for _ in range(200):
        scene = synthetic.text_scene(rng, "green", "triangle", "black", 64, 64)
        text = synthetic.caption(scene, rng)
        assert synthetic.core_phrase("green", "triangle", "black") in text
        named = [w for w in SIZE_WORDS if w in re.findall(r"\w+", text)] + [
            p for p in synthetic.POSITIONS.values() if p in text
        ]
        assert len(named) == (2 if scene.placed else 0), text


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_stage1_shards_hold_one_centred_shape_of_their_class(tmp_path: Path) -> None:
    n = 54
    raw = synthetic.write_stage1(tmp_path, n, size=64, per_shard=n)
    members = _members(raw / "imagenet-00000.tar")
    for name in sorted(k for k in members if k.endswith(".png")):
        colour, shape = synthetic.CLASSES[int(members[name.replace(".png", ".cls")])]
        reading = classify(Image.open(io.BytesIO(members[name])).convert("RGB"))
        assert reading.single and (reading.colour, reading.shape) == (colour, shape), name
        assert reading.position == "centered", name


def test_stage2_captions_agree_with_what_the_classifier_reads(tmp_path: Path) -> None:
    """The words a caption uses are what the independent classifier reads from the image."""
    n = 90
    raw = synthetic.write_stage2(tmp_path, n, per_shard=n)
    lines = (raw / "llava_captions.jsonl").read_text().splitlines()
    captions = {r["id"]: r["caption"] for r in map(json.loads, lines)}
    members = _members(raw / "sa_000000.tar")
    plain = 0
    for image_id, text in captions.items():
        reading = classify(Image.open(io.BytesIO(members[f"{image_id}.jpg"])).convert("RGB"))
        assert reading.single and reading.shape in text and reading.colour in text, (image_id, text)
        words = re.findall(r"\w+", text)
        if not any(w in words for w in SIZE_WORDS):
            plain += 1
            assert reading.position == "centered", (image_id, text)
            continue
        assert reading.size in words and reading.position in text, (image_id, text, reading)
    assert abs(plain - n * synthetic.PLAIN_SHARE) < 0.15 * n, plain


def test_stage3_images_are_the_demo_stage3_buckets() -> None:
    """The stage-3 world is drawn at the resolution demo/configs/stage3.yaml trains at (and the report
    samples at), each image exactly one of that resolution's aspect buckets (no resize, no crop)."""
    from tristage.data.buckets import bucket_table, choose_bucket
    from tristage.demo.run import CONFIGS
    from tristage.train.config import load_config

    data = load_config(CONFIGS / "stage3.yaml").data
    assert data.resolution == synthetic.STAGE3_RESOLUTION and data.multi_aspect
    table = bucket_table(data.resolution)
    assert [choose_bucket(h, w, table) for h, w in synthetic.STAGE3_SIZES] == list(synthetic.STAGE3_SIZES)
    assert synthetic.STAGE3_SIZES[0] == (synthetic.STAGE3_RESOLUTION, synthetic.STAGE3_RESOLUTION)
