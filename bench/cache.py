"""``tristage bench cache``: the feature cache against its bare baselines, measured in one run.

* ``loader_vs_raw_read``: :class:`FeatureLoader` samples/s over one epoch of a cache of
  256 px text samples (T5-XXL width, 80 tokens), divided by a plain sequential
  ``open().read()`` of the same shard files in the same order.  The loader's batches hold
  the cached bytes (bf16 moments and T5 rows, padded); the posterior sample and the
  diffusion noise are drawn on the training device (``data.features.sample_latents``),
  so they are not loader work.  The loader verifies every sample's checksum
  (``data/cache_format.py``).  ``checksum_samples_per_s`` is that check alone over the
  same samples, read cold (the first touch of the mapped pages): an upper bound, since
  the loader hashes each payload just after copying it, while it is in the CPU cache.
* ``extract_vs_bare``: the cache pass (read, decode, bucket, VAE + T5, write shards)
  images/s, divided by a bare ``vae.encode`` + T5 forward over the same
  preprocessed batches, on a small random VAE and the demo T5.
* ``bytes_per_sample_256``: shard bytes per sample of a shard written by the cache's
  own :class:`ShardWriter` with 256 px moments and an 80-token T5-XXL caption.
* ``remote_loader_vs_local`` (``--remote``): :class:`FeatureLoader` samples/s over one epoch of the
  same cache read from a loopback S3 server (moto's server, in a child process on 127.0.0.1, reached
  through the standard AWS environment) through the bounded read-ahead copy
  (``data/remote_cache.py``, capped at half the cache, so shards are evicted and every one is
  downloaded during the epoch), divided by the same loader on the local folder.
* ``validate_seconds_*`` (``--remote`` too): the time to check an existing 4-unit cache against its
  moved raw source (``tristage train``'s start-up check: manifest, source listing, unit identities),
  for 4 x 512 and 4 x 2048 samples; ``validate_large_vs_small`` near 1 shows it does not grow with
  the samples (a unit's identity reads at most 2 MiB of it).

Everything is synthetic, in a temp dir, on CPU.  The last line printed is the JSON result.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

TOKENS, WIDTH = 80, 4096  # an 80-token caption at T5-XXL width
CAPTION = " ".join(["a red circle on a white background"] * 11)  # about 80 T5 tokens of text


class FakeEncoders:
    """Stands in for :class:`data.cache.Encoders` where only the shapes matter (writing, loading)."""

    text_encoder = True  # "has text": ShardWriter stores T5 features

    def __init__(self, tokens: int = TOKENS, width: int = WIDTH):
        self.tokens, self.width = tokens, width
        self.g = torch.Generator().manual_seed(0)

    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = pixels.shape
        mean = torch.randn(b, 4, h // 8, w // 8, generator=self.g)
        return mean, torch.rand(b, 4, h // 8, w // 8, generator=self.g) + 0.01

    def encode_text(self, captions: list[str], max_tokens: int) -> list[torch.Tensor]:
        return [torch.randn(min(self.tokens, max_tokens), self.width, generator=self.g) for _ in captions]

    def encode_aligned(self, pixels: torch.Tensor) -> None:
        return None  # no REPA encoder (objective.repa off)


def bench_config(cache_dir: Path, batch_size: int = 16, text_dtype: str = "bfloat16"):
    from tristage.train.config import Config

    cfg = Config()
    cfg.encoders.text_feature_dtype = text_dtype
    cfg.data.cache_dir, cfg.data.resolution = str(cache_dir), 256
    cfg.encoders.batch_size, cfg.encoders.max_tokens, cfg.encoders.feature_dtype = batch_size, 120, "bfloat16"
    return cfg


def write_fake_cache(
    cache_dir: Path, shards: int, per_shard: int, text_dtype: str = "bfloat16"
) -> list[Path]:
    """A cache of 256 px text samples written through ShardWriter and write_manifest."""
    from tristage.data.cache import ShardWriter, shard_path, write_manifest, write_null_caption
    from tristage.data.sources import Skips, Unit

    cache_dir.mkdir(parents=True)
    cfg, encoders = bench_config(cache_dir, text_dtype=text_dtype), FakeEncoders()
    image = Image.new("RGB", (256, 256), (200, 30, 30))
    units = [Unit(i, f"bench[{i}]") for i in range(shards)]
    for unit in units:
        writer = ShardWriter(cfg.encoders, encoders, shard_path(cache_dir, unit))
        for j in range(per_shard):
            key = f"{unit.index:04d}_{j:05d}"
            writer.add(image, _meta(key))
        writer.close(Skips(), per_shard, 0)
    write_null_caption(cfg.encoders, encoders, cache_dir)
    write_manifest(cfg.data.source, units, cache_dir, {"bench": "synthetic"}, 0.18215)
    return [Path(shard_path(cache_dir, u)) for u in units]


def _meta(key: str) -> dict:
    return {
        "key": key,
        "caption": CAPTION,
        "label": None,
        "score": None,
        "original_size": [256, 256],
        "crop": [0, 0],
        "bucket": [256, 256],
    }


# -- bytes per sample ------------------------------------------------------------------------------
def bytes_per_sample(root: Path, text_dtype: str, samples: int = 32) -> float:
    shard = write_fake_cache(
        root / f"bytes_{text_dtype}", shards=1, per_shard=samples, text_dtype=text_dtype
    )[0]
    return shard.stat().st_size / samples


# -- loader vs raw read ------------------------------------------------------------------------------
def raw_read(shards: list[Path], samples: int) -> float:
    """Samples/s of reading the shard files whole, in order (the floor any loader pays)."""
    start = time.perf_counter()
    total = 0
    for shard in shards:
        with open(shard, "rb") as fh:
            total += len(fh.read())
    assert total > 0
    return samples / (time.perf_counter() - start)


def loader_read(cache_dir: Path | str, samples: int, batch: int, data=None) -> float:
    """Samples/s of FeatureLoader batches over ``samples`` (one process, the whole batch decoded);
    ``data``: a DataConfig (a remote cache's read-ahead folder and cap).  The clock starts before the
    loader is built, so a remote cache's first download counts."""
    from tristage.data.features import FeatureLoader, LoaderSpec

    spec = LoaderSpec(
        batch, 1, rank=0, world=1, seed=0, shuffle_buffer=4 * batch, cond_dropout=0.1, null_label=0
    )
    start = time.perf_counter()
    loader = FeatureLoader(cache_dir, spec, data=data)
    it = iter(loader)
    try:
        for _ in range(samples // batch):
            next(it)
        return samples / (time.perf_counter() - start)
    finally:
        it.close()


def checksum_read(shards: list[Path], samples: int) -> float:
    """Samples/s of the loader's per-sample checksum check alone (payloads already mapped)."""
    from tristage.data.cache_format import check_sample, shard_samples

    mapped = [
        dict(s, meta=json.loads(bytes(s["json"]))) for shard in shards for s in shard_samples(str(shard))
    ]
    start = time.perf_counter()
    for sample in mapped:
        check_sample(sample)
    return samples / (time.perf_counter() - start)


def loader_vs_raw(root: Path, shards: int, per_shard: int, batch: int, repeats: int) -> dict:
    files = write_fake_cache(root / "loader", shards, per_shard)
    samples = shards * per_shard
    raw, ours, check = 0.0, 0.0, 0.0
    for _ in range(repeats):  # interleaved, best of each: the same page-cache state for both
        raw = max(raw, raw_read(files, samples))
        ours = max(ours, loader_read(root / "loader", samples, batch))
        check = max(check, checksum_read(files, samples))
    return {
        "raw_read_samples_per_s": raw,
        "loader_samples_per_s": ours,
        "loader_vs_raw_read": ours / raw,
        "checksum_samples_per_s": check,
    }


# -- cache pass vs bare encoders --------------------------------------------------------------------
def extract_config(root: Path, enc: dict[str, Path], raw: Path, batch: int):
    from tristage.demo.run import CONFIGS
    from tristage.train.config import load_config

    overrides = [
        f"run.dir={root / 'run'}",
        f"data.cache_dir={root / 'cache'}",
        f"data.source.paths=[{raw}/sa_*.tar]",
        f"data.source.captions={raw / 'llava_captions.jsonl'}",
        "data.resolution=256",
        f"encoders.vae={enc['vae']}",
        f"encoders.text_encoder={enc['text_encoder']}",
        f"encoders.tokenizer={enc['tokenizer']}",
        f"encoders.batch_size={batch}",
    ]
    return load_config(CONFIGS / "stage2.yaml", overrides)


def cache_pass(cfg, encoders) -> tuple[float, int]:
    """Seconds and images of the cache pass over every unit (encoders already loaded)."""
    from tristage.data.cache import cache_unit
    from tristage.data.sources import open_source

    source = open_source(cfg.data.source)
    Path(cfg.data.cache_dir).mkdir(parents=True, exist_ok=True)
    start, images = time.perf_counter(), 0
    for unit in source.units():
        images += cache_unit(cfg.data, cfg.encoders, encoders, source, unit, Path(cfg.data.cache_dir))
    return time.perf_counter() - start, images


def bare_batches(cfg, encoders) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The cache pass's encoder batches, preprocessed up front: (pixels, token ids, mask)."""
    from tristage.data.cache import decode, to_pixels
    from tristage.data.sources import Skips, open_source

    source, batches, skips = open_source(cfg.data.source), [], Skips()
    n = cfg.encoders.batch_size
    for unit in source.units():  # one bucket (square 256 px): per unit, chunks of the batch size
        items = [d for d in (decode(i, cfg.data, skips) for i in source.read(unit, skips)) if d is not None]
        for s in range(0, len(items), n):
            chunk = items[s : s + n]
            pixels = torch.stack([to_pixels(img) for img, _ in chunk])
            tok = encoders.tokenizer(
                [m["caption"] for _, m in chunk],
                max_length=cfg.encoders.max_tokens,
                truncation=True,
                padding="longest",
                return_tensors="pt",
            )
            batches.append((pixels, tok.input_ids, tok.attention_mask))
    return batches


@torch.no_grad()
def bare_pass(encoders, batches) -> tuple[float, int]:
    start = time.perf_counter()
    for pixels, ids, mask in batches:
        dist = encoders.vae.encode(pixels).latent_dist
        _ = dist.mean, dist.std, encoders.text_encoder(ids, attention_mask=mask).last_hidden_state
    return time.perf_counter() - start, sum(len(b[0]) for b in batches)


def extract_vs_bare(root: Path, images: int, per_shard: int, batch: int, repeats: int) -> dict:
    from tristage.data.cache import Encoders
    from tristage.demo import synthetic
    from tristage.demo.encoders import write_encoders

    enc = write_encoders(root / "encoders")
    raw = synthetic.write_stage2(root / "raw", images, size=256, per_shard=per_shard)
    encoders = Encoders.load(extract_config(root / "x0", enc, raw, batch).encoders, torch.device("cpu"))
    batches = bare_batches(extract_config(root / "x0", enc, raw, batch), encoders)
    ours, bare = 0.0, 0.0
    for r in range(repeats):  # interleaved, best of each
        seconds, n = cache_pass(extract_config(root / f"x{r}", enc, raw, batch), encoders)
        ours = max(ours, n / seconds)
        seconds, n = bare_pass(encoders, batches)
        bare = max(bare, n / seconds)
    return {
        "cache_pass_images_per_s": ours,
        "bare_encoders_images_per_s": bare,
        "extract_vs_bare": ours / bare,
    }


# -- remote shards vs local ------------------------------------------------------------------------
@contextlib.contextmanager
def loopback_s3() -> Iterator[str]:
    """moto's S3 server in a child process on 127.0.0.1; yields a bucket URL.  The AWS variables point
    s3fs at it for this process, the standard way (nothing tristage-specific)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    aws = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in aws}
    os.environ.update(aws)
    try:
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        for _ in range(200):  # the server's start-up
            try:
                fs.mkdir("bench")
                break
            except Exception:  # not listening yet
                time.sleep(0.05)
        yield "s3://bench"
    finally:
        server.terminate()
        server.wait()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def remote_vs_local(root: Path, shards: int, per_shard: int, batch: int, repeats: int) -> dict:
    import fsspec

    from tristage.data.config import DataConfig

    files = write_fake_cache(root / "local", shards, per_shard)
    samples = shards * per_shard
    with loopback_s3() as bucket:
        fsspec.filesystem("s3").put(f"{root / 'local'}/", f"{bucket[5:]}/cache/", recursive=True)
        half = sum(f.stat().st_size for f in files) / 2 / 2**30
        data = DataConfig(
            cache_dir=f"{bucket}/cache", remote_cache_dir=str(root / "copies"), remote_cache_gb=half
        )
        local, remote, download = 0.0, 0.0, 0.0
        for _ in range(repeats):  # interleaved, best of each; two epochs each (the read-ahead's steady state)
            local = max(local, loader_read(root / "local", 2 * samples, batch))
            remote = max(remote, loader_read(f"{bucket}/cache", 2 * samples, batch, data))
            download = max(download, s3_read(f"{bucket}/cache", files, root / "dl"))
    per_sample = sum(f.stat().st_size for f in files) / samples
    return {
        "local_loader_samples_per_s": local,
        "remote_loader_samples_per_s": remote,
        "remote_loader_vs_local": remote / local,
        "remote_loader_vs_s3_download": remote * per_sample / 1e6 / download,
        "local_loader_mb_per_s": local * per_sample / 1e6,  # the bytes the loader consumes
        "s3_download_mb_per_s": download,  # the server's bare rate, one object after another: the bound
    }


def s3_read(url: str, files: list[Path], folder: Path) -> float:
    """MB/s of plain sequential downloads of the shards (fsspec), the remote loader's ceiling."""
    from tristage.data import storage

    folder.mkdir(exist_ok=True)
    start = time.perf_counter()
    for f in files:
        storage.download(f"{url}/{f.name}", folder / f.name)
    return sum(f.stat().st_size for f in files) / 1e6 / (time.perf_counter() - start)


def validate_seconds(root: Path, per_unit: int, repeats: int) -> float:
    """Seconds to check a 4-unit stage-1 cache against its raw source after the folder moved."""
    from accelerate import Accelerator

    from tristage.data.cache_check import training_shards
    from tristage.data.features import open_manifest
    from tristage.data.fingerprint import fingerprint
    from tristage.demo import synthetic
    from tristage.demo.encoders import demo_vae_path
    from tristage.demo.run import CONFIGS
    from tristage.train.config import load_config
    from tristage.train.families import feature_encoders
    from tristage.train.training.stage_cache import cache_stage

    raw = synthetic.write_stage1(root / "raw", 4 * per_unit, size=64, per_shard=per_unit)
    args = [f"data.cache_dir={root / 'cache'}", f"encoders.vae={demo_vae_path()}", f"run.dir={root / 'run'}"]
    cache_stage(load_config(CONFIGS / "stage1.yaml", [*args, *_stage1_source(raw)]), Accelerator())
    moved = raw.rename(root / "moved")
    cfg = load_config(CONFIGS / "stage1.yaml", [*args, *_stage1_source(moved)])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        manifest = open_manifest(cfg.data.cache_dir, fingerprint(cfg.data, feature_encoders(cfg)))
        assert len(training_shards(manifest, cfg.data.cache_dir, cfg.data.source, warn=False)) == 4
        best = min(best, time.perf_counter() - start)
    return best


def _stage1_source(raw: Path) -> list[str]:
    return [f"data.source.paths=[{raw}/imagenet-*.tar]", f"data.source.synsets={raw / 'synsets.txt'}"]


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tristage bench cache", description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4, help="loader bench: feature shards")
    parser.add_argument("--per-shard", type=int, default=64, help="loader bench: samples per shard")
    parser.add_argument("--batch", type=int, default=32, help="loader bench: global batch")
    parser.add_argument("--images", type=int, default=32, help="extraction bench: raw 256 px images")
    parser.add_argument("--encode-batch", type=int, default=16, help="extraction bench: encoder batch")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; best of each side")
    parser.add_argument(
        "--remote", action="store_true", help="only the loopback-S3 loader ratio and the validation time"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads, the same for both sides of each ratio"
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = arguments().parse_args(argv)
    torch.set_num_threads(args.threads)  # shared CPUs: more threads than free cores only adds noise
    result: dict = {}
    if args.remote:
        return remote_main(args)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # text_feature_dtype=float8_e4m3fn (per-token scaled); bf16 T5 alone is 655,360 bytes
        result["bytes_per_sample_256"] = bytes_per_sample(root, "float8_e4m3fn")
        result["bytes_per_sample_256_bf16"] = bytes_per_sample(root, "bfloat16")
        print(
            f"bytes per cached 256 px sample, 80 T5-XXL tokens: {result['bytes_per_sample_256']:.0f} "
            f"(fp8 T5), {result['bytes_per_sample_256_bf16']:.0f} (bf16 T5)"
        )
        loader = loader_vs_raw(root, args.shards, args.per_shard, args.batch, args.repeats)
        print(
            f"loader {loader['loader_samples_per_s']:.0f} samples/s vs raw read "
            f"{loader['raw_read_samples_per_s']:.0f} samples/s: {loader['loader_vs_raw_read']:.3f}"
        )
        per_unit = max(args.encode_batch, args.images // 2)  # two units: one shard per unit
        extract = extract_vs_bare(root, args.images, per_unit, args.encode_batch, args.repeats)
        print(
            f"cache pass {extract['cache_pass_images_per_s']:.1f} images/s vs bare encoders "
            f"{extract['bare_encoders_images_per_s']:.1f} images/s: {extract['extract_vs_bare']:.3f}"
        )
    result.update(loader | extract)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()


def remote_main(args: argparse.Namespace) -> dict:
    """``--remote``: loader throughput from a loopback S3 server against local disk, and the time to
    validate a 4-unit cache after a path change at two sample counts."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        result = remote_vs_local(root / "remote", args.shards, args.per_shard, args.batch, args.repeats)
        print(
            f"loader from loopback S3 {result['remote_loader_samples_per_s']:.0f} samples/s vs local "
            f"{result['local_loader_samples_per_s']:.0f} samples/s: {result['remote_loader_vs_local']:.3f} "
            f"(local loader {result['local_loader_mb_per_s']:.0f} MB/s, bare S3 download "
            f"{result['s3_download_mb_per_s']:.0f} MB/s)"
        )
        # Both past 2 MiB per tar (512 samples of 64 px: ~2.3 MB), what a unit's identity reads at most
        # (storage.DIGEST_SPAN at each end): the check must cost the same for 4x the samples.
        small = validate_seconds(root / "v512", 512, 20)  # best of 20: milliseconds on a shared machine
        large = validate_seconds(root / "v2048", 2048, 20)
        result.update(
            validate_seconds_4x512=small, validate_seconds_4x2048=large, validate_large_vs_small=large / small
        )
        print(
            f"validate a moved 4-unit cache: {small * 1e3:.1f} ms (4 x 512 samples), "
            f"{large * 1e3:.1f} ms (4 x 2048)"
        )
    print(json.dumps(result), flush=True)
    return result
