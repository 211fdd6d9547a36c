"""The command line (SPEC section 4): verbs, exit codes, one error message, no report on bad input.

Exit codes: 0 done; 1 done but a limit given on the command line was breached; 2 bad input or
usage, with one message on stderr naming the file, row and column, no traceback, and no report
folder written. Every bad-input case of ``test_validation.py`` is run through ``stress validate``
and ``stress run``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import stress
from stress import sample
from stress.cli import app
from stress.scenarios import default_path

from .test_validation import CASES, GOOD_SCENARIOS, POSITIONS, Case, base_inputs, build, expected, location, make, params

runner = CliRunner()
REPORT_FILES = ("summary.json", "accounts.parquet", "scenarios.parquet", "report.md", "report.html")

# Moves BTC to 3x: B (short perpetual and short calls on 50k USDC) goes bankrupt.
BAD_DEBT_SCENARIOS = GOOD_SCENARIOS + """
[[scenario]]
name = "btc-up-200"
moves = { BTC = 2.0 }
vol_shift = { BTC = 0.30 }
"""


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def assert_no_crash(result) -> None:
    """No Python exception escaped and no traceback was printed."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one message on stderr, got: {stderr!r}"
    return lines[0]


def assert_names(line: str, case: Case, fmt: str) -> None:
    """The message names the file, row and column (its wording is test_validation's business)."""
    file, row, column = expected(case, fmt)
    if case.id.startswith("missing-table"):
        assert file.split(".")[0] in line, line
    else:
        assert location(file, row, column) in line, line


# --------------------------------------------------------------------------------------------
# Verbs and good input


def test_help_lists_the_verbs():
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    for verb in ("run", "validate", "generate"):
        assert re.search(rf"\b{verb}\b", result.stdout), result.stdout


@pytest.mark.parametrize("verb, text", [("run", "stress[cluster]"), ("margin", "exchange.toml [margin] model"),
                                        ("backtest", "exchange.toml [margin] model")])
