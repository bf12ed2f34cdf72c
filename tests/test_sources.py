"""Raw source readers: what they yield, and every item they cannot use counted under a reason."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data import synthetic
from data.sources import (
    AestheticFolder,
    ImageNetWds,
    SamLlava,
    Skips,
    SourceError,
    class_names,
    expand,
    load_captions,
    open_source,
)
from train.config import SourceConfig


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (40, 32), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def read_all(source, skips: Skips | None = None) -> tuple[list, Skips]:
    skips = skips if skips is not None else Skips()
    return [item for unit in source.units() for item in source.read(unit, skips)], skips


# -- ImageNet webdataset -------------------------------------------------------------------------
def test_imagenet_reads_png_and_jpg_with_labels(tmp_path):
    png, jpg = image_bytes("PNG"), image_bytes("JPEG", colour=(10, 200, 10))
    write_tar(tmp_path / "a.tar", [("k0.png", png), ("k0.cls", b"3"), ("k1.jpg", jpg), ("k1.cls", b" 17\n")])
    write_tar(tmp_path / "b.tar", [("k2.jpeg", jpg), ("k2.cls", b"0")])
    source = ImageNetWds(SourceConfig(kind="imagenet_wds", paths=[str(tmp_path / "*.tar")]))
    assert [u.name for u in source.units()] == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    items, skips = read_all(source)
    assert [(i.key, i.label) for i in items] == [("k0", 3), ("k1", 17), ("k2", 0)]
    assert [i.image for i in items] == [png, jpg, jpg]
    assert all(i.caption is None and i.score is None for i in items)
    assert skips.counts == {}


def test_imagenet_counts_missing_and_non_utf8_once_each(tmp_path):
    png = image_bytes()
    members = [
        ("good.png", png),
        ("good.cls", b"5"),
        ("nocls.png", png),
        ("noimg.cls", b"2"),
        ("badcls.png", png),
        ("badcls.cls", b"\xff\xfe"),
        ("word.png", png),
        ("word.cls", b"tench"),
        ("last.png", png),
        ("last.cls", b"1"),
    ]
    source = ImageNetWds(
        SourceConfig(kind="imagenet_wds", paths=[str(write_tar(tmp_path / "s.tar", members))])
    )
    items, skips = read_all(source)
    assert [(i.key, i.label) for i in items] == [("good", 5), ("last", 1)]
    assert skips.counts == {"missing_image_or_class": 3, "non_utf8_text": 1}  # one reason per item
    assert skips.examples == {
        "missing_image_or_class": ["nocls", "noimg", "word"],
        "non_utf8_text": ["badcls"],
    }


@pytest.fixture
def good_tar(tmp_path) -> tuple[Path, list[tarfile.TarInfo]]:
    """A valid six-sample ImageNet-style tar and its member table."""
    members = []
    for i in range(6):
        members += [(f"{i:03d}.png", image_bytes(size=(40 + 8 * i, 32))), (f"{i:03d}.cls", str(i).encode())]
    path = write_tar(tmp_path / "full.tar", members)
    with tarfile.open(path) as tar:
        return path, tar.getmembers()


def complete_before(members: list[tarfile.TarInfo], cut: int) -> list[str]:
    """Keys all of whose members end before byte ``cut``."""
    keys: dict[str, bool] = {}
    for m in members:
        key = m.name.split(".")[0]
        keys[key] = keys.get(key, True) and m.offset_data + m.size <= cut
    return [k for k, ok in keys.items() if ok]


@pytest.mark.parametrize("where", ["half", "at_header", "in_header", "in_data"])
def test_truncated_tar_keeps_prefix_and_counts_corrupt_tar(good_tar, tmp_path, where):
    path, members = good_tar
    data = path.read_bytes()
    end = members[-1].offset_data + members[-1].size
    cut = {
        "half": len(data) // 2,
        "at_header": members[6].offset,  # tarfile would end here silently, as if complete
        "in_header": members[6].offset + 100,
        "in_data": members[6].offset_data + 50,
    }[where]
    assert 0 < cut < end
    cut_path = tmp_path / "cut.tar"
    cut_path.write_bytes(data[:cut])
    source = ImageNetWds(SourceConfig(kind="imagenet_wds", paths=[str(cut_path)]))
    items, skips = read_all(source)
    expected = complete_before(members, cut)
    assert 0 < len(expected) < 6
    assert [i.key for i in items] == expected
    assert skips.counts["corrupt_tar"] == 1
    assert skips.examples["corrupt_tar"][0].startswith(f"{cut_path}: ")
    assert set(skips.counts) <= {"corrupt_tar", "missing_image_or_class"}  # a half-read sample is counted


def test_damaged_header_in_the_middle_is_counted(good_tar, tmp_path):
    path, members = good_tar
    data = bytearray(path.read_bytes())
    data[members[4].offset : members[4].offset + 32] = b"\xff" * 32
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    items, skips = read_all(ImageNetWds(SourceConfig(kind="imagenet_wds", paths=[str(bad)])))
    assert [i.key for i in items] == ["000", "001"]
    assert skips.counts == {"corrupt_tar": 1}


def test_intact_tar_is_not_reported_corrupt(good_tar):
    path, _ = good_tar
    items, skips = read_all(ImageNetWds(SourceConfig(kind="imagenet_wds", paths=[str(path)])))
    assert len(items) == 6 and skips.counts == {}


def test_synthetic_stage1_round_trip(tmp_path):
    raw = synthetic.write_stage1(tmp_path, 7, size=32, per_shard=4)
    cfg = SourceConfig(
        kind="imagenet_wds", paths=[str(raw / "imagenet-*.tar")], synsets=str(raw / "synsets.txt")
    )
    items, skips = read_all(open_source(cfg))
    assert [i.label for i in items] == [i % len(synthetic.CLASSES) for i in range(7)]
    assert skips.counts == {}
    names = class_names(cfg)
    assert len(names) == len(synthetic.CLASSES) and names[4] == synthetic.class_name(4)


# -- SAM + LLaVA ---------------------------------------------------------------------------------
CAPTIONS = {"sa_1": "a red circle", "sa_2": "a blue square", "sa_4": "   ", "sa_5": "a green triangle"}


def write_captions(path: Path, form: str) -> Path:
    if form == "jsonl":
        path.write_text("".join(json.dumps({"id": k, "caption": v}) + "\n" for k, v in CAPTIONS.items()))
    elif form == "dict":
        path.write_text(json.dumps(CAPTIONS))
    else:
        path.write_text(json.dumps([{"id": k, "caption": v} for k, v in CAPTIONS.items()]))
    return path


@pytest.mark.parametrize("form", ["jsonl", "dict", "list"])
def test_sam_llava_joins_images_and_captions_by_id(tmp_path, form):
    jpg = image_bytes("JPEG")
    meta = json.dumps({"image": {"image_id": 1}}).encode()
    members = [
        ("sa_1.jpg", jpg),
        ("sa_1.json", meta),
        ("sa_2.jpg", jpg),
        ("sa_3.jpg", jpg),
        ("sa_4.jpg", jpg),
    ]
    members += [("sa_5.json", meta)]  # caption but no image
    tar = write_tar(tmp_path / "sa_000000.tar", members)
    name = {"jsonl": "c.jsonl", "dict": "c.json", "list": "c.json"}[form]
    captions = write_captions(tmp_path / name, form)
    assert load_captions(str(captions)) == CAPTIONS
    source = SamLlava(SourceConfig(kind="sam_llava", paths=[str(tar)], captions=str(captions)))
    items, skips = read_all(source)
    assert [(i.key, i.caption) for i in items] == [("sa_1", "a red circle"), ("sa_2", "a blue square")]
    assert all(i.image == jpg and i.label is None for i in items)
    assert skips.counts == {"missing_caption": 2, "missing_image": 1}
    assert skips.examples == {"missing_caption": ["sa_3", "sa_4"], "missing_image": ["sa_5"]}


def test_sam_llava_needs_a_readable_caption_file(tmp_path):
    tar = write_tar(tmp_path / "sa.tar", [("sa_1.jpg", image_bytes("JPEG"))])
    with pytest.raises(SourceError, match=r"data\.source\.captions: sam_llava needs a caption file"):
        SamLlava(SourceConfig(kind="sam_llava", paths=[str(tar)]))
    for name, text in [
        ("broken.json", "{not json"),
        ("nocap.json", '[{"id": "sa_1"}]'),
        ("x.jsonl", '{"c": 1}\n'),
    ]:
        (tmp_path / name).write_text(text)
        with pytest.raises(SourceError, match=rf"{name}: unreadable caption file"):
            SamLlava(SourceConfig(kind="sam_llava", paths=[str(tar)], captions=str(tmp_path / name)))
    with pytest.raises(SourceError, match=r"source path matches nothing: .*nowhere\.jsonl"):
        SamLlava(SourceConfig(kind="sam_llava", paths=[str(tar)], captions=str(tmp_path / "nowhere.jsonl")))


# -- aesthetic folder ----------------------------------------------------------------------------
def write_aesthetic(root: Path, records: list[dict], files: list[str]) -> SourceConfig:
    (root / "images").mkdir(parents=True)
    for name in files:
        (root / "images" / name).write_bytes(image_bytes())
    (root / "meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return SourceConfig(
        kind="aesthetic_folder",
        paths=[str(root / "images")],
        metadata=str(root / "meta.jsonl"),
        min_aesthetic=5.0,
    )


def test_aesthetic_folder_filters_and_counts(tmp_path):
    records = [
        {"file": "keep.png", "caption": "a red circle", "aesthetic_score": 6.2},
        {"file": "low.png", "caption": "a red circle", "aesthetic_score": 4.0},
        {"file": "edge.png", "caption": "a red circle", "aesthetic_score": 5.0},  # "above" is strict
        {"file": "unscored.png", "caption": "a red circle"},
        {"file": "gone.png", "caption": "a red circle", "aesthetic_score": 7.0},
        {"file": "mute.png", "caption": " ", "aesthetic_score": 7.0},
        {"file": "also.png", "caption": "a blue square", "aesthetic_score": 5.01},
    ]
    files = ["keep.png", "low.png", "edge.png", "unscored.png", "mute.png", "also.png"]
    source = open_source(write_aesthetic(tmp_path, records, files))
    items, skips = read_all(source)
    assert [(i.key, i.score, i.caption) for i in items] == [
        ("keep", 6.2, "a red circle"),
        ("also", 5.01, "a blue square"),
    ]
    assert items[0].image == (tmp_path / "images" / "keep.png").read_bytes()
    assert skips.counts == {"below_aesthetic_threshold": 3, "missing_image": 1, "missing_caption": 1}
    assert skips.examples["below_aesthetic_threshold"] == ["low", "edge", "unscored"]
    assert skips.examples["missing_image"] == ["gone"]


def test_aesthetic_units_cover_every_record_once(tmp_path, monkeypatch):
    monkeypatch.setattr(AestheticFolder, "CHUNK", 2)
    names = [f"{i:02d}.png" for i in range(5)]
    records = [{"file": n, "caption": "c", "aesthetic_score": 9} for n in names]
    source = open_source(write_aesthetic(tmp_path, records, names))
    assert len(source.units()) == 3
    items, _ = read_all(source)
    assert [i.key for i in items] == [f"{i:02d}" for i in range(5)]


def test_aesthetic_bad_metadata_line_is_named(tmp_path):
    cfg = write_aesthetic(tmp_path, [{"file": "a.png", "caption": "c", "aesthetic_score": 9}], ["a.png"])
    with open(cfg.metadata, "a") as fh:
        fh.write("{truncated\n")
    with pytest.raises(SourceError, match=r"meta\.jsonl:2: not valid JSON"):
        open_source(cfg)
    cfg.metadata = None
    with pytest.raises(SourceError, match=r"data\.source\.metadata: aesthetic_folder needs a metadata JSONL"):
        open_source(cfg)


# -- paths, kinds, class names -------------------------------------------------------------------
def test_expand_keeps_order_and_names_the_empty_pattern(tmp_path):
    for name in ("b.tar", "a.tar", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    assert expand([str(tmp_path / "c.txt"), str(tmp_path / "*.tar")]) == [
        str(tmp_path / "c.txt"),
        str(tmp_path / "a.tar"),
        str(tmp_path / "b.tar"),
    ]
    for missing in (str(tmp_path / "*.zip"), str(tmp_path / "nope.tar")):
        with pytest.raises(SourceError, match=r"source path matches nothing: ") as err:
            expand([str(tmp_path / "a.tar"), missing])
        assert str(err.value).endswith(missing)


def test_open_source_unknown_kind_names_it():
    with pytest.raises(
        SourceError, match=r"data\.source\.kind: unknown source 'laion'; known: imagenet_wds, "
    ):
        open_source(SourceConfig(kind="laion", paths=["x"]))


def test_class_names_parses_synsets(tmp_path):
    synsets = tmp_path / "synsets.txt"
    synsets.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\nn01484850  great white shark \n\n")
    names = class_names(SourceConfig(kind="imagenet_wds", synsets=str(synsets)))
    assert names == {0: "tench, Tinca tinca", 1: "goldfish", 2: "great white shark"}
    assert class_names(SourceConfig(kind="imagenet_wds")) == {}


def test_skips_cap_examples_and_merge():
    a = Skips()
    for i in range(25):
        a.add("too_small", f"k{i}")
    assert a.counts["too_small"] == 25 and a.examples["too_small"] == [f"k{i}" for i in range(20)]
    b = Skips()
    b.add("too_small", "x")
    b.merge(a.to_dict())
    assert b.counts["too_small"] == 26 and len(b.examples["too_small"]) == 20
    assert b.examples["too_small"][0] == "x"
