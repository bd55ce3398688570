"""``vllm-steer demo`` as a new user runs it: a subprocess with a clean environment (no
``VLLM_CPU_KVCACHE_SPACE``, nothing of the test session's), and the behaviour change it reports.

The thresholds are the demo's claims with a margin (the measured run is in benchmarks/RESULTS.md):
steering at a good alpha makes the liars' answers true without touching the honest speakers', too
strong an alpha breaks the honest speakers' answers, and FASB at that alpha does not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _clean_env() -> dict:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER")
    return {k: os.environ[k] for k in keep if k in os.environ}


def test_demo_shows_steering_change_behaviour_on_held_out_prompts(tmp_path):
    from vllm_steer.demo import GOOD_ALPHA, STRONG_ALPHA

    cli = Path(sys.executable).parent / "vllm-steer"
    proc = subprocess.run([str(cli), "demo", "--workdir", str(tmp_path / "demo")], capture_output=True, text=True,
                          env=_clean_env(), cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["n_held_out"] == {"lying": 160, "honest": 160}
    rows = {(r["method"], r["alpha"]): r for r in results["rows"]}
    none = rows[("unsteered", None)]
    good, strong, fasb = rows[("ITI", GOOD_ALPHA)], rows[("ITI", STRONG_ALPHA)], rows[("FASB", STRONG_ALPHA)]
    assert none["liar_truthful"] <= 0.05 and none["honest_truthful"] >= 0.95
    assert good["liar_truthful"] >= 0.9 and good["honest_truthful"] >= 0.95  # the behaviour changes
    assert strong["honest_truthful"] <= 0.8  # the damage of too strong an alpha
    assert fasb["honest_truthful"] >= 0.95 and fasb["liar_truthful"] >= strong["liar_truthful"] - 0.05
    same = results["unsteered_identical_to_plugin_free"]
    assert same["identical"] == same["of"] == 320
    assert (tmp_path / "demo" / "rate_vs_alpha.png").stat().st_size > 10_000
    table = proc.stdout[proc.stdout.index("setting"):]
    assert f"ITI  alpha={STRONG_ALPHA:g} (too strong)" in table and "identical to an engine without the plugin: 320/320" in table


def test_demo_workdir_that_cannot_be_written_is_one_message_and_exit_2(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cli = Path(sys.executable).parent / "vllm-steer"
    proc = subprocess.run([str(cli), "demo", "--workdir", str(blocker / "demo")], capture_output=True, text=True,
                          env=_clean_env(), cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--workdir" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
