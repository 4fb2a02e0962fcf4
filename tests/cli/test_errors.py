"""lean_relora.cli.errors: a bug ends in exit 1 and one line naming a log that holds its traceback."""

import io

import pytest
import typer
from rich.console import Console

from lean_relora.cli.errors import BAD_INPUT, ERROR_LOG, FAILED, Outcome, UserError


def ends(log_dir=None, error=RuntimeError("boom\nsecond line")):
    console = Console(file=io.StringIO(), width=200, color_system=None)
    with pytest.raises(typer.Exit) as exit_:
        with Outcome(console) as outcome:
            outcome.log_dir = log_dir
            raise error
    return exit_.value.exit_code, console.file.getvalue()


def test_an_internal_error_gives_exit_1_and_a_log_with_the_traceback_in_the_run_dir(tmp_path):
    code, output = ends(tmp_path)
    assert code == FAILED and len(output.splitlines()) == 1 and "Traceback" not in output
    assert output.startswith("error: internal error (RuntimeError: boom); the traceback is in ")
    assert f"{tmp_path / ERROR_LOG};" in output
    log = (tmp_path / ERROR_LOG).read_text()
    assert "Traceback (most recent call last)" in log and "RuntimeError: boom" in log and "test_errors.py" in log


def test_without_a_run_dir_the_log_goes_to_a_temporary_file(tmp_path):
    code, output = ends(tmp_path / "missing")
    path = output.split("the traceback is in ")[1].split(";")[0]
    try:
        assert code == FAILED and "RuntimeError: boom" in open(path).read()
    finally:
        import os

        os.unlink(path)


def test_bad_input_is_one_line_and_undoes_what_the_command_made(tmp_path):
    undone = []
    console = Console(file=io.StringIO(), width=200, color_system=None)
    with pytest.raises(typer.Exit) as exit_:
        with Outcome(console) as outcome:
            outcome.on_bad_input = lambda: undone.append(True)
            raise UserError("--thing 3: must be 4")
    assert exit_.value.exit_code == BAD_INPUT and console.file.getvalue() == "error: --thing 3: must be 4\n"
    assert undone == [True]
