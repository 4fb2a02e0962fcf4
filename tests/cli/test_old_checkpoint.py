"""A run written by the flat-layout code (commit e8c3e0c, before the package reorganisation) resumes on today's code
and continues exactly as that code's uninterrupted run did.

tests/fixtures/flat_layout_run: a tiny run (2 warm-start steps, cycles of 3, disk masters) stopped after step 6 by
`lean-relora train RECIPE --max-steps 6`; flat_layout_run_uninterrupted.jsonl: the same recipe run to step 10 by
that code. Made by: PYTHONPATH=<checkout of e8c3e0c> python -m lean_relora train tests/fixtures/flat_layout_run/
checkpoints/step-00000006/recipe.toml --run-dir DIR [--max-steps 6].
"""

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from lean_relora.cli.app import app

FIXTURES = Path(__file__).parents[1] / "fixtures"


def losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r}


def test_a_checkpoint_of_the_flat_layout_resumes_to_the_uninterrupted_losses(tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURES / "flat_layout_run", run_dir, symlinks=True)
    result = CliRunner().invoke(app, ["train", "--run-dir", str(run_dir), "--resume", "auto"])
    assert result.exit_code == 0, result.output
    resumed, whole = losses(run_dir / "metrics.jsonl"), losses(FIXTURES / "flat_layout_run_uninterrupted.jsonl")
    assert sorted(resumed) == list(range(1, 11))
    assert resumed == whole
