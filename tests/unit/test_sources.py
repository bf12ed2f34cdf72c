"""Raw source readers: what they yield, and every item they cannot use counted under a reason."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from tristage.data.config import SourceConfig
from tristage.data.sources import (
    AestheticFolder,
    ImageNetFolders,
    ImageNetWds,
    SamLlava,
    Skips,
    SourceError,
    class_names,
    expand,
    load_captions,
    open_source,
)
from tristage.demo import synthetic
from tristage.errors import ConfigError


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
        ("x.json", "[1]"),
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


def test_an_unknown_source_kind_is_refused_where_it_is_declared():
    with pytest.raises(ConfigError, match=r"^key 'data\.source\.kind': 'laion' is not one of imagenet_wds, "):
        SourceConfig(kind="laion", paths=["x"])


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


# -- ImageNet class folders ----------------------------------------------------------------------
def write_imagenet_folders(root: Path) -> Path:
    """ILSVRC train layout: three synset folders (one not in synsets.txt), a stray non-image file."""
    files = {
        "n002": ["n002_1.JPEG", "n002_0.JPEG"],
        "n001": ["n001_0.JPEG", "n001_1.png", "n001_2.txt"],
        "n009": ["n009_0.JPEG"],
    }
    for synset, names in files.items():
        (root / "train" / synset).mkdir(parents=True)
        for name in names:
            (root / "train" / synset / name).write_bytes(image_bytes() if "txt" not in name else b"notes")
    (root / "synsets.txt").write_text("n002 goldfish\nn001 tench, Tinca tinca\n")
    return root


def test_imagenet_folders_labels_follow_synsets_line_order(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageNetFolders, "CHUNK", 2)
    root = write_imagenet_folders(tmp_path)
    cfg = SourceConfig(
        kind="imagenet_folders", paths=[str(root / "train")], synsets=str(root / "synsets.txt")
    )
    source = open_source(cfg)
    assert isinstance(source, ImageNetFolders)
    assert [u.name for u in source.units()] == [f"{root / 'train'}[{s}:{s + 2}]" for s in (0, 2, 4)]
    items, skips = read_all(source)
    # sorted folders, sorted files; n001 is line 1, n002 line 0
    assert [(i.key, i.label) for i in items] == [("n001_0", 1), ("n001_1", 1), ("n002_0", 0), ("n002_1", 0)]
    assert items[0].image == (root / "train" / "n001" / "n001_0.JPEG").read_bytes()
    assert skips.counts == {"not_an_image": 1, "unknown_synset": 1}
    assert skips.examples == {"not_an_image": ["n001_2"], "unknown_synset": ["n009_0"]}


def test_imagenet_folders_without_synsets_use_sorted_folder_names(tmp_path):
    root = write_imagenet_folders(tmp_path)
    items, skips = read_all(open_source(SourceConfig(kind="imagenet_folders", paths=[str(root / "train")])))
    assert [(i.key, i.label) for i in items] == [
        ("n001_0", 0),
        ("n001_1", 0),
        ("n002_0", 1),
        ("n002_1", 1),
        ("n009_0", 2),
    ]
    assert skips.counts == {"not_an_image": 1}


# -- SAM captions as per-id text files -----------------------------------------------------------
TXT_CAPTIONS = {"sa_1": b"a red circle\n", "sa_2": b"\xffa broken caption", "sa_3": b"  \n", "sa_9": b"x"}


def write_txt_captions(root: Path, form: str) -> Path:
    if form == "folder":
        (root / "captions").mkdir()
        for key, text in TXT_CAPTIONS.items():
            (root / "captions" / f"{key}.txt").write_bytes(text)
        return root / "captions"
    name = {"tar": "captions.tar", "tar.gz": "captions.tar.gz"}[form]
    with tarfile.open(root / name, "w:gz" if form == "tar.gz" else "w") as tar:
        for key, text in TXT_CAPTIONS.items():
            info = tarfile.TarInfo(f"captions/{key}.txt")
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
    return root / name


@pytest.mark.parametrize("form", ["tar", "tar.gz", "folder"])
def test_sam_captions_from_per_id_text_files(tmp_path, form):
    jpg = image_bytes("JPEG")
    members = [(f"sa_{i}.jpg", jpg) for i in (1, 2, 3, 4)] + [("sa_5.json", b"{}")]
    tar = write_tar(tmp_path / "sa_000000.tar", members)
    captions = write_txt_captions(tmp_path, form)
    source = open_source(SourceConfig(kind="sam_llava", paths=[str(tar)], captions=str(captions)))
    items, skips = read_all(source)
    assert [(i.key, i.caption) for i in items] == [("sa_1", "a red circle")]
    assert skips.counts == {"non_utf8_text": 1, "missing_caption": 2, "missing_image": 1}
    assert skips.examples == {
        "non_utf8_text": ["sa_2"],
        "missing_caption": ["sa_3", "sa_4"],
        "missing_image": ["sa_5"],
    }


def test_non_utf8_caption_json_is_a_named_source_error(tmp_path):
    tar = write_tar(tmp_path / "sa.tar", [("sa_1.jpg", image_bytes("JPEG"))])
    (tmp_path / "c.json").write_bytes(b'{"sa_1": "caf\xe9"}')
    with pytest.raises(SourceError, match=r"c\.json: unreadable caption file \(UnicodeDecodeError"):
        open_source(SourceConfig(kind="sam_llava", paths=[str(tar)], captions=str(tmp_path / "c.json")))


# -- aesthetic metadata as parquet ---------------------------------------------------------------
PARQUET_RECORDS = [
    {"file": "keep.png", "caption": "a red circle", "aesthetic_score": 6.2},
    {"file": "low.png", "caption": "a red circle", "aesthetic_score": 4.0},
    {"file": "nan.png", "caption": "a red circle", "aesthetic_score": float("nan")},
    {"file": "null.png", "caption": "a red circle", "aesthetic_score": None},
    {"file": "mute.png", "caption": None, "aesthetic_score": 7.0},
    {"file": "gone.png", "caption": "a red circle", "aesthetic_score": 7.0},
]


def test_aesthetic_folder_reads_parquet_metadata(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    cfg = write_aesthetic(tmp_path, [], ["keep.png", "low.png", "nan.png", "null.png", "mute.png"])
    table = pa.Table.from_pylist(PARQUET_RECORDS).append_column("url", pa.array(["u"] * len(PARQUET_RECORDS)))
    pq.write_table(table, tmp_path / "meta.parquet")
    cfg.metadata = str(tmp_path / "meta.parquet")
    items, skips = read_all(open_source(cfg))
    assert [(i.key, i.score, i.caption) for i in items] == [("keep", 6.2, "a red circle")]
    assert skips.counts == {"below_aesthetic_threshold": 3, "missing_caption": 1, "missing_image": 1}
    assert skips.examples["below_aesthetic_threshold"] == ["low", "nan", "null"]
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    cfg.metadata = str(tmp_path / "broken.parquet")
    with pytest.raises(SourceError, match=r"broken\.parquet: unreadable parquet"):
        open_source(cfg)


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    cfg = write_aesthetic(tmp_path, [], ["a.png"])
    (tmp_path / "meta.parquet").write_bytes(b"PAR1")
    cfg.metadata = str(tmp_path / "meta.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(SourceError) as err:
        open_source(cfg)
    assert str(err.value) == f"{cfg.metadata}: parquet metadata needs pyarrow; pip install pyarrow " + (
        "(or tristage[parquet])"
    )


# -- webdataset tars with captions ---------------------------------------------------------------
def test_aesthetic_wds_applies_threshold_and_counts(tmp_path):
    jpg, png = image_bytes("JPEG"), image_bytes("PNG")

    def meta(score, caption="a red circle") -> bytes:
        return json.dumps({"caption": caption, "aesthetic_score": score}).encode()

    members = [
        ("keep.jpg", jpg),
        ("keep.json", meta(6.5)),
        ("low.jpg", jpg),
        ("low.json", meta(4.5)),
        ("unscored.jpg", jpg),
        ("unscored.json", json.dumps({"caption": "c"}).encode()),
        ("latin.jpg", jpg),
        ("latin.json", b'{"caption": "caf\xe9", "aesthetic_score": 9}'),
        ("broken.jpg", jpg),
        ("broken.json", b'{"caption": '),
        ("noimg.json", meta(8.0)),
        ("mute.png", png),
        ("mute.json", meta(8.0, caption="  ")),
        ("also.png", png),
        ("also.json", meta(5.5, caption=" a blue square ")),
    ]
    tar = write_tar(tmp_path / "aes-0.tar", members)
    source = open_source(SourceConfig(kind="aesthetic_wds", paths=[str(tar)], min_aesthetic=5.0))
    items, skips = read_all(source)
    assert [(i.key, i.score, i.caption) for i in items] == [
        ("keep", 6.5, "a red circle"),
        ("also", 5.5, "a blue square"),
    ]
    assert items[0].image == jpg and items[1].image == png
    assert skips.counts == {
        "below_aesthetic_threshold": 2,
        "non_utf8_text": 1,
        "bad_json": 1,
        "missing_image": 1,
        "missing_caption": 1,
    }
    assert skips.examples["below_aesthetic_threshold"] == ["low", "unscored"]


def test_generic_wds_reads_txt_or_json_captions(tmp_path):
    jpg = image_bytes("JPEG")
    members = [
        ("a/k0.jpg", jpg),
        ("a/k0.txt", b"from txt"),
        ("a/k1.png", jpg),
        ("a/k1.json", b'{"caption": "from caption"}'),
        ("a/k2.jpg", jpg),
        ("a/k2.json", b'{"text": "from text", "width": 40}'),
        ("a/k3.jpg", jpg),
        ("a/k3.json", b'{"url": "x"}'),
        ("a/k4.jpg", jpg),
        ("a/k4.txt", b"\xfe\xff"),
        ("a/k5.txt", b"no image"),
        ("a/k6.jpg", jpg),
        ("a/k6.json", b"[1, 2]"),
    ]
    tars = [write_tar(tmp_path / "w-0.tar", members), write_tar(tmp_path / "w-1.tar", members[:2])]
    source = open_source(SourceConfig(kind="wds", paths=[str(tmp_path / "w-*.tar")]))
    assert [u.name for u in source.units()] == [str(t) for t in tars]
    items, skips = read_all(source)
    assert [(i.key, i.caption) for i in items] == [
        ("a_k0", "from txt"),
        ("a_k1", "from caption"),
        ("a_k2", "from text"),
        ("a_k0", "from txt"),
    ]
    assert all(i.score is None and i.label is None for i in items)
    assert skips.counts == {"missing_caption": 1, "non_utf8_text": 1, "missing_image": 1, "bad_json": 1}
    assert skips.examples == {
        "missing_caption": ["a_k3"],
        "non_utf8_text": ["a_k4"],
        "missing_image": ["a_k5"],
        "bad_json": ["a_k6"],
    }


def test_caption_pass_reads_uncaptioned_images_too(tmp_path):
    """need_captions=False (the caption pass): a missing or unreadable caption is no skip, the image
    comes with caption None; everything else is still counted."""
    jpg = image_bytes("JPEG")
    members = [("k0.jpg", jpg), ("k0.txt", b"alt text"), ("k1.jpg", jpg), ("k2.jpg", jpg)]
    members += [("k2.txt", b"\xfe"), ("k3.txt", b"no image")]
    write_tar(tmp_path / "w-0.tar", members)
    cfg = SourceConfig(kind="wds", paths=[str(tmp_path / "w-0.tar")])
    items, skips = read_all(open_source(cfg, need_captions=False))
    assert [(i.key, i.caption) for i in items] == [("k0", "alt text"), ("k1", None), ("k2", None)]
    assert skips.counts == {"missing_image": 1}
    records = [{"file": "a.png", "caption": "", "aesthetic_score": 7.0}]
    items, skips = read_all(open_source(write_aesthetic(tmp_path / "aes", records, ["a.png"]), False))
    assert [(i.key, i.caption) for i in items] == [("a", None)] and not skips.counts
    sam = SourceConfig(kind="sam_llava", paths=[str(tmp_path / "w-0.tar")])  # no caption file yet
    assert [i.key for i in read_all(open_source(sam, need_captions=False))[0]] == ["k0", "k1", "k2"]
    with pytest.raises(SourceError, match="imagenet_wds has class labels, not captions"):
        open_source(SourceConfig(kind="imagenet_wds", paths=[str(tmp_path / "w-0.tar")]), False)


def test_wds_caption_file_replaces_the_tars_captions(tmp_path):
    """`tristage caption` output for a generic webdataset: joined by sample key, the tars' own
    captions ignored, a key the file lacks counted as missing_caption."""
    jpg = image_bytes("JPEG")
    write_tar(tmp_path / "w-0.tar", [("a/k0.jpg", jpg), ("a/k0.txt", b"alt"), ("a/k1.jpg", jpg)])
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"id": "a_k0", "caption": "a detailed caption"}) + "\n")
    cfg = SourceConfig(kind="wds", paths=[str(tmp_path / "w-0.tar")], captions=str(captions))
    items, skips = read_all(open_source(cfg))
    assert [(i.key, i.caption) for i in items] == [("a_k0", "a detailed caption")]
    assert skips.counts == {"missing_caption": 1} and skips.examples["missing_caption"] == ["a_k1"]
