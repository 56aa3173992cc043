"""Where converted nets and what was learnt about them are kept on disk.

``<root>/<checkpoint sha256>/<net class>-c<in channels>-<D>x<H>x<W>-b<batch>/`` holds, for one
net, window and batch:

- ``<stem>.onnx``: the export (``stem`` names torch's and onnxscript's versions and the opset,
  :func:`medvit.runtimes.backends.export_stem`), shared by both runtimes;
- ``<stem>.openvino-<version>.compiled/``: OpenVINO's compiled blobs of that export (its
  ``CACHE_DIR``; one per thread count, OpenVINO names and checks them);
- ``<stem>.<runtime>-<version>.json``: the verdict of that runtime version on that export (it ran
  and matched torch within the tolerance, with the difference; or why not), so a later run neither
  checks again nor retries a conversion that failed;
- ``<stem>.auto-<key>.json``: ``auto``'s choice and timings for one set of installed runtime
  versions and thread count.

Another torch, onnxscript or runtime version finds no file of its name and builds its own: nothing
made by another version is loaded. Every file is written under a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from medvit.core.errors import InputError
from medvit.core.files import atomic_path, check_writable


def default_cache_dir() -> Path:
    """``$MEDVIT_CACHE/runtimes``, else ``$XDG_CACHE_HOME/medvit/runtimes``, else ``~/.cache/medvit/runtimes``."""
    if os.environ.get("MEDVIT_CACHE"):
        base = Path(os.environ["MEDVIT_CACHE"])
    elif os.environ.get("XDG_CACHE_HOME"):
        base = Path(os.environ["XDG_CACHE_HOME"]) / "medvit"
    else:
        base = Path.home() / ".cache" / "medvit"
    return base / "runtimes"


def entry_dir(root: Path, sha256: str, net_class: str, in_channels: int, roi: tuple[int, int, int], batch: int) -> Path:
    """The folder of one net (by its checkpoint's SHA-256 and class), window and batch."""
    return Path(root) / sha256 / f"{net_class}-c{in_channels}-{'x'.join(map(str, roi))}-b{batch}"


def unwritable(folder: Path) -> str | None:
    """Why files cannot be written in ``folder`` (created if missing), or None when they can."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        check_writable(folder / "probe")
    except InputError as e:
        return e.problem
    except OSError as e:
        return e.strerror or str(e)
    return None


def read_json(path: Path) -> dict[str, Any] | None:
    """The mapping in ``path``, or None when it is missing or unreadable (then it is rebuilt)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict[str, Any]) -> bool:
    """Write ``data`` to ``path`` atomically; False (nothing written) where the folder refuses it."""
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    except (InputError, OSError):
        return False
    return True
