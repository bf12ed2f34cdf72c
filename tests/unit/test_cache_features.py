"""Cache pass (frozen VAE + T5 -> feature shards + manifest) and the feature loader.

Everything is built in tmp dirs: synthetic raw shards, a tiny random AutoencoderKL
(factor 8) and the demo T5, both saved with ``save_pretrained`` and loaded back by
path through the same code the real runs use.
"""

from __future__ import annotations

import io
import json
import random
import re
import shutil
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import load_file

from tristage.cli import main as cli_main
from tristage.data.cache_format import tar_members
from tristage.data.features import (
    CacheError,
    FeatureLoader,
    LoaderSpec,
    open_manifest,
    sample_latents,
)
from tristage.data.fingerprint import fingerprint
from tristage.demo import synthetic
from tristage.demo.encoders import write_demo_text_encoder
from tristage.demo.run import source_overrides
from tristage.train.config import Config, load_config
from tristage.train.families import cache_stage, feature_encoders

from ..conftest import ROOT

STAGE1_IMAGES, STAGE1_PER_SHARD = 24, 12
STAGE2_IMAGES = 10
STAGE3_IMAGES = 24
ODD_BUCKET = (64, 128)
LANDSCAPE_BUCKET = (80, 112)  # the demo world is square: these images give the loader a second bucket
LANDSCAPE_IMAGES = 8
BAD_STAGE3 = {"bad_bytes": "undecodable_image", "tiny": "too_small", "wide": "aspect_ratio_out_of_range"}


# -- fixtures: encoders, raw data, configs, cache builds ------------------------------------------
@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> Iterator[dict[str, Path]]:
    """A tiny random VAE (4 blocks -> factor 8, 4 latent channels) and the demo T5 + tokenizer."""
    from diffusers import AutoencoderKL

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared CI cores; the models are tiny
    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    vae.save_pretrained(root / "vae")
    tokenizer, text_encoder = write_demo_text_encoder(root)
    yield {"vae": root / "vae", "tokenizer": tokenizer, "text_encoder": text_encoder}
    torch.set_num_threads(threads)


def stage_config(
    n: int, raw: Path, cache_dir: Path, enc: dict[str, Path], extra: Sequence[str] = ()
) -> Config:
    """demo/configs/stageN.yaml pointed at tmp paths (the override pattern of train.demo)."""
    return load_config(stage_yaml(n), stage_overrides(n, raw, cache_dir, enc, extra))


def stage_yaml(n: int) -> Path:
    return ROOT / "demo" / "configs" / f"stage{n}.yaml"


def stage_overrides(
    n: int, raw: Path, cache_dir: Path, enc: dict[str, Path], extra: Sequence[str] = ()
) -> list[str]:
    overrides = [
        f"run.dir={cache_dir.parent / 'run'}",
        f"data.cache_dir={cache_dir}",
        f"encoders.vae={enc['vae']}",
        "encoders.batch_size=5",  # several encoder batches per shard, one partial
    ]
    if n > 1:
        overrides += [
            f"encoders.text_encoder={enc['text_encoder']}",
            f"encoders.tokenizer={enc['tokenizer']}",
        ]
    return overrides + source_overrides(n, raw) + list(extra)


def cache(cfg: Config) -> dict:
    return cache_stage(cfg, Accelerator())


def shard_samples(cache_dir: Path) -> list[tuple[dict, dict[str, torch.Tensor]]]:
    """(json, tensors) of every sample in every feature shard, read with plain tarfile."""
    out = []
    for shard in sorted(cache_dir.glob("features-*.tar")):
        with tarfile.open(shard) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(n for n in files if n.endswith(".json")):
            key = name[: -len(".json")]
            out.append((json.loads(files[name]), st_load(files[f"{key}.feat.safetensors"])))
    return out


def keys_of(cache_dir: Path) -> list[str]:
    return [meta["key"] for meta, _ in shard_samples(cache_dir)]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, encoders):
    """Stage-1 cache over two ImageNet-style shards of 64 px images."""
    root = tmp_path_factory.mktemp("stage1")
    raw = synthetic.write_stage1(root / "raw", STAGE1_IMAGES, size=80, per_shard=STAGE1_PER_SHARD)
    cfg = stage_config(1, raw, root / "cache", encoders)
    return cfg, cache(cfg)


@pytest.fixture(scope="module")
def stage2(tmp_path_factory, encoders):
    """Stage-2 (text) cache: SA-1B-style tar + LLaVA JSONL captions."""
    root = tmp_path_factory.mktemp("stage2")
    raw = synthetic.write_stage2(root / "raw", STAGE2_IMAGES, size=64)
    cfg = stage_config(2, raw, root / "cache", encoders)
    return cfg, cache(cfg)


