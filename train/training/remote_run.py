"""A run whose ``run.dir`` is an object-store URL (``s3://``, ``gs://``): a local working folder mirrored
to it.

The trainer works in a local folder (``TMPDIR/tristage-runs/<hash of the URL>``) exactly as in a local
``run.dir``: a checkpoint is assembled, fsynced, renamed and marked there (``checkpoint_files.py``).
The mirror then uploads each committed checkpoint to ``run.dir/checkpoints/step_N/``, every file
first and ``COMPLETE`` last -- an object store has no rename, so a remote checkpoint counts only once
its marker object exists -- and deletes the remote ones that rotation dropped locally.  At start-up
the local folder is made to hold what the object store holds: files and checkpoints the store lacks
(an earlier run's under the same URL) are deleted, its metrics and config are fetched, and its
newest checkpoint with its marker is downloaded when the local folder lacks it (another machine, a
requeued job on a fresh node); it is then verified like any local one.  ``final/``, the metrics and
the resolved config are uploaded when the run finishes.

The upload runs on the main process after the commit; the processes of other nodes write their
RNG files into their own working folder, so a multi-node run keeps that folder on a filesystem the
nodes share (as a local ``run.dir`` must be).
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import replace
from pathlib import Path

from tristage.data import storage
from tristage.train.config import Config
from tristage.train.training import checkpoint_files as ckpt

log = logging.getLogger(__name__)
STEP = re.compile(r"step_(\d+)")


def working_dir(url: str) -> Path:
    """The local working folder of the run at ``url`` (TMPDIR: put it on local disk)."""
    return storage.local_folder_for(url, "runs")


class RunMirror:
    """Uploads a local run folder's checkpoints and outputs to ``url``; downloads the newest back."""

    def __init__(self, url: str):
        self.url, self.local = url.rstrip("/"), working_dir(url)
        self.remote_root = storage.join(self.url, "checkpoints")

    @classmethod
    def localised(cls, cfg: Config) -> tuple[Config, RunMirror | None]:
        """``cfg`` with ``run.dir`` pointing at the local working folder, and its mirror (None: local)."""
        if not storage.is_remote(cfg.run.dir):
            return cfg, None
        mirror = cls(cfg.run.dir)
        mirror.local.mkdir(parents=True, exist_ok=True)
        return replace(cfg, run=replace(cfg.run, dir=str(mirror.local))), mirror

    def remote_steps(self) -> list[str]:
        """Names of the remote checkpoints that carry their marker, newest first."""
        found = storage.glob(storage.join(self.remote_root, f"step_*/{ckpt.MARKER}"))
        names = [storage.basename(storage.parent(m)) for m in found]
        return sorted((n for n in names if STEP.fullmatch(n)), key=lambda n: int(n[5:]), reverse=True)

    def sync_down(self, resume: bool) -> None:
        """Make the local working folder hold what the object store holds: drop what it does not have
        (an earlier run's files under the same URL), fetch its top-level files (``metrics.jsonl`` goes
        on where it left off) and, for a resume, its newest checkpoint unless already here."""
        remote = self.remote_steps()
        root = self.local / "checkpoints"
        for path in [*self.local.iterdir(), *(root.iterdir() if root.is_dir() else [])]:
            if path != root and not (path.parent == root and path.name in remote):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        for url in storage.files(self.url):
            storage.download(url, self.local / storage.basename(url))
        if resume and remote and not (root / remote[0] / ckpt.MARKER).is_file():
            root.mkdir(parents=True, exist_ok=True)
            storage.download_tree(storage.join(self.remote_root, remote[0]), root / remote[0])
            log.warning("downloaded checkpoint %s from %s", remote[0], self.remote_root)

    def push_checkpoint(self, step_dir: Path, kept: list[Path]) -> None:
        """Upload a committed checkpoint (marker last), then delete remote ones not in ``kept``."""
        storage.upload_tree(step_dir, storage.join(self.remote_root, step_dir.name), last=ckpt.MARKER)
        keep = {p.name for p in kept}
        for name in self.remote_steps():
            if name not in keep:
                storage.remove(storage.join(storage.join(self.remote_root, name), ckpt.MARKER))
                storage.remove(storage.join(self.remote_root, name), recursive=True)

    def push_outputs(self) -> None:
        """Upload ``final/`` (its marker last) and the run's top-level files (metrics, config)."""
        final = self.local / "final"
        if final.is_dir():
            storage.upload_tree(final, storage.join(self.url, "final"), last=ckpt.MARKER)
        for path in sorted(p for p in self.local.iterdir() if p.is_file()):
            storage.write_bytes(storage.join(self.url, path.name), path.read_bytes())
