"""The router's own credentials: the API key comes from a file or the environment (the old
--api-key still works, with a warning), and /metrics and the docs sit behind it."""

from __future__ import annotations

import argparse
import logging

import pytest
from fastapi.testclient import TestClient
from splitserve.discovery.registry import StaticRegistry
from splitserve.router.app import create_app
from splitserve.router.cli import api_key_from_args, register
from splitserve.router.config import RouterConfig

pytestmark = pytest.mark.timeout(60)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["router", "--model", "m", "--decode", "http://d:1", *argv])


def test_api_key_from_file_env_or_deprecated_flag(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("SPLITSERVE_API_KEY", raising=False)
    monkeypatch.delenv("SPLITSERVE_API_KEY_FILE", raising=False)
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file\n")
    assert api_key_from_args(parse("--api-key-file", str(key_file))) == "from-a-file"
    monkeypatch.setenv("SPLITSERVE_API_KEY", "from-env")
    assert api_key_from_args(parse()) == "from-env"
    monkeypatch.delenv("SPLITSERVE_API_KEY")
    with caplog.at_level(logging.WARNING):
        assert api_key_from_args(parse("--api-key", "on-argv")) == "on-argv"
    assert "deprecated" in caplog.text
    with pytest.raises(ValueError, match="cannot read the API key file"):
        api_key_from_args(parse("--api-key-file", str(tmp_path / "missing")))
    assert "from-a-file" not in repr(RouterConfig("m", "m", decode_urls=("http://d:1",), api_key="from-a-file"))


@pytest.mark.parametrize("public_metrics", [False, True])
def test_metrics_and_docs_need_the_key(demo_model, public_metrics):
    cfg = RouterConfig("demo", str(demo_model), decode_urls=("http://127.0.0.1:9",), api_key="k" * 20,
                       public_metrics=public_metrics, docs=True)
    with TestClient(create_app(cfg, StaticRegistry((), ("http://127.0.0.1:9",)))) as client:
        good = {"Authorization": "Bearer " + "k" * 20}
        assert client.get("/metrics").status_code == (200 if public_metrics else 401)
        assert client.get("/metrics", headers=good).status_code == 200
        for path in ("/docs", "/openapi.json"):
            assert client.get(path).status_code == 401
            assert client.get(path, headers=good).status_code == 200
        assert client.get("/health").status_code in (200, 503)  # probes need no key


def test_docs_are_off_by_default(demo_model):
    cfg = RouterConfig("demo", str(demo_model), decode_urls=("http://127.0.0.1:9",))
    with TestClient(create_app(cfg, StaticRegistry((), ("http://127.0.0.1:9",)))) as client:
        assert client.get("/docs").status_code == 404
        assert client.get("/openapi.json").status_code == 404