def test_help_shows_square_brackets_as_written(verb, text):
    """Help is rich markup: an unescaped ``[margin]`` would be taken for a style and vanish."""
    result = runner.invoke(app, [verb, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert text in " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.stdout).split()), result.stdout


def test_a_scenario_name_in_square_brackets_prints_as_written(tmp_path):
    """Console output is not markup: a scenario named ``[red]...[/]`` keeps its brackets in the
    summary table and in a limit breach (with markup, rich would colour it and drop them)."""
    snap, scen = build(tmp_path)
    name = "[red]btc-up-200[/]"
    scen.write_text(BAD_DEBT_SCENARIOS.replace('"btc-up-200"', f'"{name}"'))
    result = runner.invoke(app, ["run", str(snap), "-s", str(scen), "-o", str(tmp_path / "r"), "--max-bad-debt", "0"],
                           terminal_width=200)
    assert result.exit_code == 1, result.output
    assert "LIMIT BREACHED: worst bad debt" in result.stdout and f"({name})" in result.stdout, result.stdout
    assert any(line.split("│")[1].strip() == name for line in result.stdout.splitlines() if line.count("│") > 2), result.stdout


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_validate_good_snapshot(tmp_path, fmt):
    snap, scen = build(tmp_path, fmt=fmt)
    result = invoke("validate", snap)
    assert result.exit_code == 0, result.output
    assert_no_crash(result)
    assert "ok" in result.stdout
    assert result.stderr.strip() == ""

    result = invoke("validate", snap, "--scenarios", scen)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("ok") >= 2, result.stdout
    assert len(result.stdout.strip().splitlines()) == 1, result.stdout  # not wrapped: scripts read it


def test_generate_sample_writes_a_loadable_snapshot(tmp_path):
    folder = tmp_path / "sample"
    result = invoke("generate", "sample", folder, "--accounts", "50")
    assert result.exit_code == 0, result.output
    assert_no_crash(result)
    assert (folder / "exchange.toml").is_file()
    snap = stress.load_snapshot(folder)
    assert snap.n_accounts == 50
    assert snap.n_positions > 0
    # the default scenario set fits the sample exchange
    assert len(stress.load_scenarios(default_path(), snap)) > 0
    result = invoke("validate", folder)
    assert result.exit_code == 0, result.output


def test_generate_sample_positions_sets_about_how_many_positions_in_a_matched_book(tmp_path):
    # the scale issue's exchange has about three positions per account, twice the usual mix
    folder = tmp_path / "deep"
    result = invoke("generate", "sample", folder, "--accounts", "400", "--positions", "1600", "--format", "parquet")
    assert result.exit_code == 0, result.output
    snap = stress.load_snapshot(folder)
    assert snap.n_accounts == 400
    # "about": the other roles' counts are expected values (a small book leaves some options
    # without flow, so market makers hold fewer); at 100,000 accounts it is within 0.2%
    assert abs(snap.n_positions - 1600) <= 160
    usual = stress.load_snapshot(sample.write(tmp_path / "usual", accounts=400))
    assert usual.n_positions < 800
    # no account holds an instrument twice, and every long has its short
    keys = np.asarray(snap.pos_account, np.int64) * len(snap.instrument_ids) + snap.pos_instrument
    assert len(np.unique(keys)) == snap.n_positions
    net = np.bincount(snap.pos_instrument, weights=snap.pos_quantity, minlength=len(snap.instrument_ids))
    gross = np.bincount(snap.pos_instrument, weights=np.abs(snap.pos_quantity), minlength=len(snap.instrument_ids))
    assert np.all(np.abs(net) <= 1e-9 * gross)
    # the same arguments, the same files
    again = tmp_path / "again"
    assert invoke("generate", "sample", again, "--accounts", "400", "--positions", "1600", "--format", "parquet").exit_code == 0
    assert (again / "positions.parquet").read_bytes() == (folder / "positions.parquet").read_bytes()


def test_run_writes_the_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snap, scen = build(tmp_path)
    out = tmp_path / "report"
    result = invoke("run", snap, "--scenarios", scen, "--out", out)
    assert result.exit_code == 0, result.output
    assert_no_crash(result)
    for name in REPORT_FILES:
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accounts"] == 3
    assert summary["positions"] == len(POSITIONS)
    assert summary["scenarios"] == 2
    assert len(pd.read_parquet(out / "accounts.parquet")) == 3
    assert list(pd.read_parquet(out / "scenarios.parquet")["scenario"]) == ["btc-down-30", "usdc-depeg"]


def test_max_bad_debt_breached_exits_1_after_writing_the_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snap, scen = build(tmp_path)
    scen.write_text(BAD_DEBT_SCENARIOS)
    out = tmp_path / "report"
    result = invoke("run", snap, "--scenarios", scen, "--out", out, "--max-bad-debt", "0")
    assert result.exit_code == 1, result.output
    assert_no_crash(result)
    for name in REPORT_FILES:
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["worst_bad_debt"] > 0
    assert summary["worst_scenario"] == "btc-up-200"

    # the same run under a limit it does not breach is done: exit 0
    out2 = tmp_path / "report2"
    result = invoke("run", snap, "--scenarios", scen, "--out", out2, "--max-bad-debt", "1e12")
    assert result.exit_code == 0, result.output
    assert (out2 / "summary.json").is_file()


def test_max_p_fund_depleted_without_random_scenarios_exits_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snap, scen = build(tmp_path)
    out = tmp_path / "report"
    result = invoke("run", snap, "--scenarios", scen, "--out", out, "--max-p-fund-depleted", "0.001")
    assert result.exit_code == 2, result.output
    assert_no_crash(result)
    line = one_error_line(result.stderr)
    assert scen.name in line and "(--max-p-fund-depleted)" in line
    assert not out.exists()
    assert not (tmp_path / "reports").exists()
    with open(snap / "exchange.toml", "a") as f:  # the same limit set nightly: the message says where
        f.write("\n[limits]\nmax_p_fund_depleted = 0.001\n")
    result = invoke("run", snap, "--scenarios", scen, "--out", out)
    assert result.exit_code == 2, result.output
    assert "(exchange.toml [limits] max_p_fund_depleted)" in one_error_line(result.stderr)
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# Bad input through the CLI: exit 2, one message on stderr, no traceback, no report


@pytest.mark.parametrize("case, fmt", params())
def test_validate_bad_input(tmp_path, case, fmt):
    snap, scen = make(tmp_path, case, fmt)
    args = ["validate", snap] + (["--scenarios", scen] if case.scenario else [])
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert_no_crash(result)
    assert result.stdout.strip() == "", result.stdout
    assert_names(one_error_line(result.stderr), case, fmt)


@pytest.mark.parametrize("case, fmt", params())
def test_run_bad_input(tmp_path, monkeypatch, case, fmt):
    monkeypatch.chdir(tmp_path)
    snap, scen = make(tmp_path, case, fmt)
    out = tmp_path / "report"
    result = invoke("run", snap, "--scenarios", scen, "--out", out)
    assert result.exit_code == 2, result.output
    assert_no_crash(result)
    assert result.stdout.strip() == "", result.stdout
    assert_names(one_error_line(result.stderr), case, fmt)
    assert not out.exists()
    assert not (tmp_path / "reports").exists()


def test_an_input_error_only_the_run_finds_exits_2_without_a_report(tmp_path, monkeypatch):
    """Some input is judged only by the run, e.g. a margin model's tables too large for this
    machine's memory: the same one message and exit 2 as an error found at load."""
    from stress import engine

    def refuse(*args, **kwargs):
        raise stress.InputError("nightly.toml", None, None, "the portfolio margin model's tables would not fit")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(engine, "run", refuse)
    snap, scen = build(tmp_path)
    out = tmp_path / "report"
    result = invoke("run", snap, "--scenarios", scen, "--out", out)
    assert result.exit_code == 2, result.output
    assert_no_crash(result)
    assert "would not fit" in one_error_line(result.stderr)
    assert not out.exists()


def test_the_built_in_sample_leaves_no_files_behind(tmp_path, monkeypatch):
    import tempfile

    from stress import cli

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    snap, _ = cli._load(None, None, 50)
    assert snap.n_accounts == 50
    assert list(tmp_path.iterdir()) == []


def test_run_missing_snapshot_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, scen = build(tmp_path)
    result = invoke("run", tmp_path / "no-such-snapshot", "--scenarios", scen, "--out", tmp_path / "report")
    assert result.exit_code == 2, result.output
    assert_no_crash(result)
    assert "no-such-snapshot" in one_error_line(result.stderr)
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("argv, said", [
    (["run", "--bogus"], "No such option: --bogus"),
    (["greeks", "x", "--top", "0"], "'--top'"),
    (["greeks"], "Missing argument"),
    (["no-such-verb"], "No such command"),
])
def test_the_console_script_says_a_usage_error_in_one_line(monkeypatch, capsys, argv, said):
    """The framework's own usage errors (unknown option, value out of range, missing
    argument), as every other input error: exit 2 and one line, not a framed box."""
    from stress import cli

    monkeypatch.setattr(sys, "argv", ["stress", *argv])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    line = one_error_line(err)
    assert line.startswith("error: ") and said in line and "--help" in line, err


def test_bad_dtype_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snap, scen = build(tmp_path)
    result = invoke("run", snap, "--scenarios", scen, "--out", tmp_path / "report", "--dtype", "float16")
    assert result.exit_code == 2, result.output
    assert_no_crash(result)
    assert not (tmp_path / "report").exists()


# --------------------------------------------------------------------------------------------
# For real: a separate process, its own stderr and exit status


def _stress(*args: str | Path, cwd: Path, console_script: bool = False) -> subprocess.CompletedProcess:
    if console_script:
        exe = Path(sys.executable).with_name("stress")
        assert exe.exists(), "the install (README) puts the `stress` console script next to the interpreter"
        cmd = [str(exe)]
    else:
        cmd = [sys.executable, "-m", "stress.cli"]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    return subprocess.run(cmd + [str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_subprocess_bad_cell(tmp_path):
    case = next(c for c in CASES if c.id == "non-numeric-quantity")
    snap, scen = make(tmp_path, case, "csv")
    out = tmp_path / "report"

    proc = _stress("validate", snap, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    line = one_error_line(proc.stderr)
    assert line.endswith("positions.csv line 3, column quantity: 'abc' is not a number"), line

    proc = _stress("run", snap, "--scenarios", scen, "--out", out, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert one_error_line(proc.stderr) == line
    assert not out.exists()
    assert not (tmp_path / "reports").exists()


def test_console_script_bad_scenario_file(tmp_path):
    case = next(c for c in CASES if c.id == "scenario-unknown-asset-move")
    snap, scen = make(tmp_path, case, "csv")
    out = tmp_path / "report"
    proc = _stress("run", snap, "--scenarios", scen, "--out", out, cwd=tmp_path, console_script=True)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    line = one_error_line(proc.stderr)
    assert "nightly.toml scenario 'eth-crash', column moves.ETH: unknown asset 'ETH'" in line, line
    assert not out.exists()


def test_run_without_scenarios_uses_the_default_set_on_any_snapshot(tmp_path, monkeypatch):
    # The built-in set names ETH and SOL; a snapshot without them still runs it (moves of
    # assets it lacks are dropped), and the report lands under reports/<UTC timestamp>/.
    monkeypatch.chdir(tmp_path)
    snap, _ = build(tmp_path)
    result = invoke("run", snap)
    assert result.exit_code == 0, result.output
    runs = list((tmp_path / "reports").iterdir())
    assert len(runs) == 1 and re.fullmatch(r"\d{8}T\d{6}Z", runs[0].name)
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["scenarios"] == len(stress.load_scenarios(default_path(), stress.load_snapshot(snap), skip_unknown_assets=True))


def test_run_with_timings_prints_each_stage_after_writing_the_report(tmp_path, monkeypatch):
    import re
    import time

    monkeypatch.chdir(tmp_path)
    snap, scen = build(tmp_path)
    out = tmp_path / "report"
    t = time.perf_counter()
    result = invoke("run", snap, "--scenarios", scen, "--out", out, "--timings", "-q")
    wall = time.perf_counter() - t
    assert result.exit_code == 0, result.output
    assert (out / "summary.json").is_file()
    stages = ("load snapshot", "build scenarios", "run (compile, revalue, sweep)", "exposure (Greeks)", "write report")
    seconds = []
    for stage in stages:
        m = re.search(re.escape(stage) + r"\s*│\s*([0-9.]+)", result.output)
        assert m, (stage, result.output)
        seconds.append(float(m.group(1)))
    # the stages after the start are this invocation's own time (here the "start" row is the
    # whole test process's, which a real command's is not)
    assert 0 < sum(seconds) <= wall + 0.01


@pytest.mark.parametrize("option, value", [("--max-bad-debt", "nan"), ("--max-bad-debt", "-5"), ("--max-bad-debt", "inf"),
                                           ("--max-p-fund-depleted", "nan"), ("--max-p-fund-depleted", "2")])
def test_a_limit_that_can_never_be_measured_against_exits_2_before_the_run(tmp_path, monkeypatch, option, value):
    # NaN compares false with everything: such a limit would never be breached, silently
    monkeypatch.chdir(tmp_path)
    snap, scen = build(tmp_path)
    out = tmp_path / "report"
    result = invoke("run", snap, "--scenarios", scen, "--out", out, option, value)
    assert result.exit_code == 2, result.output
    assert_no_crash(result)
    assert one_error_line(result.stderr).startswith(f"error: {option}: {float(value)!r}: the limit must be")
    assert not out.exists()


@pytest.mark.parametrize("key, value, limit, shown", [
    ("worst_bad_debt", 48_999.99999, 48_999.5, "49,000.0 USD (s) > max_bad_debt 48,999.5"),
    ("worst_bad_debt", 50_000.0, 49_000.0, "50,000 USD (s) > max_bad_debt 49,000"),
    ("p_fund_depleted", 4e-5, 2e-5, "p_fund_depleted 0.00004 > max_p_fund_depleted 0.00002"),
])
def test_a_breach_message_shows_the_digits_that_tell_value_and_limit_apart(key, value, limit, shown):
    from stress.cli import _breaches

    summary = {"worst_bad_debt": 0.0, "worst_scenario": "s", "p_fund_depleted": 0.0, key: value}
    (line,) = _breaches(summary, {"max_" + key.replace("worst_", ""): limit})
    assert line.endswith(shown), line


def test_a_nan_limit_in_exchange_toml_exits_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snap, scen = build(tmp_path)
    with open(snap / "exchange.toml", "a") as f:
        f.write("\n[limits]\nmax_bad_debt = nan\n")
    result = invoke("run", snap, "--scenarios", scen, "--out", tmp_path / "report")
    assert result.exit_code == 2, result.output
    assert "exchange.toml [limits], column max_bad_debt: nan" in one_error_line(result.stderr)


def test_an_out_path_that_cannot_be_a_folder_exits_2_before_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snap, scen = build(tmp_path)
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "below"):
        result = invoke("run", snap, "--scenarios", scen, "--out", out)
        assert result.exit_code == 2, result.output
        assert_no_crash(result)
        assert one_error_line(result.stderr).startswith("error: --out: ")
    assert (tmp_path / "afile").read_text() == "x"
    assert not (tmp_path / "reports").exists()


# Every verb that writes checks its --out before the work: (verb and its arguments, suffix of
# the file it writes, or None for a folder). The snapshot and scenario file come from build().
WRITERS = [
    (("greeks", "{snap}"), ".parquet"),
    (("margin", "{snap}"), ".parquet"),
    (("backtest", "{snap}", "--prices", "{snap}/none.csv", "--horizon-days", "1"), ".parquet"),
    (("reverse", "{snap}", "--scenarios", "{scen}"), ".json"),
    (("generate", "scenarios", "--kind", "grid"), ".toml"),
    (("sensitivities", "{snap}", "--scenarios", "{scen}"), None),
    (("calibrate", "{snap}", "--scenarios", "{scen}", "--target", "p_fund_depleted<=0.01"), None),
]


@pytest.mark.parametrize("args,suffix", WRITERS, ids=[" ".join(a[:2]).replace(" {snap}", "") for a, _ in WRITERS])
def test_every_verb_that_writes_exits_2_on_an_unusable_out_path_before_the_work(tmp_path, monkeypatch, args, suffix):
    monkeypatch.chdir(tmp_path)
    snap, scen = build(tmp_path)
    (tmp_path / "afile").write_text("x")
    name = "out" + (suffix or "")
    unusable = [tmp_path / "afile", tmp_path / "afile" / name]  # a file where a folder must be, or under one
    if suffix is not None:  # a folder where the file must be
        (tmp_path / name).mkdir()
        unusable = [tmp_path / name, tmp_path / "afile" / name]
    for out in unusable:
        result = invoke(*(a.format(snap=snap, scen=scen) for a in args), "--out", out)
        assert result.exit_code == 2, result.output
        assert_no_crash(result)
        assert one_error_line(result.stderr).startswith("error: --out: "), result.stderr
    assert (tmp_path / "afile").read_text() == "x"
    if suffix is not None:
        assert list((tmp_path / name).iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_out_folder_where_nothing_can_be_made_exits_2_before_the_run_even_as_root(tmp_path, monkeypatch):
    # os.access says a root process may write /proc; making a folder there fails all the same
    monkeypatch.chdir(tmp_path)
    snap, scen = build(tmp_path)
    result = invoke("run", snap, "--scenarios", scen, "--out", "/proc/stress-out")
    assert result.exit_code == 2, result.output
    assert one_error_line(result.stderr).startswith("error: --out: cannot write /proc/stress-out: /proc")
    assert "exposure" not in result.output  # nothing of the run was printed


def test_an_internal_error_exits_3_with_its_traceback_not_1(tmp_path, monkeypatch):
    # exit 1 means "a limit was breached": a crash must not look like one to a scheduler
    from stress import cli, engine

    snap, scen = build(tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(engine, "run", broken)
    monkeypatch.setattr(sys, "argv", ["stress", "run", str(snap), "--scenarios", str(scen), "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == cli.INTERNAL_ERROR == 3


def test_generate_sample_will_not_mix_formats_in_one_folder(tmp_path):
    folder = tmp_path / "snap"
    assert invoke("generate", "sample", folder, "--accounts", "20").exit_code == 0
    result = invoke("generate", "sample", folder, "--accounts", "20", "--format", "parquet")
    assert result.exit_code == 2, result.output
    assert "holds CSV tables" in one_error_line(result.stderr)
    assert not list(folder.glob("*.parquet"))
    stress.load_snapshot(folder)  # still the CSV snapshot it was


def test_the_device_thread_starts_after_the_imports_that_write_numpys_type_registry():
    # JAX's import registers ml_dtypes' types in NumPy's type dictionary while the main thread's
    # pandas import (numpy.ma) iterates it: overlapping, they raised "dictionary changed size
    # during iteration" (exit 3) now and then. Both are imported before the thread starts.
    code = ("import sys, threading\n"
            "import stress.cli as cli\n"
            "seen = {}\n"
            "class Thread:\n"
            "    def __init__(self, **kw): seen.update({m: m in sys.modules for m in ('ml_dtypes', 'numpy.ma')})\n"
            "    def start(self): pass\n"
            "before = {m: m in sys.modules for m in ('ml_dtypes', 'numpy.ma')}\n"
            "cli.threading.Thread = Thread\n"
            "cli._start_devices()\n"
            "print(before, seen)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str({"ml_dtypes": False, "numpy.ma": False}) + " " + str({"ml_dtypes": True, "numpy.ma": True})


def test_validate_refuses_a_fund_limit_the_scenarios_cannot_measure_as_run_does(tmp_path, monkeypatch):
    # [limits] max_p_fund_depleted needs random scenarios; the explicit set has none
    monkeypatch.chdir(tmp_path)
    snap, scen = build(tmp_path)
    with open(snap / "exchange.toml", "a") as f:
        f.write("\n[limits]\nmax_p_fund_depleted = 0.01\n")
    for verb, extra in (("validate", ()), ("run", ("--out", tmp_path / "report"))):
        result = invoke(verb, snap, "--scenarios", scen, *extra)
        assert result.exit_code == 2, (verb, result.output)
        assert "needs random scenarios" in one_error_line(result.stderr)
    assert invoke("validate", snap).exit_code == 0  # alone, the snapshot is fine


def test_a_run_whose_results_overflow_exits_2_without_output(tmp_path, monkeypatch):
    # a BTC balance of 1e308 is a finite number, but not once valued at 90,000 USD: the run
    # would report an infinite equity and a NaN bad debt, which every limit lets through
    monkeypatch.chdir(tmp_path)
    inputs = base_inputs()
    inputs["balances"][1]["amount"] = 1e308
    snap, scen = build(tmp_path, inputs)
    result = invoke("run", snap, "--scenarios", scen, "--out", tmp_path / "report", "--max-bad-debt", "0")
    assert result.exit_code == 2, result.output
    assert one_error_line(result.stderr).startswith("error: results summary, column total_equity: inf")
    assert not (tmp_path / "report").exists()


def test_an_overflowing_run_says_one_line_in_a_new_process(tmp_path):
    # NumPy's overflow warnings on the way (a matmul of 1e305 BTC at 90,000 USD) are not
    # printed beside the error: one message, exit 2, no report
    inputs = base_inputs()
    inputs["balances"][1]["amount"] = 1e305
    snap, scen = build(tmp_path, inputs)
    proc = _stress("run", snap, "--scenarios", scen, "--out", tmp_path / "report", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert one_error_line(proc.stderr).startswith("error: ")
    assert not (tmp_path / "report").exists()


def test_a_nan_bad_debt_counts_as_a_breach_of_the_limit():
    from stress.cli import _breaches

    summary = {"worst_bad_debt": float("nan"), "worst_scenario": "s", "p_fund_depleted": float("nan")}
    assert len(_breaches(summary, {"max_bad_debt": 1e9, "max_p_fund_depleted": 0.5})) == 2
