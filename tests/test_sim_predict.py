"""The prediction grid (``bench/lab/sim_predict.py``): its files and its resumption, on a tiny
latency model, grid and load (the numbers themselves are the simulator's, tested elsewhere)."""

from __future__ import annotations

import json

import pytest
from splitserve.bench.lab import sim_predict


def _args(tmp_path, scales: str, duration: str = "2") -> list[str]:
    """Targets tight enough for this latency model that each search ends in a few rates."""
    lat = tmp_path / "lat.json"
    lat.write_text(json.dumps({
        "prefill": {"base_ms": 10, "per_token_ms": 0.05},
        "decode": {"base_ms": 5, "per_seq_ms": 0.1, "per_context_token_ms": 0.0005},
        "transfer": {"base_ms": 1, "per_token_ms": 0.01},
        "meta": {"block_size": 16, "num_kv_blocks": 2000},
    }))
    return ["--latency-model", str(lat), "--gpus", "2", "--workloads", "chat", "--scales", scales,
            "--duration", duration, "--num-requests", "10", "--max-requests", "30",
            "--ttft-ms", "40", "--tpot-ms", "8",
            "--refine", "1", "--jobs", "1", "--out", str(tmp_path / "out")]


def test_the_grid_writes_every_cell_a_table_and_a_plot_and_resumes(tmp_path, monkeypatch):
    assert sim_predict.main(_args(tmp_path, "1,2")) == 0
    out = tmp_path / "out"
    doc = json.loads((out / "predictions.json").read_text())
    assert sorted(doc["cells"]) == ["chat/2/1", "chat/2/2"]
    cell = doc["cells"]["chat/2/2"]
    assert cell["slo"]["ttft_ms"] == 80 and cell["slo"]["tpot_ms"] == 16  # 40 / 8 ms x 2
    assert {r["layout"] for r in cell["layouts"]} == {"1P1D", "colocated2"}
    assert cell["best"] == cell["layouts"][0]["layout"] and cell["best_split"] == "1P1D"
    assert all(r["per_gpu"] == pytest.approx(r["goodput"] / 2) for r in cell["layouts"])
    table = (out / "predictions.md").read_text().splitlines()
    assert len(table) == 4 and table[2].startswith("| chat | 1 | 40 ms / 8 ms | 2 |")
    assert (out / "chat.png").stat().st_size > 0

    from splitserve.sim import plan

    planned, real = [], plan.plan_many
    monkeypatch.setattr(plan, "plan_many", lambda jobs, *a: planned.extend(jobs) or real(jobs, *a))
    assert sim_predict.main(_args(tmp_path, "0.5,1,2")) == 0  # only the new cell is simulated
    assert [j.slo.ttft_s for j in planned] == [0.02]
    again = json.loads((out / "predictions.json").read_text())
    assert again["cells"]["chat/2/2"] == cell and len(again["cells"]) == 3
    assert len((out / "predictions.md").read_text().splitlines()) == 5
    with pytest.raises(SystemExit, match="duration"):  # another setup, same folder
        sim_predict.main(_args(tmp_path, "1", duration="3"))
