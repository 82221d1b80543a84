"""Where runs live: a local folder, a shared mount, or object storage (`s3://bucket/prefix`, `gs://...`).

Everything goes through pyarrow's filesystems, the layer Ray Train itself writes checkpoints with, so a path that
works as `storage.path` for Ray Train works here too. S3-compatible endpoints come from the standard AWS
environment variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...), read by pyarrow.

Nodes of a cluster share no disk. A worker or replica reads what it needs from storage: `local_copy` downloads a
folder from object storage once per node into a node-local cache (registered checkpoints never change, so the
URI is the cache key), and refuses clearly when a local path is not there, as on a node that lacks the mount.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def normalize(path: str | os.PathLike) -> str:
    """A URI as given (without a trailing slash), or an absolute local path."""
    path = str(path)
    return path.rstrip("/") if is_uri(path) else str(Path(path).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    if is_uri(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def filesystem(path: str):
    """(pyarrow filesystem, path within it) for a URI or a local path."""
    import pyarrow.fs

    if is_uri(path):
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), normalize(path)


def _info(path: str):
    fs, inner = filesystem(path)
    return fs.get_file_info(inner)


def exists(path: str) -> bool:
    import pyarrow.fs

    return _info(path).type != pyarrow.fs.FileType.NotFound


def is_file(path: str) -> bool:
    import pyarrow.fs

    return _info(path).type == pyarrow.fs.FileType.File


def is_dir(path: str) -> bool:
    import pyarrow.fs

    return _info(path).type == pyarrow.fs.FileType.Directory


def read_text(path: str) -> str:
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as f:
        return f.read().decode()


def write_text(path: str, text: str) -> None:
    fs, inner = filesystem(path)
    if not is_uri(path):
        Path(inner).parent.mkdir(parents=True, exist_ok=True)
    with fs.open_output_stream(inner) as f:
        f.write(text.encode())


def write_json(path: str, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def upload(local: str | os.PathLike, dest: str) -> None:
    """Copy a local file or folder to `dest` (a URI or a local path), replacing files of the same name."""
    import pyarrow.fs

    local = str(local)
    fs, inner = filesystem(dest)
    if not is_uri(dest):
        if os.path.isdir(local):
            shutil.copytree(local, inner, dirs_exist_ok=True)
        else:
            Path(inner).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(local, inner)
        return
    if os.path.isdir(local):
        pyarrow.fs.copy_files(local, inner, source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=fs)
    else:
        with open(local, "rb") as src, fs.open_output_stream(inner) as out:
            shutil.copyfileobj(src, out)


def copy(src: str, dest: str) -> None:
    """Copy one file within storage (any scheme to any scheme)."""
    src_fs, src_inner = filesystem(src)
    dest_fs, dest_inner = filesystem(dest)
    if not is_uri(dest):
        Path(dest_inner).parent.mkdir(parents=True, exist_ok=True)
    with src_fs.open_input_stream(src_inner) as f, dest_fs.open_output_stream(dest_inner) as out:
        shutil.copyfileobj(f, out)


def cache_root() -> Path:
    """Node-local cache of folders downloaded from object storage (`RAYLOOP_CACHE`, else ~/.cache/rayloop)."""
    return Path(os.environ.get("RAYLOOP_CACHE", "~/.cache/rayloop")).expanduser()


def local_copy(path: str) -> str:
    """A local file or folder holding `path`: the path itself when it is local, else a copy in this node's cache.

    A local path that is missing here is an error that names the node: on a cluster, storage must be a mount
    every node has, or object storage."""
    if not is_uri(path):
        if not Path(path).expanduser().exists():
            raise FileNotFoundError(
                f"{path} does not exist on node {socket.gethostname()}: a worker reads runs, models and data from "
                f"storage, so on a cluster storage.path must be a shared mount or s3://")
        return str(Path(path).expanduser())
    target = cache_root() / "storage" / hashlib.sha256(path.encode()).hexdigest()[:24]
    name = path.rstrip("/").rsplit("/", 1)[-1]
    done = target / ".complete"
    if done.is_file():
        return str(target / name) if done.read_text() == "file" else str(target)
    import pyarrow.fs

    kind = _info(path).type
    if kind == pyarrow.fs.FileType.NotFound:
        raise FileNotFoundError(f"nothing at {path}")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Download beside the target and rename into place: two processes of one node may ask at once.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fs, inner = filesystem(path)
        if kind == pyarrow.fs.FileType.File:
            with fs.open_input_stream(inner) as src, open(staging / name, "wb") as out:
                shutil.copyfileobj(src, out)
            (staging / ".complete").write_text("file")
        else:
            pyarrow.fs.copy_files(inner, str(staging), source_filesystem=fs,
                                  destination_filesystem=pyarrow.fs.LocalFileSystem())
            (staging / ".complete").write_text("dir")
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not done.is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target / name) if done.read_text() == "file" else str(target)
