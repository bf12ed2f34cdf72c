"""Where data lives: local paths, object-store URLs (``s3://``, ``gs://``, any fsspec protocol) and
webdataset ``pipe:`` commands.

Object stores are reached through fsspec (``s3fs``, ``gcsfs``: the ``tristage[s3]`` / ``[gcs]``
extras), configured the way each library documents: for S3 the standard AWS environment
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``) or the AWS
config files; tristage adds no setting of its own.  Local paths keep the POSIX rules the rest of the
code relies on (write to a temporary name, fsync, rename).  An object store has no rename, but one
PUT makes an object appear whole or not at all, so a remote write is a single upload and a unit or
checkpoint is complete when its marker object, written last, exists.

A credential or permission failure becomes one :class:`StorageError` line naming the bucket.
"""

from __future__ import annotations

import functools
import glob as local_glob
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import xxhash

from tristage.errors import StorageError  # credentials or permissions refused: one line naming the bucket
from tristage.files import atomic_write, publish

T = TypeVar("T")
DIGEST_SPAN = 1 << 20  # bytes hashed at each end of a file for its content identity


def is_remote(path: str) -> bool:
    """A URL that fsspec opens (``s3://b/k``, ``gs://b/k``), not a local path."""
    return "://" in str(path) and not str(path).startswith("file://")


def is_pipe(path: str) -> bool:
    """A webdataset ``pipe:COMMAND`` (the command's stdout is the tar)."""
    return str(path).startswith("pipe:")


def is_local(path: str) -> bool:
    return not is_remote(path) and not is_pipe(path)


def bucket_of(url: str) -> str:
    """``s3://bucket/a/b`` -> ``s3://bucket``."""
    protocol, _, rest = str(url).partition("://")
    return f"{protocol}://{rest.split('/', 1)[0]}"


