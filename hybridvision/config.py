"""Typed configuration: nested dataclasses, YAML files and dotted command-line overrides.

Every stage describes its configuration as a tree of dataclasses (``TrainConfig``,
``OptimConfig``, ``DataConfig``, ``ModelConfig`` + the stage's own sections). A run's
configuration is built in three layers::

    defaults (the dataclasses) <- --config file.yaml <- key=value overrides (train.max_steps=10)

Unknown keys and badly typed values raise :class:`ConfigError`, whose message names the key
(``train.batch_size``, as typed), the value, the expected type and the closest valid keys. Stage
scripts call :func:`cli_main`, which turns every user error (bad keys or values, missing or
unreadable files, unwritable ``train.output_dir``, a NaN-loss stop) into one ``error: ...`` line
on stderr and exit status 2, without a traceback unless ``HYBRIDVISION_DEBUG=1``. ``--help``
lists every key with its default and the one-line comment written next to its field.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import errno
import functools
import inspect
import io
import os
import sys
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

__all__ = [
    "ConfigError",
    "TrainConfig",
    "OptimConfig",
    "DataConfig",
    "ModelConfig",
    "load_config",
    "apply_overrides",
    "config_to_dict",
    "save_config",
    "cli_main",
    "help_text",
    "field_descriptions",
    "user_error_message",
    "check_output_dir",
    "field_error",
]

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
# Sections shared by every stage
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """The training loop (same keys in every stage)."""

    output_dir: str = "runs/default"  # where checkpoints, logs and exported models go
    max_steps: int = 200  # optimizer steps to train for
    batch_size: int = 16  # samples per process per micro-batch
    grad_accum_steps: int = 1  # micro-batches accumulated into one optimizer step
    # autocast dtype (Accelerate); auto: bf16 on GPUs that support it (else fp16), on CPUs bf16 only
    # with AMX (without it bf16 matmuls/convs run slower than fp32: benchmarks/precision.py), else no
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "no"
    seed: int = 0  # global seed (model init, data order, augmentations)
    resume: str = "auto"  # auto: newest complete checkpoint in output_dir; never; or a checkpoint path
    log_every: int = 10  # steps between scalar logs
    ckpt_every: int = 100  # steps between checkpoints (a final one is always written)
    keep_last: int = 3  # checkpoints kept (older ones are deleted)
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    grad_clip: float = 1.0  # max global grad norm (0 disables clipping)
    skip_nonfinite: bool = False  # skip steps with a NaN/inf loss instead of stopping
    max_nonfinite: int = 20  # with skip_nonfinite: stop after this many skipped steps
    log_images_every: int = 0  # steps between image logs (0: at evaluations only)
    progress_bar: bool = True  # tqdm bar on the main process
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])  # accelerate trackers

    def __post_init__(self) -> None:
        _positive(self, "max_steps", "batch_size", "grad_accum_steps", "log_every", "ckpt_every", "keep_last")
        _non_negative(self, "eval_every", "grad_clip", "log_images_every", "max_nonfinite")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: Literal["adamw", "sgd"] = "adamw"  # optimizer
    lr: float = 1e-3  # peak learning rate (after warmup)
    weight_decay: float = 0.05  # decoupled weight decay (not applied to norms, biases, tokens)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    momentum: float = 0.9  # SGD momentum
    warmup_steps: int = 10  # linear warmup from warmup_start_ratio * lr to lr
    warmup_start_ratio: float = 0.0  # LR at step 0 as a fraction of lr
    schedule: Literal["cosine", "poly", "constant"] = "cosine"  # decay after warmup
    min_lr_ratio: float = 0.0  # final LR as a fraction of lr
    poly_power: float = 1.0  # exponent of the poly schedule
    lr_mult: dict[str, float] = field(default_factory=dict)  # parameter-name prefix -> LR multiplier
    layer_decay: float = 1.0  # layer-wise LR decay for transformer encoders (1.0: off)

    def __post_init__(self) -> None:
        _positive(self, "lr")
        _non_negative(self, "weight_decay", "warmup_steps", "min_lr_ratio", "warmup_start_ratio")
        if not 0.0 < self.layer_decay <= 1.0:
            raise field_error(self, "layer_decay", f"must be in (0, 1], got {self.layer_decay}")


@dataclass
class DataConfig:
    """Where samples come from and how they are loaded."""

    source: str = "synthetic"  # synthetic | a folder path | a HF dataset id or local datasets dir
    split: str = "train"  # training split (folder layouts: images/<split>)
    val_split: str = "val"  # evaluation split ('' disables evaluation)
    val_ids: list[str] = field(default_factory=list)  # hold these ids of `split` out for evaluation
    in_chans: int = 3  # image channels given to the model
    image_size: tuple[int, int] = (64, 64)  # training crop size (H, W)
    resize: list[int] | str = "auto"  # scale: [short, max_long] px | native | auto (native if sizes agree)
    num_classes: int = 4  # classes (1: binary with BCE); synthetic: shape classes incl. background
    class_names: list[str] = field(default_factory=list)  # names for logs and metrics.json
    ignore_index: int = 255  # mask value excluded from losses and metrics
    mask_values: list[int] = field(default_factory=list)  # stored value of class 0, 1, ...: [0, 255]
    on_bad_file: Literal["error", "skip"] = "error"  # unreadable file: stop and name it | skip it
    num_workers: int = 0  # DataLoader worker processes per training process
    persistent_workers: bool = False  # keep workers alive between epochs
    pin_memory: bool = True  # pinned host memory (used only with CUDA)
    streaming: bool = False  # HF datasets: stream instead of materialising
    image_column: str = "image"  # HF datasets: image column
    mask_column: str = "label"  # HF datasets: mask column
    synthetic_samples: int = 512  # synthetic: samples in the training set
    synthetic_val_samples: int = 64  # synthetic: samples in the evaluation set
    normalize: str = "imagenet"  # imagenet | per_image | none (ignored when data.mean/data.std are set)
    mean: list[float] = field(default_factory=list)  # per-channel normalisation mean (with data.std)
    std: list[float] = field(default_factory=list)  # per-channel normalisation std (with data.mean)
    window: tuple[float, float] | None = None  # CT windowing (center, width) applied before normalize

    def __post_init__(self) -> None:
        _positive(self, "in_chans", "num_classes", "synthetic_samples")
        _non_negative(self, "num_workers", "synthetic_val_samples")
        if any(s <= 0 for s in self.image_size):
            raise field_error(self, "image_size", f"must be positive, got {self.image_size}")
        self.resize = _check_resize(self, self.resize)
        classes = max(self.num_classes, 2)
        if self.class_names and len(self.class_names) != classes:
            raise field_error(
                self,
                "class_names",
                f"has {len(self.class_names)} names but data.num_classes={self.num_classes} needs {classes}",
            )
        if self.normalize not in ("imagenet", "per_image", "none"):
            raise field_error(
                self, "normalize", f"must be imagenet, per_image or none; got {self.normalize!r}"
            )
        if self.mask_values:
            if len(self.mask_values) != classes:
                raise field_error(
                    self,
                    "mask_values",
                    f"has {len(self.mask_values)} values but data.num_classes={self.num_classes} needs "
                    f"{classes} (the stored value of class 0, 1, ...; e.g. [0, 255] for 0/255 binary masks)",
                )
            if len(set(self.mask_values)) != len(self.mask_values):
                raise field_error(self, "mask_values", f"has repeated values: {self.mask_values}")
        if bool(self.mean) != bool(self.std):
            raise field_error(
                self, "mean" if not self.mean else "std", "must be set together with data.mean/data.std"
            )
        if self.mean:
            for name in ("mean", "std"):
                if len(getattr(self, name)) != self.in_chans:
                    raise field_error(
                        self,
                        name,
                        f"has {len(getattr(self, name))} values but data.in_chans={self.in_chans}",
                    )
            if any(v <= 0 for v in self.std):
                raise field_error(self, "std", f"values must be > 0, got {self.std}")
        elif self.normalize == "imagenet" and self.in_chans not in (1, 3):
            raise field_error(
                self,
                "normalize",
                f"is 'imagenet', whose statistics are for 1 or 3 channels, but data.in_chans={self.in_chans}: set "
                f"data.mean and data.std ({self.in_chans} values each) or data.normalize=per_image",
            )

    @property
    def resize_scale(self) -> list[int] | None:
        """``[short_side, max_long_side]`` to rescale to, or None for native sizes.

        ``auto`` must have been resolved first (:func:`hybridvision.data.from_config.resolve_resize`).
        """
        if self.resize == "auto":
            raise RuntimeError("data.resize=auto is resolved from the training images before use")
        return None if self.resize == "native" else list(self.resize)

    @property
    def normalization(self) -> str | tuple[list[float], list[float]]:
        """What transforms take as ``normalize``: ``(data.mean, data.std)`` if set, else ``data.normalize``."""
        return (list(self.mean), list(self.std)) if self.mean else self.normalize


@dataclass
class ModelConfig:
    """Which registered model to build."""

    name: str = "hybrid_nano"  # registered encoder / segmenter name (see hybridvision.models.list_models())
    overrides: dict[str, Any] = field(
        default_factory=dict
    )  # preset fields to override, e.g. {drop_path_rate: 0.1}


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
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("auto", "native"):
            return text
        if not text.isdigit():
            raise field_error(
                obj,
                "resize",
                f"must be auto, native, a short side or [short_side, max_long_side]; got {value!r}",
            )
        value = [int(text)]
    values = [int(v) for v in value]
    if len(values) not in (1, 2) or values[0] < 1 or (len(values) == 2 and values[1] < 0):
        raise field_error(
            obj,
            "resize",
            f"must be [short_side] or [short_side, max_long_side] with short_side >= 1; got {value}",
        )
    if len(values) == 2 and 0 < values[1] < values[0]:
        raise field_error(obj, "resize", f"max_long_side {values[1]} is below short_side {values[0]}")
    return values if len(values) == 2 else [values[0], 0]


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise field_error(obj, name, f"must be > 0, got {getattr(obj, name)!r}")


def _non_negative(obj: Any, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 0:
            raise field_error(obj, name, f"must be >= 0, got {getattr(obj, name)!r}")


# --------------------------------------------------------------------------------------------
# Type coercion
# --------------------------------------------------------------------------------------------

_MISSING = object()


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        args = ", ".join(_type_name(a) if a is not Ellipsis else "..." for a in get_args(tp))
        return f"{origin.__name__}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _parse_scalar_text(text: str) -> Any:
    """Parse command-line text as YAML, so ``[1, 2]``, ``true``, ``null`` and ``{a: 1}`` work."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise a ConfigError naming ``key``."""

    def fail() -> ConfigError:
        return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")

    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise fail()
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise fail()
    if tp is int:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    as_float = float(value)
                except ValueError:
                    raise fail() from None
                if as_float.is_integer():
                    return int(as_float)
        raise fail()
    if tp is float:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise fail() from None
        raise fail()
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail()
    if origin in (list, tuple):
        if isinstance(value, str):
            parsed = _parse_scalar_text(value)
            value = parsed if isinstance(parsed, (list, tuple)) else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise fail()
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(
                    f"{key}: expected {len(args)} values ({_type_name(tp)}), got {list(value)!r}"
                )
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if isinstance(value, str):
            value = _parse_scalar_text(value)
        if not isinstance(value, dict):
            raise fail()
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail()
        return _build(tp, value, key)
    if isinstance(value, tp):
        return value
    raise fail()


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(key: str, name: str, valid: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.5)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f" Did you mean {', '.join(prefix + c for c in close)}?" if close else ""
    valid_txt = ", ".join(prefix + v for v in valid)
    return ConfigError(f"unknown config key {key!r}.{hint} Valid keys here: {valid_txt}")


