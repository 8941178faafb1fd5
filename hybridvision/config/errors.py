"""The one exception type of configuration errors, and the helper sections use to raise it."""

from __future__ import annotations

from typing import Any, TypeVar

from ..geometry import Scale

T = TypeVar("T")


class ConfigError(ValueError):
    """A user error in a config file or an override; the message says what and where.

    Args:
        message: the one-line message shown to the user.
        field: for errors raised in a section's ``__post_init__`` about one of its fields: the field
            name. :func:`load_config` then rewrites the message to name the dotted key
            (``train.batch_size``) the way it is typed.
        detail: with ``field``: the message after the key (``must be > 0, got 0``).
    """

    def __init__(self, message: str, field: str | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.detail = detail


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _section_name(obj: Any) -> str:
    return getattr(obj, "_config_path", type(obj).__name__)


def field_error(obj: Any, name: str, detail: str) -> ConfigError:
    """A :class:`ConfigError` about field ``name`` of section ``obj``; ``detail`` follows the key.

    Raised from ``__post_init__``, the message says ``TrainConfig.batch_size must be > 0, got 0``;
    :func:`load_config` and :func:`apply_overrides` rename it to the typed key, ``train.batch_size``.
    """
    return ConfigError(f"{type(obj).__name__}.{name} {detail}", field=name, detail=detail)


def _check_resize(obj: Any, value: Any) -> list[int] | str:
    """``data.resize`` as ``"auto"``, ``"native"`` or ``[short_side, max_long_side]`` (0: no limit)."""
    if isinstance(value, str) and value.strip().lower() in ("auto", "native"):
        return value.strip().lower()
    try:
        scale = Scale.parse(value)
    except ValueError as err:
        raise field_error(obj, "resize", f"is not a scale: {err}, or auto") from None
    return list(scale) if scale else "native"


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise field_error(obj, name, f"must be > 0, got {getattr(obj, name)!r}")


def _non_negative(obj: Any, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 0:
            raise field_error(obj, name, f"must be >= 0, got {getattr(obj, name)!r}")