def _filesystem(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:  # fsspec names the package a protocol needs
        raise StorageError(f"{url}: {str(err).splitlines()[0]}") from None


def _credential_errors() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [PermissionError]
    try:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError

        found += [NoCredentialsError, PartialCredentialsError]
    except ImportError:  # no botocore: no S3, so none of its errors
        pass
    return tuple(found)


@contextmanager
def access(url: str) -> Iterator[None]:
    """Turn a credential or permission failure on ``url`` into one :class:`StorageError` naming the bucket."""
    try:
        yield
    except StorageError:
        raise
    except _credential_errors() as err:
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        raise StorageError(
            f"{bucket_of(url)}: access denied ({type(err).__name__}: {reason}); check the credentials "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the AWS config files for s3://)"
        ) from None


def _remote(fn: Callable[..., T]) -> Callable[..., T]:
    """Run ``fn(url, ...)`` under :func:`access`."""

    @functools.wraps(fn)
    def wrapped(url: str, *args, **kwargs) -> T:
        with access(url):
            return fn(url, *args, **kwargs)

    return wrapped


def join(base: str, name: str) -> str:
    return f"{str(base).rstrip('/')}/{name}" if is_remote(base) else str(Path(base) / name)


def parent(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[0] if is_remote(path) else str(Path(path).parent)


def basename(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


@_remote
def glob(pattern: str) -> list[str]:
    """Sorted matches of a glob; remote matches keep their protocol (``s3://...``)."""
    if not is_remote(pattern):
        return sorted(local_glob.glob(pattern))
    fs, path = _filesystem(pattern)
    return sorted(fs.unstrip_protocol(p) for p in fs.glob(path))


def local_folder_for(url: str, kind: str) -> Path:
    """The local folder that stands in for ``url`` on this host: ``TMPDIR/tristage-KIND/<xxh3 of url>``,
    the same on every rerun (so a rerun finds what a killed pass left there); not created here."""
    return Path(tempfile.gettempdir()) / f"tristage-{kind}" / xxhash.xxh3_64_hexdigest(url.encode())


@_remote
def exists(path: str) -> bool:
    if not is_remote(path):
        return Path(path).exists()
    fs, p = _filesystem(path)
    return fs.exists(p)


@_remote
def is_dir(path: str) -> bool:
    if not is_remote(path):
        return Path(path).is_dir()
    fs, p = _filesystem(path)
    return fs.isdir(p)


@_remote
def size(path: str) -> int:
    if not is_remote(path):
        return os.stat(path).st_size
    fs, p = _filesystem(path)
    return int(fs.size(p))


@_remote
def read_bytes(path: str, start: int | None = None, end: int | None = None) -> bytes:
    """The bytes of ``path`` (``start``/``end``: a range, one ranged GET on an object store)."""
    if not is_remote(path):
        with open(path, "rb") as fh:
            fh.seek(start or 0)
            return fh.read() if end is None else fh.read(end - (start or 0))
    fs, p = _filesystem(path)
    return fs.cat_file(p, start=start, end=end)


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


@_remote
def names(folder: str, pattern: str) -> list[str]:
    """Names (not paths) in ``folder`` matching the glob ``pattern``: one listing, not a HEAD per name."""
    if not is_remote(folder):
        return sorted(p.name for p in Path(folder).glob(pattern))
    fs, p = _filesystem(join(folder, pattern))
    return sorted(basename(m) for m in fs.glob(p))


@_remote
def files(folder: str) -> list[str]:
    """The files directly in ``folder`` (not its sub-folders), as full paths or URLs."""
    if not is_remote(folder):
        return sorted(str(p) for p in Path(folder).iterdir() if p.is_file())
    fs, p = _filesystem(folder)
    if not fs.exists(p):
        return []
    return sorted(fs.unstrip_protocol(e["name"]) for e in fs.ls(p, detail=True) if e["type"] == "file")


@_remote
def sizes(folder: str, pattern: str) -> dict[str, int]:
    """path -> bytes of the files in ``folder`` matching ``pattern`` (one listing)."""
    if not is_remote(folder):
        return {str(p): p.stat().st_size for p in Path(folder).glob(pattern)}
    fs, p = _filesystem(join(folder, pattern))
    return {fs.unstrip_protocol(k): int(v["size"]) for k, v in fs.glob(p, detail=True).items()}


@_remote
def read_many(paths: list[str]) -> dict[str, bytes]:
    """path -> bytes of many small files (remote: fetched concurrently by fsspec)."""
    if not paths or not is_remote(paths[0]):
        return {p: Path(p).read_bytes() for p in paths}
    fs, _ = _filesystem(paths[0])
    found = fs.cat([_filesystem(p)[1] for p in paths])
    return {p: found[_filesystem(p)[1]] for p in paths}


@_remote
def write_bytes(path: str, data: bytes) -> None:
    """Write ``path`` atomically: locally a temporary name, fsync, rename; remotely one PUT."""
    if is_remote(path):
        fs, p = _filesystem(path)
        fs.pipe_file(p, data)
        return
    atomic_write(Path(path), data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


@_remote
def upload(local: Path, dest: str) -> None:
    """Move a finished local file to ``dest``: locally fsync and rename; remotely one upload, then the
    local file is deleted (the object exists whole only once the upload completes)."""
    if not is_remote(dest):
        publish(local, Path(dest))
        return
    fs, p = _filesystem(dest)
    fs.put_file(str(local), p)
    local.unlink()


@_remote
def download(url: str, local: Path) -> None:
    """Copy ``url`` to ``local`` (through a temporary name, so ``local`` is whole or absent)."""
    tmp = local.with_name(f"{local.name}.tmp-{os.getpid()}")
    fs, p = _filesystem(url)
    fs.get_file(p, str(tmp))
    os.replace(tmp, local)


@_remote
def remove(path: str, recursive: bool = False) -> None:
    """Delete a file (or a folder with ``recursive``); absent is fine."""
    if not is_remote(path):
        target = Path(path)
        if recursive and target.is_dir():
            import shutil

            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
        return
    fs, p = _filesystem(path)
    if fs.exists(p):
        fs.rm(p, recursive=recursive)


@_remote
def makedirs(path: str) -> None:
    """A local folder is created; an object store needs none (a bucket must exist)."""
    if not is_remote(path):
        Path(path).mkdir(parents=True, exist_ok=True)


@_remote
def content_identity(path: str) -> list:
    """``[size, digest]`` of a raw file: the digest is xxh3-64 over the size and the first and last
    :data:`DIGEST_SPAN` bytes (the whole file when it is shorter than two spans).

    Why not the whole file: the identity is checked at every ``tristage train`` start, over every unit
    of the source, on local disk and on object stores alike; a full read of SA-1B's 11 TB is not a
    start-up check.  Why not the tar's member index: it needs every 512-byte header, one seek (one
    ranged GET on an object store) per sample, so it grows with the samples.  Size plus both ends costs
    two ranged reads per file, whatever it holds, and sees every rewrite that moves a byte count, a
    truncation, an appended or replaced first or last member.  It misses a same-size edit confined to
    the middle of a file larger than 2 MiB: delete that unit's ``features-NNNNN.done.json`` to have
    ``tristage cache`` re-encode it."""
    total = size(path)
    h = xxhash.xxh3_64(total.to_bytes(8, "little"))
    if total <= 2 * DIGEST_SPAN:
        h.update(read_bytes(path))
    else:
        h.update(read_bytes(path, 0, DIGEST_SPAN))
        h.update(read_bytes(path, total - DIGEST_SPAN, total))
    return [total, h.hexdigest()]


@_remote
def upload_tree(local: Path, url: str, last: str | None = None) -> None:
    """Upload every file under ``local`` to ``url`` (same relative names); the file named ``last``
    (a completeness marker) goes after all the others, so the marker's presence means all is there."""
    files = sorted(p for p in local.rglob("*") if p.is_file())
    fs, root = _filesystem(url)
    for path in sorted(files, key=lambda p: p.name == last):
        fs.put_file(str(path), f"{root}/{path.relative_to(local).as_posix()}")


@_remote
def download_tree(url: str, local: Path) -> None:
    """Copy every object under ``url`` into ``local`` (through a temporary folder renamed at the end)."""
    import shutil

    fs, root = _filesystem(url)
    tmp = local.with_name(f".tmp-{local.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for key in fs.find(root):
        target = tmp / key[len(root) :].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(key, str(target))
    os.replace(tmp, local)