def _build(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    """Instantiate dataclass ``cls`` from a (possibly partial) nested dict, validating keys/types."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise _unknown_key(key, str(name), list(fields))
        tp = hints[name]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if exc.field is not None and exc.detail is not None:  # name the key as typed: train.batch_size
            key = f"{prefix}.{exc.field}" if prefix else exc.field
            raise ConfigError(f"{key} {exc.detail}") from None
        raise


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict form of a config (tuples become lists) for YAML/JSON."""

    def convert(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v

    return convert(cfg)


def _merge(base: dict[str, Any], update: dict[str, Any], cls: type) -> dict[str, Any]:
    """Merge a YAML tree into ``base``: config sections merge key by key, while free-form
    dict fields (``loss.weights``, ``optim.lr_mult``, ``model.overrides``...) are replaced
    whole, so a file that says ``weights: {ce: 1, dice: 1}`` means exactly those terms."""
    out = dict(base)
    hints = _hints(cls)
    for k, v in update.items():
        tp = hints.get(k)
        if isinstance(v, dict) and isinstance(out.get(k), dict) and dataclasses.is_dataclass(tp):
            out[k] = _merge(out[k], v, tp)
        else:
            out[k] = v
    return out


def _set_dotted(tree: dict[str, Any], cls: type, dotted: str, text: str) -> None:
    """Set ``a.b.c=text`` in the nested dict ``tree``, checking each key against ``cls``."""
    parts = dotted.split(".")
    node = tree
    current: Any = cls
    for i, part in enumerate(parts):
        key = ".".join(parts[: i + 1])
        if not dataclasses.is_dataclass(current):
            # a free-form dict field (e.g. model.overrides.depth=2): everything below is data
            node[part] = _parse_scalar_text(text) if i == len(parts) - 1 else node.get(part, {})
            if i < len(parts) - 1:
                node = node[part]
            continue
        fields = {f.name for f in dataclasses.fields(current) if f.init}
        if part not in fields:
            raise _unknown_key(key, part, sorted(fields))
        tp = _hints(current)[part]
        if i == len(parts) - 1:
            node[part] = text if tp is str or _accepts_str(tp) else _parse_scalar_text(text)
            return
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
        if dataclasses.is_dataclass(tp):
            current = tp
        elif get_origin(tp) is dict:
            current = None
        else:
            raise ConfigError(
                f"{key} is a {_type_name(tp)}, it has no sub-keys (got override {dotted}={text})"
            )


def _accepts_str(tp: Any) -> bool:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_accepts_str(a) for a in get_args(tp))
    if origin is Literal:
        return all(isinstance(a, str) for a in get_args(tp))
    return tp is str


def apply_overrides(cfg: T, overrides: Sequence[str]) -> T:
    """Return a new config with ``key=value`` overrides applied (validated, typed)."""
    tree = config_to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=10)")
        key, text = item.split("=", 1)
        _set_dotted(tree, type(cfg), key.strip(), text)
    return _build(type(cfg), tree)


