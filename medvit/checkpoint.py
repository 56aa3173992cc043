"""Volume checkpoints: our ``NAME.safetensors`` + ``NAME.json`` pairs, and MONAI bundle ``model.pt`` state dicts.

Our checkpoint is two files. ``NAME.safetensors`` holds the weights (no pickle, so loading one runs no
code); ``NAME.json``, the sidecar, says what they are for: the net's config, the label names, the
preprocessing the net was trained with, the inference settings and the package version. The weights
are written first and the sidecar last, each under a temporary name then renamed, so a sidecar on
disk implies complete weights beside it.

A ``.pt``/``.pth`` file (a MONAI bundle's ``models/model.pt``, or any ``torch.save`` of a state dict)
is read with ``torch.load(weights_only=True)``, which refuses pickled code; it does not say which
net it is for, so it needs a config.

Every load checks keys and tensor shapes against the net before copying anything, and names the
first key that does not fit. The file format itself (writing, reading, the fit check) is
:mod:`medvit.core.weights`, shared with the LiDAR checkpoints; this module builds volume nets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import medvit
from medvit.config import Config, ModelConfig, dump_config, parse_config
from medvit.core.errors import CheckpointError, ConfigError
from medvit.core.weights import (
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_SUFFIX,
    check_fit,
    checkpoint_file,
    checkpoint_sidecar,
    load_torch_file,
    nonfinite_key,
    read_safetensors,
    read_sidecar,
    read_weights,
    shape_text,
    write_weights,
)
from medvit.nets import build_net

TORCH_SUFFIXES = (".pt", ".pth")
STATE_DICT_WRAPPERS = ("state_dict", "model", "net")
"""Keys under which training scripts (MONAI's CheckpointSaver among them) nest the state dict."""
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""Key prefixes added by DistributedDataParallel/DataParallel and torch.compile."""
PRETRAIN_KIND = "pretrain"
"""The sidecar ``kind`` of an encoder checkpoint written by ``medvit pretrain``."""


@dataclass
class LoadedModel:
    """A net ready for inference and the config it was built from.

    ``net`` is in eval mode on the requested device; ``config`` is the full :class:`Config` (labels,
    preprocessing, model, infer) to run it with; ``meta`` is the sidecar's content (our checkpoints)
    or a description of the ``.pt`` file, with ``"checkpoint"`` holding the path read.
    """

    net: nn.Module
    config: Config
    meta: dict[str, Any] = field(default_factory=dict)


def describe_net(model: ModelConfig) -> str:
    """A short name for error messages, e.g. ``unetr(in_channels=1, out_channels=2)``."""
    return f"{model.name}(in_channels={model.in_channels}, out_channels={model.out_channels})"


def save_checkpoint(net: nn.Module, path: str | Path, *, config: Config, extra: dict | None = None) -> Path:
    """Write ``net``'s weights to ``path`` (``.safetensors``) and the JSON sidecar beside it; returns ``path``.

    ``config`` must be the config ``net`` was built from; its labels, preprocessing, model and infer
    sections go to the sidecar so :func:`load_checkpoint` can rebuild both. ``extra`` (JSON-ready:
    epoch, metric...) is stored under the sidecar's ``"extra"`` key.
    """
    dumped = dump_config(config)
    if dumped["model"].get("pretrained") is None:  # kept only as provenance of a fine-tuned net
        dumped["model"].pop("pretrained", None)
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "medvit_version": medvit.__version__,
        "net": dumped["model"],
        "labels": dumped["labels"],
        "preprocess": dumped["preprocess"],
        "infer": dumped["infer"],
        "extra": dict(extra or {}),
    }
    return write_weights(net, path, sidecar)


def load_checkpoint(
    path: str | Path, *, config: Config | None = None, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Build the net a checkpoint is for, load its weights and return it in eval mode on ``device``.

    ``.safetensors``: the net and config come from the sidecar; a ``config`` given as well must ask for
    the same net (name, channels, roi size). ``.pt``/``.pth``: a state dict, bare or under
    ``state_dict``/``model``/``net``, ``module.`` prefixes stripped; ``config`` says which net it is for.
    Raises :class:`CheckpointError` for a missing, unreadable or unsafe file, a missing sidecar, or
    weights that do not fit the net (naming the first key that does not).
    """
    path = checkpoint_file(path)
    if path.suffix == WEIGHTS_SUFFIX:
        meta = read_sidecar(path)
        if meta.get("kind", "volume") == PRETRAIN_KIND:
            raise CheckpointError(f"{path}: holds an encoder from 'medvit pretrain', not a trained net; start a training "
                                  "from it with model.pretrained")
        if meta.get("kind", "volume") != "volume":
            raise CheckpointError(f"{path}: this is a {meta['kind']} checkpoint; use it with 'medvit {meta['kind']} segment'")
        cfg = _config_from_sidecar(meta, checkpoint_sidecar(path))
        if config is not None:
            _check_same_net(path, cfg.model, config.model)
        state = read_safetensors(path)
    elif path.suffix in TORCH_SUFFIXES:
        if config is None:
            raise CheckpointError(f"{path}: a .pt state dict does not say which net it is for; pass --config")
        cfg = config
        state, meta = _read_torch_state_dict(path)
    else:
        raise CheckpointError(
            f"{path}: unknown checkpoint type {path.suffix!r}; expected {WEIGHTS_SUFFIX} (with its .json sidecar), "
            f"or a .pt/.pth state dict"
        )
    meta = {**meta, "checkpoint": str(path)}

    try:
        net = build_net(cfg.model)
    except ConfigError as e:
        if config is not None and cfg is config:
            raise  # the user's config is at fault, and the error already names its key
        raise CheckpointError(f"{checkpoint_sidecar(path)}: {e}") from None
    check_fit(path, state, net, describe_net(cfg.model))
    net.load_state_dict(state, strict=True)
    return LoadedModel(net=net.to(device).eval(), config=cfg, meta=meta)


def _config_from_sidecar(meta: dict[str, Any], sidecar: Path) -> Config:
    raw = {"labels": meta["labels"], "model": meta["net"]}
    raw.update({k: meta[k] for k in ("preprocess", "infer") if k in meta})
    try:
        return parse_config(raw, sidecar)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _check_same_net(path: Path, have: ModelConfig, want: ModelConfig) -> None:
    if have.name != want.name:
        raise CheckpointError(f"{path}: checkpoint is for net '{have.name}' but the config asks for '{want.name}'")
    for key in ("in_channels", "out_channels", "roi_size"):
        a, b = getattr(have, key), getattr(want, key)
        if a != b:
            fmt = (lambda v: list(v)) if key == "roi_size" else (lambda v: v)
            raise CheckpointError(
                f"{path}: checkpoint's {have.name} has model.{key} {fmt(a)} but the config asks for {fmt(b)}"
            )


def _read_torch_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    obj = load_torch_file(path)
    meta: dict[str, Any] = {"format": "torch-state-dict", "wrapper": None, "stripped_prefix": None}
    if isinstance(obj, dict) and not _is_state_dict(obj):
        for key in STATE_DICT_WRAPPERS:
            if isinstance(obj.get(key), dict):
                obj, meta["wrapper"] = obj[key], key
                break
    if not isinstance(obj, dict) or not _is_state_dict(obj):
        what = f"a dict with keys {_preview(obj)}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise CheckpointError(
            f"{path}: holds {what}, not a state dict (tensors by parameter name, "
            f"bare or under one of {', '.join(STATE_DICT_WRAPPERS)})"
        )
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
            meta["stripped_prefix"] = prefix
    return dict(obj), meta


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _preview(obj: dict, n: int = 5) -> str:
    keys = [repr(k) for k in list(obj)[:n]]
    return "[" + ", ".join(keys) + (", ...]" if len(obj) > n else "]")


