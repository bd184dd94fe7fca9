"""Files that hold guest data or steer a daemon (snapshots, pid files, logs, the
run directory): private to this user, never written through a symlink,
never on top of another user's file. A snapshot holds all of guest memory."""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path

from .errors import KemariError


def private_dir(path: Path) -> Path:
    """Create `path` (mode 0700), or check the existing one: a directory owned by
    this user that no other user can write into."""
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise KemariError(f"{path}: cannot create directory: {exc.strerror}") from exc
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise KemariError(f"{path} is not a directory")
    if st.st_uid != os.geteuid():
        raise KemariError(f"{path} is owned by uid {st.st_uid}, not by this user "
                          f"(uid {os.geteuid()}): refusing to keep files there")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise KemariError(f"{path} has mode {mode:04o}: other users could replace files "
                          "there; refusing to use it (chmod go-w)")
    return path


def write_private(path: Path, parts: Iterable[bytes], *, durable: bool = False) -> None:
    """Replace `path` with `parts`, mode 0600: written to a new temporary name
    (O_EXCL, no symlink followed) and renamed over it, so neither a planted
    symlink nor a reader ever sees another file or half of this one.
    `durable`: fsync the file and the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def open_private_append(path: Path) -> int:
    """An fd appending to `path` (a log), created 0600; refuses a symlink and a file
    that is not this user's own regular file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise KemariError(f"{path}: cannot open for writing: {exc.strerror}"
                          + (" (a symlink)" if os.path.islink(path) else "")) from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise KemariError(f"{path} is not a regular file owned by this user: refusing it")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.fchmod(fd, 0o600)
    return fd
