"""User errors: what a user causes and fixes, and how every command ends on one.

Owns `UserError` (the base of every exception whose message already says what to fix),
`is_user_error` and `exit_on_user_error`, the one wrapper each command's entry point runs its main
through: a user error ends the command with ONE line `<prog>: error: <message>` on stderr and exit
code 2; `--debug` re-raises it with its traceback. Anything else is a bug and keeps its traceback.
Tests: tests/unit/test_errors.py, tests/integration/test_user_errors.py (every case, as real
processes).
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable, Sequence

__all__ = ["UserError", "UnusableInput", "is_user_error", "exit_on_user_error", "one_line", "DEBUG_FLAG", "DEBUG_HELP"]

DEBUG_FLAG = "--debug"
DEBUG_HELP = "show the traceback of a user error (bad config, refused checkpoint, missing data...) too"

# errno values of an OSError that the filesystem, not the program, is to blame for
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


class UserError(Exception):
    """An error the user causes and can fix; its message names what and how (no traceback shown)."""


class UnusableInput(UserError, RuntimeError):
    """Input that exists but cannot be used (not one image readable, files that do not belong together)."""


def is_user_error(error: BaseException) -> bool:
    """UserError, a missing file (an input not written or a stage not run: the messages of this
    project name which), or a full / read-only filesystem."""
    if isinstance(error, (UserError, FileNotFoundError)):
        return True
    return isinstance(error, OSError) and error.errno in _USER_ERRNOS


def one_line(error: BaseException) -> str:
    """The message on one line (details a message puts on further lines are joined with '; ')."""
    parts = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return "; ".join(parts) if parts else type(error).__name__


def exit_on_user_error(
    main: Callable[[list[str]], int], argv: Sequence[str] | None, prog: str, also: tuple[type, ...] = ()
) -> int:
    """main(argv without `--debug`), a user error (or one of `also`, the entry point's own) turned
    into one stderr line and exit code 2; with `--debug` it is raised with its traceback instead.
    Parsers may list `--debug` for their --help; they never see it."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args
    try:
        return main([a for a in args if a != DEBUG_FLAG])
    except Exception as e:
        if debug or not (is_user_error(e) or isinstance(e, also)):
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
