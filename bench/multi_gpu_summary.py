"""Summarize bench/multi_gpu.sh: summary.json (issue 12's keys), details.json and table.md.

    python3 bench/multi_gpu_summary.py bench/results/multi_gpu
    python3 bench/multi_gpu_summary.py RUN1 RUN2 --out bench/results/multi_gpu   # stages from separate calls

Each run directory holds what multi_gpu.sh wrote: gpus.csv, gpu_trace.csv, stages.csv and a
directory per stage (sweep_one_gpu, sweep_all_gpus, serve_one_replica, serve_all_replicas). A
stage is taken from the first directory that has it, with that directory's trace.

What it reads: the sweeps' own summary.json (wall_s: from the sweep's start, base-model evaluation
included, to its adapters published), each trial's Tune reports (tune/trial-*.json: pid, start and
end), the "qlora-ray device:" lines of the trials and replicas (qlora_ray/devices.py: each one's
CUDA_VISIBLE_DEVICES and the device its weights are on; nvidia-smi's index follows from the GPU's
UUID), serve_throughput.json (requests/s of the timed scenario) and the per-GPU trace.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from pathlib import Path

DEVICE_TAG = "qlora-ray device:"  # qlora_ray.devices.DEVICE_TAG (not imported: this runs without the project)
SWEEPS = ("sweep_one_gpu", "sweep_all_gpus")
SERVES = ("serve_one_replica", "serve_all_replicas")
SWEEP_GOAL = 1.25  # all-GPU wall <= 1.25/N of the one-GPU wall
SERVE_GOAL = 0.8  # N replicas >= 0.8 N of one replica's requests/s
TRACE_TIME = "%Y/%m/%d %H:%M:%S.%f"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


# ----------------------------------------------------------------------------- readers


def csv_rows(path: Path) -> list[list[str]]:
    if not path.is_file():
        return []
    return [[c.strip() for c in line.split(",")] for line in path.read_text(errors="replace").splitlines()
            if line.strip()]


def read_gpus(run: Path) -> list[dict]:
    gpus = []
    for row in csv_rows(run / "gpus.csv"):
        if len(row) >= 3 and row[0].isdigit():
            gpus.append({"index": int(row[0]), "uuid": row[1], "name": row[2],
                         "memory_total": row[3] if len(row) > 3 else None})
    return gpus


def read_stages(run: Path) -> dict[str, dict]:
    stages = {}
    for row in csv_rows(run / "stages.csv"):
        if len(row) == 6 and row[1].isdigit():
            stages[row[0]] = {"start_epoch": int(row[1]), "start_local": row[2], "end_epoch": int(row[3]),
                              "end_local": row[4], "rc": int(row[5]) if row[5].lstrip("-").isdigit() else None}
    return stages


def read_trace(run: Path) -> list[tuple[int, dt.datetime, int, int]]:
    """(GPU index, local time, utilization %, memory used MiB) per sample; header and odd rows skipped."""
    samples = []
    for row in csv_rows(run / "gpu_trace.csv"):
        if len(row) != 4 or not row[0].isdigit():
            continue
        try:
            when = dt.datetime.strptime(row[1], TRACE_TIME)
            util, mem = int(row[2].split()[0]), int(row[3].split()[0])
        except ValueError:
            continue
        samples.append((int(row[0]), when, util, mem))
    return samples


def local_offset(stage: dict) -> dt.timedelta:
    """The device's local time (nvidia-smi's timestamps) minus UTC, from a stage's two clocks."""
    local = dt.datetime.strptime(stage["start_local"], "%Y/%m/%d %H:%M:%S")
    utc = dt.datetime.fromtimestamp(stage["start_epoch"], dt.timezone.utc).replace(tzinfo=None)
    quarter = 15 * 60
    return dt.timedelta(seconds=round((local - utc).total_seconds() / quarter) * quarter)


def to_local(epoch: float, offset: dt.timedelta) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).replace(tzinfo=None) + offset


