"""Nets built by name from a config: one :class:`Registry` class for both sides.

A registry maps the name in ``model.name`` to a builder, a callable (a function or the net's
class) taking the registry's fixed arguments by keyword (``in_channels``, ``out_channels`` and
the window or voxel size, which come from elsewhere in the config) plus ``model.options``.
:meth:`Registry.build` checks the options against the builder's signature through
:func:`construct`; a builder that forwards ``**options`` to a class checks them there with
:func:`construct` itself. ``medvit.nets.NETS`` and ``pointcloud.nets.POINT_NETS`` are the two
instances.

Every refusal is a :class:`~medvit.core.errors.ConfigError` naming ``model.name`` or
``model.options.<key>``; registering one name twice is a programming error (``ValueError``).
"""

from __future__ import annotations

import collections.abc
import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from medvit.core.errors import ConfigError

Builder = Callable[..., Any]
ValueCheck = Callable[[str, str, Any, Any], None]
"""``check(net_name, key, value, hint)``: raises :class:`ConfigError` for a value its type lets through."""


class Registry:
    """Names -> builders of one kind of net; :meth:`register`, :meth:`names`, :meth:`build`.

    ``kind`` names the nets in messages ("net", "point-cloud net"). ``fixed`` maps each argument
    every builder receives from the config (not from ``model.options``) to where a user sets it,
    e.g. ``{"out_channels": "model.out_channels"}``; an option repeating one is refused pointing
    there. ``refused`` are the exception types a builder raises about an option's value (turned
    into a ConfigError naming the option, see :func:`construct`).
    """

    def __init__(self, kind: str, fixed: Mapping[str, str], *,
                 refused: tuple[type[BaseException], ...] = (ValueError,)) -> None:
        self.kind = kind
        self.fixed = dict(fixed)
        self.refused = refused
        self._builders: dict[str, Builder] = {}

    def register(self, name: str) -> Callable[[Builder], Builder]:
        """Decorator registering a builder (function or class) under ``name``; returns it unchanged.

        Raises ``ValueError`` when another builder already holds ``name``.
        """

        def deco(builder: Builder) -> Builder:
            held = self._builders.get(name)
            if held is not None and held is not builder:
                raise ValueError(f"a {self.kind} named {name!r} is already registered ({held.__module__})")
            self._builders[name] = builder
            return builder

        return deco

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._builders)

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def get(self, name: str) -> Builder:
        """The builder of ``name``; ConfigError naming ``model.name`` and the registered names if none."""
        builder = self._builders.get(name)
        if builder is None:
            raise ConfigError(f"model.name: unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return builder

    def build(self, name: str, options: Mapping[str, Any] | None = None, **fixed: Any) -> Any:
        """``builder(**fixed, **options)`` for the builder of ``name``, its options checked first.

        ``fixed`` must give exactly the registry's fixed arguments (else ``TypeError``: a caller's
        bug). Raises :class:`ConfigError` for an unknown name, an option repeating a fixed argument,
        one the builder does not take, one of the wrong type, or one its constructor refuses.
        """
        if set(fixed) != set(self.fixed):
            raise TypeError(f"{self.kind} builders take {', '.join(self.fixed)}; got {', '.join(fixed) or 'none'}")
        builder = self.get(name)
        return construct(builder, name, dict(options or {}), fixed=fixed, fixed_from=self.fixed, refused=self.refused)


def construct(
    cls: Builder,
    net_name: str,
    options: Mapping[str, Any],
    *,
    fixed: Mapping[str, Any],
    fixed_from: Mapping[str, str] | None = None,
    check_value: ValueCheck | None = None,
    refused: tuple[type[BaseException], ...] = (ValueError,),
    failed: tuple[type[BaseException], ...] = (),
) -> Any:
    """``cls(**fixed, **options)`` after checking each option against ``cls``'s signature.

    ``cls`` is a class (its ``__init__`` is read) or a function. Per option, in order: naming one of
    ``fixed`` is refused pointing at ``fixed_from[key]``; a name the signature lacks is refused
    listing the ones it takes (unless it takes ``**kwargs``); the value is checked against the
    annotation (int, float, bool, str, sequences and unions of them; others pass), then by
    ``check_value``. An exception of ``refused`` from the call becomes a ConfigError naming the
    option its message names first (or a string option it quotes); one of ``failed``, a ConfigError
    saying the options could not build the net. Anything else propagates.
    """
    fn = cls.__init__ if inspect.isclass(cls) else cls
    params = inspect.signature(fn).parameters
    takes = [n for n, p in params.items() if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    any_keyword = any(p.kind is p.VAR_KEYWORD for p in params.values())
    hints = type_hints(fn)
    fixed_from = dict(fixed_from or {})
    for key, value in options.items():
        if key in fixed:
            where = fixed_from.get(key, "the net builder")
            raise ConfigError(f"model.options.{key}: {net_name} sets {key} from {where}; remove it from the options")
        if key not in takes and not any_keyword:
            opts = ", ".join(n for n in takes if n not in fixed) or "none"
            raise ConfigError(f"model.options.{key}: {net_name} ({cls.__name__}) takes no option {key!r}; it takes: {opts}")
        check_option(key, value, hints)
        if check_value is not None:
            check_value(net_name, key, value, hints.get(key))
    try:
        return cls(**fixed, **options)
    except refused as e:
        # constructors check values (divisibility, ranges, widths); name the option the message is about
        raise ConfigError(f"{_named_option(str(e), options)}: {net_name}: {e}") from None
    except failed as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(f"model.options: {net_name} could not be built from these options: "
                          f"{type(e).__name__}: {first}") from None


def _named_option(message: str, options: Mapping[str, Any]) -> str:
    """``model.options.<key>`` for the option ``message`` names first, else one whose string value
    it quotes, else ``model.options``."""
    hits = [(m.start(), k) for k in options if (m := re.search(rf"\b{re.escape(k)}\b", message))]
    if hits:
        return f"model.options.{min(hits)[1]}"
    quoted = [k for k, v in options.items() if isinstance(v, str) and len(v) > 1 and repr(v) in message]
    return f"model.options.{quoted[0]}" if quoted else "model.options"


def check_option(key: str, value: Any, hints: Mapping[str, Any]) -> None:
    """Raise a ConfigError naming ``model.options.<key>`` when ``value`` does not fit its hint."""
    hint = hints.get(key)
    if hint is not None and conforms(value, hint) is False:
        raise ConfigError(f"model.options.{key}: expected {describe_hint(hint)}, got {value!r}")


def type_hints(fn: Callable) -> dict[str, Any]:
    """``fn``'s resolved annotations; empty when they do not resolve (such options go unchecked)."""
    # MONAI writes its annotations as strings (``from __future__ import annotations``)
    try:
        return typing.get_type_hints(fn)
    except (NameError, TypeError, AttributeError):
        return {}


_SEQUENCES = (tuple, list, collections.abc.Sequence)


def conforms(value: Any, hint: Any) -> bool | None:
    """True/False when ``hint`` is simple enough to check; None when it is not (the value passes)."""
    if hint is Any:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        verdicts = [conforms(value, h) for h in typing.get_args(hint)]
        if any(v is None for v in verdicts):
            return None
        return any(verdicts)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in _SEQUENCES or origin in _SEQUENCES:
        # YAML gives lists where MONAI writes tuple or Sequence
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if len(args) != 1:
            return None if args else True
        verdicts = [conforms(v, args[0]) for v in value]
        return None if any(v is None for v in verdicts) else all(verdicts)
    return None


def describe_hint(hint: Any) -> str:
    """``hint`` in words for a message: ``int or null``, ``a list of float``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(describe_hint(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if hint in _SEQUENCES or origin in _SEQUENCES:
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return f"a list of {describe_hint(args[0])}" if len(args) == 1 else "a list"
    return getattr(hint, "__name__", str(hint))
