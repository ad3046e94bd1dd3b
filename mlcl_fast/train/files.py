"""Files the trainer writes and reads back: atomic writes, the output-folder check, and reading
of cached results that may be damaged.

Every file is written to a hidden temporary file in its own folder (`.NAME.*.tmp`) and renamed
over NAME only once complete, so a crash or a full disk leaves either the previous file or none
under NAME, never a partial one (resumable runs treat an existing file as finished).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Optional


class OutputFolderError(OSError):
    """The output folder cannot be created or written; the message names it."""


@lru_cache(maxsize=None)
def _file_mode() -> int:
    # mkstemp creates 0600 files; give results the permissions a plain open() would
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", **kwargs) -> Iterator:
    """Open a temporary file next to `path` for writing; on a clean exit it replaces `path`, on an
    exception it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def dataset_key(name: str) -> str:
    """A dataset argument as one file-name component: a plain name (emotions, tmc2007_500) as it
    is; a path or a `synth:` spec with every character other than letters, digits and ._=+-
    replaced by '_' (a path's '/' would otherwise leave the output folder)."""
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", name).strip("_.") or "dataset"


def write_text(path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1))


def torch_save(obj, path) -> None:
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def save_figure(fig, path, **kwargs) -> None:
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=path.suffix.lstrip(".") or "png", **kwargs)


def ensure_output_folder(folder) -> Path:
    """Create `folder` (and its parents) and check that a file can be written in it, so that an
    unusable --out fails before any training rather than after it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputFolderError(f"{folder}: cannot create or write the output folder "
                                f"({err.strerror or err}{f': {err.filename}' if err.filename else ''})") from err
    return folder


def read_cached(path, load: Callable[[Path], object], what: str = "cached result") -> Optional[object]:
    """`load(path)` for a file written earlier, or None when it is absent or cannot be used: a
    damaged file is named in a warning and the caller computes it again (and overwrites it)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return load(path)
    except Exception as err:  # any failure to read back means: recompute
        warnings.warn(f"{path}: unreadable {what} ({type(err).__name__}: {err}); computing it again",
                      RuntimeWarning, stacklevel=2)
        return None


def load_json_object(path: Path) -> dict:
    """The JSON object in `path` (a loader for read_cached)."""
    obj = json.loads(Path(path).read_text())
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, found {type(obj).__name__}")
    return obj


RECORD_KEYS = ("dataset", "method", "seed", "num_labels", "wall_s", "config", "test", "val", "stages")


def load_record(path: Path) -> dict:
    """A finished run's record (RunResult.to_json() and more), as a study cell or tuning candidate."""
    record = load_json_object(path)
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise ValueError(f"not a run record, no {missing[0]!r}")
    return record
