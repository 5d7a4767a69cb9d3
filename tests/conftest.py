"""Shared fixtures: demo models made locally (never downloaded), free ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from services import RedisServer
from splitserve.engine.demo_model import DemoModelSpec, init_demo_model


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default demo model (Llama, GQA 4:2, fp32, context 1024)."""
    return init_demo_model(tmp_path_factory.mktemp("demo-llama"), DemoModelSpec())


# Several architectures, so exactness covers Qwen2 bias, tied embeddings, Llama 3 RoPE, MHA.
MODEL_VARIANTS = {
    "llama-gqa": DemoModelSpec(),
    "qwen2-tied": DemoModelSpec(model_type="qwen2", tie_word_embeddings=True, num_heads=4, num_kv_heads=1, seed=1),
    "llama3-rope": DemoModelSpec(llama3_rope_scaling=True, num_layers=3, hidden_size=96, num_heads=6, num_kv_heads=2, seed=2),
    "mistral-mha": DemoModelSpec(model_type="mistral", num_heads=4, num_kv_heads=4, head_dim=32, seed=3),
}


@pytest.fixture(scope="session", params=sorted(MODEL_VARIANTS))
def model_variant(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_demo_model(tmp_path_factory.mktemp(request.param), MODEL_VARIANTS[request.param])


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
