"""What an existing cache folder holds against what this config would write.

Every shard's done marker records the fingerprint it was encoded under and the (size, mtime,
content hash) of each raw file its features came from (``source.unit_files``).  Before a cache pass touches
anything, :func:`stale_units` compares them with the config and the raw files as they are now:

* a different fingerprint (in the manifest or any marker) means the folder holds features of
  another configuration -- every done unit is stale;
* a changed raw file (a truncated tar replaced by the intact one, an edited caption file) makes
  the units that read it stale.

Without ``--rebuild`` the pass stops with one line naming the key or file; with it, exactly the
stale units are re-encoded.  Every rank computes the same answer from the same files, so the
decision needs no collective.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import xxhash

from tristage.data.cache_format import FORMAT, MANIFEST, done_marker, shard_name
from tristage.data.fingerprint import first_difference
from tristage.data.sources import Unit

REBUILD_HINT = "rerun `tristage cache CONFIG --rebuild`"


def stamp(files: list[str]) -> dict[str, list]:
    """path -> [size, mtime_ns, xxh3-64 of the content].  Taken just before the unit is read, so the
    hash's read leaves the file in the page cache for the reader."""
    out = {}
    for name in files:
        st = os.stat(name)
        out[name] = [st.st_size, st.st_mtime_ns, content_digest(name)]
    return out


def content_digest(path: str) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def source_change(old: dict[str, list], files: list[str]) -> str | None:
    """How the first of a unit's raw files changed since its stamp, or None.  Size and mtime decide;
    a new mtime at the same size is hashed, so a file rewritten with the same bytes (a regenerated
    demo world, a copy) is not a change."""
    for path in [*files, *(p for p in old if p not in files)]:
        before = old.get(path)
        if before is None:
            return f"{path} was not read before"
        if path not in files:
            return f"{path} is no longer read"
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return f"{path} is gone"
        if st.st_size != before[0]:
            return f"{path}: {before[0]} -> {st.st_size} bytes"
        if st.st_mtime_ns != before[1] and content_digest(path) != before[2]:
            return f"{path}: modified since (same size, other bytes)"
    return None


def differing_key(expected: dict[str, str], found: dict[str, str] | None) -> str | None:
    """The fingerprint field that differs; a cache of another format is named as such first."""
    if found is None or found.get("cache_format") != FORMAT:
        return "cache_format"
    return first_difference(expected, found)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def fingerprint_reason(where: Path, key: str, expected: dict, found: dict | None) -> str:
    old = (found or {}).get(key)
    return (
        f"{where}: cache was built with a different '{key}' "
        f"(cache: {_short(old)}, config: {_short(expected.get(key))})"
    )


def stale_units(cache_dir: Path, units: list[Unit], source, fp: dict) -> tuple[list[Unit], list[str]]:
    """(done units to re-encode, one line per reason); both empty when the folder matches."""
    manifest = cache_dir / MANIFEST
    if manifest.is_file():
        found = json.loads(manifest.read_text()).get("fingerprint")
        key = differing_key(fp, found)
        if key is not None:
            done = [u for u in units if done_marker(cache_dir / shard_name(u.index)).is_file()]
            return done, [fingerprint_reason(manifest, key, fp, found)]
    stale, reasons = [], []
    for unit in units:
        marker = done_marker(cache_dir / shard_name(unit.index))
        if not marker.is_file():
            continue
        reason = _unit_reason(marker, unit, source, fp)
        if reason is not None:
            stale.append(unit)
            reasons.append(reason)
    return stale, reasons


def _unit_reason(marker: Path, unit: Unit, source, fp: dict) -> str | None:
    done = json.loads(marker.read_text())
    key = differing_key(fp, done.get("fingerprint"))
    if key is not None:
        return fingerprint_reason(marker, key, fp, done.get("fingerprint"))
    change = source_change(done.get("source", {}), source.unit_files(unit))
    if change is not None:
        return f"{shard_name(unit.index)}: its raw source changed since it was cached ({change})"
    return None


def refusal(reasons: list[str]) -> str:
    """The one line a pass without ``--rebuild`` stops with."""
    if "raw source changed" in reasons[0]:
        more = f" (and {len(reasons) - 1} more shards)" if len(reasons) > 1 else ""
        return f"{reasons[0]}{more}; {REBUILD_HINT} to re-read the changed units"
    return f"{reasons[0]}; use a new data.cache_dir, or {REBUILD_HINT} to re-encode it"


def complete_manifest(cache_dir: Path, units: list[Unit]) -> dict | None:
    """The manifest when it lists exactly these units and each has its done marker (no work left)."""
    path = cache_dir / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    names = [shard_name(u.index) for u in units]
    if [s["file"] for s in manifest["shards"]] != names:
        return None
    if not all(done_marker(cache_dir / n).is_file() for n in names):
        return None
    return manifest
