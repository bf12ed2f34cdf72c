"""The demo world's stage-1 layouts: two thirds object-centric, every image one shape of its class."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from tristage.demo import synthetic
from tristage.demo.adherence import classify


def test_centred_scenes_stay_near_the_middle_at_every_size() -> None:
    rng = random.Random(0)
    scenes = [synthetic.centred_scene(rng, "red", "square", "white", 64, 64) for _ in range(500)]
    offsets = np.array([(s.cx - 32, s.cy - 32) for s in scenes])
    sides = np.array([s.side for s in scenes])
    assert np.abs(offsets).max() <= 0.05 * 64
    assert np.abs(offsets).max() > 0.04 * 64  # the jitter is used, not a fixed centre
    assert sides.min() >= 0.30 * 64 and sides.max() <= 0.60 * 64
    assert sides.max() - sides.min() > 0.25 * 64  # small and large objects alike


def test_stage1_shards_hold_single_shapes_of_their_class_most_of_them_centred(tmp_path: Path) -> None:
    n = 90
    raw = synthetic.write_stage1(tmp_path, n, size=64, per_shard=n)
    with tarfile.open(raw / "imagenet-00000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    centred = 0
    for name in sorted(k for k in members if k.endswith(".png")):
        label = int(members[name.replace(".png", ".cls")])
        reading = classify(Image.open(io.BytesIO(members[name])).convert("RGB"))
        assert reading.single and reading.colour == synthetic.CLASSES[label][0], name
        centred += reading.position == "centered"
    # CENTRED_SHARE of them object-centric, plus the ninth of the others that land in the middle cell
    expected = n * (synthetic.CENTRED_SHARE + (1 - synthetic.CENTRED_SHARE) / 9)
    assert abs(centred - expected) < 0.15 * n, (centred, expected)
