"""What every part of the project says about a failure: the first meaningful line of an exception."""
from __future__ import annotations

import re

# Lines of a framework's own stack dump that say where, not what (MXNet's C++ errors start with one).
_WHERE = re.compile(r'^(Traceback \(most recent call last\):|File "|\[bt\]|Stack trace|at |\d+: )')
_NAMED = re.compile(r"^[\w.]*(Error|Exception): (?P<what>.+)$")


def first_line(error: BaseException) -> str:
    """The line of ``error``'s message that says what went wrong, for a one-line report: the first
    non-empty line, or, where the message is a stack dump (MXNet's), its ``...Error: what`` line;
    the exception's class name when the message is empty. Never the word Traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    said = [line for line in lines if not _WHERE.match(line)]
    if lines and lines[0].startswith("Traceback"):
        named = [m.group("what") for m in map(_NAMED.match, said) if m]
        said = named[-1:] or said
    return said[0] if said else type(error).__name__
