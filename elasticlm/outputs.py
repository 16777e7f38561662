"""One output-path policy for every verb that writes.

* An existing non-empty path is refused unless ``--force``; ``--force`` replaces only a directory that looks
  like what the verb writes (a model directory has ``config.json``, importance scores ``importance.json``,
  …), never an input of the command (or a directory holding one), never a regular file.
* Symlinks are followed and said; a dangling one, or a path under a regular file, is refused.
* The result is written into a hidden sibling directory and published with a rename. A lock file beside the
  target admits one writer at a time, so of two processes racing for one path exactly one succeeds and the
  other gets a one-line error; the publishing rename never replaces a directory that appeared meanwhile
  (``renameat2(RENAME_NOREPLACE)`` where the kernel has it).
* Temporary directories and locks left by crashed writers on this host (their process is gone) are removed
  when the next writer comes to the same place, and said so.
* I/O errors (disk full, read-only, permission) become one line naming the path; the previous content is
  intact.

Hidden names: ``.<name>.tmp-<host>-<pid>-<hex>`` (being written), ``.<name>.old-<host>-<pid>-<hex>`` (the
replaced content while the new one is renamed in) and ``.<name>.lock``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import OutputError

log = logging.getLogger("elasticlm")

# What a --force may replace, per kind of output: any one of these files marks the directory.
MARKERS = {
    "model": ("config.json",),
    "elastic": ("config.json", "elastic.json"),
    "extract": ("config.json", "budget-*/config.json"),
    "importance": ("importance.json",),
    "report": ("eval.json",),
    "tokenizer": ("tokenizer.json",),
    "checkpoint": ("trainer_state.json", "config.json"),
    "run": ("run_config.json",),
    "demo": ("demo.json", "parent/run_config.json"),
}
_HIDDEN = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old)-(?:(?P<host>[^-]+)-)?(?P<pid>\d+)-[0-9a-f]+$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def writer_tag() -> str:
    """``<host>-<pid>-<hex>``: the suffix of this process's hidden temporary names (see the module)."""
    return f"{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def resolve_output(path: str | os.PathLike, *, force: bool = False, kind: str = "model",
                   inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """The directory to write for ``path`` under the policy (symlinks resolved), or :class:`OutputError`.

    Call it before long work too, so that a refused path costs nothing.
    """
    given = Path(path)
    for ancestor in reversed(given.absolute().parents):
        if ancestor.exists() and not ancestor.is_dir():
            raise OutputError(f"cannot write {given}: {ancestor} is a file, not a directory")
    if given.is_symlink():
        target = given.resolve()
        if not target.exists() and not target.parent.is_dir():
            raise OutputError(f"cannot write {given}: it is a symlink to {os.readlink(given)}, which does not exist")
        log.info("%s is a symlink: writing %s", given, target)
    real = given.resolve()
    for item in inputs:
        src = Path(item).resolve()
        if real == src or real in src.parents:
            raise OutputError(f"refusing to write {given}: it {'is' if real == src else 'holds'} the input {item}; "
                              "choose another output path")
    if real.exists():
        if not real.is_dir():
            raise OutputError(f"{given} is a file, not a directory; give a directory path (the file is left as it is)")
        if any(real.iterdir()):
            if not force:
                raise OutputError(f"{given} already exists and is not empty; choose another path or pass --force")
            markers = MARKERS.get(kind, ())
            if markers and not any(any(real.glob(m)) for m in markers):
                raise OutputError(f"--force replaces only a {kind} directory, and {given} does not look like one "
                                  f"(no {' or '.join(markers)}); remove it yourself or choose another path")
    return real


