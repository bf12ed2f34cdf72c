"""Full-state checkpoints (resume) and the weights-only ``final/`` folder (stage handoff, export).

Layout of ``run.dir/checkpoints/step_NNNNNNN/``::

    model.safetensors        trained weights
    ema.safetensors          EMA weights
    optimizer.pt             optimizer state (tensors and numbers; loaded with weights_only=True)
    trainer.json             step, samples, loader position, LR-scheduler state, tracker run id, version
    rng_rank{R}.json / .pt   python + numpy / torch (+ CUDA) RNG states of every rank
    config.yaml              the resolved config
    sharded/                 instead of the three weight files under train.parallelism fsdp*: one
                             torch.distributed.checkpoint folder of model, optimizer and EMA shards
                             (train/training/dcp.py)
    COMPLETE                 written last: a directory without it is never used

A checkpoint is assembled in ``.tmp-step_N``, fsynced, renamed into place, and
only then marked complete.  "Latest" means the highest step among directories
that carry the marker *and* whose files all load (RNG files of every rank included).
A marked checkpoint that fails this is *demoted*: renamed to ``step_N.damaged``
without its marker, with one line, so it is never resumed, never rewritten over
and never counted by ``keep_last``.  Nothing is unpickled: weights are
safetensors, everything else JSON or ``torch.load(weights_only=True)``.

Writes: every writer (safetensors, torch.save, json/text, fsync, rename) runs under
:func:`guarded`, which turns whatever it raises for a failed write (``OSError``,
``SafetensorError``, torch's ``RuntimeError``) into one :class:`CheckpointWriteError`
naming the file and the free space left.  It is raised on the rank that failed, so a
caller can agree across ranks before it applies ``checkpoint.on_error``
(``train/training/checkpointer.py``), removing the temp folder; :func:`cleanup` removes
any a crash left, at the next start, so none survives.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tristage.errors import CheckpointError
from tristage.train.training import dcp

MARKER = "COMPLETE"
FORMAT = "tristage-checkpoint-v1"
TMP_PREFIX = ".tmp-step_"  # a checkpoint being assembled
DAMAGED = ".damaged"  # suffix of a demoted checkpoint
STEP_NAME = re.compile(r"step_\d+")
# What the writers raise for a failed write: OSError (json/text, fsync, rename), SafetensorError
# (safetensors' Rust writer), RuntimeError (torch.save's "PytorchStreamWriter failed writing file").
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)
log = logging.getLogger(__name__)


class CheckpointWriteError(CheckpointError, OSError):
    """One checkpoint file could not be written on this rank (disk full, I/O error).  Also an
    ``OSError``, so code that tells I/O failures from other ones keeps doing so."""

    def __init__(self, path: Path, err: BaseException):
        self.path, self.free_bytes = path, free_bytes(path)
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        super().__init__(f"{path}: write failed ({reason}); {self.free_bytes / 2**20:.1f} MiB free there")


def free_bytes(path: Path) -> int:
    """Free space on the filesystem holding ``path`` (its nearest existing parent)."""
    for parent in (path, *path.parents):
        if parent.exists():
            return shutil.disk_usage(parent).free
    return 0


@contextmanager
def guarded(path: Path) -> Iterator[None]:
    """Run one write of ``path``; any write error becomes a :class:`CheckpointWriteError`."""
    try:
        yield
    except CheckpointWriteError:
        raise
    except WRITE_ERRORS as err:
        raise CheckpointWriteError(path, err) from None


def _write_text(path: Path, text: str) -> None:
    with guarded(path):
        path.write_text(text)


@dataclass
class TrainState:
    """Counters that travel with a checkpoint."""

    step: int = 0  # optimizer steps done
    samples: int = 0  # training samples consumed (global)
    loader: dict = field(default_factory=dict)  # FeatureLoader.state_dict()
    scheduler: dict = field(default_factory=dict)  # LR scheduler state_dict()
    tracker_run_id: str | None = None  # W&B run id, kept across resumes
    nonfinite_skips: int = 0  # optimizer steps skipped for a non-finite loss or gradient
    val_loss: float | None = None  # the last val/loss (train/training/evaluation.py)
    best_val_loss: float | None = None  # the lowest val/loss so far
    best_val_step: int | None = None  # the step it was measured at
    version: str = ""  # tristage version that wrote it


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with guarded(path), open(path, "rb") as fh:
                os.fsync(fh.fileno())
    with guarded(root):
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON part, tensor part) of this process's RNG states."""
    np_state = np.random.get_state()
    py = random.getstate()
    json_part = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return json_part, tensors