@dataclass
class PretrainedLoad:
    """What :func:`load_pretrained` copied: the checkpoint's keys (all loaded) and the net's keys it left alone."""

    path: Path
    loaded: list[str]
    not_loaded: list[str]

    def summary(self) -> str:
        """One line: counts, and the top-level modules of the keys left at their fresh initialisation."""
        fresh = sorted({k.split(".")[0] for k in self.not_loaded})
        rest = f"; {len(self.not_loaded)} keys keep their fresh weights ({', '.join(fresh)})" if fresh else ""
        tops = sorted({k.split(".")[0] for k in self.loaded})
        return f"model.pretrained: loaded {len(self.loaded)} encoder keys ({', '.join(tops)}) from {self.path}{rest}"


def load_pretrained(net: nn.Module, model: ModelConfig) -> PretrainedLoad:
    """Copy the encoder weights of ``model.pretrained`` (a ``medvit pretrain`` checkpoint) into ``net``.

    Every key of the checkpoint must be a key of ``net`` of the same shape; the net's other keys
    (decoder, heads) are left as they are. Raises :class:`CheckpointError` naming ``model.pretrained``
    for a missing or unreadable file, a checkpoint that is not an encoder from ``medvit pretrain``,
    one of another net (name or input channels), a key the net lacks, or a shape that differs; nothing
    is copied then.
    """
    if model.pretrained is None:
        raise ValueError("model.pretrained is not set")
    where = f"model.pretrained: {model.pretrained}"
    try:
        state, meta = read_weights(model.pretrained, kind=PRETRAIN_KIND)
    except CheckpointError as e:
        raise CheckpointError(f"model.pretrained: {e}") from None
    have = meta["net"] if isinstance(meta["net"], dict) else {}
    if have.get("name") != model.name:
        raise CheckpointError(f"{where}: holds the encoder of net '{have.get('name')}', but model.name is '{model.name}'")
    if have.get("in_channels") != model.in_channels:
        raise CheckpointError(f"{where}: its encoder takes {have.get('in_channels')} input channels, but model.in_channels "
                              f"is {model.in_channels}")
    expected = net.state_dict()
    for key, t in state.items():
        if key not in expected:
            raise CheckpointError(f"{where}: key '{key}' is not a parameter of {describe_net(model)} (built with other "
                                  f"options than the pretrained {have.get('options')}?)")
        if t.shape != expected[key].shape:
            raise CheckpointError(f"{where}: key '{key}' has shape {shape_text(t)} in the checkpoint but "
                                  f"{shape_text(expected[key])} in {describe_net(model)}; model.options must build the "
                                  f"encoder it was pretrained with ({have.get('options')})")
    bad = nonfinite_key(state)
    if bad is not None:
        raise CheckpointError(f"{where}: key '{bad}' holds NaN or infinite values (saved from a diverged run?)")
    net.load_state_dict(state, strict=False)
    return PretrainedLoad(Path(model.pretrained), sorted(state), sorted(k for k in expected if k not in state))
