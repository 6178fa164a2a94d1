"""Artifacts in S3, spoken only through the ``minio`` client.

A folder (a PEFT adapter as ``save_pretrained`` writes it, or a backbone) is stored under a
prefix keyed by its content hash, with a manifest of per-file hashes; a download checks
every byte against the manifest and the recorded hash. Calls block: async callers wrap
them in ``asyncio.to_thread``.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from minio import Minio
from minio.error import S3Error
from minio.helpers import ProgressType

from lorafaas.errors import ArtifactIntegrityError, InvalidArtifact, NotFound
from lorafaas.names import adapter_prefix
from lorafaas.settings import S3Settings

MANIFEST = "manifest.json"
ADAPTER_REQUIRED = ("adapter_config.json", "adapter_model.safetensors")
ADAPTER_OPTIONAL = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "README.md",
)
_CHUNK = 1 << 20


@dataclass(frozen=True)
class StoredArtifact:
    bucket: str
    prefix: str
    sha256: str
    size_bytes: int
    files: dict[str, str]  # relative name -> sha256


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def folder_digest(files: dict[str, str]) -> str:
    """The content hash of a folder: the hash of its sorted (name, file hash) pairs."""
    canonical = "\n".join(f"{name}\t{sha}" for name, sha in sorted(files.items()))
    return hashlib.sha256(canonical.encode()).hexdigest()


def adapter_files(folder: Path) -> list[Path]:
    """The files of a PEFT folder that belong in the artifact; refuses a folder without weights."""
    folder = Path(folder)
    for name in ADAPTER_REQUIRED:
        if not (folder / name).is_file():
            raise InvalidArtifact(f"{name} is missing from the adapter folder {folder}", file=name)
    return [folder / n for n in (*ADAPTER_REQUIRED, *ADAPTER_OPTIONAL) if (folder / n).is_file()]


class ArtifactStore:
    """Uploads and downloads content-addressed folders in one bucket."""

    def __init__(self, s3: S3Settings) -> None:
        self.bucket = s3.bucket
        self.client = Minio(
            s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key, secure=s3.secure, region=s3.region
        )

    def ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            self.client.make_bucket(self.bucket)

    def upload_files(
        self,
        files: list[Path],
        prefix: str | None = None,
        tenant_id: str | None = None,
        progress: ProgressType | None = None,
    ) -> StoredArtifact:
        """Store files under ``prefix`` (or the tenant's content-addressed adapter prefix).

        ``progress`` is a minio progress object (``set_meta(object_name, total_length)`` and
        ``update(size)``), e.g. the CLI's progress bar for large uploads.
        """
        hashes = {p.name: file_sha256(p) for p in files}
        sha = folder_digest(hashes)
        if prefix is None:
            if tenant_id is None:
                raise ValueError("upload_files needs a prefix or a tenant_id")
            prefix = adapter_prefix(tenant_id, sha)
        size = 0
        for path in files:
            size += path.stat().st_size
            self.client.fput_object(self.bucket, f"{prefix}/{path.name}", str(path), progress=progress)
        manifest = json.dumps({"sha256": sha, "files": hashes}, indent=2).encode()
        # The manifest goes last: its presence means the upload is complete.
        self.client.put_object(self.bucket, f"{prefix}/{MANIFEST}", io.BytesIO(manifest), len(manifest))
        return StoredArtifact(self.bucket, prefix, sha, size, hashes)

    def upload_adapter(self, folder: Path, tenant_id: str, progress: ProgressType | None = None) -> StoredArtifact:
        return self.upload_files(adapter_files(folder), tenant_id=tenant_id, progress=progress)

    def upload_folder(self, folder: Path, prefix: str) -> StoredArtifact:
        return self.upload_files(sorted(p for p in Path(folder).iterdir() if p.is_file()), prefix=prefix)

    def read_manifest(self, prefix: str, bucket: str | None = None) -> dict:
        try:
            response = self.client.get_object(bucket or self.bucket, f"{prefix}/{MANIFEST}")
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchBucket"):
                raise NotFound(f"no artifact at s3://{bucket or self.bucket}/{prefix}") from e
            raise
        try:
            return json.loads(response.read())
        finally:
            response.close()
            response.release_conn()

    def download(self, prefix: str, dest: Path, expected_sha256: str | None = None, bucket: str | None = None) -> Path:
        """Download into ``dest`` atomically, checking every file against the manifest."""
        bucket = bucket or self.bucket
        manifest = self.read_manifest(prefix, bucket)
        files: dict[str, str] = manifest["files"]
        if expected_sha256 and folder_digest(files) != expected_sha256:
            raise ArtifactIntegrityError(f"manifest of s3://{bucket}/{prefix} does not match sha256 {expected_sha256}")
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".partial-"))
        try:
            for name, sha in files.items():
                target = staging / name
                self.client.fget_object(bucket, f"{prefix}/{name}", str(target))
                if file_sha256(target) != sha:
                    raise ArtifactIntegrityError(
                        f"{name} of s3://{bucket}/{prefix} does not match its sha256", file=name
                    )
            if dest.exists():
                shutil.rmtree(dest)
            staging.rename(dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return dest

    def delete_prefix(self, prefix: str) -> None:
        for obj in self.client.list_objects(self.bucket, prefix=f"{prefix}/", recursive=True):
            self.client.remove_object(self.bucket, obj.object_name)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (bucket, prefix)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri}")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    return bucket, prefix.rstrip("/")