def set_rng_state(json_part: dict, tensors: dict[str, torch.Tensor]) -> None:
    py = json_part["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = json_part["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def tmp_dir(root: Path, step: int) -> Path:
    return root / f"{TMP_PREFIX}{step:07d}"


def write_rank_files(tmp: Path, rank: int) -> None:
    """Every rank writes its own RNG state into the checkpoint being assembled."""
    json_part, tensors = rng_state()
    _write_text(tmp / f"rng_rank{rank}.json", json.dumps(json_part))
    with guarded(tmp / f"rng_rank{rank}.pt"):
        torch.save(tensors, tmp / f"rng_rank{rank}.pt")


def write_main_files(
    tmp: Path, model_sd: dict, ema_sd: dict, optim_sd: dict, state: TrainState, cfg_yaml: str
) -> None:
    """Rank 0 writes weights, optimizer, counters and config."""
    for name, sd in (("model.safetensors", model_sd), ("ema.safetensors", ema_sd)):
        with guarded(tmp / name):
            save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, tmp / name)
    with guarded(tmp / "optimizer.pt"):
        torch.save(optim_sd, tmp / "optimizer.pt")
    write_state_files(tmp, state, cfg_yaml)


def write_state_files(tmp: Path, state: TrainState, cfg_yaml: str) -> None:
    """Rank 0 writes the counters and the config (a sharded checkpoint's tensors are in ``sharded/``)."""
    _write_text(tmp / "trainer.json", json.dumps({"format": FORMAT, **state.__dict__}, indent=1))
    _write_text(tmp / "config.yaml", cfg_yaml)


def commit(tmp: Path, final: Path) -> None:
    """fsync, rename into place, then write the completeness marker."""
    _fsync_tree(tmp)
    with guarded(final):
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    _write_text(final / MARKER, "ok\n")
    _fsync_tree(final)


def cleanup(root: Path) -> int:
    """Remove the temp folders of saves that never finished (call where no save is in flight)."""
    stale = list(root.glob(f"{TMP_PREFIX}*")) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return len(stale)


def read_state(path: Path) -> TrainState:
    """Counters of a checkpoint; refuses unknown formats."""
    try:
        payload = json.loads((path / "trainer.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable trainer.json ({type(err).__name__})") from None
    if payload.pop("format", None) != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format (expected {FORMAT})")
    return TrainState(**payload)


@dataclass
class Contents:
    """Everything rank 0 wrote into a checkpoint, read once."""

    state: TrainState  # trainer.json
    model: dict[str, torch.Tensor] | None  # model.safetensors (None: a sharded checkpoint, dcp.py)
    ema: dict[str, torch.Tensor] | None  # ema.safetensors (None: sharded)
    optimizer: dict | None  # optimizer.pt (None: sharded)
    rng: dict[int, tuple[dict, dict]] = field(default_factory=dict)  # rank -> rng_rank{R}.json / .pt


def read(path: Path) -> Contents:
    """Read every file of a checkpoint (each once; every rank's RNG files are loaded too, so a damaged
    or pickled one is found before the resume); a file that does not load raises CheckpointError."""
    if not (path / MARKER).is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MARKER} marker)")
    state = read_state(path)
    rng = _read_rng(path)
    if dcp.is_sharded_checkpoint(path):
        try:
            dcp.verify(path)  # the shards themselves are read by dcp.load, once, into place
        except dcp.ShardedCheckpointError as err:
            raise CheckpointError(str(err)) from None
        return Contents(state, None, None, None, rng)
    weights = {}
    for name in ("model.safetensors", "ema.safetensors"):
        try:
            weights[name] = load_file(path / name)
        except (OSError, SafetensorError) as err:
            raise CheckpointError(f"{path / name}: unreadable ({err})") from None
    optimizer = _load_pt(path / "optimizer.pt")
    return Contents(state, weights["model.safetensors"], weights["ema.safetensors"], optimizer, rng)