def device_notes(path: Path) -> list[dict]:
    """The JSON of every "qlora-ray device:" line, once per (role, pid, trial or replica)."""
    notes, seen = [], set()
    if not path.is_file():
        return notes
    decoder = json.JSONDecoder()
    for line in path.read_text(errors="replace").splitlines():
        line = ANSI.sub("", line)
        at = line.find(DEVICE_TAG)
        if at < 0:
            continue
        try:
            note, _ = decoder.raw_decode(line[at + len(DEVICE_TAG):].strip())
        except json.JSONDecodeError:
            continue
        key = (note.get("role"), note.get("pid"), note.get("trial_id"), note.get("replica_id"))
        if key not in seen:
            seen.add(key)
            notes.append(note)
    return notes


def gpu_index(note: dict, gpus: list[dict]) -> int | None:
    """nvidia-smi's index of the GPU a note names (by UUID; else the one GPU CUDA_VISIBLE_DEVICES names)."""
    uuid = note.get("gpu_uuid")
    for g in gpus:
        if uuid and g["uuid"] == uuid:
            return g["index"]
    visible = str(note.get("cuda_visible_devices") or "")
    if visible.isdigit() and not uuid:
        return int(visible)
    return None


def last_report(path: Path) -> dict | None:
    rows = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(rows):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def command_wall(sweep_log: Path) -> float | None:
    if not sweep_log.is_file():
        return None
    m = re.findall(r"sweep exit -?\d+, wall (\d+) s", sweep_log.read_text(errors="replace"))
    return float(m[-1]) if m else None


# ----------------------------------------------------------------------------- per GPU


def gpu_stats(trace, index: int, start: dt.datetime, end: dt.datetime) -> dict:
    rows = [(u, m) for i, t, u, m in trace if i == index and start <= t <= end]
    if not rows:
        return {"samples": 0}
    util = [u for u, _ in rows]
    return {"samples": len(rows), "mean_util_pct": round(sum(util) / len(util), 1),
            "busy_share": round(sum(u > 0 for u in util) / len(util), 3),
            "peak_memory_mib": max(m for _, m in rows)}


