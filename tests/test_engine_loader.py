"""Checkpoint loading: sharded safetensors with an index, other dtypes, and clear refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from splitserve.engine.loader import load_model


def shard(src, dst, dtype: torch.dtype):
    """Rewrite ``src``'s single-file checkpoint as two shards + index (as HF's save does)."""
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    weights = {k: v.to(dtype) for k, v in load_file(str(src / "model.safetensors")).items()}
    names = sorted(weights)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: weights[k] for k in part}, str(dst / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sharded_checkpoint_loads_the_same_weights(demo_model, tmp_path, dtype):
    sharded = shard(demo_model, tmp_path / "sharded", dtype)
    one = load_model(demo_model, dtype, torch.device("cpu"))
    two = load_model(sharded, dtype, torch.device("cpu"))
    a, b = dict(one.named_parameters()), dict(two.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == dtype
        assert torch.equal(a[name], b[name]), name


def test_missing_weights_are_refused(demo_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(demo_model, broken)
    weights = load_file(str(broken / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks weights for: layers.1.mlp.gate_up_proj.weight"):
        load_model(broken, torch.float32, torch.device("cpu"))
