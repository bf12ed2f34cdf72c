"""What an existing cache folder holds against what this config and the raw source would write.

Every shard's done marker records the fingerprint it was encoded under, the *key* of the unit it
holds (its name within the source) and that unit's content identity (``data/identity.py``).  The
manifest repeats the last two per shard, so a trainer checks a whole cache with one read.  Units are
matched to shards by key, never by position or path:

* a unit whose key no shard holds is *missing*: ``tristage cache`` encodes it into a new shard;
  ``tristage train`` stops before step 1 naming how many are missing;
* a unit whose identity changed is *stale*: ``tristage cache`` re-encodes it (one line each);
  ``tristage train`` refuses the cache;
* a shard whose key the source no longer has is *removed*: kept on disk, left out of the manifest by
  ``tristage cache``; ``tristage train`` warns once with the count and reads only the others;
* a different fingerprint means the folder holds features of another configuration: every done
  unit is stale, and without ``--rebuild`` the pass stops with one line naming the key.

Every rank computes the same answer from the same files, so the decision needs no collective.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace

from tristage.data import storage
from tristage.data.cache_format import FORMAT, MANIFEST, CacheError, done_marker_name, shard_name
from tristage.data.fingerprint import first_difference
from tristage.data.identity import identity_change, unit_identity
from tristage.data.sources import SourceError, Unit, listing

REBUILD_HINT = "rerun `tristage cache CONFIG --rebuild`"
log = logging.getLogger(__name__)


def read_manifest(cache_dir: str) -> dict | None:
    path = storage.join(cache_dir, MANIFEST)
    return json.loads(storage.read_text(path)) if storage.exists(path) else None


def read_markers(cache_dir: str) -> dict[str, dict]:
    """shard file name -> its done marker, for every marker in the folder (one listing)."""
    names = storage.names(cache_dir, "features-*.done.json")
    found = storage.read_many([storage.join(cache_dir, n) for n in names])
    return {n.replace(".done.json", ".tar"): json.loads(found[storage.join(cache_dir, n)]) for n in names}


def place(units: list[Unit], markers: dict[str, dict]) -> list[Unit]:
    """Each unit with its shard: the shard whose marker holds its key; else the shard of its position
    in the source when no marker holds that one (a fresh or killed pass numbers shards as the source
    lists units), else a new one after every shard in the folder -- adding a unit never renumbers a
    cached one."""
    held = {m["unit"]: _index(f) for f, m in markers.items() if "unit" in m}
    taken = {_index(f) for f in markers} | set(held.values())
    shard = {}
    for unit in units:
        if unit.key in held:
            shard[unit.key] = held[unit.key]
        elif unit.index not in taken:
            shard[unit.key] = unit.index
            taken.add(unit.index)
    for unit in units:
        if unit.key not in shard:
            shard[unit.key] = max(taken, default=-1) + 1
            taken.add(shard[unit.key])
    return [replace(u, shard=shard[u.key]) for u in units]


def _index(shard_file: str) -> int:
    return int(shard_file.removeprefix("features-").removesuffix(".tar"))


def identities(source, units: list[Unit]) -> dict[str, dict[str, list]]:
    """unit key -> content identity, shared files read once."""
    memo: dict[str, list] = {}
    return {u.key: unit_identity(source, u, memo) for u in units}


def differing_key(expected: dict[str, str], found: dict[str, str] | None) -> str | None:
    """The fingerprint field that differs; a cache of another format is named as such first."""
    if found is None or found.get("cache_format") != FORMAT:
        return "cache_format"
    return first_difference(expected, found)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def fingerprint_reason(where: str, key: str, expected: dict, found: dict | None) -> str:
    old = (found or {}).get(key)
    return (
        f"{where}: cache was built with a different '{key}' "
        f"(cache: {_short(old)}, config: {_short(expected.get(key))})"
    )


@dataclass
class Stale:
    """Done units that must be re-encoded, and why (one line per unit)."""

    other_config: list[tuple[Unit, str]]  # encoded under another fingerprint: only with --rebuild
    changed: list[tuple[Unit, str]]  # their raw input changed: always

    @property
    def units(self) -> list[Unit]:
        return [u for u, _ in self.other_config + self.changed]


def stale_units(cache_dir: str, placed: list[Unit], markers: dict, idents: dict, fp: dict) -> Stale:
    """Which of the placed units that carry a done marker are stale, and why."""
    done = [u for u in placed if shard_name(u.cache_index) in markers]
    manifest = read_manifest(cache_dir)
    found = None if manifest is None else manifest.get("fingerprint")
    if manifest is not None and differing_key(fp, found) is not None:
        reason = fingerprint_reason(storage.join(cache_dir, MANIFEST), differing_key(fp, found), fp, found)
        return Stale([(u, reason) for u in done], [])
    stale = Stale([], [])
    for unit in done:
        name = shard_name(unit.cache_index)
        marker = markers[name]
        key = differing_key(fp, marker.get("fingerprint"))
        if key is not None:
            where = storage.join(cache_dir, done_marker_name(name))
            stale.other_config.append((unit, fingerprint_reason(where, key, fp, marker.get("fingerprint"))))
            continue
        change = identity_change(marker.get("input", {}), idents[unit.key])
        if change is not None:
            stale.changed.append(
                (unit, f"{name} ({unit.key}): its raw input changed since it was cached ({change})")
            )
    return stale


def refusal(reasons: list[str]) -> str:
    """The one line a pass without ``--rebuild`` stops with (features of another configuration)."""
    return f"{reasons[0]}; use a new data.cache_dir, or {REBUILD_HINT} to re-encode it"


def complete_manifest(cache_dir: str, placed: list[Unit], markers: dict) -> dict | None:
    """The manifest when it lists exactly these units' shards and each has its done marker."""
    manifest = read_manifest(cache_dir)
    if manifest is None:
        return None
    names = [shard_name(u.cache_index) for u in placed]
    if [s["file"] for s in manifest["shards"]] != names or not all(n in markers for n in names):
        return None
    return manifest


