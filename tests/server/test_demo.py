"""`make demo` end to end, shortened: TP 4 under load, a worker SIGKILLed, recovery, plot, nothing left behind."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.server


def test_demo_survives_the_kill_with_nothing_lost_and_leaves_a_plot(servers, tiny_model, tmp_path):
    servers.close()  # the demo runs its own TP 4 server; free the pooled one's memory and cores first
    out = tmp_path / "demo"
    run = subprocess.run(
        [sys.executable, "-m", "sglang_ft.demo", "--model-dir", tiny_model, "--before-s", "4", "--after-s", "8",
         "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lost"] == 0 and summary["mismatched"] == 0 and summary["served"] > 0
    assert summary["recovered"] and summary["tp_after"] == 3 and summary["leftover_processes"] == []
    assert summary["kv_tokens_recomputed"] == 0 and summary["tokens_per_s_after"] > 0
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "SIGKILL -> worker 2" in run.stdout and "regrouped in place to TP 3" in run.stdout
    # a bad flag is refused by name, before anything starts
    bad = subprocess.run([sys.executable, "-m", "sglang_ft.demo", "--kill-rank", "9"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--kill-rank" in bad.stderr
