"""Checkpoint files: ``NAME.safetensors`` weights with a ``NAME.json`` sidecar.

The weights file holds tensors only (no pickle, so loading one runs no code); the sidecar says
what they are for (``format``, ``format_version``, ``kind``, ``net``, ``labels`` and whatever the
side that wrote it adds). :func:`write_weights` writes the weights first and the sidecar last,
each through :func:`~medvit.core.files.atomic_path`, so a sidecar on disk implies complete
weights beside it. Reading checks the sidecar's format and version and the checkpoint's
``kind`` (``volume`` when absent, ``lidar``, ``pretrain``); :func:`check_fit` compares keys and
shapes with a net before anything is copied and names the first that differs. Every refusal
is a one-line :class:`~medvit.core.errors.CheckpointError` naming the file.

The volume specifics (building the net from the sidecar, ``.pt`` files, encoders) live in
:mod:`medvit.checkpoint`, the LiDAR ones in :mod:`pointcloud.checkpoint`. Functions that take or
return tensors import torch when called.
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medvit.core.errors import CheckpointError
from medvit.core.files import atomic_path

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMAT = "medvit-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_SUFFIX = ".safetensors"


def checkpoint_sidecar(path: str | Path) -> Path:
    """The JSON sidecar of the weights file ``path``: ``NAME.safetensors`` -> ``NAME.json``."""
    return Path(path).with_suffix(".json")


def write_weights(net: nn.Module, path: str | Path, sidecar: dict[str, Any], *,
                  prefixes: tuple[str, ...] | None = None) -> Path:
    """Weights of ``net`` to ``path`` (``.safetensors``), then ``sidecar`` as JSON beside it; both atomic.

    The shared writer for every kind of checkpoint (volume nets, point nets, encoders from
    ``medvit pretrain``); ``sidecar`` must carry ``format``, ``format_version``, ``net``, ``labels``.
    With ``prefixes`` only the keys starting with one of them are written (an encoder's). A
    DataParallel/DDP or ``torch.compile`` wrapper is saved under the module's own keys. Raises
    :class:`CheckpointError` for a path not ending in ``.safetensors``; a sidecar JSON cannot hold
    raises before anything is written. Imports torch.
    """
    import safetensors.torch

    path = Path(path)
    if path.suffix != WEIGHTS_SUFFIX:
        raise CheckpointError(f"{path}: checkpoints are written as {WEIGHTS_SUFFIX} files")
    # serialise before touching the disk: a value JSON cannot hold fails here, leaving old files intact
    text = json.dumps(sidecar, indent=2) + "\n"
    tensors = _portable_state_dict(net)
    if prefixes is not None:
        tensors = {k: t for k, t in tensors.items() if k.startswith(prefixes)}
    with atomic_path(path) as tmp:
        # bytes written by us, not save_file: its own temporary file is made 0600 (unreadable to
        # colleagues on a shared server) and its write errors are not OSErrors
        Path(tmp).write_bytes(safetensors.torch.save(tensors, metadata={"format": "pt"}))
    with atomic_path(checkpoint_sidecar(path)) as tmp:
        Path(tmp).write_text(text)
    return path


def read_weights(path: str | Path, *, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict (CPU tensors) and sidecar of a ``.safetensors`` checkpoint of ``kind``.

    Raises :class:`CheckpointError` for a missing file, a folder, another suffix, a missing or
    unreadable sidecar, a checkpoint of another kind, or unreadable weights. Imports torch.
    """
    path = checkpoint_file(path)
    if path.suffix != WEIGHTS_SUFFIX:
        raise CheckpointError(f"{path}: expected a {WEIGHTS_SUFFIX} checkpoint with its .json sidecar")
    meta = read_sidecar(path)
    have = meta.get("kind", "volume")
    if have != kind:
        raise CheckpointError(f"{path}: this is a {have} checkpoint, not a {kind} one")
    return read_safetensors(path), meta


def checkpoint_file(path: str | Path) -> Path:
    """``path`` as a Path when it is a file; CheckpointError for a folder or a missing file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; give the checkpoint file in it (a .safetensors with its .json "
                              "sidecar, or a MONAI bundle's models/model.pt)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    return path


def read_sidecar(path: Path) -> dict[str, Any]:
    """The sidecar of the weights file ``path`` as a dict that has ``net`` and ``labels``.

    Raises :class:`CheckpointError` when it is missing, unreadable, not JSON, not a medvit
    sidecar, of a newer ``format_version`` than :data:`FORMAT_VERSION`, or lacks a key.
    """
    sidecar = checkpoint_sidecar(path)
    if not sidecar.is_file():
        raise CheckpointError(
            f"{path}: its sidecar {sidecar} is missing; a .safetensors checkpoint needs the .json written beside it"
        )
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{sidecar}: cannot read the checkpoint sidecar ({e})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{sidecar}: not valid JSON (line {e.lineno})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{sidecar}: not a medvit checkpoint sidecar (no \"format\": \"{FORMAT}\")")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{sidecar}: checkpoint format_version {version!r} is newer than this medvit reads ({FORMAT_VERSION}); "
            f"it was written by medvit {meta.get('medvit_version', '?')}"
        )
    for key in ("net", "labels"):
        if key not in meta:
            raise CheckpointError(f"{sidecar}: missing key '{key}'")
    return meta


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` on the CPU; CheckpointError when it cannot be read. Imports torch."""
    import safetensors.torch

    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except safetensors.SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None


def nonfinite_key(state: dict[str, torch.Tensor]) -> str | None:
    """The first key of ``state`` whose floating tensor holds NaN or inf, else None. Imports torch."""
    import torch

    return next((k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)


def check_fit(path: str | Path, state: dict[str, torch.Tensor], net: nn.Module, net_desc: str) -> None:
    """CheckpointError naming the first key whose presence or shape differs between ``state`` and ``net``.

    ``net_desc`` names the net in the message (``unetr(in_channels=1, out_channels=2)``). When more
    than half the keys differ the message says the checkpoint looks like one for another net. A
    state that fits but holds NaN or inf (a diverged run) is refused too.
    """
    path = Path(path)
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    reshaped = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    unexpected = [k for k in state if k not in expected]
    if not (missing or reshaped or unexpected):
        # fits: a diverged run's NaN weights would only show as an error deep inside the first window
        bad_values = nonfinite_key(state)
        if bad_values is not None:
            raise CheckpointError(f"{path}: key '{bad_values}' holds NaN or infinite values (saved from a diverged run?)")
        return
    bad = set(missing) | set(reshaped)
    first = next((k for k in expected if k in bad), None)
    if first is None:
        problem = f"key '{unexpected[0]}' is not a parameter of {net_desc}"
    elif first in missing:
        problem = f"key '{first}' is missing from the checkpoint"
    else:
        problem = (
            f"key '{first}' has shape {shape_text(state[first])} in the checkpoint "
            f"but {shape_text(expected[first])} in {net_desc}"
        )
    n_diff = len(bad) + len(unexpected)
    counts = f"{len(missing)} missing, {len(reshaped)} of another shape, {len(unexpected)} unexpected"
    if n_diff > max(len(expected), len(state)) / 2:
        raise CheckpointError(
            f"{path}: looks like a checkpoint for another net than {net_desc} "
            f"({counts} of its {len(expected)} keys); first: {problem}"
        )
    more = f" ({counts} keys)" if n_diff > 1 else ""
    raise CheckpointError(f"{path}: {problem}{more}")


def load_torch_file(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with a corrupt, truncated or unsafe file
    as a one-line :class:`CheckpointError`. Imports torch."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True): {_unpickler_reason(e)}") from None
    except (RuntimeError, OSError, EOFError, struct.error, ValueError, IndexError, KeyError, AssertionError) as e:
        # what torch.load raised on truncated or damaged files in our trials: the zip reader raises
        # RuntimeError or OSError (EINVAL); the unpickler EOFError, struct.error, UnicodeDecodeError,
        # IndexError or a failed assertion, depending on which byte is wrong
        first = (e.strerror if isinstance(e, OSError) else str(e).split(". ")[0]) or "unexpected end of data"
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {first})") from None


SAFE_LOAD = "only tensors and plain containers are loaded, never pickled objects or code"


def _unpickler_reason(e: pickle.UnpicklingError) -> str:
    """The line of torch's long weights_only message that says what was refused."""
    marker = "WeightsUnpickler error:"
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue", "(1)", "(2)")
    for line in str(e).splitlines():
        line = line.split(marker, 1)[1] if marker in line else line
        line = line.strip()
        if line and not line.startswith(boilerplate):
            return line.split(". Please")[0].rstrip(".") + f" ({SAFE_LOAD})"
    return SAFE_LOAD


def shape_text(t: torch.Tensor) -> str:
    """A tensor's shape for a message: ``(2, 3)``."""
    return str(tuple(t.shape))


def _portable_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as contiguous CPU tensors that each own their storage (safetensors refuses shared ones)."""
    from torch import nn

    if isinstance(net, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        net = net.module
    net = getattr(net, "_orig_mod", net)  # torch.compile wraps the module; save the module's own keys
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in net.state_dict().items():
        t = t.detach().cpu().contiguous()
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        # tied weights and views share storage; a copy makes each tensor its own
        if ptr and (ptr in seen or storage.nbytes() != t.nbytes):
            t = t.clone()
        else:
            seen.add(ptr)
        out[key] = t
    return out
