"""The identity of a cache unit's raw input, by content: what makes a cache survive a move.

A unit's identity maps each input's *name within the source* to ``[size, digest]``
(:func:`tristage.data.storage.content_identity`: xxh3-64 of the size and the first and last MiB):

* a tar unit: ``{"imagenet-000001.tar": [size, digest]}``, plus ``"captions"`` when a captions file
  feeds it (named by its role, so a captions file that moved is still the same input);
* a folder chunk (``imagenet_folders``, ``aesthetic_folder``): its shared file (``synsets``,
  ``metadata``) by content, and ``"members": [count, digest]`` over the sorted (name, size) of its
  images -- a stat each, no read, so a chunk of 1000 images costs 1000 stats, not 1000 reads;
* a ``pipe:`` unit: ``[None, None]`` -- a command's output cannot be looked at without running it,
  so only its name (the command) identifies it.

No path spelling enters: the same files under another mount point, or named relative instead of
absolute, have the same identity.  Checking a unit costs O(its files), never O(its samples).
"""

from __future__ import annotations

import os

import xxhash

from tristage.data import storage


def unit_identity(source, unit, memo: dict[str, list] | None = None) -> dict[str, list]:
    """name -> [size, digest] of everything ``unit`` is encoded from.  ``memo`` (path -> identity)
    spares re-reading a file that many units share (a captions file) within one check."""
    memo = {} if memo is None else memo
    found = {}
    for name, path in source.unit_inputs(unit).items():
        if path not in memo:
            memo[path] = [None, None] if storage.is_pipe(path) else storage.content_identity(path)
        found[name] = memo[path]
    members = source.unit_members(unit)
    if members:
        h = xxhash.xxh3_64()
        for name in sorted(members):
            h.update(f"{name}\0{os.stat(members[name]).st_size}\n".encode())
        found["members"] = [len(members), h.hexdigest()]
    return found


def identity_change(recorded: dict[str, list], now: dict[str, list]) -> str | None:
    """How the input changed since it was recorded, in a few words, or None."""
    for name in [*recorded, *(n for n in now if n not in recorded)]:
        before, after = recorded.get(name), now.get(name)
        if before == after:
            continue
        if before is None:
            return f"{name} was not an input before"
        if after is None:
            return f"{name} is no longer an input"
        if name == "members":
            return f"its images changed ({before[0]} -> {after[0]} files, or their sizes)"
        if before[0] != after[0]:
            return f"{name}: {before[0]} -> {after[0]} bytes"
        return f"{name}: same size, other content"
    return None
