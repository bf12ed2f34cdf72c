"""The loader's bounded read-ahead copies of remote shards (``data/remote_cache.py``), on fsspec's
in-memory filesystem (``memory://``, a real fsspec backend; the S3 server tests are in
tests/integration/test_s3.py)."""

from __future__ import annotations

import fsspec
import pytest

from tristage.data.cache_format import CacheError
from tristage.data.remote_cache import ShardCache

SIZE = 1000


@pytest.fixture
def shards():
    fs = fsspec.filesystem("memory")
    urls = [f"memory://bucket/features-{i:05d}.tar" for i in range(5)]
    for i, url in enumerate(urls):
        fs.pipe(url, bytes([i]) * SIZE)
    yield urls
    fs.rm("memory://bucket", recursive=True)


def held_bytes(folder) -> int:
    """Bytes on disk in ``folder``; a fetch in flight may rename its temporary file while we look."""
    total = 0
    for p in folder.iterdir():
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            continue
    return total


def test_copies_stay_under_the_cap_evicting_the_least_recently_used(shards, tmp_path):
    cache = ShardCache(tmp_path / "copies", cap_bytes=int(2.5 * SIZE), sizes=dict.fromkeys(shards, SIZE))
    try:
        for epoch in range(2):
            for i, url in enumerate(shards):
                local = cache.local(url, shards[i + 1 :])
                assert open(local, "rb").read() == bytes([i]) * SIZE  # byte for byte
                held = held_bytes(tmp_path / "copies")
                assert held <= 2.5 * SIZE, (epoch, i, held)
        assert len(list((tmp_path / "copies").iterdir())) == 2  # the current shard and one ahead
    finally:
        cache.close()
    assert not (tmp_path / "copies").exists()


def test_a_shard_larger_than_the_cap_is_one_line(shards, tmp_path):
    with pytest.raises(
        CacheError, match=r"features-00000\.tar: a 0\.00 MiB shard does not fit data\.remote_cache_gb"
    ):
        ShardCache(tmp_path / "copies", cap_bytes=SIZE // 2, sizes={shards[0]: SIZE})


def test_a_new_loader_empties_the_folder_of_an_earlier_run(shards, tmp_path):
    (tmp_path / "copies").mkdir()
    (tmp_path / "copies" / "stale.tar").write_bytes(b"from a cache rebuilt since")
    cache = ShardCache(tmp_path / "copies", cap_bytes=4 * SIZE, sizes=dict.fromkeys(shards, SIZE))
    cache.close()
    assert not (tmp_path / "copies" / "stale.tar").exists()
