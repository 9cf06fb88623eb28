"""Files and URLs, shared by the result stores (``prefect_openeo.storage``) and the job databases
(``prefect_openeo.jobdb``): atomic local writes, the object-store URL schemes, and URLs that ``pathlib`` mangled.

Imports nothing of prefect-openeo, so any module may use it.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["MANGLED_URL", "S3_SCHEMES", "SCHEMES", "atomic_write", "lost_slashes"]

#: URL schemes of object stores, with the fsspec package that implements them and the extra that installs it.
SCHEMES: dict[str, tuple[str, str]] = {
    "s3": ("s3fs", "pip install 'prefect-openeo[s3]'"),
    "s3a": ("s3fs", "pip install 'prefect-openeo[s3]'"),
    "gs": ("gcsfs", "pip install gcsfs"),
    "gcs": ("gcsfs", "pip install gcsfs"),
    "az": ("adlfs", "pip install adlfs"),
    "abfs": ("adlfs", "pip install adlfs"),
    "abfss": ("adlfs", "pip install adlfs"),
    "memory": ("fsspec", "pip install fsspec"),
}
#: The schemes of ``SCHEMES`` that are S3 (s3fs), where conditional and multipart requests are used.
S3_SCHEMES = ("s3", "s3a")

#: A URL whose ``//`` was collapsed by ``pathlib.Path`` (``Path("s3://b/p")`` is ``s3:/b/p``).
MANGLED_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/[^/]")


def lost_slashes(text: str) -> str | None:
    """The URL that ``text`` was meant to be if it is an object-store or ``file://`` URL whose ``//`` was
    collapsed by ``pathlib.Path`` (``s3:/bucket/jobs.csv`` -> ``s3://bucket/jobs.csv``); None otherwise."""
    mangled = MANGLED_URL.match(text)
    if not mangled or mangled.group(1).lower() not in (*SCHEMES, "file"):
        return None
    scheme = mangled.group(1)
    return f"{scheme}://{text[len(scheme) + 2 :]}"


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _keep_mode(path: Path, tmp: Path) -> None:
    """The replacement keeps the file's mode and owner (a temporary file is 0600); a new file gets the mode any
    new file gets here (0666 less the umask)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        os.chmod(tmp, 0o666 & ~_UMASK)
        return
    os.chmod(tmp, st.st_mode & 0o7777)
    try:
        os.chown(tmp, st.st_uid, st.st_gid)
    except (PermissionError, AttributeError):  # not ours to give away: the writer's own
        pass


class Changed(Exception):
    """``atomic_write``'s ``unchanged`` check failed: ``path`` changed meanwhile; nothing was written."""


def atomic_write(path: Path, write: Any, unchanged: Any = None) -> None:
    """Call ``write(tmp_path)`` then fsync and rename over ``path``; ``path`` is intact if anything fails.
    ``unchanged()``, if given, is asked right before the rename: False raises ``Changed`` (nothing written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        _keep_mode(path, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if unchanged is not None and not unchanged():
            raise Changed(str(path))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
