"""Every benchmark script imports and answers `--help` (an import broken by a package change fails here, not in a
benchmark run weeks later). `tests/conftest.py` puts `benchmarks/` on the path, as running a script there does."""

import importlib
import json
import sys
from pathlib import Path

import pytest


BENCHMARKS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("bench_*.py"))


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_help(name, monkeypatch, capsys):
    module = importlib.import_module(name)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_bench_peers_reports_the_mean_of_the_convergence_seeds_and_keeps_what_it_did_not_measure(tmp_path, monkeypatch):
    bench_peers = importlib.import_module("bench_peers")
    for seed, ndcg in ((42, 0.0289), (1, 0.0280)):  # finished runs, which the benchmark reuses instead of training
        run = tmp_path / "runs" / f"sports_short_histories_convergence_seed{seed}"
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps({
            "test": {"ndcg@10": ndcg, "hr@10": 2 * ndcg, "hr@200": 0.25, "num_users": 35598},
            "mean_train_events": 5.0, "train_seconds": 4444.0, "steps": 13000, "best_step": 11000,
            "tokens_per_s": 3000.0, "peak_rss_gib": 1.5,
        }))
    output = tmp_path / "peers.json"
    output.write_text(json.dumps({"sports_ndcg@10": 0.0191, "ndcg_ratio_vs_best_peer": 7.665}))
    monkeypatch.setattr(sys, "argv", [
        "bench_peers.py", "--systems", "--convergence_config", "short_histories", "--convergence_seeds", "42", "1",
        "--convergence_minutes", "100", "--jobs", "2", "--runs_dir", str(tmp_path / "runs"), "--update",
        "--output", str(output),
    ])
    bench_peers.main()
    report = json.loads(output.read_text())
    assert report["sports_ndcg@10"] == 0.02845  # (.0289 + .0280) / 2 from the runs' own figures
    assert report["ndcg_ratio_vs_best_peer"] == 7.665  # not measured here: kept
    assert "budget_minutes" not in report  # no budget run
    convergence = report["sports_convergence"]
    assert convergence["config"] == "recipes/configs/short_histories.yaml" and convergence["hr@10"] == 0.0569
    assert {seed: row["ndcg@10"] for seed, row in convergence["seeds"].items()} == {"42": 0.0289, "1": 0.028}
    assert convergence["seeds"]["42"]["targets_per_s"] == 2400.0  # tokens/s x (mean - 1) / mean
