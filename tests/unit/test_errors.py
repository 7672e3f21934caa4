"""slade_dist/errors.py: which errors are the user's, one line out of many, and the entry-point
wrapper (exit 2 and one stderr line; --debug re-raises; a bug keeps its traceback). The same
through real processes: tests/integration/test_user_errors.py."""

from __future__ import annotations

import errno

import pytest

from slade_dist.config import ConfigError
from slade_dist.errors import UserError, exit_on_user_error, is_user_error, one_line
from slade_dist.fileio import DirInUse, WriteFailed
from slade_dist.models import CheckpointError, HubWeightsMissing, StateDictMismatchError, UnsafeCheckpointError


@pytest.mark.parametrize(
    "error",
    [
        ConfigError("x"),
        UnsafeCheckpointError("x"),
        CheckpointError("x"),
        StateDictMismatchError("x"),
        HubWeightsMissing("x"),
        DirInUse("x"),
        WriteFailed(errno.ENOSPC, "x"),
        FileNotFoundError("x"),
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EROFS, "Read-only file system"),
    ],
)
def test_user_errors(error):
    assert is_user_error(error)


@pytest.mark.parametrize("error", [RuntimeError("x"), ValueError("x"), KeyError("x"), OSError(errno.EIO, "io")])
def test_bugs_are_not_user_errors(error):
    assert not is_user_error(error)


def test_one_line_joins_detail_lines():
    assert one_line(ConfigError("unknown key 'a.b'. did you mean 'a.c'?\nvalid keys in a: a.c, a.d")) == (
        "unknown key 'a.b'. did you mean 'a.c'?; valid keys in a: a.c, a.d"
    )
    assert one_line(UserError("")) == "UserError"


def test_wrapper_exit_code_line_debug_and_bugs(capsys):
    def fails(error):
        def main(argv):
            assert "--debug" not in argv  # the wrapper takes the flag away
            raise error

        return main

    assert exit_on_user_error(lambda argv: 0, ["a"], "prog") == 0
    assert exit_on_user_error(fails(ConfigError("bad key\nmore")), ["a"], "prog") == 2
    assert capsys.readouterr().err == "prog: error: bad key; more\n"
    with pytest.raises(ConfigError):
        exit_on_user_error(fails(ConfigError("bad key")), ["a", "--debug"], "prog")
    with pytest.raises(RuntimeError):  # a bug: its traceback is kept
        exit_on_user_error(fails(RuntimeError("bug")), ["a"], "prog")
    assert exit_on_user_error(fails(ValueError("layout")), [], "prog", also=(ValueError,)) == 2
    assert capsys.readouterr().err == "prog: error: layout\n"
