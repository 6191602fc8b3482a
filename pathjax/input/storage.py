"""One path abstraction for slides and records: local paths, shared filesystems, object stores.

Local paths (and `file://` URLs, which become local paths) use `os` directly, so renames are
atomic. Any other URL (`gs://`, `s3://`, `memory://`, ...) goes through fsspec, which the
stack already installs (tiffslide depends on it); `gs://` needs `gcsfs`, `s3://` needs
`s3fs` on the workers. Writes to an object store are atomic per object (a reader sees the
old object or the new one), so remote files are written by one upload; local files are
written under a unique temporary name and renamed.

Unique temporary names carry the host, the pid and a random part: two attempts of one
slide on two hosts (which may share a pid) never write the same file.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import socket
import uuid
from typing import Any

TMP_MARK = ".tmp-"


def is_remote(path: str) -> bool:
  """True for URLs that are not local files (`file://` counts as local)."""
  return "://" in path and not path.startswith("file://")


def local_path(path: str) -> str:
  """A local path for `path` (strips `file://`); remote URLs are returned unchanged."""
  return path[len("file://"):] if path.startswith("file://") else path


def _fs(path: str):
  import fsspec
  fs, _ = fsspec.core.url_to_fs(path)
  return fs


def join(base: str, *parts: str) -> str:
  if is_remote(base):
    return posixpath.join(base, *parts)
  return os.path.join(local_path(base), *parts)


def basename(path: str) -> str:
  return posixpath.basename(path.rstrip("/")) if is_remote(path) else os.path.basename(path)


def unique_tmp(path: str) -> str:
  """`path` + a temporary suffix unique across hosts, processes and attempts."""
  host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:32] or "host"
  return f"{path}{TMP_MARK}{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def exists(path: str) -> bool:
  return _fs(path).exists(path) if is_remote(path) else os.path.exists(local_path(path))


def isdir(path: str) -> bool:
  return _fs(path).isdir(path) if is_remote(path) else os.path.isdir(local_path(path))


def info(path: str) -> dict[str, Any] | None:
  """{"size", "mtime"} of a file, or None if there is none (mtime None where unknown)."""
  if not is_remote(path):
    try:
      st = os.stat(local_path(path))
    except FileNotFoundError:
      return None
    return {"size": st.st_size, "mtime": st.st_mtime}
  fs = _fs(path)
  try:
    d = fs.info(path)
  except FileNotFoundError:
    return None
  mtime = d.get("mtime") or d.get("updated") or d.get("LastModified") or d.get("created")
  return {"size": int(d.get("size") or 0), "mtime": None if mtime is None else str(mtime)}


def makedirs(path: str) -> None:
  if is_remote(path):
    _fs(path).makedirs(path, exist_ok=True)
  else:
    os.makedirs(local_path(path), exist_ok=True)


def read_text(path: str) -> str:
  if is_remote(path):
    with _fs(path).open(path, "rb") as f:
      return f.read().decode("utf-8")
  with open(local_path(path), encoding="utf-8") as f:
    return f.read()


def open_binary(path: str):
  """A binary file object for reading (local or remote)."""
  if is_remote(path):
    return _fs(path).open(path, "rb")
  return open(local_path(path), "rb")


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` so that a reader sees the old file or the whole new one, never a part.

  A failed local write (a full disk) removes its temporary file before raising.
  """
  data = text.encode("utf-8")
  if is_remote(path):
    with _fs(path).open(path, "wb") as f:
      f.write(data)
    return
  path = local_path(path)
  tmp = unique_tmp(path)
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def put_file(local_src: str, dest: str) -> None:
  """Copies a finished local file to `dest` atomically (rename locally, one upload remotely)."""
  if is_remote(dest):
    _fs(dest).put_file(local_src, dest)
    return
  dest = local_path(dest)
  tmp = unique_tmp(dest)
  try:
    shutil.copyfile(local_src, tmp)
    os.replace(tmp, dest)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def get_file(src: str, local_dest: str) -> None:
  """Copies a (remote) file to a local path."""
  if is_remote(src):
    _fs(src).get_file(src, local_dest)
  else:
    shutil.copyfile(local_path(src), local_dest)


def listdir(path: str) -> list[str]:
  """Names (not paths) of the entries of a directory; [] if it does not exist."""
  if is_remote(path):
    fs = _fs(path)
    if not fs.exists(path):
      return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
  try:
    return sorted(os.listdir(local_path(path)))
  except FileNotFoundError:
    return []


def glob_files(pattern: str) -> list[str]:
  """Sorted files (not directories) matching a glob (`**` recursive); remote matches keep
  their protocol and are listed with one request per directory, not one per file."""
  if is_remote(pattern):
    fs = _fs(pattern)
    protocol = pattern.split("://", 1)[0]
    found = fs.glob(pattern, detail=True)
    return sorted(p if "://" in p else f"{protocol}://{p}"
                  for p, d in found.items() if d.get("type") != "directory")
  import glob as glob_lib
  return sorted(p for p in glob_lib.glob(os.path.expanduser(local_path(pattern)), recursive=True)
                if not os.path.isdir(p))


def has_magic(pattern: str) -> bool:
  return any(c in pattern for c in "*?[")


def remove(path: str) -> None:
  if is_remote(path):
    _fs(path).rm(path)
  else:
    os.remove(local_path(path))
