"""End to end: every failure a user can cause ends in one line and exit code 2, leaves nothing behind in runs/;
`-h` and `--version`. (A piped run's plain lines: test_cli.py; SIGTERM's exit code 75 and the resumable checkpoint
it leaves: test_cli_checkpoint.py.)"""

import os

import pytest
from helpers import TINY, invoke

from lean_relora.cli.errors import BAD_INPUT


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory of its own, so that the default run directory (runs/...) is the test's to inspect."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.toml").write_text(TINY)
    (tmp_path / "file").write_text("keep me")
    return tmp_path


def assert_one_line_exit_2(code, output, *expected):
    assert code == BAD_INPUT, output
    assert len(output.splitlines()) == 1 and output.startswith("error: "), output
    assert "Traceback" not in output and "ERROR" not in output
    for text in expected:
        assert text in output, output


def assert_nothing_left(workdir):
    runs = workdir / "runs"
    assert not runs.exists() or not any(runs.iterdir()), list(runs.rglob("*"))


@pytest.mark.parametrize("case", ["under a file", "in /proc", "names a file"])
def test_run_dir_that_cannot_be_a_directory(workdir, case):
    run_dir, expected = {"under a file": ("file/run", "cannot be created or written there (Not a directory)"),
                         "in /proc": ("/proc/lean-relora-run", "cannot be created or written there"),
                         "names a file": ("file", "is a file, not a directory")}[case]
    code, output = invoke("train", "tiny.toml", "--run-dir", run_dir)
    assert_one_line_exit_2(code, output, f"--run-dir {run_dir}: ", expected)
    assert (workdir / "file").read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a mode-0500 directory anyway: nothing to refuse")
def test_run_dir_under_an_unwritable_directory(workdir):
    locked = workdir / "locked"
    locked.mkdir(mode=0o500)
    code, output = invoke("train", "tiny.toml", "--run-dir", locked / "run")
    assert_one_line_exit_2(code, output, "(Permission denied)")
    assert list(locked.iterdir()) == []


def test_recipe_that_is_a_directory(workdir):
    (workdir / "recipes").mkdir()
    code, output = invoke("train", "recipes")
    assert_one_line_exit_2(code, output, "recipes: is a directory; pass a recipe .toml file")
    assert_nothing_left(workdir)


@pytest.mark.parametrize("content,expected", [(b"", "is empty"), (bytes(range(256)) * 8, "is binary, not UTF-8 text")],
                         ids=["empty", "binary"])
def test_txt_data_that_is_empty_or_binary_is_said_so(workdir, content, expected):
    (workdir / "corpus.txt").write_bytes(content)
    code, output = invoke("train", "tiny.toml", "--set", "data.source=corpus.txt")
    assert_one_line_exit_2(code, output, f"data.source = 'corpus.txt': {workdir / 'corpus.txt'} {expected}")
    assert_nothing_left(workdir)


def test_malformed_jsonl_gives_our_line_only(workdir):
    (workdir / "corpus.jsonl").write_text('{"text": "a"}\n{"text": broken\n')
    code, output = invoke("train", "tiny.toml", "--set", "data.source=corpus.jsonl")
    assert_one_line_exit_2(code, output, "could not be read as json (ArrowInvalid: JSON parse error")
    assert_nothing_left(workdir)


@pytest.mark.parametrize("item,expected", [
    ("lora.rank=-1", "--set lora.rank=-1: lora.rank = -1: must be > 0"),
    ("lora.rnak=3", "--set lora.rnak=3: unknown key lora.rnak; did you mean 'rank'?"),
    ("lora.rank=x", "--set lora.rank=x: lora.rank = 'x': must be an integer, got str"),
    ("lroa.rank=4", "--set lroa.rank=4: unknown section [lroa]; did you mean 'lora'?"),
    ("relora.warm_start_steps=99", "--set relora.warm_start_steps=99: relora.warm_start_steps = 99: must be <= "
                                   "train.max_steps (7)"),
])
def test_set_errors_name_the_set_not_the_recipe_file(workdir, item, expected):
    code, output = invoke("train", "tiny.toml", "--set", item)
    assert_one_line_exit_2(code, output, f"error: {expected}")
    assert "tiny.toml" not in output
    assert_nothing_left(workdir)


def test_a_run_stopped_by_bad_data_leaves_no_directory_but_keeps_a_given_one(workdir):
    code, output = invoke("train", "tiny.toml", "--set", "data.source=missing.txt")
    assert_one_line_exit_2(code, output, "data.source = 'missing.txt': no such file or directory")
    assert_nothing_left(workdir)
    (workdir / "mine").mkdir()
    (workdir / "mine" / "notes.txt").write_text("keep me")
    code, output = invoke("train", "tiny.toml", "--run-dir", "mine", "--set", "data.source=missing.txt")
    assert code == BAD_INPUT
    assert [p.name for p in (workdir / "mine").iterdir()] == ["notes.txt"]  # what was there stays, ours goes


@pytest.mark.parametrize("out", ["file/report", "/proc/lean-relora-report"])
def test_report_out_that_cannot_be_written(workdir, out):
    run = workdir / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 6.0, "lr": 0.001, "tokens": 128, "tokens_per_s": 10.0, '
                                       '"restarts": 0}\n')
    code, output = invoke("report", run, "--out", out)
    assert_one_line_exit_2(code, output, f"--out {out}: ")
    assert (workdir / "file").read_text() == "keep me"


def test_help_and_version():
    code, output = invoke("-h")
    assert code == 0 and "train" in output and "report" in output
    code, output = invoke("--version")
    from importlib.metadata import version

    assert code == 0 and output == f"lean-relora {version('lean-relora')}\n"
