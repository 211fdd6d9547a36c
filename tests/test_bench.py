"""`stress bench`: every stage is timed and reported, on a tiny synthetic exchange."""

from __future__ import annotations

from typer.testing import CliRunner

from stress.benchmark import run_stages
from stress.cli import app


def test_bench_times_every_stage_and_reuses_a_kept_sample(tmp_path):
    stages = run_stages(40, 12, "float64", tmp_path / "snap")
    names = [s.name for s in stages]
    assert names == ["generate sample", "load snapshot", "build scenarios", "revalue instruments",
                     "first run (compiles)", "warm run", "write report", "peak memory"]
    assert all(s.seconds >= 0 for s in stages[:-1])
    assert "account-scenarios/s" in stages[5].note
    again = [s.name for s in run_stages(40, 12, "float32", tmp_path / "snap")]
    assert "generate sample" not in again  # the kept sample of the same size is reused


def test_bench_command_prints_the_table_and_rejects_a_bad_dtype():
    runner = CliRunner()
    r = runner.invoke(app, ["bench", "--accounts", "30", "--scenarios", "8"])
    assert r.exit_code == 0, r.output
    assert "warm run" in r.output and "30 accounts x 8 scenarios" in r.output
    assert runner.invoke(app, ["bench", "--dtype", "float16"]).exit_code == 2