def add_stage3_records(raw: Path, names: list[str]) -> None:
    with open(raw / "metadata.jsonl", "a") as meta:
        for name in names:
            record = {
                "file": f"{name}.png",
                "caption": "a red circle on a white background",
                "aesthetic_score": 6.5,
            }
            meta.write(json.dumps(record) + "\n")


def write_bad_stage3_files(raw: Path) -> None:
    """Three unusable images with good scores and captions, appended to the metadata."""
    rng = random.Random(0)
    images = raw / "images"
    (images / "bad_bytes.png").write_bytes(bytes(rng.randrange(256) for _ in range(500)))
    Image.new("RGB", (16, 16), (200, 0, 0)).save(images / "tiny.png")
    Image.new("RGB", (200, 40), (0, 200, 0)).save(images / "wide.png")  # 5:1 (w:h)
    add_stage3_records(raw, list(BAD_STAGE3))


@pytest.fixture(scope="module")
def stage3(tmp_path_factory, encoders):
    """Stage-3 cache: 96 px, score filter, square demo images, landscape 80 x 112 ones, three bad ones."""
    root = tmp_path_factory.mktemp("stage3")
    raw = synthetic.write_stage3(root / "raw", STAGE3_IMAGES)
    rng = random.Random(0)
    for i in range(LANDSCAPE_IMAGES):
        scene = synthetic.placed_scene(rng, "red", "circle", "white", *LANDSCAPE_BUCKET)
        synthetic.render(scene).save(raw / "images" / f"landscape{i}.png")
    add_stage3_records(raw, [f"landscape{i}" for i in range(LANDSCAPE_IMAGES)])
    Image.new("RGB", (210, 120), (0, 0, 200)).save(raw / "images" / "odd.png")  # good, resized and cropped
    add_stage3_records(raw, ["odd"])
    records = [json.loads(line) for line in (raw / "metadata.jsonl").read_text().splitlines()]
    write_bad_stage3_files(raw)
    cfg = stage_config(3, raw, root / "cache", encoders)
    return cfg, cache(cfg), records


# -- cache pass --------------------------------------------------------------------------------
def test_stage1_cache_counts_and_contents(stage1):
    cfg, manifest = stage1
    cache_dir = Path(cfg.data.cache_dir)
    assert manifest["samples"] == STAGE1_IMAGES
    assert [s["file"] for s in manifest["shards"]] == ["features-00000.tar", "features-00001.tar"]
    assert [s["samples"] for s in manifest["shards"]] == [STAGE1_PER_SHARD] * 2
    assert manifest["skipped"] == {}
    assert manifest["null_caption"] is None  # class-conditional: no T5
    assert manifest["class_names"]["0"] == synthetic.class_name(0)
    assert json.loads((cache_dir / "manifest.json").read_text()) == manifest
    samples = shard_samples(cache_dir)
    assert sorted(m["key"] for m, _ in samples) == [f"{i:08d}" for i in range(STAGE1_IMAGES)]
    for meta, tensors in samples:
        assert meta["label"] == int(meta["key"]) % len(synthetic.CLASSES)
        assert (meta["bucket"], meta["original_size"], meta["crop"]) == ([64, 64], [80, 80], [0, 0])
        assert meta["caption"] is None and "tokens" not in meta
        assert set(tensors) == {"mean", "std"}
        for t in tensors.values():
            assert t.shape == (4, 8, 8) and t.dtype == torch.float16
        assert bool((tensors["std"] > 0).all())


def test_bad_images_are_skipped_and_counted_nothing_else_lost(stage3):
    cfg, manifest, records = stage3
    cache_dir = Path(cfg.data.cache_dir)
    good = {Path(r["file"]).stem for r in records if r["aesthetic_score"] > cfg.data.source.min_aesthetic}
    low = len(records) - len(good)
    assert 0 < low < len(records)
    expected = {reason: 1 for reason in BAD_STAGE3.values()} | {"below_aesthetic_threshold": low}
    assert manifest["skipped"] == expected
    skipped = json.loads((cache_dir / "skipped.json").read_text())
    assert skipped["counts"] == expected
    for key, reason in BAD_STAGE3.items():
        assert skipped["examples"][reason] == [key]
    keys = keys_of(cache_dir)
    assert len(keys) == len(set(keys)) == manifest["samples"] == len(good)
    assert set(keys) == good
    buckets = {tuple(m["bucket"]) for m, _ in shard_samples(cache_dir)}
    assert buckets == set(synthetic.STAGE3_SIZES) | {LANDSCAPE_BUCKET, ODD_BUCKET}


