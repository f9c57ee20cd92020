"""Checks of what a user types and the files they point to, run before any model loads.

Every check raises :class:`InputError` with one line naming the flag, file, line and field at
fault; ``visipruner.cli.main`` prints that line and exits with status 2 (``--debug`` shows the
traceback instead). Anything else that goes wrong is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
from pathlib import Path


class InputError(ValueError):
    """Bad user input (an argument, a file, a line of a file); reported in one line, exit status 2."""


def at_least(flag: str, value: int | float | None, low: int | float) -> None:
    """``value`` (when given) must be ``>= low``; ``--limit 0`` is refused, not ignored."""
    if value is not None and value < low:
        raise InputError(f"{flag} must be >= {low}, got {value}")


def positive(flag: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise InputError(f"{flag} must be > 0, got {value}")


def read_questions(path: str, flag: str = "--data", limit: int | None = None):
    """The question file at ``path`` (first ``limit`` questions, a limit the caller checked), every
    image checked to open.

    Raises :class:`InputError` for a missing file, a malformed line, an unreadable image or an
    empty result.
    """
    from .data.questions import load_questions

    if not os.path.exists(path):
        raise InputError(f"{flag}: {path}: no such file")
    if not os.path.isfile(path):
        raise InputError(f"{flag}: {path}: not a file")
    try:
        questions = load_questions(path, verify_images=True)
    except OSError as e:
        raise InputError(f"{flag}: {path}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise InputError(f"{flag}: {path}: not UTF-8 text (expected JSONL)") from None
    except InputError as e:
        raise InputError(f"bad question file ({flag}): {e}") from None
    if not questions:
        raise InputError(f"{flag}: {path}: no questions (the file is empty)")
    return questions[:limit] if limit else questions


def _folder_with(flag: str, path: str | None, needed: str, why: str) -> None:
    if path is None:
        return
    if not os.path.isdir(path):
        raise InputError(f"{flag}: {path}: no such directory")
    if not os.path.isfile(os.path.join(path, needed)):
        raise InputError(f"{flag}: {path}: no {needed}{why}")


def model_dir(flag: str, path: str | None) -> None:
    """A saved Hugging Face model directory (``save_pretrained`` output) must hold a config.json."""
    _folder_with(flag, path, "config.json", " (expected a save_pretrained directory)")


def weights_dir(flag: str, path: str | None) -> None:
    """An organism weights directory must hold organism.safetensors."""
    _folder_with(flag, path, "organism.safetensors", " in it")


def output_file(flag: str, path: str | None) -> None:
    """An output file's folder is created now, so that a long run cannot fail at its last step."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{flag}: {path} is a directory (expected a file name)")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{flag}: cannot create the folder {p.parent} ({e.strerror or e})") from None
    if not os.access(p.parent, os.W_OK):
        raise InputError(f"{flag}: the folder {p.parent} is not writable")


def method_config(flag: str, text: str, expected=None):
    """A method config given as a JSON file or as the JSON text itself; ``expected``: its class."""
    from .methods import config_from_json

    if os.path.isfile(text):
        source = text
        try:
            text = Path(text).read_text()
        except OSError as e:
            raise InputError(f"{flag}: {source}: cannot be read ({e.strerror or e})") from None
    elif not text.lstrip().startswith("{"):
        raise InputError(f"{flag}: {text}: no such file (give a config JSON file or the JSON text)")
    else:
        source = "the JSON text"
    try:
        cfg = config_from_json(text) if expected is None else expected.from_json(text)
    except (ValueError, TypeError) as e:  # parsing and the config's own field checks
        raise InputError(f"{flag}: {source}: {e}") from None
    if expected is not None and not isinstance(cfg, expected):
        raise InputError(f"{flag}: {source}: expected a {expected.__name__}, got {type(cfg).__name__}")
    return cfg


def choices(flag: str, text: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated subset of ``allowed``: unknown names and an empty list are refused."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise InputError(f"{flag}: no names given; choose from {','.join(allowed)}")
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise InputError(f"{flag}: unknown name(s) {','.join(unknown)}; choose from {','.join(allowed)}")
    return names
