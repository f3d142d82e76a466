"""Reporting the end-to-end benchmark: ratios between rows, the tables, the target verdicts, chart and JSON.

The rows are the dicts :mod:`e2e_measure` returns; the targets are declared in ``benchmarks/targets.py``
(:data:`targets.STEP_TARGETS`) and only judged here.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any, Iterator

import torch

from _common import ROOT
from e2e_contenders import CONTENDERS
from e2e_measure import BUSY_CORES
from e2e_workloads import WORKLOADS, Workload
from targets import CUDA_TARGETS_ELSEWHERE, RKFAST_VECTORIZED, STEP_TARGETS, StepTarget

Row = dict[str, Any]


def fmt(x: float | None, spec: str = ".2f", width: int = 9) -> str:
    return f"{'-' if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec):>{width}}"


def lookup(rows: list[Row], **key: str) -> Row | None:
    """The first timed row with these fields."""
    for r in rows:
        if all(r.get(k) == v for k, v in key.items()) and r.get("status") == "ok" and r.get("ms") is not None:
            return r
    return None


def add_ratios(rows: list[Row]) -> None:
    """``x_rkfast`` (this row's ms over rkfast's at the same tableau and order) and, on rkfast rows,
    ``x_loop`` (the loop's ms over this row's)."""
    for r in rows:
        if r.get("ms") is None:
            continue
        ref = lookup(rows, workload=r["workload"], contender="rkfast", tableau=r["tableau"], order=r["order"])
        r["x_rkfast"] = r["ms"] / ref["ms"] if ref else None
        loop = lookup(rows, workload=r["workload"], contender="loop", tableau=r["tableau"], order=r["order"])
        r["x_loop"] = loop["ms"] / r["ms"] if loop and r["contender"].startswith("rkfast") else None


# -- the tables -----------------------------------------------------------------------------------------------


def sanity_text(san: dict[str, Any]) -> str:
    """``ok 1.7e-07`` (float32 relative error), ``ok 1.7e-03 (f64 4.4e-14)`` when the exact check decided."""
    f32, f64 = san.get("float32") or {}, san.get("float64") or {}
    if f32.get("reference"):
        return "reference"
    if not f32 and not f64:
        return "-"
    if "rel_err" not in f32:
        return f32.get("reason", "unchecked")
    text = f"{f32['rel_err']:.1e}"
    if "rel_err" in f64:
        text += f" (f64 {f64['rel_err']:.1e})"
    ok = f64.get("ok") if f64 else f32.get("ok")
    return f"{ {True: 'ok', False: 'WRONG', None: 'unchecked'}[ok] } {text}"


def print_table(wl: Workload, rows: list[Row]) -> None:
    print(f"\n== {wl.name}: {wl.describe}")
    print(f"{'contender':<17}{'tableau':<8}{'order':<7}{'ms/step':>10}{'n':>4}{'peak MB':>9}{'base MB':>9}"
          f"{'rkfast x':>9}{'x loop':>8}{'other':>7}  sanity")
    for r in rows:
        if r["workload"] != wl.name:
            continue
        head = f"{r['contender']:<17}{r['tableau']:<8}{r['order']:<7}"
        check = sanity_text(r.get("sanity") or {})
        if r.get("status") == "wrong":
            print(f"{head}WRONG, not timed: meta-gradient vs the loop's {check.split(' ', 1)[-1]}")
            continue
        if r.get("status") == "unsupported" and r.get("reason", "").startswith("the same as rkfast"):
            continue  # rkfast-vmap / rkfast-loop where the default already is that (the rkfast row)
        if r.get("status") != "ok":
            print(f"{head}{r['status'].upper()}: {r.get('reason', '') or check}")
            continue
        if r.get("ms") is None:
            continue
        busy = r.get("other_cores")
        flag = "!" if busy is not None and busy > BUSY_CORES else ""
        print(f"{head}{fmt(r['ms'], '.2f', 10)}{r.get('repeats', 0):>4}{fmt(r.get('peak_mb'), '.1f')}{fmt(r.get('base_mb'), '.0f')}"
              f"{fmt(r.get('x_rkfast'), '.2f')}{fmt(r.get('x_loop'), '.2f', 8)}{fmt(busy, '.2f', 6)}{flag:1} {check}")


def print_legend(device: torch.device, isolated: bool) -> None:
    print("\n'rkfast x' = this row's ms / rkfast's (same tableau, order); 'x loop' = loop's ms / this row's; "
          "'other' = CPU cores used by other processes during the cell; peak MB = "
          + ("CUDA max allocated above setup" if device.type == "cuda" else
             "peak anonymous RSS of the timed steps above that after imports+setup, own process per cell"
             if isolated else
             "not measured (in-process run)"))


# -- the targets ------------------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None else None


def _where(target: StepTarget, rows: list[Row], workloads: list[str]) -> Iterator[tuple[str, str, str]]:
    """The (workload, tableau, order) a target is judged at."""
    if target.every_tableau:  # every one rkfast ran, in the run's workload order, maml and second order first
        yield from sorted({(r["workload"], r["tableau"], r["order"]) for r in rows if r["contender"] == "rkfast"
                           and (target.workloads is None or r["workload"] in target.workloads)},
                          key=lambda k: (workloads.index(k[0]), k[1] != "maml", k[1], k[2] != "second"))
        return
    for wl in workloads if target.workloads is None else target.workloads:
        if wl in workloads or target.listed_when_not_run:
            yield wl, "maml", "second"


def judge(target: StepTarget, rows: list[Row], device: torch.device, wl: str, tab: str, order: str) -> dict[str, Any]:
    """One verdict: ``target``, ``value``, ``limit``, ``met`` (None: not measured) and ``detail``."""
    def find(contender: str) -> Row | None:
        key = {"workload": wl, "tableau": tab, "order": order}
        if contender == RKFAST_VECTORIZED:  # see targets.RKFAST_VECTORIZED
            return lookup(rows, contender="rkfast-vmap", **key) or lookup(rows, contender="rkfast", **key)
        return lookup(rows, contender=contender, **key)

    row, base = find(target.contender), find(target.baseline)
    name = row["contender"] if row else ("rkfast" if target.contender == RKFAST_VECTORIZED else target.contender)
    label, title = target.label or name, target.title(wl, tab, order, name)
    if target.compare == "memory":
        a, b = (row.get("peak_mb") if row else None), (base.get("peak_mb") if base else None)
        noise = target.rss_noise_mb if device.type == "cpu" else 0.0
        met = None if a is None or b is None else a <= b + noise
        detail = (f"{label} {fmt(a, '.1f').strip()} MB / {target.baseline} {fmt(b, '.1f').strip()} MB"
                  + (f" (difference {a - b:+.1f} MB; CPU tolerance {noise:g} MB of RSS noise)"  # type: ignore[operator]
                     if met is not None and device.type == "cpu" else ""))
        return {"target": title, "value": _ratio(a, b), "limit": target.limit, "met": met, "detail": detail}
    a, b = (row["ms"] if row else None), (base["ms"] if base else None)
    if target.compare == "speedup":
        value = _ratio(b, a)
        detail = f"{target.baseline} {fmt(b).strip()} ms / {label} {fmt(a).strip()} ms"
    else:
        value = _ratio(a, b)
        detail = f"{label} {fmt(a).strip()} ms / {target.baseline} {fmt(b).strip()} ms"
    met = None if value is None else (value >= target.limit if target.compare == "speedup" else value <= target.limit)
    return {"target": title, "value": value, "limit": target.limit, "met": met, "detail": detail}


def judge_targets(rows: list[Row], device: torch.device, workloads: list[str]) -> list[dict[str, Any]]:
    """The verdict of every target that applies on this device, in the order targets.py declares them."""
    out = [judge(t, rows, device, *where) for t in STEP_TARGETS if t.applies_to(device.type)
           for where in _where(t, rows, workloads)]
    if device.type != "cuda":
        out.append({"target": CUDA_TARGETS_ELSEWHERE, "value": None, "limit": None, "met": None,
                    "detail": "CUDA only: not measured on this device"})
    return out


def print_verdicts(verdicts: list[dict[str, Any]]) -> None:
    print("\nTargets:")
    for t in verdicts:
        state = {True: "met", False: "NOT MET", None: "n/a"}[t["met"]]
        value = "" if t["value"] is None else f" = {t['value']:.2f} (limit {t['limit']:g})"
        print(f"  [{state:^7}] {t['target']}{value}: {t['detail']}")


# -- the chart and the JSON ---------------------------------------------------------------------------------


def plot(rows: list[Row], workloads: list[str], path: Path, title: str) -> None:
    """Bars of ms per meta-step (log scale), one panel per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(wl, [r for r in rows if r["workload"] == wl and r.get("ms") is not None]) for wl in workloads]
    groups = [(wl, rs) for wl, rs in groups if rs]
    if not groups:
        return
    names = list(CONTENDERS)
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    heights = [max(2.0, 0.28 * len(rs) + 1.0) for _, rs in groups]
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, sum(heights)), gridspec_kw={"height_ratios": heights},
                             squeeze=False)
    for ax, (wl, rs) in zip(axes[:, 0], groups):
        rs = sorted(rs, key=lambda r: (r["order"] != "second", r["tableau"] != "maml", r["tableau"],
                                       names.index(r["contender"])))
        labels = [f"{r['contender']} {r['tableau']} {'2nd' if r['order'] == 'second' else '1st'}" for r in rs]
        y = range(len(rs))
        ax.barh(list(y), [r["ms"] for r in rs], color=[colors[r["contender"]] for r in rs])
        for i, r in enumerate(rs):
            ax.text(r["ms"], i, f" {r['ms']:.3g}", va="center", fontsize=7)
        ax.set_yticks(list(y), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("ms per meta-step (median, log scale)")
        ax.set_title(f"{wl}: {WORKLOADS[wl].describe}", fontsize=8)
        ax.margins(x=0.15)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.25 / sum(heights)))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def git_state() -> dict[str, Any]:
    """The checkout's commit and its uncommitted changes (``git status --porcelain`` lines)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD").strip(), "dirty": git("status", "--porcelain").splitlines()}


def write_json(result: dict[str, Any], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