def covered_s(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Seconds of [start, end] inside the union of the intervals."""
    total, cursor = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, cursor), min(b, end)
        if b > a:
            total += b - a
            cursor = b
    return total


# ----------------------------------------------------------------------------- stages


def sweep_details(name: str, run: Path, gpus: list[dict], stage: dict | None, trace) -> dict | None:
    d = run / name
    if not d.is_dir():
        return None
    out: dict = {"run_dir": str(run), "exit": stage.get("rc") if stage else None,
                 "command_wall_s": command_wall(d / "sweep.log")}
    summary_path = d / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    out["wall_s"] = summary.get("wall_s")
    for key in ("sweep", "trials", "completed", "stopped_early", "errored", "trial_seconds"):
        out[key] = summary.get(key)
    notes = {n.get("trial_id"): n for n in device_notes(d / "sweep.log") if n.get("role") == "trial"}
    trials = []
    for path in sorted((d / "tune").glob("trial-*.json")):
        last = last_report(path)
        if not last:
            continue
        tid = last.get("trial_id") or path.stem.removeprefix("trial-")
        note = notes.get(tid, {})
        end = float(last.get("timestamp", 0))
        start = end - float(last.get("time_total_s", 0))
        trials.append({"trial_id": tid, "config": last.get("config"), "pid": last.get("pid"),
                       "step": last.get("step"), "start_epoch": round(start, 1), "end_epoch": end,
                       "cuda_visible_devices": note.get("cuda_visible_devices"),
                       "ray_gpu_ids": note.get("ray_gpu_ids"), "device": note.get("device"),
                       "gpu_uuid": note.get("gpu_uuid"), "gpu_index": gpu_index(note, gpus) if note else None,
                       "device_note_pid": note.get("pid")})
    for tid in set(notes) - {t["trial_id"] for t in trials}:  # a trial with a note but no report
        note = notes[tid]
        trials.append({"trial_id": tid, "pid": note.get("pid"),
                       "cuda_visible_devices": note.get("cuda_visible_devices"), "device": note.get("device"),
                       "gpu_uuid": note.get("gpu_uuid"), "gpu_index": gpu_index(note, gpus),
                       "note": "no Tune report"})
    trials.sort(key=lambda t: t.get("start_epoch") or 0)
    out["trials_on"] = trials
    out["trials_per_gpu"] = {str(g): sum(t.get("gpu_index") == g for t in trials)
                             for g in sorted({t.get("gpu_index") for t in trials if t.get("gpu_index") is not None})}
    if stage and trace:
        offset = local_offset(stage)
        s, e = to_local(stage["start_epoch"], offset), to_local(stage["end_epoch"], offset)
        out["gpus_over_stage"] = {str(g["index"]): gpu_stats(trace, g["index"], s, e) for g in gpus}
        timed = [t for t in trials if t.get("start_epoch") and t.get("end_epoch")]
        if timed:
            # While trials remain: from the first trial's start to the last one's (none queued after it).
            w0, w1 = min(t["start_epoch"] for t in timed), max(t["start_epoch"] for t in timed)
            out["while_trials_remain"] = {"start_epoch": w0, "end_epoch": w1, "seconds": round(w1 - w0, 1)}
            used = sorted({t["gpu_index"] for t in timed if t.get("gpu_index") is not None})
            per_gpu = {}
            for g in gpus:
                spans = [(t["start_epoch"], t["end_epoch"]) for t in timed if t.get("gpu_index") == g["index"]]
                idle = (w1 - w0) - covered_s(spans, w0, w1) if w1 > w0 else 0.0
                per_gpu[str(g["index"])] = gpu_stats(trace, g["index"], to_local(w0, offset), to_local(w1, offset)) | {
                    "trials": len(spans), "without_a_trial_s": round(idle, 1)}
            out["while_trials_remain"]["per_gpu"] = per_gpu
            out["while_trials_remain"]["gpus_with_trials"] = used
    return out


def serve_details(name: str, run: Path, gpus: list[dict], stage: dict | None, trace) -> dict | None:
    d = run / name
    path = d / "serve_throughput.json"
    if not d.is_dir():
        return None
    out: dict = {"run_dir": str(run), "exit": stage.get("rc") if stage else None}
    result = json.loads(path.read_text()) if path.is_file() else {}
    scenarios = result.get("scenarios") or []
    sc = scenarios[0] if scenarios else {}
    out |= {"requests_per_s": sc.get("requests_per_s"), "tokens_per_s": sc.get("tokens_per_s"),
            "scenario": sc.get("name"), "clients": sc.get("concurrency"), "requests": sc.get("requests"),
            "errors": sc.get("errors"), "latency_ms": sc.get("latency_ms"),
            "server_start_s": result.get("server_start_s"), "errors_run": result.get("errors_run"),
            "serve_args": (result.get("settings") or {}).get("serve_args")}
    replicas = []
    for note in device_notes(d / "serve.log"):
        if note.get("role") == "replica":
            replicas.append({"replica_id": note.get("replica_id"), "pid": note.get("pid"),
                             "cuda_visible_devices": note.get("cuda_visible_devices"),
                             "ray_gpu_ids": note.get("ray_gpu_ids"), "device": note.get("device"),
                             "gpu_uuid": note.get("gpu_uuid"), "gpu_index": gpu_index(note, gpus)})
    out["replicas"] = replicas
    if stage and trace:
        offset = local_offset(stage)
        s, e = to_local(stage["start_epoch"], offset), to_local(stage["end_epoch"], offset)
        out["gpus_over_stage"] = {str(g["index"]): gpu_stats(trace, g["index"], s, e) for g in gpus}
    return out


# ----------------------------------------------------------------------------- table


def fmt(x, unit: str = "", nd: int = 1) -> str:
    if x is None:
        return "not run"
    return f"{x:,.{nd}f}{unit}" if isinstance(x, float) else f"{x}{unit}"


def where(items: list[dict]) -> str:
    """'GPU 0 (CUDA_VISIBLE_DEVICES=0, cuda:0) x4' per GPU."""
    groups: dict[tuple, int] = {}
    for it in items:
        key = (it.get("gpu_index"), it.get("cuda_visible_devices"), it.get("device"))
        groups[key] = groups.get(key, 0) + 1
    if not groups:
        return "no device line"
    return "; ".join(f"GPU {g if g is not None else '?'} (CUDA_VISIBLE_DEVICES={v}, {dev}) x{k}"
                     for (g, v, dev), k in sorted(groups.items(), key=lambda kv: str(kv[0])))


def table(details: dict) -> str:
    n = details["gpus"]
    sw, sv = details["stages"], details["stages"]
    one, all_ = sw.get("sweep_one_gpu") or {}, sw.get("sweep_all_gpus") or {}
    s1, sn = sv.get("serve_one_replica") or {}, sv.get("serve_all_replicas") or {}
    same = details["all_is_one"]
    col2 = f"all {n} GPUs" + (" (= the one-GPU run: N=1)" if same else "")

    def busy(stage: dict) -> str:
        per = (stage.get("gpus_over_stage") or {})
        return ", ".join(f"GPU {g}: {v.get('mean_util_pct', '-')}% mean, {v.get('peak_memory_mib', '-')} MiB peak"
                         for g, v in per.items()) or "-"

    def remain(stage: dict, only_used: bool = False) -> str:
        w = stage.get("while_trials_remain") or {}
        per = {g: v for g, v in (w.get("per_gpu") or {}).items() if v.get("trials") or not only_used}
        if not per:
            return "-"
        return f"{w.get('seconds')} s: " + ", ".join(
            f"GPU {g}: {v.get('trials')} trials, {v.get('without_a_trial_s')} s without one, "
            f"busy {v.get('busy_share', 0):.0%} of samples" for g, v in per.items())

    rows = [
        ("sweep wall (the sweep's own, base evaluation to publishing)", fmt(one.get("wall_s"), " s"),
         fmt(all_.get("wall_s"), " s") if not same else "same"),
        ("whole command (Ray start included)", fmt(one.get("command_wall_s"), " s", 0),
         fmt(all_.get("command_wall_s"), " s", 0) if not same else "same"),
        ("trials (completed)", f"{one.get('trials')} ({one.get('completed')})",
         f"{all_.get('trials')} ({all_.get('completed')})" if not same else "same"),
        ("where each trial ran", where(one.get("trials_on") or []),
         where(all_.get("trials_on") or []) if not same else "same"),
        ("per-GPU utilization over the sweep", busy(one), busy(all_) if not same else "same"),
        ("while trials remained", remain(one, only_used=True), remain(all_) if not same else "same"),
        ("Serve requests/s (uniform over 8 adapters)", fmt(s1.get("requests_per_s")),
         fmt(sn.get("requests_per_s")) if not same else "same"),
        ("Serve clients, errors", f"{s1.get('clients')}, {s1.get('errors')}",
         f"{sn.get('clients')}, {sn.get('errors')}" if not same else "same"),
        ("each replica's device", where(s1.get("replicas") or []),
         where(sn.get("replicas") or []) if not same else "same"),
    ]
    lines = [f"| {details['device']}, {details['date']}, N={n} | one GPU | {col2} |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    g = details["goals"]
    lines += ["", f"Goals (N >= 2 only): sweep {g['sweep']}; GPUs busy {g['busy']}; serve {g['serve']}."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories of bench/multi_gpu.sh")
    ap.add_argument("--out", type=Path, help="where summary.json, details.json, table.md go (default: the first run)")
    ap.add_argument("--gpus", type=int, help="N (default: the GPUs in gpus.csv)")
    ap.add_argument("--note", help="appended to summary.json's note")
    args = ap.parse_args()
    out_dir = args.out or args.runs[0]
    out_dir.mkdir(parents=True, exist_ok=True)

    gpus_of = {run: read_gpus(run) for run in args.runs}
    first = next((g for g in gpus_of.values() if g), [])
    n = args.gpus or len(first)
    stages: dict[str, dict | None] = {}
    for name in SWEEPS + SERVES:
        stages[name] = None
        for run in args.runs:
            if (run / name).is_dir():
                st = read_stages(run).get(name)
                reader = sweep_details if name in SWEEPS else serve_details
                stages[name] = reader(name, run, gpus_of[run], st, read_trace(run))
                break
    all_is_one = n == 1 and stages["sweep_all_gpus"] is None and stages["serve_all_replicas"] is None
    dates = [st["start_local"][:10].replace("/", "-") for run in args.runs for st in read_stages(run).values()]

    def val(stage: str, key: str):
        s = stages.get(stage)
        return s.get(key) if s else None

    one_w, all_w = val("sweep_one_gpu", "wall_s"), val("sweep_all_gpus", "wall_s")
    one_r, all_r = val("serve_one_replica", "requests_per_s"), val("serve_all_replicas", "requests_per_s")
    notes = []
    if all_is_one:
        all_w, all_r = one_w, one_r
        notes.append("N=1: with one GPU the all-GPU sweep and the all-replica Serve run are the one-GPU runs "
                     "themselves, so they were not run twice; sweep_wall_s_all_gpus and serve_rps_all_replicas "
                     "repeat the one-GPU values. The goal (N >= 2) is not verified by this run.")
    for name in SWEEPS + SERVES:
        if stages[name] is None and not (all_is_one and name in ("sweep_all_gpus", "serve_all_replicas")):
            notes.append(f"{name}: not run.")
        elif stages[name] is not None and stages[name].get("exit") not in (0, None):
            notes.append(f"{name}: exit status {stages[name]['exit']} (see details.json).")
    if args.note:
        notes.append(args.note)

    goals: dict[str, str] = {}
    if n >= 2 and one_w and all_w:
        ratio = all_w / one_w
        goals["sweep"] = (f"{all_w:.0f} s / {one_w:.0f} s = {ratio:.3f} of the one-GPU wall, goal <= "
                          f"{SWEEP_GOAL / n:.3f}: {'met' if ratio <= SWEEP_GOAL / n else 'not met'}")
    else:
        goals["sweep"] = "not applicable (needs N >= 2 and both sweeps)"
    w = (stages.get("sweep_all_gpus") or {}).get("while_trials_remain") or {}
    if n >= 2 and w.get("per_gpu"):
        idle = {g: v.get("without_a_trial_s", 0) for g, v in w["per_gpu"].items()}
        ok = all(v <= max(5.0, 0.05 * w["seconds"]) for v in idle.values())
        goals["busy"] = (f"seconds without a trial per GPU while trials remained ({w['seconds']} s): {idle}: "
                         f"{'met' if ok else 'not met'} (at most 5 s or 5% each)")
    else:
        goals["busy"] = "not applicable (needs N >= 2 and the all-GPU sweep)"
    if n >= 2 and one_r and all_r:
        ratio = all_r / one_r
        goals["serve"] = (f"{all_r:.1f} / {one_r:.1f} requests/s = {ratio:.2f}x one replica, goal >= "
                          f"{SERVE_GOAL * n:.2f}x: {'met' if ratio >= SERVE_GOAL * n else 'not met'}")
    else:
        goals["serve"] = "not applicable (needs N >= 2 and both Serve runs)"

    device = first[0]["name"] if first else None
    if first and len({g["name"] for g in first}) > 1:
        device = ", ".join(g["name"] for g in first)
    summary = {
        "device": device,
        "date": min(dates) if dates else None,
        "gpus": n,
        "sweep_wall_s_one_gpu": one_w,
        "sweep_wall_s_all_gpus": all_w,
        "trials": val("sweep_all_gpus", "trials") or val("sweep_one_gpu", "trials"),
        "serve_rps_one_replica": one_r,
        "serve_rps_all_replicas": all_r,
    }
    if notes:
        summary["note"] = " ".join(notes)
    details = {"device": device, "date": summary["date"], "gpus": n, "gpu_list": first, "all_is_one": all_is_one,
               "goals": goals, "stages": stages}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "details.json").write_text(json.dumps(details, indent=2) + "\n")
    md = table(details)
    (out_dir / "table.md").write_text(md)
    print(json.dumps(summary, indent=2))
    print(md)
    print(f"-> {out_dir / 'summary.json'}, details.json, table.md", file=sys.stderr)


if __name__ == "__main__":
    main()
