"""The stages' command line: --help from field comments, one-line user errors, exit codes."""

from __future__ import annotations

import ast
import dataclasses
import errno
import functools
import inspect
import io
import os
import sys
import textwrap
import tokenize
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import yaml

from .errors import ConfigError
from .loading import config_to_dict, load_config

T = TypeVar("T")


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
    for node in cast(ast.ClassDef, ast.parse(source).body[0]).body:  # the class body
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
        docs = field_descriptions(type(obj))  # type: ignore[arg-type]  # types are hashable; typeshed's lru_cache wants Hashable
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