def clean_stale(directory: Path, name: str | None = None) -> list[Path]:
    """Remove the hidden temporary directories and locks in ``directory`` (for ``name`` only, if given) whose
    writer was a process of this host that no longer runs; returns what was removed (and logs it)."""
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    host = _host()
    for entry in directory.iterdir():
        m = _HIDDEN.match(entry.name)
        if m is not None:
            owner_host, pid = m.group("host") or host, int(m.group("pid"))
            if (name is None or m.group("name") == name) and owner_host == host and not _alive(pid):
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
                removed.append(entry)
        elif entry.name.startswith(".") and entry.name.endswith(".lock") and \
                (name is None or entry.name == f".{name}.lock") and _stale_lock(entry):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    for entry in removed:
        log.warning("removed %s, left by a writer that is no longer running", entry)
    return removed


def _stale_lock(lock: Path) -> bool:
    try:
        owner_host, pid = lock.read_text().split()
        return owner_host == _host() and not _alive(int(pid))
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _lock(real: Path, given: Path) -> Iterator[None]:
    lock = real.parent / f".{real.name}.lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            owner = lock.read_text().split()
        except OSError:
            owner = []
        who = f"pid {owner[1]} on {owner[0]}" if len(owner) == 2 else "another process"
        raise OutputError(f"{given} is being written by {who} (lock {lock}); wait for it or choose another "
                          "path") from None
    except OSError as exc:  # read-only, full, no permission: said like any other write
        raise io_error(given, exc) from None
    try:
        os.write(fd, f"{_host()} {os.getpid()}\n".encode())
        os.close(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)


_RENAME_NOREPLACE = 1


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing with FileExistsError if ``dst`` exists (renameat2 on Linux; else a
    check then a rename, which the lock file makes safe among elasticlm writers)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd = -100
        if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, "exists", str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS):  # not supported by this file system: fall back
            raise OSError(err, os.strerror(err), str(dst))
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    os.rename(src, dst)


def io_error(path: Path | str, exc: BaseException) -> OutputError:
    """One line for an OS error (or a safetensors I/O error) met while writing ``path``."""
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
        return OutputError(f"cannot write {path}: {reason}{where}; nothing there was changed")
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    for code, reason in ((errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system"),
                         (errno.EACCES, "Permission denied"), (errno.EDQUOT, "Disk quota exceeded")):
        if f"code: {code}" in text or reason.lower() in text.lower():
            return OutputError(f"cannot write {path}: {reason}; nothing there was changed")
    return OutputError(f"cannot write {path}: {text}; nothing there was changed")


def _is_io_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError"


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, force: bool = False, kind: str = "model",
                  inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` only if the block completes (see the module)."""
    given = Path(path)
    real = resolve_output(given, force=force, kind=kind, inputs=inputs)
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise io_error(given, exc) from None
    clean_stale(real.parent, real.name)
    with _lock(real, given) if _writable(real.parent, given) else contextlib.nullcontext():
        # under the lock: what another writer published meanwhile is judged like any existing path
        real = resolve_output(given, force=force, kind=kind, inputs=inputs)
        tag = writer_tag()
        tmp = real.parent / f".{real.name}.tmp-{tag}"
        try:
            tmp.mkdir()
            yield tmp
            for f in tmp.rglob("*"):  # data on disk before the rename makes it visible
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            if real.exists():
                old = real.parent / f".{real.name}.old-{tag}"
                real.rename(old)
                try:
                    _rename_noreplace(tmp, real)
                except BaseException:
                    old.rename(real)  # put the previous content back
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                _rename_noreplace(tmp, real)
        except FileExistsError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OutputError(f"{given} was created by another process while this one was writing; nothing "
                              "was replaced") from None
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if _is_io_error(exc):
                raise io_error(given, exc) from None
            raise


def _writable(directory: Path, given: Path) -> bool:
    if not os.access(directory, os.W_OK):
        raise OutputError(f"cannot write {given}: {directory} is not writable (permission denied or read-only)")
    return True


def atomic_file(path: str | os.PathLike, data: bytes | str) -> None:
    """Write one file so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{writer_tag()}")
    try:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        tmp.replace(path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if _is_io_error(exc):
            raise io_error(path, exc) from None
        raise
