"""Result files: written whole or not at all, and a write that fails (full disk, read-only folder) is one sentence."""
from __future__ import annotations

import os
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError
from .faults import kill_point


@contextmanager
def atomic_path(path):
    """Yield a temp path beside ``path``; when the block ends, the temp file replaces ``path`` in one rename, so a
    reader (or a rerun after a kill) sees the old file or the new one, never half of one. A leftover temp file
    (``.<name>.*.tmp``, from a killed writer) is never read as a result."""
    path, tmp = Path(path), None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        kill_point(f"write:{path.name}")
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise OutputError(f"Could not write {path} ({e.strerror or e}); free disk space or make the folder writable, "
                          "or set out_dir=... to another folder.") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def write_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (``atomic_path``), synced to disk before the rename."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def remove_temp_files(folder) -> list[Path]:
    """Delete the temp files that killed writers left in ``folder``; returns them."""
    stale = sorted(Path(folder).glob(".*.tmp"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def writable_dir(folder) -> Path:
    """Create ``folder`` and check that files can be made in it, before any compute."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".rap-probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"Output folder {folder} is not writable ({e.strerror or e}); make it writable or set "
                          "out_dir=... to another folder.") from None
    return folder


def _holder(owner: Path) -> str:
    try:
        return owner.read_text().strip() or "another process"
    except OSError:
        return "another process"


@contextmanager
def job_lock(folder, label: str):
    """Hold ``<folder>/.rap.lock`` (an OS file lock, ``filelock``) while a job computes, so that two sweeps over the
    same folder, or parallel launcher workers, never compute one cell at once; the second waits, then finds the
    result. The kernel drops the lock when its holder dies, so a killed job never blocks the rerun; the owner file
    it leaves behind tells the rerun that it is taking over."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    lock, owner = FileLock(str(folder / ".rap.lock")), folder / ".rap.owner"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"[rap] {label}: waiting for {_holder(owner)}, which is computing this job", flush=True)
        lock.acquire()
    try:
        if owner.exists():
            print(f"[rap] {label}: taking over from {_holder(owner)}, which was killed before it finished", flush=True)
        write_atomic(owner, f"pid {os.getpid()} on {socket.gethostname()}\n")
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()


def lock_state(folder) -> str | None:
    """``running`` while a process holds the job's lock, ``killed`` when its holder died without releasing it (the
    owner file is left), None otherwise. Never blocks."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    if not (folder / ".rap.owner").exists():
        return None
    lock = FileLock(str(folder / ".rap.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return "running"
    lock.release()
    return "killed"
