"""How every `hyperbroker` command ends on an error: one line on stderr and an exit status.

A user error (a file that is not there, a port another process holds, a socket directory the
user may not write, a peer that is not running) is not a bug of the program: it gets one line
naming the command, what is wrong and what to do, never a traceback (`--log-level debug`
keeps the traceback for whoever wants it). The exit status says whether waiting can help,
which is what systemd's RestartPreventExitStatus= needs (docs/operations.md, "Exit codes"):

- 2 (USAGE): the command line or the configuration is wrong; restarting will not fix it.
- 1 (UNAVAILABLE): a peer or resource is not there now (agent, broker, store); it may be later.
- 141 (128 + SIGPIPE): stdout was closed by its reader (`... | head`), as a C tool would exit.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import grpc

from hyperbroker.runtime.net import CannotListen

USAGE = 2
UNAVAILABLE = 1
BROKEN_PIPE = 128 + 13


class UsageError(Exception):
    """The command line or configuration is wrong: exit 2 with this one line."""


class Unavailable(Exception):
    """A peer the command needs is not there (now): exit 1 with this one line."""


def _file_error(e: OSError) -> str:
    what = e.strerror or type(e).__name__
    hint = {FileNotFoundError: "check the path", PermissionError:
            "run as a user who may read it or change its permissions",
            IsADirectoryError: "give a file, not a directory"}.get(type(e), "check the path")
    return f"{e.filename}: {what}; {hint}"


def run_command(command: str, func: Callable[[argparse.Namespace], int],
                args: argparse.Namespace, debug: bool) -> int:
    """func(args), with every error a user can cause turned into one line and an exit status."""
    prefix = f"hyperbroker {command}"
    try:
        return int(func(args))
    except BrokenPipeError:
        # The reader went away: point stdout at /dev/null so the interpreter's final flush at
        # exit does not raise again, and exit as SIGPIPE would have ended the process.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return BROKEN_PIPE
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if debug:
            raise
        status, line = describe(e)
        print(f"{prefix}: {line}", file=sys.stderr)
        return status


def describe(e: Exception) -> tuple[int, str]:
    """The exit status and the one line for an exception that reached the command line."""
    match e:
        case UsageError() | ValueError():
            return USAGE, str(e)
        case Unavailable():
            return UNAVAILABLE, str(e)
        case CannotListen():
            return USAGE, (f"{e}; stop whatever holds it or give another address"
                           if e.what != "VMM socket" else str(e))
        case grpc.aio.AioRpcError():
            return UNAVAILABLE, (f"the broker answered {e.code().name}: {e.details()}; check "
                                 f"--broker and that `hyperbroker serve` runs there")
        case OSError() if e.filename is not None:
            return USAGE, _file_error(e)
        case _:
            return UNAVAILABLE, (f"unexpected {type(e).__name__}: {e} (run with --log-level "
                                 f"debug for the traceback, and please report it)")
