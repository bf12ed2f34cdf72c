"""Aspect-ratio buckets: PixArt's tables, nearest-ratio choice, resize + centre crop."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)
from PIL import Image

from tristage.data.buckets import (
    MULTIPLE,
    Placement,
    RatioOutOfRange,
    bucket_table,
    choose_bucket,
    fit,
    place,
)


@pytest.mark.parametrize(
    "resolution, diffusers_table, entries",
    [
        (256, ASPECT_RATIO_256_BIN, {"1.0": (256, 256), "0.25": (128, 512), "4.0": (512, 128)}),
        (512, ASPECT_RATIO_512_BIN, {"1.0": (512, 512), "0.25": (256, 1024), "4.0": (1024, 256)}),
        (1024, ASPECT_RATIO_1024_BIN, {"1.0": (1024, 1024), "0.25": (512, 2048), "4.0": (2048, 512)}),
    ],
)
def test_standard_tables_are_diffusers(resolution, diffusers_table, entries):
    table = bucket_table(resolution)
    assert len(table) == len(diffusers_table) > 30
    assert table == {k: (int(h), int(w)) for k, (h, w) in diffusers_table.items()}
    assert all(table[k] == v for k, v in entries.items())
    assert all(isinstance(side, int) for hw in table.values() for side in hw)
    ratios = sorted(float(k) for k in table)
    assert ratios[0] == 0.25 and ratios[-1] == 4.0


def test_demo_table_128():
    table = bucket_table(128)
    sides = set(table.values())
    assert {(128, 128), (96, 160), (160, 96)} <= sides
    assert all(h % MULTIPLE == 0 and w % MULTIPLE == 0 and min(h, w) >= MULTIPLE for h, w in sides)
    for key, (h, w) in table.items():  # keys are the rounded sides' real ratio
        assert float(key) == pytest.approx(h / w, abs=0.0051)
    assert len(sides) == len(table) > 10


@pytest.mark.parametrize(
    "height, width, resolution, expected",
    [
        (100, 100, 128, (128, 128)),
        (60, 100, 128, (96, 160)),  # 0.60 exactly
        (101, 60, 128, (160, 96)),  # 1.68 -> 1.67
        (300, 300, 256, (256, 256)),
        (1000, 1000 * 4, 256, (128, 512)),  # exactly 4:1 is still allowed
        (770, 1000, 1024, (896, 1152)),  # 0.77 -> 0.78, between 0.72 and 0.82
    ],
)
def test_choose_bucket_picks_the_nearest_ratio(height, width, resolution, expected):
    table = bucket_table(resolution)
    assert choose_bucket(height, width, table) == expected
    distance = {v: abs(float(k) - height / width) for k, v in table.items()}
    assert distance[expected] == min(distance.values())


@pytest.mark.parametrize("height, width", [(500, 100), (100, 401), (10, 1000)])
def test_ratio_beyond_four_raises(height, width):
    with pytest.raises(RatioOutOfRange, match=r"aspect ratio [\d.]+ outside \[1/4, 4\]"):
        choose_bucket(height, width, bucket_table(256))


def striped(width: int, height: int, edge: int) -> Image.Image:
    """Blue image with ``edge`` red columns on the left and right and green rows top/bottom."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[...] = (0, 0, 255)
    arr[:, :edge] = arr[:, width - edge :] = (255, 0, 0)
    arr[:edge] = arr[height - edge :] = (0, 255, 0)
    return Image.fromarray(arr)


def test_fit_resizes_to_cover_then_centre_crops():
    image = striped(200, 100, edge=5)  # w=200, h=100
    out, where = fit(image, (96, 160))
    assert out.size == (160, 96)
    # scale = max(96/100, 160/200) = 0.96 -> 192 x 96; (192 - 160) / 2 = 16 columns cut each side
    assert where == Placement(bucket=(96, 160), original=(100, 200), crop=(0, 16))
    arr = np.asarray(out).astype(int)
    assert (np.abs(arr[:, 0] - [0, 0, 255]).max(axis=1) < 60)[10:-10].all()  # red side columns cropped away
    assert (np.abs(arr[0, 40:-40] - [0, 255, 0]).max(axis=1) < 60).all()  # rows kept: green border survives


def test_fit_upscales_small_images():
    out, where = fit(Image.new("RGB", (40, 30)), (128, 128))
    assert out.size == (128, 128)
    assert where.original == (30, 40) and where.crop == (0, (171 - 128) // 2)


def test_place_square_mode_centre_crops():
    image = striped(100, 60, edge=8)  # w=100, h=60
    out, where = place(image, 64, multi_aspect=False)
    assert out.size == (64, 64)
    # scale 64/60 -> 107 x 64; left = (107 - 64) // 2
    assert where == Placement(bucket=(64, 64), original=(60, 100), crop=(0, 21))
    arr = np.asarray(out).astype(int)
    assert np.abs(arr[32, :5] - [0, 0, 255]).max() < 60 and np.abs(arr[32, -5:] - [0, 0, 255]).max() < 60


def test_place_multi_aspect_uses_the_table():
    out, where = place(Image.new("RGB", (100, 60)), 128, multi_aspect=True)
    assert out.size == (160, 96) and where.bucket == (96, 160)
    out, where = place(Image.new("RGB", (50, 50)), 128, multi_aspect=True)
    assert out.size == (128, 128) and where.crop == (0, 0)


@pytest.mark.parametrize("multi_aspect", [True, False])
def test_place_refuses_beyond_four_to_one(multi_aspect):
    with pytest.raises(RatioOutOfRange, match="outside"):
        place(Image.new("RGB", (500, 100)), 128, multi_aspect=multi_aspect)
