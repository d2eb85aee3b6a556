"""Paths and URIs through pyarrow filesystems: a local path, ``file://``, ``s3://`` or ``gs://``.

``AWS_ENDPOINT_URL`` (the standard variable of the AWS SDKs) points ``s3://`` at MinIO or any other
S3-compatible server. When the endpoint or the credentials come from the environment they are put into the
filesystem object explicitly, because that object is pickled into Ray tasks, which may run in processes
(or on nodes) whose environment lacks them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from ..errors import UserError, first_line

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://")


def is_uri(location: str | os.PathLike) -> bool:
    return str(location).startswith(REMOTE_SCHEMES)


def _s3() -> pafs.S3FileSystem:
    env = os.environ
    kwargs: dict = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, rest = endpoint.partition("://")
        kwargs["endpoint_override"] = rest if rest else scheme
        if rest:
            kwargs["scheme"] = scheme
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        kwargs["access_key"] = env["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = env["AWS_SECRET_ACCESS_KEY"]
        if env.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = env["AWS_SESSION_TOKEN"]
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region or endpoint:
        kwargs["region"] = region or "us-east-1"
    if endpoint:
        kwargs["force_virtual_addressing"] = False
    return pafs.S3FileSystem(**kwargs)


@dataclass(frozen=True)
class Location:
    """A filesystem and a path in it; ``str()`` gives back what the user wrote (for messages)."""

    fs: pafs.FileSystem
    path: str  # in ``fs``'s terms (no scheme); absolute for local files
    uri: str

    def __str__(self) -> str:
        return self.uri

    @property
    def remote(self) -> bool:
        return not isinstance(self.fs, pafs.LocalFileSystem)

    def join(self, *parts: str) -> "Location":
        path = "/".join([self.path.rstrip("/"), *parts])
        uri = "/".join([self.uri.rstrip("/"), *parts])
        return Location(self.fs, path, uri)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> "Location":
        path = self.path.rstrip("/").rsplit("/", 1)[0]
        uri = self.uri.rstrip("/").rsplit("/", 1)[0]
        return Location(self.fs, path, uri)

    def info(self) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path)
        except OSError as exc:
            raise UserError(f"{self.uri}: cannot reach it: {first_line(exc)}") from None

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def listdir(self) -> list[str]:
        """Names directly under this directory (or prefix); empty when there is nothing."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        except OSError as exc:
            raise UserError(f"{self.uri}: cannot list it: {first_line(exc)}") from None
        return sorted(i.base_name for i in infos)

    def read_text(self) -> str:
        with self.fs.open_input_stream(self.path) as f:
            return f.read().decode()

    def write_bytes(self, data: bytes) -> None:
        if not self.remote:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def remove(self) -> None:
        """Delete this file or tree; nothing if it is not there (best effort on failure paths)."""
        info = self.info()
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)


def locate(location: str | os.PathLike) -> Location:
    """The filesystem and path of a local path or URI (``s3://bucket/key``, ``gs://``, ``file://``)."""
    text = str(location)
    if text.startswith("s3://"):
        return Location(_s3(), text[len("s3://"):].rstrip("/"), text.rstrip("/"))
    if text.startswith(("gs://", "gcs://")):
        try:
            fs, path = pafs.FileSystem.from_uri(text)
        except (OSError, ValueError, ImportError) as exc:
            raise UserError(f"{text}: cannot open Google Cloud Storage: {first_line(exc)}") from None
        return Location(fs, path.rstrip("/"), text.rstrip("/"))
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        raise UserError(f"{text}: unsupported URI scheme (use a local path, s3:// or gs://)")
    path = os.path.abspath(text)
    return Location(pafs.LocalFileSystem(), path, str(location))