def load_config(cls: type[T], config_path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of ``cls`` <- YAML file <- dotted overrides; every key and type validated."""
    tree: dict[str, Any] = config_to_dict(cls())
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
        try:
            _build(cls, loaded)  # validate the file on its own so errors name it
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        tree = _merge(tree, loaded, cls)
    cfg = _build(cls, tree)
    return apply_overrides(cfg, overrides) if overrides else cfg


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(config_to_dict(cfg), fh, sort_keys=False)
    os.replace(tmp, path)


def parse_cli(cls: type[T], argv: Sequence[str] | None = None) -> T:
    """Parse ``[--config FILE] [key=value ...]`` into a validated ``cls`` instance.

    ``-h`` / ``--help`` prints every key with its default and one-line description to stdout and
    raises ``SystemExit(0)``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = None
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            sys.stdout.write(help_text(cls) + "\n")
            sys.stdout.flush()
            raise SystemExit(0)
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file path")
            config_path = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg.startswith("--"):
            overrides.append(arg[2:])
        else:
            overrides.append(arg)
        i += 1
    return load_config(cls, config_path, overrides)


@functools.cache
def field_descriptions(cls: type) -> dict[str, str]:
    """One-line description of each field of dataclass ``cls``: the comment written on its line(s).

    Read from the source (``name: type = default  # description``); a field whose definition spans
    several lines may carry its comment on any of them. Fields without a comment are left out.
    """
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (e.g. defined in a REPL)
        return {}
    comments: dict[int, str] = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
    except (tokenize.TokenError, IndentationError):
        return {}
    out: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:  # the class body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            lines = range(node.lineno, (node.end_lineno or node.lineno) + 1)
            text = next((comments[n] for n in lines if n in comments), None)
            if text:
                out[node.target.id] = text
    return out


def help_text(cls: type) -> str:
    """``--help`` text: usage, then every key as ``section.key=default  description``."""
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "run.py"
    doc = (inspect.getdoc(cls) or "").strip().splitlines()
    rows: list[tuple[str, str]] = []

    def walk(obj: Any, prefix: str) -> None:
        docs = field_descriptions(type(obj))
        for f in dataclasses.fields(obj):
            if not f.init:
                continue
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                section_doc = (inspect.getdoc(type(value)) or "").strip().splitlines()
                rows.append(("", f"{key}: {section_doc[0] if section_doc else ''}".rstrip(": ")))
                walk(value, key + ".")
                continue
            shown = yaml.safe_dump(config_to_dict({"v": value})["v"], default_flow_style=True, width=10**6)
            shown = shown.strip().removesuffix("...").strip()
            rows.append((f"{key}={shown}", docs.get(f.name, "")))

    walk(cls(), "")
    width = min(44, max((len(k) for k, _ in rows if k), default=0))
    lines = [
        f"usage: {prog} [--config FILE.yaml] [section.key=value ...]",
        "",
        *([doc[0], ""] if doc else []),
        "Values are YAML (train.max_steps=10, data.image_size=[64,64], data.window=null); the command line",
        "overrides the --config file, which overrides these defaults. User errors end with one line",
        "naming the key or file and exit status 2; HYBRIDVISION_DEBUG=1 shows the traceback instead.",
    ]
    for key, text in rows:
        if not key:
            lines.extend(["", text])
        elif len(key) > width:
            lines.append(f"  {key}\n  {'':{width}}  {text}" if text else f"  {key}")
        else:
            lines.append(f"  {key:{width}}  {text}".rstrip())
    return "\n".join(lines)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if (
            isinstance(v, dict)
            and v
            and all(isinstance(x, str) for x in v)
            and not key.endswith(("overrides", "lr_mult"))
        ):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


#: errno values of OSErrors a user causes (paths): reported in one line, without a traceback
_USER_ERRNOS = frozenset(
    {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EEXIST}
    | {errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG}
)


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message for an exception a user caused, or None for a bug (keep the traceback).

    User errors: :class:`ConfigError` and other ``ValueError`` (bad data, bad values),
    ``FileNotFoundError`` / path ``OSError`` (missing, read-only or non-directory paths, full
    disk), ``KeyError`` (unknown model names) and the engine's ``NonFiniteLossError`` (whose
    message already says what to change).
    """
    engine = sys.modules.get("hybridvision.engine")  # imported by the stage if it trained at all
    nonfinite = getattr(engine, "NonFiniteLossError", None)
    if isinstance(exc, KeyError):
        text = str(exc.args[0]) if len(exc.args) == 1 else str(exc)
        text = f"key {text!r} not found" if type(exc) is KeyError else text
    elif isinstance(exc, ValueError) or (nonfinite is not None and isinstance(exc, nonfinite)):
        text = str(exc)
    elif isinstance(exc, OSError) and (exc.errno in _USER_ERRNOS or isinstance(exc, FileNotFoundError)):
        text = str(exc)
    else:
        return None
    return " ".join(text.split()) or type(exc).__name__


def check_output_dir(cfg: Any) -> None:
    """Fail early, naming ``train.output_dir``, when it cannot be created or written.

    Raises:
        ConfigError: if the path (or its first existing ancestor) is a file, or is not writable.
    """
    out = getattr(getattr(cfg, "train", None), "output_dir", None)
    if not isinstance(out, str) or not out:
        return
    path = Path(out).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"train.output_dir={out}: {existing} is a file, not a folder; choose another train.output_dir"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"train.output_dir={out}: {existing} is not writable (read-only or no permission); "
            "choose another train.output_dir"
        )


def cli_main(cls: type[T], main: Callable[[T], Any], argv: Sequence[str] | None = None) -> int:
    """Run ``main(config)`` for a stage script and return its exit status.

    0 on success; 2 for a user error (see :func:`user_error_message`), reported as one line
    ``error: ...`` on stderr without a traceback (``HYBRIDVISION_DEBUG=1`` re-raises instead).
    Other exceptions (bugs) propagate with their traceback.
    """
    try:
        cfg = parse_cli(cls, argv)
        check_output_dir(cfg)
        main(cfg)
    except Exception as exc:
        message = user_error_message(exc)
        if message is None or os.environ.get("HYBRIDVISION_DEBUG", "") not in ("", "0"):
            raise
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
        return 2
    return 0
