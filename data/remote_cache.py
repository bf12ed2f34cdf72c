"""A bounded local read-ahead cache of remote feature shards, for the loader.

The loader memory-maps its shards (``data/cache_format.py``).  A shard on an object store is first
copied whole into ``data.remote_cache_dir``; the loader knows each epoch's shard order in advance,
so while it decodes one shard a thread fetches the next ones.  The folder holds at most
``data.remote_cache_gb`` per process: a fetch that would pass the cap first evicts the least
recently used shards that are neither being read nor waiting to be.  Evicting a file the loader
still maps is safe on POSIX (the pages live until unmapped; the space is freed then).  The copies
are byte-for-byte, so every sample's checksum is still verified when its batch is built.

Each process keeps its own folder (``rank{R}``) and empties it when it starts: a copy left by an
earlier run may be of a shard rebuilt since.
"""

from __future__ import annotations

import shutil
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import xxhash

from tristage.data import storage
from tristage.data.cache_format import CacheError


class ShardCache:
    """Local copies of remote shards, at most ``cap_bytes``, fetched ahead of use."""

    def __init__(self, folder: Path, cap_bytes: int, sizes: dict[str, int], ahead: int = 2):
        """``sizes``: url -> bytes of every shard the loader may read (from one listing)."""
        self.folder, self.cap, self.sizes, self.ahead = folder, cap_bytes, sizes, ahead
        biggest = max(sizes.items(), key=lambda kv: kv[1], default=("", 0))
        if biggest[1] > cap_bytes:
            raise CacheError(
                f"{biggest[0]}: a {biggest[1] / 2**20:.2f} MiB shard does not fit data.remote_cache_gb "
                f"({cap_bytes / 2**20:.2f} MiB); raise it"
            )
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        self.present: OrderedDict[str, Path] = OrderedDict()  # url -> local copy, least recent first
        self.pending: dict[str, Future] = {}
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard-fetch")

    def local(self, url: str, following: list[str]) -> str:
        """The local path of ``url`` (waiting for its fetch), after queueing fetches of the next
        ``ahead`` of ``following`` that fit beside it.  Called from one thread (the loader's)."""
        if not self._start(url, keep={url}):
            self._drain()  # the fetches in flight finish first; then they may be evicted too
            self._start(url, keep={url})
        if url in self.pending:
            self.present[url] = self.pending.pop(url).result()
        self._settle()
        self.present.move_to_end(url)
        for nxt in following[: self.ahead]:
            if not self._start(nxt, keep={url, nxt}):
                break
        return str(self.present[url])

    def _start(self, url: str, keep: set[str]) -> bool:
        """Queue a fetch of ``url`` unless present or queued; False when it cannot fit yet."""
        if url in self.present or url in self.pending:
            return True
        if not self._make_room(self.sizes.get(url, 0), keep):
            return False
        self.pending[url] = self.pool.submit(self._fetch, url)
        return True

    def _make_room(self, need: int, keep: set[str]) -> bool:
        """Evict least recently used copies (not in ``keep``, not in flight) until ``need`` fits."""
        used = sum(self.sizes.get(u, 0) for u in [*self.present, *self.pending])
        for url in list(self.present):
            if used + need <= self.cap:
                break
            if url not in keep:
                self.present.pop(url).unlink(missing_ok=True)
                used -= self.sizes.get(url, 0)
        return used + need <= self.cap

    def _fetch(self, url: str) -> Path:
        local = self.folder / f"{xxhash.xxh3_64_hexdigest(url.encode())}-{storage.basename(url)}"
        storage.download(url, local)
        return local

    def _settle(self) -> None:
        """Move finished fetches into ``present`` (a failed one raises here, in the loader)."""
        for url, future in list(self.pending.items()):
            if future.done():
                self.present[url] = self.pending.pop(url).result()

    def _drain(self) -> None:
        for url in list(self.pending):
            self.present[url] = self.pending.pop(url).result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.folder, ignore_errors=True)
