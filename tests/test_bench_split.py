"""``splitserve bench split-vs-colocated``: the two systems' commands, and the whole path on the
CPU (two real `splitserve up` deployments in turn, the same requests, reports at two SLOs)."""

from __future__ import annotations

import argparse
import json
import shlex

import pytest
from splitserve.bench import split_vs_colocated as svc


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    svc.add_arguments(parser)
    return parser.parse_args(["--model", "/m", *argv])


def test_split_is_one_prefill_one_decode_and_colocated_two_chunked_workers() -> None:
    args = _args("--kv-backend", "tcp", "--devices", "cuda:0,cuda:1")
    split = shlex.split(svc.system_command("split", args).format(model="/m", name="n", host="h", port=1))
    colo = shlex.split(svc.system_command("colocated", args).format(model="/m", name="n", host="h", port=1))
    assert split[split.index("--prefill") + 1 :][:3] == ["1", "--decode", "1"]
    assert colo[colo.index("--prefill") + 1 :][:3] == ["0", "--decode", "2"]
    split_workers = next(a for a in split if a.startswith("--worker-args="))
    colo_workers = next(a for a in colo if a.startswith("--worker-args="))
    assert "--kv-backend tcp" in split_workers and "--chunked-prefill" not in split_workers
    assert "--chunked-prefill" in colo_workers and "--random-weights" in colo_workers
    for cmd in (split, colo):
        assert cmd[cmd.index("--devices") + 1] == "cuda:0,cuda:1" and cmd[-4:] == ["--host", "h", "--port", "1"]
    with pytest.raises(ValueError, match="unknown system"):
        svc.system_command("both", args)


@pytest.mark.timeout(240)
def test_cpu_run_of_both_systems_writes_reports_at_both_slos(demo_model, tmp_path) -> None:
    out = tmp_path / "split"
    status = svc.main([
        "--model", str(demo_model), "--devices", "cpu,cpu", "--dtype", "float32",
        "--kv-backend", "tcp", "--workloads", "chat", "--rates", "0.5", "--num-requests", "3", "--duration", "2",
        "--max-input", "48", "--max-output", "6", "--ttft-ms", "5000", "--tpot-ms", "2000",
        "--out", str(out), "--no-progress",
    ])
    assert status == 0
    for system in svc.SYSTEMS:
        run = json.loads((out / system / "chat_rate0.5.json").read_text())
        assert [r["error"] for r in run["requests"]] == [None] * 3
    assert (out / "report" / "chat" / "report.json").is_file()
    assert (out / "report_loose" / "chat" / "report.json").is_file()
