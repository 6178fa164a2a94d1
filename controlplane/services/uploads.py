"""Staging an adapter upload into a private temporary folder before it is validated.

Three sources, one result (a flat PEFT folder on local disk): multipart files, one tar.gz,
or an ``s3://`` prefix. Staging refuses what could escape the folder (absolute paths,
``..``, links) and stops reading once the size limit is passed, so an oversize upload
never fills the disk. Nothing here touches the database or the artifact store's prefixes.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tarfile
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO

from minio.error import S3Error

from lorafaas.artifacts import ArtifactStore, parse_s3_uri
from lorafaas.errors import InvalidArtifact, InvalidInput

_CHUNK = 1 << 20


@dataclass
class AdapterSource:
    """Exactly one of: named files, a tar.gz stream, an s3:// URI."""

    files: list[tuple[str, BinaryIO]] = field(default_factory=list)
    archive: BinaryIO | None = None
    s3_uri: str | None = None

    def check(self) -> None:
        given = sum((bool(self.files), self.archive is not None, bool(self.s3_uri)))
        if given != 1:
            raise InvalidInput(
                "send exactly one of: files (multipart, one per file), archive (a .tar.gz), s3_uri (s3://bucket/prefix)"
            )


@asynccontextmanager
async def staged(source: AdapterSource, store: ArtifactStore, tenant_id: str, max_bytes: int) -> AsyncIterator[Path]:
    """A temporary folder holding the adapter; removed when the block ends, whatever happens."""
    source.check()
    tmp = Path(tempfile.mkdtemp(prefix="lorafaas-upload-"))
    folder = tmp / "adapter"
    folder.mkdir()
    try:
        if source.files:
            await asyncio.to_thread(stage_files, source.files, folder, max_bytes)
        elif source.archive is not None:
            await asyncio.to_thread(stage_tarball, source.archive, folder, max_bytes)
        else:
            await asyncio.to_thread(stage_s3, store, source.s3_uri or "", folder, tenant_id, max_bytes)
        yield folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _safe_name(name: str) -> str:
    """A plain file name: PEFT folders are flat, so any directory part or traversal is refused."""
    clean = PurePosixPath(name.replace("\\", "/"))
    if not name or clean.is_absolute() or ".." in clean.parts or len(clean.parts) != 1 or clean.name.startswith("."):
        raise InvalidArtifact(f"{name!r}: not a plain file name of a PEFT adapter folder", file=name)
    return clean.name


class _Budget:
    """Counts bytes across every file of one upload and refuses past the limit."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.used = max_bytes, 0

    def copy(self, src: IO[bytes], dest: Path) -> None:
        with open(dest, "wb") as out:
            while chunk := src.read(_CHUNK):
                self.used += len(chunk)
                if self.used > self.max_bytes:
                    raise InvalidArtifact(
                        f"{dest.name}: the upload is over the limit of {self.max_bytes} bytes", file=dest.name
                    )
                out.write(chunk)


def stage_files(files: list[tuple[str, BinaryIO]], folder: Path, max_bytes: int) -> None:
    budget = _Budget(max_bytes)
    for name, stream in files:
        # Clients may send a path as the file name; only its last part names the file.
        target = folder / _safe_name(PurePosixPath(name.replace("\\", "/")).name)
        if target.exists():
            raise InvalidArtifact(f"{target.name}: sent twice", file=target.name)
        budget.copy(stream, target)


def stage_tarball(archive: BinaryIO, folder: Path, max_bytes: int) -> None:
    """Extract regular files of a tar(.gz); a single top-level folder is flattened away."""
    budget = _Budget(max_bytes)
    try:
        with tarfile.open(fileobj=archive, mode="r:*") as tar:
            members = [m for m in tar.getmembers() if not m.isdir()]
            for m in members:
                if not m.isfile():
                    raise InvalidArtifact(
                        f"{m.name}: links and special files are refused in an adapter archive", file=m.name
                    )
            for m, name in zip(members, _flatten([m.name for m in members]), strict=True):
                src = tar.extractfile(m)
                if src is None:
                    raise InvalidArtifact(f"{m.name}: cannot be read from the archive", file=m.name)
                target = folder / name
                if target.exists():
                    raise InvalidArtifact(f"{name}: appears twice in the archive", file=name)
                budget.copy(src, target)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise InvalidArtifact(f"archive: not a readable tar.gz: {e}", file="archive") from e


def _flatten(names: list[str]) -> list[str]:
    parts = [PurePosixPath(n.removeprefix("./")).parts for n in names]
    tops = {p[0] for p in parts if len(p) > 1}
    if len(tops) == 1 and all(len(p) == 2 for p in parts):
        return [_safe_name(p[1]) for p in parts]
    return [_safe_name("/".join(p)) for p in parts]


def stage_s3(store: ArtifactStore, uri: str, folder: Path, tenant_id: str, max_bytes: int) -> None:
    """Copy the files directly under an s3:// prefix. In the platform's own bucket only the
    tenant's own prefix may be named, so no tenant can register another's objects."""
    bucket, prefix = _check_s3_uri(uri)
    if bucket == store.bucket and not prefix.startswith(f"tenants/{tenant_id}/"):
        raise _s3_error(f"no adapter files under {uri}")
    try:
        listed = store.client.list_objects(bucket, prefix=f"{prefix}/" if prefix else "", recursive=False)
        objects = [o for o in listed if not o.is_dir]
        if not objects:
            raise _s3_error(f"no adapter files under {uri}")
        total = sum(o.size or 0 for o in objects)
        if total > max_bytes:
            raise _s3_error(f"{uri}: the adapter is {total} bytes, over the limit of {max_bytes} bytes")
        for o in objects:
            store.client.fget_object(bucket, o.object_name, str(folder / _safe_name(PurePosixPath(o.object_name).name)))
    except S3Error as e:
        raise _s3_error(f"{uri}: cannot be read ({e.code})") from e
    except ValueError as e:  # the client's own checks of names it is given
        raise _s3_error(f"{uri}: cannot be read ({e})") from e


# S3's rules for a bucket name; an object key is at most 1024 bytes.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_MAX_KEY = 1024


def _check_s3_uri(uri: str) -> tuple[str, str]:
    try:
        bucket, prefix = parse_s3_uri(uri)
    except ValueError as e:
        raise _s3_error(f"s3_uri {uri[:100]!r}: {e}") from e
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise _s3_error(f"s3_uri {uri[:100]!r}: {bucket[:70]!r} is not an S3 bucket name (3-63 of a-z 0-9 . -)")
    if len(prefix.encode(errors="replace")) > _MAX_KEY - 64 or "\x00" in prefix:
        raise _s3_error(f"s3_uri {uri[:100]!r}: the prefix is not a usable S3 key prefix")
    return bucket, prefix


def _s3_error(message: str) -> InvalidArtifact:
    return InvalidArtifact(message, param="s3_uri")
