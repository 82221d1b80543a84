"""Where runs live: a local folder, a shared mount, or object storage (`s3://bucket/prefix`, `gs://...`).

Everything goes through pyarrow's filesystems, the layer Ray Train itself writes checkpoints with, so a path that
works as `storage.path` for Ray Train works here too. S3-compatible endpoints come from the standard AWS
environment variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...), read by pyarrow.

Nodes of a cluster share no disk. A worker or replica reads what it needs from storage: `local_copy` downloads a
file or folder from object storage once per node into a node-local cache, and refuses clearly when a local path is
not there, as on a node that lacks the mount.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable


def is_uri(path: str | os.PathLike) -> bool:
    """Whether `path` names object storage; `file://` paths are local paths."""
    return "://" in str(path) and not str(path).startswith("file://")


def normalize(path: str | os.PathLike) -> str:
    """A URI as given (without a trailing slash), or an absolute local path (`file://` removed)."""
    path = str(path).removeprefix("file://")
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


def weights_bytes(folder: str) -> int:
    """Bytes of the weight files (*.safetensors, *.bin) directly in a model folder, a local path or a URI."""
    import pyarrow.fs

    fs, inner = filesystem(folder)
    return sum(info.size for info in fs.get_file_info(pyarrow.fs.FileSelector(inner))
               if info.type == pyarrow.fs.FileType.File and info.base_name.endswith((".safetensors", ".bin")))


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
    """Node-local cache of what was copied from object storage (`RAYLOOP_CACHE`, else ~/.cache/rayloop)."""
    return Path(os.environ.get("RAYLOOP_CACHE", "~/.cache/rayloop")).expanduser()


def training_state(relative: str) -> bool:
    """Files of a Trainer checkpoint that only resuming needs (optimizer, scheduler, RNG, DeepSpeed shards): a node
    that loads the model to use it skips them."""
    first = relative.split("/", 1)[0]
    return (first.startswith(("optimizer", "scheduler", "rng_state", "global_step", "trainer_state", "training_args"))
            or first in ("deepspeed", "latest"))


def local_copy(path: str, exclude: Callable[[str], bool] | None = None) -> str:
    """A local file or folder holding `path`: the path itself when it is local, else a copy in this node's cache,
    without the files that `exclude` (given the path relative to the folder) picks out.

    The cache is keyed by the URI and the listing (names, sizes, modification times), so a folder written anew
    under the same name is copied again. A local path missing here is an error that names the node: on a cluster,
    storage must be a mount that every node has, or object storage."""
    if not is_uri(path):
        path = normalize(path)
        if not Path(path).exists():
            raise FileNotFoundError(
                f"{path} does not exist on node {socket.gethostname()}: a worker reads runs, models and data from "
                f"storage, so on a cluster storage.path must be a shared mount or s3://")
        return path
    import pyarrow.fs

    fs, inner = filesystem(path)
    info = fs.get_file_info(inner)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise FileNotFoundError(f"nothing at {path}")
    if info.type == pyarrow.fs.FileType.File:
        files = [info]
    else:
        files = [f for f in fs.get_file_info(pyarrow.fs.FileSelector(inner, recursive=True))
                 if f.type == pyarrow.fs.FileType.File]
    base = inner.rstrip("/") if info.type == pyarrow.fs.FileType.Directory else inner.rsplit("/", 1)[0]
    wanted = [(f, f.path[len(base) + 1:]) for f in files]
    wanted = [(f, rel) for f, rel in wanted if not (exclude and exclude(rel))]
    listing = "\n".join(f"{rel} {f.size} {f.mtime_ns}" for f, rel in sorted(wanted, key=lambda w: w[1]))
    key = hashlib.sha256(f"{path}\n{listing}".encode()).hexdigest()[:24]
    root = cache_root() / "storage"
    target = root / key
    name = inner.rsplit("/", 1)[-1]
    result = str(target / name) if info.type == pyarrow.fs.FileType.File else str(target)
    if (target / ".complete").is_file():
        return result
    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_downloads(root)
    # Download beside the target and rename into place: two processes of one node may ask at once.
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        for file, relative in wanted:
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(file.path) as src, open(staging / relative, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        (staging / ".complete").write_text(path)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / ".complete").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _remove_abandoned_downloads(root: Path, older_than_s: float = 3600) -> None:
    """Staging folders that a killed process left behind (a finished download is renamed away at once)."""
    import time

    for staging in root.glob(".*.*"):
        try:
            if time.time() - staging.stat().st_mtime > older_than_s:
                shutil.rmtree(staging, ignore_errors=True)
        except OSError:
            continue
