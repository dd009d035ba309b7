"""Files written whole or not at all (plans, results, tables), and a write that fails (full disk, read-only folder)
is one sentence."""
from __future__ import annotations

import os
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


def write_csv(path, rows: list[dict], fieldnames: list[str] | None = None) -> None:
    """``rows`` as a CSV file (header: ``fieldnames``, else every key in order of first appearance), atomically."""
    import csv
    import io

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if fieldnames is None:
        fieldnames = list(dict.fromkeys(k for r in rows for k in r))
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=fieldnames)
    w.writeheader()
    w.writerows(rows)
    write_atomic(path, out.getvalue())