def test_stage3_placement_and_feature_shapes(stage3):
    cfg, _, _ = stage3
    for meta, tensors in shard_samples(Path(cfg.data.cache_dir)):
        h, w = meta["bucket"]
        if meta["key"] == "odd":  # 120 x 210 (ratio 0.57) -> 0.50 bucket; scale 128/210 -> 73 x 128
            assert (meta["original_size"], meta["crop"]) == ([120, 210], [4, 0])
            assert (h, w) == ODD_BUCKET
        else:
            assert meta["original_size"] == [h, w] and meta["crop"] == [0, 0]
        assert tensors["mean"].shape == (4, h // 8, w // 8)
        assert tensors["mean"].dtype == torch.bfloat16
        assert 5.0 < meta["score"] and meta["caption"]


def test_resume_remakes_exactly_the_missing_shard(tmp_path, encoders):
    raw = synthetic.write_stage1(tmp_path / "raw", 9, size=64, per_shard=3)
    cfg = stage_config(1, raw, tmp_path / "cache", encoders)
    first = cache(cfg)
    cache_dir = Path(cfg.data.cache_dir)
    keys = keys_of(cache_dir)
    (cache_dir / "features-00001.tar").unlink()
    (cache_dir / "features-00001.done.json").unlink()
    (cache_dir / "features-00000.tar.tmp-123").write_bytes(b"half a shard from a killed run")
    stamps = {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("features-*")}
    second = cache(cfg)
    remade = {p.name for p in cache_dir.glob("features-*") if p.stat().st_mtime_ns != stamps.get(p.name)}
    assert remade == {"features-00001.tar", "features-00001.done.json"}
    assert second == first
    again = keys_of(cache_dir)
    assert sorted(again) == sorted(keys) and len(again) == len(set(again)) == 9


def test_rerun_with_other_resolution_is_one_line_then_rebuild(stage1, encoders, cache_copy, caplog, capsys):
    """Issue 17: `tristage cache` with a changed resolution into an existing folder."""
    cfg, manifest = stage1
    before = {p.name: p.read_bytes() for p in cache_copy.iterdir()}
    raw = Path(cfg.data.source.synsets).parent
    overrides = stage_overrides(1, raw, cache_copy, encoders, ["data.resolution=32"])
    assert cli_main(["cache", str(stage_yaml(1)), *overrides]) == 2  # `tristage cache`, in this process
    assert capsys.readouterr().err.strip().splitlines() == [
        f"tristage cache: error: {cache_copy / 'manifest.json'}: cache was built with a different "
        "'resolution' (cache: '64', config: '32'); use a new data.cache_dir, or rerun "
        "`tristage cache CONFIG --rebuild` to re-encode it"
    ]
    assert {p.name: p.read_bytes() for p in cache_copy.iterdir()} == before  # nothing touched
    rebuilt = cache_stage(load_config(stage_yaml(1), overrides), Accelerator(), rebuild=True)
    assert "re-encoding" in caplog.text and "different 'resolution'" in caplog.text
    assert rebuilt["fingerprint"]["resolution"] == "32" and rebuilt["samples"] == manifest["samples"]
    assert sorted(keys_of(cache_copy)) == sorted(keys_of(Path(cfg.data.cache_dir)))  # nothing lost
    assert {tuple(m["bucket"]) for m, _ in shard_samples(cache_copy)} == {(32, 32)}


def test_rerun_with_other_max_tokens_is_refused(stage2, encoders):
    cfg, _ = stage2
    cache_dir = Path(cfg.data.cache_dir)
    before = {p.name: p.read_bytes() for p in cache_dir.iterdir()}
    raw = Path(cfg.data.source.captions).parent
    changed = stage_config(2, raw, cache_dir, encoders, ["encoders.max_tokens=16"])
    with pytest.raises(CacheError, match=r"different 'max_tokens'"):
        cache(changed)
    assert {p.name: p.read_bytes() for p in cache_dir.iterdir()} == before


def test_text_features_trimmed_to_real_tokens(stage2):
    from transformers import AutoTokenizer, T5EncoderModel

    cfg, manifest = stage2
    cache_dir = Path(cfg.data.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(cfg.encoders.tokenizer)
    t5 = T5EncoderModel.from_pretrained(cfg.encoders.text_encoder).eval()
    captions = {}
    for line in Path(cfg.data.source.captions).read_text().splitlines():
        record = json.loads(line)
        captions[record["id"]] = record["caption"]
    samples = shard_samples(cache_dir)
    assert manifest["samples"] == len(samples) == STAGE2_IMAGES
    lengths = set()
    for meta, tensors in samples:
        assert meta["caption"] == captions[meta["key"]]
        ids = tokenizer(meta["caption"]).input_ids
        assert ids[-1] == tokenizer.eos_token_id
        assert meta["tokens"] == tensors["t5"].shape[0] == len(ids) < cfg.encoders.max_tokens
        assert tensors["t5"].shape[1] == 64 and tensors["t5"].dtype == torch.bfloat16
        with torch.no_grad():  # the caption alone, unpadded: trimming kept exactly its rows
            alone = t5(torch.tensor([ids])).last_hidden_state[0]
        torch.testing.assert_close(
            tensors["t5"].float(), alone.to(torch.bfloat16).float(), atol=2e-2, rtol=2e-2
        )
        lengths.add(len(ids))
    assert len(lengths) > 1  # captions of different lengths were batched together
    assert manifest["null_caption"] == "null_caption.safetensors"
    null = load_file(cache_dir / "null_caption.safetensors")["t5"]
    assert null.shape == (1, 64) and null.dtype == torch.bfloat16


# -- feature loader ---------------------------------------------------------------------------
def spec(**kw) -> LoaderSpec:
    base = dict(global_batch=4, rank=0, world=1, seed=0, shuffle_buffer=8, cond_dropout=0.5, null_label=1000)
    return LoaderSpec(**(base | kw))


def take(loader: FeatureLoader, n: int) -> list[dict]:
    it = iter(loader)
    try:
        return [next(it) for _ in range(n)]
    finally:
        it.close()  # stop the prefetch thread


def test_batches_come_from_one_bucket(stage3):
    cfg, _, _ = stage3
    cache_dir = Path(cfg.data.cache_dir)
    bucket_of = {m["key"]: tuple(m["bucket"]) for m, _ in shard_samples(cache_dir)}
    batches = take(FeatureLoader(cache_dir, spec()), 6)
    seen = set()
    for batch in batches:
        (bucket,) = {bucket_of[k] for k in batch["keys"]}
        seen.add(bucket)
        latents, noise = sample_latents(batch, torch.device("cpu"))
        assert latents.shape == noise.shape == (4, 4, bucket[0] // 8, bucket[1] // 8)
        assert bool((batch["aspect_ratio"] == bucket[0] / bucket[1]).all())
    assert len(seen) > 1


def _assert_same_sample(a: dict, i: int, b: dict, j: int) -> None:
    assert a["keys"][i] == b["keys"][j]
    drawn_a, drawn_b = sample_latents(a, torch.device("cpu")), sample_latents(b, torch.device("cpu"))
    for k, name in enumerate(("latents", "noise")):
        assert torch.equal(drawn_a[k][i], drawn_b[k][j]), name
    assert torch.equal(a["u"][i], b["u"][j])
    if "labels" in a:
        assert a["labels"][i] == b["labels"][j]
    else:
        n = int(a["text_mask"][i].sum())
        assert n == int(b["text_mask"][j].sum())
        assert torch.equal(a["text"][i, :n], b["text"][j, :n])
        assert torch.equal(a["resolution"][i], b["resolution"][j])


@pytest.mark.parametrize("stage", ["stage1", "stage3"])
def test_two_process_slices_equal_one_process_batch(stage, request):
    cfg = request.getfixturevalue(stage)[0]
    cache_dir = Path(cfg.data.cache_dir)
    full = take(FeatureLoader(cache_dir, spec()), 7)  # crosses an epoch boundary in stage 1
    parts = [take(FeatureLoader(cache_dir, spec(rank=r, world=2)), 7) for r in (0, 1)]
    for f, p0, p1 in zip(full, *parts):
        assert p0["position"] == p1["position"] == f["position"]
        assert len(p0["keys"]) == len(p1["keys"]) == 2
        for i in range(4):
            part = p0 if i < 2 else p1
            _assert_same_sample(f, i, part, i % 2)
    dropped = [f["labels"] == 1000 for f in full] if "labels" in full[0] else []
    if dropped:  # cond_dropout=0.5 did drop some labels and kept others
        assert 0 < int(torch.cat(dropped).sum()) < 4 * len(full)


def test_micro_batches_cut_each_process_slice_in_order(stage1):
    """2 processes x 2 micro-batches of 1 see the rows, draws and noise of 1 process x 1 batch of 4,
    and the position moves only after a global batch's last micro-batch."""
    cache_dir = Path(stage1[0].data.cache_dir)
    full = take(FeatureLoader(cache_dir, spec()), 3)
    for rank in (0, 1):
        loader = FeatureLoader(cache_dir, spec(rank=rank, world=2, micro_batches=2))
        it = iter(loader)
        for f in full:
            for micro in range(2):
                batch = next(it)
                assert batch["position"] == (*f["position"][:2], micro) and len(batch["keys"]) == 1
                _assert_same_sample(f, 2 * rank + micro, batch, 0)
                assert loader.state_dict()["next_index"] == f["position"][1] + micro
        it.close()
    with pytest.raises(ValueError, match="not divisible by 2 processes x 3 micro-batches"):
        FeatureLoader(cache_dir, spec(world=2, micro_batches=3))


@pytest.mark.parametrize("k", [3, 7])
def test_resume_continues_with_the_next_batch(stage1, k):
    cache_dir = Path(stage1[0].data.cache_dir)
    reference = take(FeatureLoader(cache_dir, spec()), k + 1)
    first = FeatureLoader(cache_dir, spec())
    take(first, k)
    state = first.state_dict()
    assert state == {
        "epoch": reference[k - 1]["position"][0],
        "next_index": reference[k - 1]["position"][1] + 1,
    }
    resumed = FeatureLoader(cache_dir, spec())
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as it travels through a checkpoint
    (batch,) = take(resumed, 1)
    assert batch["position"] == reference[k]["position"]
    for i in range(4):
        _assert_same_sample(reference[k], i, batch, i)


def test_fingerprint_mismatch_is_one_line_naming_the_field(stage1, encoders):
    cfg, _ = stage1
    cache_dir = Path(cfg.data.cache_dir)
    matching = fingerprint(cfg.data, feature_encoders(cfg))
    FeatureLoader(cache_dir, spec(), expected=matching)  # the matching config is accepted
    raw = Path(cfg.data.source.synsets).parent
    other = stage_config(1, raw, cache_dir, encoders, ["encoders.feature_dtype=float32"])
    with pytest.raises(
        CacheError, match=r"manifest.json: cache fingerprint disagrees .* on 'feature_dtype'"
    ) as err:
        FeatureLoader(cache_dir, spec(), expected=fingerprint(other.data, feature_encoders(other)))
    assert "\n" not in str(err.value) and "float16" in str(err.value) and "float32" in str(err.value)


def test_missing_manifest(tmp_path):
    with pytest.raises(CacheError, match=r"manifest\.json: no feature-cache manifest"):
        open_manifest(tmp_path, None)


@pytest.fixture
def cache_copy(stage1, tmp_path) -> Path:
    return Path(shutil.copytree(stage1[0].data.cache_dir, tmp_path / "cache"))


def test_deleted_shard_is_named(cache_copy):
    (cache_copy / "features-00001.tar").unlink()
    with pytest.raises(CacheError, match=r"features-00001\.tar: shard listed in the manifest is missing"):
        FeatureLoader(cache_copy, spec())


@pytest.mark.parametrize("where", ["feat_header", "json_header", "features", "json"])
def test_corrupt_shard_is_named_when_read(cache_copy, where):
    shard = cache_copy / "features-00001.tar"
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    middle = [m for m in members if m.name.endswith(".json")][len(members) // 4]
    feat = next(m for m in members if m.name == middle.name.replace(".json", ".feat.safetensors"))
    start = {
        "feat_header": feat.offset,  # tarfile stops silently: caught by the manifest's count
        "json_header": middle.offset,  # the stream ends inside a sample
        "features": feat.offset_data,
        "json": middle.offset_data,
    }[where]
    data[start : start + 16] = b"\xff" * 16
    shard.write_bytes(bytes(data))
    loader = FeatureLoader(cache_copy, spec())  # opening checks presence, not content
    named = (
        r"features-00001\.tar: (corrupt feature shard|sample '\d+' lacks json or features"
        r"|damaged cached sample '\d+' \(fails its checksum)"
    )
    with pytest.raises(CacheError, match=named) as err:
        take(loader, 20)  # more than three epochs
    assert "\n" not in str(err.value)


def test_full_dropout_gives_null_labels(stage1):
    (batch,) = take(FeatureLoader(Path(stage1[0].data.cache_dir), spec(cond_dropout=1.0, null_label=1000)), 1)
    assert batch["labels"].tolist() == [1000] * 4


def test_full_dropout_gives_null_text(stage3):
    cache_dir = Path(stage3[0].data.cache_dir)
    null = load_file(cache_dir / "null_caption.safetensors")["t5"]  # (1, C), the cached bf16
    for batch in take(FeatureLoader(cache_dir, spec(cond_dropout=1.0)), 2):
        assert batch["text"].shape == (4, 1, 64) and batch["text"].dtype == torch.bfloat16
        assert torch.equal(batch["text"], null.expand(4, 1, 64))
        assert batch["text_mask"].tolist() == [[1.0]] * 4


def test_no_dropout_keeps_labels(stage1):
    (batch,) = take(FeatureLoader(Path(stage1[0].data.cache_dir), spec(cond_dropout=0.0)), 1)
    assert all(
        int(k) % len(synthetic.CLASSES) == label for k, label in zip(batch["keys"], batch["labels"].tolist())
    )


# -- the loader's zero-copy readers agree with safetensors and webdataset ---------------------------
@pytest.mark.filterwarnings("ignore:The given buffer is not writable")  # FeatureLoader() spends it
def test_safetensors_views_equal_safetensors_load():
    from safetensors.torch import save as st_save

    from tristage.data.cache_format import safetensors_views

    g = torch.Generator().manual_seed(0)
    tensors = {
        "t5": torch.randn(7, 64, generator=g).to(torch.bfloat16),
        "mean": torch.randn(4, 3, 5, generator=g).to(torch.float16),
        "std": torch.rand(2, 2, generator=g),
        "empty": torch.zeros(0, 64, dtype=torch.bfloat16),
        "scalar": torch.tensor(3.5),
    }
    data = st_save(tensors)
    views, reference = safetensors_views(data), st_load(data)
    assert views.keys() == reference.keys() == tensors.keys()
    for name, t in reference.items():
        assert views[name].dtype == t.dtype and views[name].shape == t.shape and torch.equal(views[name], t)
    cut = data[:-10]
    for damaged, message in [
        (cut, "offsets"),
        (b"\xff" * 8 + data[8:], "header size"),
        (data[:8] + b"x" + data[9:], "Expecting value"),
    ]:
        with pytest.raises(Exception, match=message):
            safetensors_views(damaged)


def test_shard_reader_groups_like_webdataset(stage3):
    import webdataset as wds

    from tristage.data.cache_format import shard_samples

    for shard in sorted(Path(stage3[0].data.cache_dir).glob("features-*.tar")):
        ours = [
            {k: v if isinstance(v, str) else bytes(v) for k, v in s.items()}
            for s in shard_samples(str(shard))
        ]
        theirs = wds.WebDataset([str(shard)], shardshuffle=False, empty_check=False, nodesplitter=lambda u: u)
        expected = [{k: v for k, v in s.items() if k not in ("__url__", "__local_path__")} for s in theirs]
        assert [{k: v for k, v in s.items() if k != "__url__"} for s in ours] == expected
        assert len(ours) > 1


@pytest.mark.parametrize(
    ("fmt", "mtime"),
    [(tarfile.USTAR_FORMAT, 1), (tarfile.PAX_FORMAT, 1.5), (tarfile.GNU_FORMAT, 1)],
)
def test_tar_header_reader_agrees_with_tarfile(tmp_path, fmt, mtime):
    """The loader's header-only tar reader finds what tarfile finds: pax records, GNU long names,
    ustar prefixes, empty members, directories skipped."""
    path = tmp_path / "t.tar"
    names = ["a.json", "b" * 120 + "/k.feat.safetensors", "d/" * 60 + "x.json", "empty.txt"]
    with tarfile.open(path, "w", format=fmt) as tar:
        info = tarfile.TarInfo("somedir")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for i, name in enumerate(names):
            payload = bytes(range(i * 37 % 250)) * (i + 1)
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(payload), mtime
            tar.addfile(info, io.BytesIO(payload))
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    assert list(tar_members(memoryview(path.read_bytes()), str(path))) == expected


def test_tar_header_with_bad_checksum_names_shard(tmp_path):
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("a.json")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    data = bytearray(path.read_bytes())
    data[10] ^= 0x01  # a name byte: the stored checksum no longer matches
    with pytest.raises(
        CacheError, match=r"t\.tar: corrupt feature shard \(bad tar header checksum at byte 0\)"
    ):
        list(tar_members(memoryview(bytes(data)), str(path)))


# -- data.null_caption: buffer -------------------------------------------------------------------
def test_buffer_null_caption_keeps_each_caption_length(stage2):
    """A dropped caption of L tokens becomes the buffer's first L rows under its own mask (official)."""
    cache_dir = Path(stage2[0].data.cache_dir)
    buffer = torch.randn(32, 64)
    (kept,) = take(FeatureLoader(cache_dir, spec(cond_dropout=0.0)), 1)
    (dropped,) = take(FeatureLoader(cache_dir, spec(cond_dropout=1.0), null_buffer=buffer), 1)
    assert kept["keys"] == dropped["keys"] and torch.equal(kept["text_mask"], dropped["text_mask"])
    lengths = kept["text_mask"].sum(1).long().tolist()
    assert len(set(lengths)) > 1  # captions of different lengths: the check can fail
    for i, n in enumerate(lengths):
        assert torch.equal(dropped["text"][i, :n], buffer[:n].to(kept["text"].dtype))
        assert not dropped["text"][i, n:].any()


def test_trainer_keeps_the_buffer_through_resume_final_and_export(stage2, tmp_path, caplog):
    import copy

    from tristage.train.conversion.init_from import load_initial_weights
    from tristage.train.families import family_of
    from tristage.train.inference.export import export
    from tristage.train.models.null_caption import BUFFER_FILE, load_buffer
    from tristage.train.training.trainer import Trainer

    cfg = copy.deepcopy(stage2[0])
    cfg.run.dir, cfg.model.size, cfg.data.null_caption = str(tmp_path / "run"), "tiny", "buffer"
    cfg.data.batch_size, cfg.train.max_steps, cfg.checkpoint.every = 2, 1, 1
    cfg.tracking.mode, cfg.validation.every = "disabled", 0
    Trainer(cfg).train()
    buffer = load_buffer(tmp_path / "run")
    assert buffer.shape == (cfg.encoders.max_tokens, cfg.model.caption_channels)
    assert abs(buffer.std().item() * 64**0.5 - 1) < 0.1  # drawn N(0, 1) / sqrt(channels), as PixArt
    assert torch.equal(load_buffer(tmp_path / "run" / "final"), buffer)

    cfg.train.max_steps = 2  # a resumed run keeps its buffer, whatever the seed says now
    cfg.train.seed = 7
    trainer = Trainer(cfg)
    trainer.train()
    assert torch.equal(trainer.loader.null_buffer, buffer)

    nxt = copy.deepcopy(cfg)  # the next stage starts from final/ and gets the same buffer back
    nxt.init_from = str(tmp_path / "run" / "final")
    assert torch.equal(load_initial_weights(family_of("pixart").build(nxt.model, 8), nxt), buffer)
    with caplog.at_level("WARNING"):
        out = export(tmp_path / "run", tmp_path / "export")
    assert torch.equal(load_buffer(out), buffer) and (out / BUFFER_FILE).is_file()
    (line,) = [r.getMessage() for r in caplog.records if BUFFER_FILE in r.getMessage()]
    assert "negative_prompt_embeds" in line and "\n" not in line


def test_validation_samples_with_the_training_null(stage2):
    """Validation's negative embeddings: T5("") by default, the buffer under the prompts' masks with it."""
    from tristage.train.training.validation import Validator

    empty, empty_mask = torch.randn(2, 8, 64), torch.tensor([[1] + [0] * 7] * 2)
    prompt_mask = torch.tensor([[1] * 3 + [0] * 5, [1] * 6 + [0] * 2])
    plain = Validator(stage2[0])._null(empty, empty_mask, prompt_mask)
    assert plain[0] is empty and plain[1] is empty_mask
    buffer = torch.randn(32, 64)
    null, mask = Validator(stage2[0], null_buffer=buffer)._null(empty, empty_mask, prompt_mask)
    assert torch.equal(null, buffer[:8].expand(2, 8, 64)) and mask is prompt_mask


def test_validation_prompts_encoded_in_the_cache_pass(stage2):
    """validation.prompts and "" (the CFG null), each as T5 encodes it alone, padded with zeros and a mask."""
    from safetensors import safe_open
    from transformers import AutoTokenizer, T5EncoderModel

    from tristage.data.cache import VALIDATION_PROMPTS

    cfg, _ = stage2
    with safe_open(str(Path(cfg.data.cache_dir) / VALIDATION_PROMPTS), framework="pt") as stored:
        assert json.loads(stored.metadata()["prompts"]) == list(cfg.validation.prompts) != []
        embeds, mask = stored.get_tensor("embeds"), stored.get_tensor("mask")
    tokenizer = AutoTokenizer.from_pretrained(cfg.encoders.tokenizer)
    t5 = T5EncoderModel.from_pretrained(cfg.encoders.text_encoder).eval()
    for i, text in enumerate([*cfg.validation.prompts, ""]):
        ids = tokenizer(text).input_ids
        assert mask[i].tolist() == [1] * len(ids) + [0] * (mask.shape[1] - len(ids))
        with torch.no_grad():
            alone = t5(torch.tensor([ids])).last_hidden_state[0]
        torch.testing.assert_close(embeds[i, : len(ids)], alone, atol=1e-5, rtol=1e-5)
        assert not embeds[i, len(ids) :].any()


# -- issue 17: bad inputs against the cache ------------------------------------------------------
def flip_tensor_bytes(shard: Path, every: int = 1) -> list[str]:
    """Flip 4 bytes inside the tensor data (past the safetensors header) of every ``every``-th
    sample of a shard -- damage no header check can see.  Returns the damaged keys."""
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        feats = [m for m in tar.getmembers() if m.name.endswith(".feat.safetensors")]
    for m in feats[::every]:
        at = m.offset_data + m.size - m.size // 4  # well inside the last tensor's bytes
        data[at : at + 4] = bytes(b ^ 0xFF for b in data[at : at + 4])
    shard.write_bytes(bytes(data))
    return [m.name.split(".")[0] for m in feats[::every]]


def test_flipped_tensor_bytes_stop_before_use_or_skip(cache_copy, caplog):
    """Issue 17: flipped bytes inside cached tensors -- one line naming shard and key."""
    shard = cache_copy / "features-00001.tar"
    damaged = flip_tensor_bytes(shard, every=4)
    with pytest.raises(CacheError) as err:
        take(FeatureLoader(cache_copy, spec()), 20)
    message = str(err.value)
    assert re.fullmatch(
        rf"{re.escape(str(shard))}: damaged cached sample '(\d+)' \(fails its checksum; the shard's "
        r"bytes changed after the cache pass wrote them\)",
        message,
    )
    assert re.search(r"'(\d+)'", message).group(1) in damaged
    loader = FeatureLoader(cache_copy, spec(on_damaged="skip", cond_dropout=0.0))
    batches = take(loader, 3 * STAGE1_IMAGES // 4)  # three epochs
    seen = {k for b in batches for k in b["keys"]}
    assert seen == set(keys_of(cache_copy)) - set(damaged)  # every intact sample still used
    assert loader.damaged_skipped == 3 * len(damaged)
    skipped = [r.getMessage() for r in caplog.records if "skipped (data.on_damaged=skip)" in r.getMessage()]
    assert all(str(shard) in line for line in skipped)  # prefetched batches may add lines, never fewer
    assert {re.search(r"'(\d+)'", line).group(1) for line in skipped} == set(damaged)
    latents, noise = sample_latents(batches[0], torch.device("cpu"))
    assert latents.shape[0] == noise.shape[0] == len(batches[0]["keys"])


def test_truncated_raw_tar_then_intact_one_needs_rebuild(tmp_path, encoders, caplog, capsys):
    """Issue 17: a truncated raw tar cached, the intact tar put back -- one line, then re-read."""
    raw = synthetic.write_stage1(tmp_path / "raw", 9, size=64, per_shard=3)
    tar = sorted(raw.glob("imagenet-*.tar"))[1]
    intact = tar.read_bytes()
    tar.write_bytes(intact[: len(intact) // 2])
    overrides = stage_overrides(1, raw, tmp_path / "cache", encoders)
    short = cache(load_config(stage_yaml(1), overrides))
    tar.write_bytes(intact)
    capsys.readouterr()  # the first pass's progress bar
    assert cli_main(["cache", str(stage_yaml(1)), *overrides]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"tristage cache: error: features-00001.tar: its raw source changed since it was cached ({tar}: "
        f"{len(intact) // 2} -> {len(intact)} bytes); rerun `tristage cache CONFIG --rebuild` to re-read "
        "the changed units"
    ]
    full = cache_stage(load_config(stage_yaml(1), overrides), Accelerator(), rebuild=True)
    assert (
        f"re-encoding: features-00001.tar: its raw source changed since it was cached ({tar}" in caplog.text
    )
    assert short["samples"] < 9 and full["samples"] == 9 and len(set(keys_of(tmp_path / "cache"))) == 9
    tar.write_bytes(intact)  # the same bytes again (a regenerated world): a new mtime is no change
    assert cache(load_config(stage_yaml(1), overrides)) == full
    tar.write_bytes(intact[:-1] + b"x")  # the same size, other bytes
    with pytest.raises(CacheError, match=r"features-00001\.tar: .*modified since \(same size, other bytes\)"):
        cache(load_config(stage_yaml(1), overrides))


def test_complete_cache_is_recognised_before_any_encoder_loads(
    stage1, cache_copy, encoders, monkeypatch, caplog
):
    """Issue 12 item 5a: a requeued cache job with nothing left to encode loads no VAE or T5."""
    from tristage.data import cache as cache_module

    def no_load(*args, **kwargs):
        raise AssertionError("encoders loaded for a complete cache")

    monkeypatch.setattr(cache_module.Encoders, "load", no_load)
    cfg, manifest = stage1
    raw = Path(cfg.data.source.synsets).parent
    again = cache(stage_config(1, raw, cache_copy, encoders))
    assert again == manifest and f"{cache_copy} is complete ({manifest['samples']} samples)" in caplog.text


def test_vae_weights_edited_mid_file_are_detected(stage1, tmp_path, encoders, monkeypatch):
    """Issue 17: VAE weights edited in place mid-file -- the fingerprint (whole-file digest) changes."""
    from tristage.data.fingerprint import digest_store, weights_digest

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = tmp_path / "big"
    folder.mkdir()
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(bytes(range(256)) * (3 << 12))  # 3 MiB: more than the first and last MiB
    before = weights_digest(str(folder))
    assert str(weights.resolve()) in json.loads(digest_store().read_text())  # one read per machine
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert weights_digest(str(folder)) != before
    # End to end: a cache made with a VAE copy, whose weights are then edited in place.
    vae = Path(shutil.copytree(encoders["vae"], tmp_path / "vae"))
    cfg, _ = stage1
    raw = Path(cfg.data.source.synsets).parent
    mine = stage_config(1, raw, tmp_path / "cache", {**encoders, "vae": vae})
    cache(mine)
    weights = vae / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(
        CacheError, match=r"manifest\.json: cache fingerprint disagrees with the config on 'vae'"
    ):
        FeatureLoader(mine.data.cache_dir, spec(), expected=fingerprint(mine.data, feature_encoders(mine)))