def _load_pt(path: Path) -> object:
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # torch raises many types for a damaged, foreign or pickled-code file
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__})") from None


def _read_rng(path: Path) -> dict[int, tuple[dict, dict]]:
    """rank -> (JSON part, tensors) of every ``rng_rank{R}`` pair, tensors loaded ``weights_only``.

    Every rank reads them all (a few KB each), so every rank makes the same choice of checkpoint."""
    tensors = sorted(path.glob("rng_rank*.pt"))
    if not tensors:
        raise CheckpointError(f"{path}: no rng_rank*.pt files")
    states = {}
    for pt in tensors:
        loaded = _load_pt(pt)
        if not isinstance(loaded, dict):
            raise CheckpointError(f"{pt}: unreadable (not a dict of RNG states)")
        try:
            states[int(pt.stem.removeprefix("rng_rank"))] = (
                json.loads(pt.with_suffix(".json").read_text()),
                loaded,
            )
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{pt.with_suffix('.json')}: unreadable ({type(err).__name__})") from None
    return states


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of directories that carry the marker, newest first (step from trainer.json);
    one whose trainer.json does not read is demoted."""
    found = []
    for path in root.glob("step_*") if root.is_dir() else []:
        if STEP_NAME.fullmatch(path.name) and (path / MARKER).is_file():
            try:
                found.append((read_state(path).step, path))
            except CheckpointError as err:
                demote(path, err)
    return sorted(found, reverse=True)


def newest_readable(root: Path) -> tuple[Path, Contents] | None:
    """The newest checkpoint whose files all load, read once; damaged newer ones are demoted."""
    for _, path in complete_checkpoints(root):
        try:
            return path, read(path)
        except CheckpointError as err:
            demote(path, err)
    return None


def demote(path: Path, err: CheckpointError) -> None:
    """Rename a damaged checkpoint aside and drop its marker; one line, by the process that renamed
    it (every rank verifies the same files, so the others find it gone and stay quiet)."""
    aside = path.with_name(path.name + DAMAGED)
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}{DAMAGED}-{n}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    except OSError as rename_err:  # a read-only run dir: still never resumed from, just not renamed
        log.warning(
            "falling back past damaged checkpoint %s (%s; cannot rename it: %s)", path, err, rename_err
        )
        return
    (aside / MARKER).unlink(missing_ok=True)
    log.warning("demoted damaged checkpoint %s to %s: %s", path.name, aside.name, err)


def rotate(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (demoted ones do not count),
    and stale temp dirs (called right after a commit, when no save is in flight)."""
    for _, path in complete_checkpoints(root)[keep_last:]:
        shutil.rmtree(path, ignore_errors=True)
    cleanup(root)


BEST = "best"  # checkpoint.keep_best: the checkpoint of the lowest val/loss, outside the rotation


def keep_as_best(root: Path, source: Path) -> Path:
    """Make ``root/best`` a copy of the complete checkpoint ``source``, by hard links where the filesystem
    allows (no bytes copied; the rotation deleting ``source`` later leaves the copy whole).  Built aside,
    then swapped in by two renames, so ``best`` is at every moment a complete checkpoint or absent."""
    best, tmp, old = root / BEST, root / f".tmp-{BEST}", root / f".old-{BEST}"
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    with guarded(tmp):
        shutil.copytree(source, tmp, copy_function=_link_or_copy)
        _fsync_tree(tmp)
        if best.exists():
            os.replace(best, old)
        os.replace(tmp, best)
    shutil.rmtree(old, ignore_errors=True)
    return best


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dst)


def load_rank_rng(contents: Contents, rank: int) -> None:
    """Restore this rank's RNG (read by :func:`read`); a rank the checkpoint did not have (world
    grew) keeps its seed."""
    if rank in contents.rng:
        set_rng_state(*contents.rng[rank])
