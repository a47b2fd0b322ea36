"""Writing an output folder all at once: everything goes into a hidden sibling folder that is renamed
into place only when the writing succeeded, so an interrupted or failed step never leaves a
half-written model behind."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError


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
    except OSError as e:
        raise OutputError(f"cannot write {out_dir}: {e.strerror or e}", "check permissions and free disk") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
