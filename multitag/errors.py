"""User-facing errors: one sentence saying what was wrong and how to fix it.

The CLI prints ``UserError`` messages without a traceback; anything else is a bug.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """A mistake in the user's input (data, config, command line) with a fix in the message.

    The message is kept to one line: line breaks and other control characters quoted from the
    user's files are shown escaped (\\n), never as real line breaks.
    """

    def __init__(self, message: str = "", *args):
        super().__init__(_one_line(str(message)), *args)


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The valid choice closest to ``name``, or None when nothing is close."""
    matches = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A ' (did you mean "x"?)' suffix for error messages, or a list of valid names."""
    choices = list(choices)
    best = closest(name, choices)
    if best is not None:
        return f' (did you mean "{best}"?)'
    shown = ", ".join(sorted(map(str, choices))[:12])
    return f" (valid: {shown}{', ...' if len(choices) > 12 else ''})"


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless n is 1 ("1 file", "3 files"), for messages."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
