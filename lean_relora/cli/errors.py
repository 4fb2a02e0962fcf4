"""How a command ends: its exit code, one line on stderr, and for a bug a log file holding the traceback.

    0   done
    1   the run failed (a save, a diverged run) or lean-relora has a bug: the line names the log with the traceback
    2   bad input (recipe, data, checkpoint, argument): the line says what is wrong and how to fix it
    75  stopped by SIGINT/SIGTERM after saving a checkpoint: continue it with --resume auto (EX_TEMPFAIL of
        sysexits.h, "try again later", so a scheduler can requeue it)
    130 aborted by a second signal without saving: --resume auto continues from the last periodic checkpoint
"""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

DONE, FAILED, BAD_INPUT, STOPPED, ABORTED = 0, 1, 2, 75, 130  # 75: EX_TEMPFAIL, stopped after a checkpoint

ERROR_LOG = "error.log"  # in the run directory, when the failing command has one


class UserError(Exception):
    """Bad input of any kind; the message is the one line the user sees."""


def user_errors() -> tuple[type[Exception], ...]:
    """Every error type that means bad input. Imported here, when a command fails, so that a command that does not
    need torch or datasets never imports them."""
    from lean_relora.data.corpus import DataError
    from lean_relora.recipe import RecipeError
    from lean_relora.tools.export import ExportError
    from lean_relora.tools.report import ReportError
    from lean_relora.training.checkpoint import CheckpointError

    return UserError, RecipeError, DataError, CheckpointError, ExportError, ReportError


def run_failures() -> tuple[type[Exception], ...]:
    """Errors of a run that its message explains in full (no traceback helps): exit 1."""
    from lean_relora.training.checkpoint import CheckpointSaveError
    from lean_relora.training.loop import TrainingDiverged

    return CheckpointSaveError, TrainingDiverged


def fail(console: Console, message: str, code: int = BAD_INPUT) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


class Outcome:
    """`with Outcome(console) as outcome:` around a command's work turns what it raises into one line and an exit
    code. `outcome.log_dir` (set once a run directory exists) is where a traceback goes; `outcome.on_bad_input`
    (a callable) undoes what the command created before it met the bad input."""

    def __init__(self, console: Console):
        self.console = console
        self.log_dir: Path | None = None
        self.on_bad_input = None

    def __enter__(self) -> Outcome:
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if error is None or isinstance(error, (SystemExit, typer.Exit)):
            return False  # done, or an exit the command chose
        if isinstance(error, KeyboardInterrupt):
            fail(self.console, "aborted without saving; --resume auto continues from the last saved checkpoint",
                 ABORTED)
        if isinstance(error, user_errors()):
            if self.on_bad_input is not None:
                self.on_bad_input()
            fail(self.console, str(error))
        if isinstance(error, run_failures()):
            fail(self.console, str(error), FAILED)
        path = write_traceback(error, self.log_dir)
        first = (str(error).strip().splitlines() or [""])[0][:200]
        fail(self.console, f"internal error ({type(error).__name__}: {first}); the traceback is in {path}; please "
                           "report it with that file", FAILED)
        return False  # not reached: fail raises


def write_traceback(error: BaseException, log_dir: Path | None = None) -> Path:
    """Append the traceback to log_dir/error.log, or to a new file in the temporary directory where there is no
    writable run directory. Returns the file's path."""
    from importlib.metadata import version

    text = (f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}  lean-relora {version('lean-relora')}  "
            f"{' '.join(sys.argv)}\n{''.join(traceback.format_exception(error))}\n")
    if log_dir is not None and log_dir.is_dir():
        try:
            with open(log_dir / ERROR_LOG, "a", encoding="utf-8") as f:
                f.write(text)
            return log_dir / ERROR_LOG
        except OSError:
            pass  # a full or read-only disk: the temporary directory may still take it
    with tempfile.NamedTemporaryFile("w", prefix="lean-relora-error-", suffix=".log", delete=False,
                                     encoding="utf-8") as f:
        f.write(text)
    return Path(f.name)
