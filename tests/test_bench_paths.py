"""Where the benchmark writes: a run never changes a tracked file, and the figures need matplotlib only to draw.

`make quick` runs `python -m bench --quick` and `python -m bench.plots`; by default both use the git-ignored
bench/out/, and only an explicit folder (`--results-dir`, `make publish-results`) writes the tracked
bench/results/ that the README shows. The quick run itself is too slow to repeat here, so these tests check
the path logic, the Makefile's commands, a tiny run and the plots command without matplotlib.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import __main__ as cli
from bench import harness, plots

REPO = Path(__file__).resolve().parents[1]
HAS_GIT = shutil.which("git") is not None and (REPO / ".git").exists()


def test_results_dir_precedence(tmp_path):
    env_dir = tmp_path / "from-env"
    assert harness.results_dir(None, environ={}) == harness.LOCAL_DIR
    assert harness.results_dir("", environ={}) == harness.LOCAL_DIR
    assert harness.results_dir(None, environ={harness.RESULTS_DIR_ENV: str(env_dir)}) == env_dir
    assert harness.results_dir(tmp_path, environ={harness.RESULTS_DIR_ENV: str(env_dir)}) == tmp_path
    assert harness.LOCAL_DIR == REPO / "bench" / "out"
    assert harness.PUBLISHED_DIR == REPO / "bench" / "results"
    assert harness.LOCAL_DIR != harness.PUBLISHED_DIR


def test_cli_defaults_to_the_ignored_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(harness.RESULTS_DIR_ENV, raising=False)
    for parse in (cli.parse_args, _bench_ttm_parse, _plots_parse):
        assert harness.results_file(parse([])) == harness.LOCAL_DIR / "results.jsonl"
        given = harness.results_file(parse(["--results-dir", str(tmp_path)]))
        assert given == tmp_path / "results.jsonl"
        assert harness.results_file(parse(["--results", str(tmp_path / "r.jsonl")])) == tmp_path / "r.jsonl"
    monkeypatch.setenv(harness.RESULTS_DIR_ENV, str(tmp_path / "env"))
    assert harness.results_file(cli.parse_args([])) == tmp_path / "env" / "results.jsonl"


def _bench_ttm_parse(argv):
    from bench import ttm

    return ttm.parse_args(argv)


def _plots_parse(argv):
    import argparse

    ap = argparse.ArgumentParser()
    harness.add_results_args(ap)
    return ap.parse_args(argv)


@pytest.mark.skipif(not HAS_GIT, reason="needs git and a checkout")
def test_the_local_folder_is_ignored_and_the_published_one_is_not():
    def ignored(rel: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", rel], cwd=REPO).returncode == 0

    assert ignored("bench/out/results.jsonl")
    assert ignored("bench/out/plots/layer-time-ratio-cpu.png")
    assert not ignored("bench/results/results.jsonl")
    assert not ignored("bench/results/plots/layer-memory-cpu.png")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_makefile_main_job_writes_only_the_ignored_folder():
    def commands(target: str) -> list[str]:
        out = subprocess.run(["make", "-n", "-B", target], cwd=REPO, capture_output=True, text=True, check=True)
        return [line for line in out.stdout.splitlines() if "-m bench" in line]

    for target in ("quick", "bench", "plots", "overhead"):
        lines = commands(target)
        assert lines, target
        for line in lines:
            assert "bench/out" in line and "bench/results" not in line, (target, line)
    publish = commands("publish-results")
    assert len(publish) == 2 and all("--results-dir bench/results" in line for line in publish)


def test_a_run_writes_where_it_says_and_nowhere_else(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(harness.RESULTS_DIR_ENV, str(tmp_path / "never"))
    before = _tracked_state()
    argv = "--preset layer --quick --M 2 --shapes 12x8 --formats lora --reps 1".split()
    assert cli.main([*argv, "--results-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    rows_file = tmp_path / "run" / "results.jsonl"
    assert f"appended to {rows_file}" in out
    assert harness.read_rows(rows_file) and not (tmp_path / "never").exists()
    assert plots.main(["--results-dir", str(tmp_path / "run"), "--no-figures"]) == 0
    assert (tmp_path / "run" / "plots" / "layer-table-cpu.md").is_file()
    assert _tracked_state() == before


def _tracked_state() -> dict[str, tuple[int, int]]:
    """Size and mtime of every file under the published folder (the files a run must not touch)."""
    state = {}
    for path in sorted(harness.PUBLISHED_DIR.rglob("*")):
        if path.is_file():
            st = path.stat()
            state[str(path)] = (st.st_size, st.st_mtime_ns)
    return state


def _rows_file(tmp_path: Path) -> Path:
    row = {
        "run": "2026-11-23T13:40:00-cpu",
        "preset": "layer",
        "provider": "frozen",
        "phase": "forward+backward",
        "device": "CPU: test",
        "device_type": "cpu",
        "dtype": "float32",
        "time_ms": 0.5,
        "M": 4,
        "d_in": 16,
        "d_out": 16,
        "rank": 8,
        "format": "lora",
        "ratio_to_base": 1.0,
    }
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "provider": "ttkernels-torch", "ratio_to_base": 1.4}))
    return path


def test_plots_without_matplotlib_write_the_table_and_exit_0(tmp_path):
    rows = _rows_file(tmp_path)
    out = tmp_path / "plots"
    # None in sys.modules makes every import of matplotlib fail, as in an environment without it
    code = (
        "import sys\n"
        "for name in ('matplotlib', 'matplotlib.pyplot'):\n"
        "    sys.modules[name] = None\n"
        "from bench import plots\n"
        f"sys.exit(plots.main(['--results', {str(rows)!r}, '--out', {str(out)!r}]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != harness.RESULTS_DIR_ENV}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pip install matplotlib" in done.stderr and "figures not drawn" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["layer-table-cpu.md"]
    assert "ttkernels-torch | 1.40" in (out / "layer-table-cpu.md").read_text()
    assert str(out / "layer-table-cpu.md") in done.stdout


def test_plots_say_where_the_rows_are_missing(tmp_path, capsys):
    assert plots.main(["--results-dir", str(tmp_path)]) == 1
    assert str(tmp_path / "results.jsonl") in capsys.readouterr().err
