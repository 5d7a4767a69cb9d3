"""End to end over NIXL: `splitserve up` with both workers asked for the nixl KV backend (UCX
over TCP on loopback here, as scripts/test.sh sets it; RDMA or NVLink in a cluster). Greedy
tokens through prefill -> nixl -> decode must equal Hugging Face transformers, and the router's
/metrics must show the link carried by nixl, not a fallback."""

from __future__ import annotations

import pytest
from splitserve.launcher.up import Deployment, UpConfig, free_port
from test_e2e_disagg import MAX_TOKENS, PROMPTS, hf_reference, kv_links_on_router_metrics


@pytest.fixture(scope="module")
def nixl_deployment(demo_model, tmp_path_factory):
    from splitserve.kvtransfer.nixl import probe

    why = probe(gpu=False)
    if why is not None:
        pytest.skip(f"nixl cannot run here: {why}")
    cfg = UpConfig(
        model=str(demo_model), served_model_name="demo", num_prefill=1, num_decode=1,
        port=free_port(), log_dir=tmp_path_factory.mktemp("logs"),
        worker_args=("--block-size", "8", "--num-kv-blocks", "256", "--kv-backend", "nixl"),
    )
    with Deployment(cfg) as dep:
        yield dep


def test_greedy_through_nixl_matches_transformers_and_the_link_says_nixl(nixl_deployment, demo_model):
    from openai import OpenAI

    client = OpenAI(base_url=nixl_deployment.base_url, api_key="unused", max_retries=0, timeout=60)
    texts = [client.completions.create(model="demo", prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text
             for p in PROMPTS[:3]]
    assert texts == hf_reference(demo_model, PROMPTS[:3], MAX_TOKENS)
    links = kv_links_on_router_metrics(nixl_deployment, transfers=3).kv_links
    assert [(k.backend, k.fallback) for k in links] == [("nixl", False)]
    assert links[0].transfers >= 3 and links[0].failures == 0
