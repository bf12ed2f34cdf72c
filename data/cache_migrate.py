"""In-place upgrade of a feature cache of the previous format (``tristage-features-v2``) to today's.

A v2 folder holds the same shards as a v3 one; only its records differ: its done markers name raw
files by the path spelled in the config, with (size, mtime, whole-file xxh3), and its fingerprint
holds the source paths.  ``tristage cache`` upgrades it without re-encoding anything: for each v2
marker it checks, by the v2 rules, that the unit in the same position of today's source is the
one the shard was read from (the same paths, unchanged), then rewrites the marker with the unit's
key and content identity and today's fingerprint, and the manifest likewise.  A v2 unit whose raw
files changed or moved since cannot be vouched for: the pass stops with one line, unless
``--rebuild`` asks to re-encode such units.  ``tristage train`` on a v2 folder stops with one line
saying to run ``tristage cache`` once.
"""

from __future__ import annotations

import ast
import json
import logging
import os

import xxhash

from tristage.data import storage
from tristage.data.cache_format import LEGACY_FORMATS, MANIFEST, CacheError, done_marker_name, shard_name
from tristage.data.identity import unit_identity
from tristage.data.sources import Unit

log = logging.getLogger(__name__)
UPGRADE_HINT = "run `tristage cache CONFIG` once to upgrade it in place (nothing is re-encoded)"


def is_legacy(fingerprint: dict | None) -> bool:
    return (fingerprint or {}).get("cache_format") in LEGACY_FORMATS


def upgrade_legacy(cache_dir: str, units: list[Unit], source, fp: dict, markers: dict, rebuild: bool) -> dict:
    """``markers`` with every v2 one upgraded (and written back, with the manifest); a v2 unit that
    cannot be vouched for is one :class:`CacheError` line, or with ``rebuild`` kept for re-encoding."""
    legacy = {f: m for f, m in markers.items() if is_legacy(m.get("fingerprint"))}
    if not legacy:
        return markers
    by_position = {shard_name(u.index): u for u in units}
    upgraded = dict(markers)
    for name, marker in sorted(legacy.items()):
        unit = by_position.get(name)
        reason = (
            "its unit is no longer in the source" if unit is None else legacy_reason(marker, unit, source, fp)
        )
        if reason is not None and not rebuild:
            where = storage.join(cache_dir, done_marker_name(name))
            raise CacheError(
                f"{where}: cannot upgrade this cache of the previous format: {reason}; run the upgrade where "
                f"the raw files sit at their recorded paths, or {REBUILD} to re-encode such units"
            )
        if unit is not None:
            upgraded[name] = _upgraded(marker, unit, source, fp if reason is None else marker["fingerprint"])
            storage.write_text(storage.join(cache_dir, done_marker_name(name)), json.dumps(upgraded[name]))
    _upgrade_manifest(cache_dir, upgraded, fp)
    log.warning(
        "cache: upgraded %d shard records of %s to %s (no re-encode)",
        len(legacy),
        cache_dir,
        fp["cache_format"],
    )
    return upgraded


REBUILD = "rerun `tristage cache CONFIG --rebuild`"


def _upgraded(marker: dict, unit: Unit, source, fp: dict) -> dict:
    kept = {k: v for k, v in marker.items() if k != "source"}
    return {**kept, "fingerprint": fp, "unit": unit.key, "input": unit_identity(source, unit)}


def _upgrade_manifest(cache_dir: str, markers: dict, fp: dict) -> None:
    path = storage.join(cache_dir, MANIFEST)
    if not storage.exists(path):
        return
    manifest = json.loads(storage.read_text(path))
    if not is_legacy(manifest.get("fingerprint")):
        return
    for shard in manifest["shards"]:
        done = markers.get(shard["file"], {})
        shard.update(unit=done.get("unit"), input=done.get("input"))
    storage.write_text(path, json.dumps({**manifest, "fingerprint": fp}, indent=1))


def legacy_reason(marker: dict, unit: Unit, source, fp: dict) -> str | None:
    """Why a v2 marker cannot be taken as ``unit``'s features today, or None."""
    old = marker.get("fingerprint") or {}
    for key in fp:
        if key not in ("cache_format", "source") and old.get(key) != fp[key]:
            return f"it was built with a different '{key}'"
    was, now = dict(ast.literal_eval(old.get("source", "[]"))), dict(ast.literal_eval(fp["source"]))
    for key, value in now.items():
        if was.get(key) != value:
            return f"it was built with a different 'data.source.{key}'"
    files = [*source.unit_inputs(unit).values(), *source.unit_members(unit).values()]
    return _path_change(marker.get("source", {}), files)


def _path_change(old: dict[str, list], files: list[str]) -> str | None:
    """The v2 rule: the same paths, each of the same size, and of the same content where the mtime moved."""
    for path in [*files, *(p for p in old if p not in files)]:
        before = old.get(path)
        if before is None or path not in files:
            return f"{path} is not among the files it was read from"
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return f"{path} is gone"
        if st.st_size != before[0] or (st.st_mtime_ns != before[1] and _whole_digest(path) != before[2]):
            return f"{path} changed since"
    return None


def _whole_digest(path: str) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()