def training_shards(manifest: dict, cache_dir: str, source_cfg, warn: bool) -> list[str]:
    """The shard files a run trains on, after checking the cache against the raw source as it is now.

    A unit the cache lacks, or whose raw input changed, is one :class:`CacheError` line; shards of
    units no longer in the source are left out, with one warning (``warn``: the main process).  A
    source that cannot be listed here (a machine that holds only the cache) is one warning, and the
    cache is used as recorded."""
    where, shards = storage.join(cache_dir, MANIFEST), manifest["shards"]
    if not source_cfg.paths:  # no source configured (a benchmark, a loader on a bare cache): nothing to check
        return [s["file"] for s in shards]
    try:
        source = listing(source_cfg)
        units = source.units()
    except SourceError as err:
        if warn:
            log.warning(
                "%s: cannot check the cache against data.source (%s); training on its %d units as recorded",
                where,
                err,
                len(shards),
            )
        return [s["file"] for s in shards]
    held = {s["unit"]: s for s in shards}
    refuse_missing_or_changed(where, source, units, held)
    keys = {u.key for u in units}
    removed = len(held.keys() - keys)
    if removed and warn:
        what = "unit is" if removed == 1 else "units are"
        log.warning(
            "%s: %d cached %s no longer in the source; training on the other %d",
            where,
            removed,
            what,
            len(units),
        )
    return [s["file"] for s in shards if s["unit"] in keys]


def refuse_missing_or_changed(where: str, source, units: list[Unit], held: dict[str, dict]) -> None:
    """One :class:`CacheError` line when the cache lacks a unit of the source, or holds a stale one."""
    missing = [u.key for u in units if u.key not in held]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CacheError(
            f"{where}: the cache lacks {len(missing)} of the source's {len(units)} units "
            f"({missing[0]}{more}); run `tristage cache CONFIG` to encode them"
        )
    idents = identities(source, units)
    changed = [(u.key, c) for u in units if (c := identity_change(held[u.key]["input"], idents[u.key]))]
    if changed:
        (key, change), more = changed[0], f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        named = change if change.startswith(key) else f"{key}: {change}"
        what = (
            "cached unit no longer matches its" if len(changed) == 1 else "cached units no longer match their"
        )
        raise CacheError(
            f"{where}: {len(changed)} {what} raw source ({named}{more}); "
            "run `tristage cache CONFIG` to re-encode them"
        )
