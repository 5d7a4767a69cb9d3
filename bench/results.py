"""Results files: one JSON per (system, workload, rate) run, raw records included.

Layout: ``OUT/<label>/<workload>_rate<rate>.json`` (``bench run`` writes them; ``bench report``
reads any files under the folders it is given). Keeping the raw per-request timings means a
report can recompute attainment, goodput and CDFs for other SLOs without re-running the load.

Run file schema (``"schema": "splitserve.bench.run/1"``)::

    {
      "schema": "splitserve.bench.run/1",
      "label": str,                      # the system's name in tables and plots
      "created_utc": "2026-01-01T00:00:00Z",
      "host": str,                       # machine that ran the load generator
      "server": {"base_url": str, "model": str, "ignore_eos": bool, "extra_body": {...},
                 "headers": [names of extra headers sent]},
      "num_gpus": int | null,            # GPUs the system used (for per-GPU goodput)
      "workload": {"name", "seed", "rate", "arrival_cv", "exact_lengths",
                   "caps": {"scale", "max_input", "max_output", "max_context"},
                   "num_requests", "mean_prompt_tokens", "mean_max_tokens"},
      "rate": float,                     # offered rate, requests/s
      "run_seconds": float,              # first send to last token
      "max_send_lag_s": float,           # worst send lateness (client overload check)
      "summary": stats.summarize(...),   # with the SLO given at run time
      "requests": [RequestRecord.to_dict(), ...]
    }

``summary`` holds: num_requests, num_ok, num_errors, errors {message: count}, short_outputs,
run_seconds, achieved_rate, request_throughput, output_token_throughput, ttft_ms / tpot_ms /
itl_ms / e2e_ms as {count, mean, min, max, p50, p90, p99}, attainment {both, ttft, tpot},
slo_scale, slo {ttft_ms, tpot_ms, attainment}. Non-finite numbers are written as JSON null
(NaN: no data) or the string "inf" (e.g. an SLO scale no scaling can reach).
"""

from __future__ import annotations

import json
import math
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from splitserve.bench.records import RequestRecord

RUN_SCHEMA = "splitserve.bench.run/1"


@dataclass
class RunFile:
    """One loaded run file."""

    path: Path
    label: str
    workload: str
    rate: float
    num_gpus: int | None
    slo: dict[str, float]
    records: list[RequestRecord]
    run_seconds: float
    data: dict[str, Any]


def run_path(out_dir: str | Path, label: str, workload: str, rate: float) -> Path:
    """Where a run's file goes (label folder, one file per workload and rate)."""
    return Path(out_dir) / _safe(label) / f"{_safe(workload)}_rate{rate:g}.json"


def write_run(path: Path, payload: dict[str, Any]) -> Path:
    """Write a run file (adds schema, time and host), creating folders; returns the path."""
    doc = {
        "schema": RUN_SCHEMA,
        "created_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": socket.gethostname(),
        **payload,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(clean_json(doc), indent=1))
    tmp.replace(path)
    return path


def read_run(path: Path) -> RunFile:
    """Load one run file; a file of another schema is an error naming it."""
    data = json.loads(Path(path).read_text())
    if data.get("schema") != RUN_SCHEMA:
        raise ValueError(f"{path}: not a {RUN_SCHEMA} file (schema={data.get('schema')!r})")
    return RunFile(
        path=Path(path),
        label=data["label"],
        workload=data["workload"]["name"],
        rate=float(data["rate"]),
        num_gpus=data.get("num_gpus"),
        slo=data["summary"]["slo"],
        records=[RequestRecord.from_dict(r) for r in data["requests"]],
        run_seconds=float(data["run_seconds"] or 0.0),
        data=data,
    )


def find_runs(paths: list[str | Path]) -> list[RunFile]:
    """All run files in the given files/folders (recursively), sorted by label, workload, rate.

    JSON files of other kinds (report.json) are skipped; a folder without any run file is an
    error, so a typo in a path is not a silently empty report.
    """
    runs: list[RunFile] = []
    for p in map(Path, paths):
        files = [p] if p.is_file() else sorted(p.rglob("*.json"))
        found = 0
        for f in files:
            try:
                head = json.loads(f.read_text())
            except ValueError as exc:
                raise ValueError(f"{f}: not valid JSON ({exc})") from exc
            if isinstance(head, dict) and head.get("schema") == RUN_SCHEMA:
                runs.append(read_run(f))
                found += 1
        if not found:
            raise ValueError(f"no {RUN_SCHEMA} files under {p}")
    runs.sort(key=lambda r: (r.workload, r.label, r.rate))
    return runs


def clean_json(obj: Any) -> Any:
    """Replace NaN by None and +/-inf by "inf"/"-inf" so the output is strict JSON."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    return obj


def _safe(name: str) -> str:
    """A file-name-safe version of a label."""
    out = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    if not out:
        raise ValueError(f"empty name: {name!r}")
    return out
