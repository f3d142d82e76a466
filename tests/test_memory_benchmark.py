"""benchmarks/memory.py on a few tiny cells, each in a fresh process: strict JSON with positive peaks and
times, the plain step (every task's graphs kept) above the default per-task one on the task-by-task path,
a cell over its memory limit recorded as out of memory without stopping the run, and a broken cell as
failed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the script imports benchmarks/_common.py
    spec = importlib.util.spec_from_file_location("memory_benchmark", ROOT / "benchmarks" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "memory_benchmark", module)
    spec.loader.exec_module(module)
    return module


def _refuse(name: str) -> Any:
    raise ValueError(f"not strict JSON: bare {name}")


def strict(path: Path) -> Any:
    return json.loads(path.read_text(), parse_constant=_refuse)


def test_plain_keeps_every_task_the_default_one_at_a_time(bench: Any, tmp_path: Path) -> None:
    args = bench.build_parser().parse_args(["--threads", "1", "--limit-gib", "20"])
    # conv4 on 28x28 with 32 filters, rk4, 4 tasks: the plain step keeps 4 x 7 stage graphs (~170 MB over the
    # baseline on the machine this was written on), the per-task default 7 (~70 MB): a factor of about 2.4
    cells = [bench.make_cell(args, "conv4-28", "loop", lever, "rk4", 4, filters=32, steps=1)
             for lever in ("plain", "default")]
    records = [bench.launch(c, min_free_gib=0.5, timeout_s=600) for c in cells]
    path = tmp_path / "memory.json"
    bench.save(path, records, args, [*cells, bench.make_cell(args, "conv4-28", "loop", "plain", "rk4", 8)])
    data = strict(path)
    assert data["missing"] == ["conv4-28 loop plain rk4 T=8"]
    assert [c["settings"]["lever"] for c in data["cells"]] == ["plain", "default"]
    for cell in data["cells"]:
        assert cell["status"] == "ok", cell.get("error")
        assert cell["peak_bytes"] > 0 and cell["baseline_bytes"] > 0 and cell["vectorize"] is False
        assert cell["median_step_s"] > 0 and len(cell["step_seconds"]) == 1
        assert len(cell["loadavg_start"]) == 3 and len(cell["loadavg_end"]) == 3
    plain, default = (c["peak_bytes"] for c in data["cells"])
    assert plain > 1.7 * default and plain - default > 50e6, (plain, default)
    assert [c["units"] for c in data["cells"]] == [28, 7] and data["cells"][1]["chunk_tasks"] == 1
    # one plain cell cannot tell how memory grows with T; one task at a time is the same at any T
    assert "conv4-28/32f loop plain" not in data["fits"] and "conv4-28/32f loop default" in data["fits"]
    assert {r["lever"]: r["cpu_24gib_tasks"] for r in data["capacity"]} == {"plain": None, "default": "any"}
    assert all(c["peak_method"].startswith("VmHWM reset") for c in data["cells"])


TRANSIENT_THEN_STEP = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import memory
peak = memory.CpuPeak()
transient = torch.ones(100_000_000)  # 400 MB, written so that it is resident, then freed
del transient
before = peak.start()
kept = torch.ones(20_000_000)  # 80 MB
print(json.dumps({"resets": peak.resets, "before": before, "resident": memory.CpuPeak.resident_bytes(),
                  "peak": peak.peak()}))
"""


def test_an_earlier_transient_peak_does_not_hide_a_step() -> None:
    # a peak while importing or building (here 400 MB, freed) once hid a ~70 MB step: ru_maxrss did not grow.
    # A fresh process, as each cell of the benchmark: a long-lived one (this test run) serves new tensors
    # from memory it freed earlier and still holds, which no resident-memory reading can see
    run = subprocess.run([sys.executable, "-c", TRANSIENT_THEN_STEP, str(ROOT / "benchmarks")],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["resets"], "this Linux refuses /proc/self/clear_refs: the benchmark falls back to ru_maxrss"
    assert out["resident"] - out["before"] > 70e6  # the step's tensor is resident, over the reset baseline
    assert 70e6 < out["peak"] < 200e6, out


def test_out_of_memory_is_recorded_and_the_run_goes_on(bench: Any, tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "oom.json"
    # MiniImageNet-shaped conv4, rk4, 4 tasks kept at once: several GB, under a 1.5 GiB address space
    argv = ["--backbones", "conv4-84", "--tableaus", "rk4", "--tasks", "4", "--levers", "plain", "--steps", "1",
            "--threads", "1", "--limit-gib", "1.5", "--json", str(path)]
    assert bench.main(argv) == 0
    (cell,) = strict(path)["cells"]
    assert cell["status"] == "out of memory" and cell["limit_gib"] == 1.5, cell
    assert "allocate" in cell["error"] or "map" in cell["error"]
    assert path.with_suffix(".png").stat().st_size > 1000
    assert "out of memory" in capsys.readouterr().out
    assert bench.main([*argv, "--resume"]) == 0  # the cell is kept, not run again
    assert capsys.readouterr().out.startswith("0 cells to run (1 already in")
    assert len(strict(path)["cells"]) == 1
    assert bench.main([*argv, "--report"]) == 0  # fits, tables and the plot again, from the file alone
    assert "largest meta-batch T" in capsys.readouterr().out

    args = bench.build_parser().parse_args(["--threads", "1", "--limit-gib", "20"])
    broken = bench.launch(bench.make_cell(args, "conv4-28", "loop", "plain", "no-such-tableau", 1, filters=8),
                          min_free_gib=0.5, timeout_s=600)
    assert broken["status"] == "failed" and "no-such-tableau" in broken["error"]
