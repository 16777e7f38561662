"""bench/replicate.py end to end on a `elasticlm demo --quick` run: every table is written to its
section of the results file, a rerun replaces a section instead of adding one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from elasticlm.cli import main

ROOT = Path(__file__).resolve().parents[1]


def replicate(*args: str) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "replicate.py"), *args, "--no-progress"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_replicate_writes_every_table_on_a_quick_demo(tmp_path):
    demo = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(demo), "--no-progress"]) == 0
    results = tmp_path / "results.md"
    common = ["--demo", str(demo), "--work", str(tmp_path / "work"), "--results", str(results), "--n", "3"]
    replicate("all", *common)
    text = results.read_text()
    for key in ("demo", "table1", "table3", "table4", "table5"):
        assert text.count(f"<!-- {key} -->") == 1 and text.count(f"<!-- /{key} -->") == 1
    table1 = text[text.index("<!-- table1 -->"):text.index("<!-- /table1 -->")]
    assert "| 0.5 |" in table1 and "| 0.75 |" in table1 and "**tokens**" in table1
    for run in ("kd-0.75", "kd-0.5", "scratch-0.75", "scratch-0.5", "stage2-uniform"):
        assert (tmp_path / "work" / run / "final" / "config.json").is_file(), run
    assert "Nemotron Nano V2 12B shape" in text and "GB" in text[text.index("<!-- table3 -->"):]
    # a second run of one table reuses its trained runs and replaces its own section only
    again = replicate("table5", *common)
    assert "training stage 2" not in again
    assert results.read_text().count("<!-- table5 -->") == 1
    assert results.read_text().index("<!-- table1 -->") < results.read_text().index("<!-- table5 -->")

    # seeds: a second demo with another seed, then the spread over both
    seed1 = tmp_path / "demo-seed1"
    assert main(["demo", "--quick", "--seed", "1", "--out", str(seed1), "--no-progress"]) == 0
    replicate("seeds", "--demos", str(demo), str(seed1), *common)
    text = results.read_text()
    seeds = text[text.index("<!-- seeds -->"):text.index("<!-- /seeds -->")]
    assert "Seeds 0, 1" in seeds and "| elastic | 0.5 |" in seeds and "seed spread" in seeds
    # router: each architecture distilled alone (one seed here, for time)
    replicate("router", "--seeds", "1", "--kd-steps", "2", *common)
    router = results.read_text()
    router = router[router.index("<!-- router -->"):router.index("<!-- /router -->")]
    for method in ("learned, hard", "learned, st", "grid", "random", "learned, st (as trained)"):
        assert f"| 0.5 | {method} |" in router and f"| 0.75 | {method} |" in router, method
    work = tmp_path / "work" / "router"
    assert (work / "kd-random-0.5-s0" / "final" / "config.json").is_file()
    assert (work / "elastic-st-s0" / "final" / "config.json").is_file()
