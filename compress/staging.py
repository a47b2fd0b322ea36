"""Writing an output folder all at once: everything goes into a hidden sibling folder that is renamed
into place only when the writing succeeded, so an interrupted or failed step never leaves a
half-written model behind."""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from .errors import OutputError


@contextmanager
def output_lock(out_dir: Path):
    """Hold ``.NAME.lock`` beside ``out_dir`` (holding this process's pid) while a run may write it: a second run
    for the same folder fails at once naming the holder; a lock left by a process that no longer runs is taken
    over."""
    lock = out_dir.parent / f".{out_dir.name}.lock"
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot write {out_dir}: {e.strerror or e}", "check the path and permissions") from None
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is None and _age(lock) < 10:  # just created: its pid is being written
                raise OutputError(f"another run is starting to write {out_dir}",
                                  "wait for it to finish, or choose another --out") from None
            if holder is not None and holder != os.getpid() and _alive(holder):
                raise OutputError(f"another run (pid {holder}) is writing {out_dir}",
                                  "wait for it to finish, or choose another --out") from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
        except OSError as e:
            raise OutputError(f"cannot write {out_dir}: {e.strerror or e}", "check permissions") from None
    else:
        raise OutputError(f"cannot lock {out_dir}", "another run keeps taking it; try again")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        if _lock_holder(lock) == os.getpid():
            lock.unlink(missing_ok=True)


def _lock_holder(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return float("inf")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def staged_folder(out_dir: Path):
    """Yield a fresh temporary folder; on success it replaces ``out_dir``, on any error it is removed."""
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir(parents=True, exist_ok=False)
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except (OSError, SafetensorError) as e:  # ENOSPC included: nothing is left behind
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise OutputError(f"cannot write {out_dir}: {reason}", "check permissions and free disk") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
