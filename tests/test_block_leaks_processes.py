"""No KV block outlives its request, with real prefill and decode worker processes on loopback.

Clients cancel at each stage of a decode request (before its reserve completes, while it waits
for its KV, while the KV streams in, while it runs), a prefill fails, bad requests arrive: after
each, both workers are back to their idle free-block count (read from /load and /metrics) and a
normal request still gets exactly the tokens it got before.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

import httpx
import pytest
import torch
from splitserve.engine.config import ModelConfig
from splitserve.kvtransfer import KVSpec, create_sender
from splitserve.launcher.processes import Component, ProcessGroup
from splitserve.launcher.up import free_port

BLOCKS = 256
GREEDY = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
PROMPT = list(range(3, 40))


class Workers:
    def __init__(self, model_dir, log_dir) -> None:
        self.group = ProcessGroup(log_dir)
        self.prefill = f"http://127.0.0.1:{free_port()}"
        self.decode = f"http://127.0.0.1:{free_port()}"
        common = ["--model", str(model_dir), "--host", "127.0.0.1", "--block-size", "8", "--num-kv-blocks", str(BLOCKS)]
        self.group.start(Component("prefill", ["prefill", *common, "--port", self.prefill.rsplit(":", 1)[1]], f"{self.prefill}/health"))
        self.group.start(Component("decode", ["decode", *common, "--port", self.decode.rsplit(":", 1)[1], "--kv-timeout", "5"], f"{self.decode}/health"))
        self.group.wait_ready(self.group.components, timeout=180)
        health = httpx.get(f"{self.decode}/health").json()
        self.kv_endpoint = health["kv_endpoint"]
        mc = ModelConfig.from_pretrained(str(model_dir))
        self.vocab = mc.vocab_size
        self.spec = KVSpec(health["fingerprint"], "float32", mc.num_layers, mc.num_kv_heads, mc.head_dim, 8, "tcp")
        self.client = httpx.Client(timeout=60)

    def assert_idle(self, timeout: float = 10.0) -> None:
        """Both workers hold no block and no sequence, by /load and by /metrics."""
        deadline = time.monotonic() + timeout
        while True:
            loads = [self.client.get(f"{url}/load").json() for url in (self.prefill, self.decode)]
            idle = all(ld["free_blocks"] == BLOCKS and ld["running"] == ld["waiting"] == 0 for ld in loads)
            if idle or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert idle, loads
        for url, role in ((self.prefill, "prefill"), (self.decode, "decode")):
            text = self.client.get(f"{url}/metrics").text
            assert f'splitserve_kv_blocks_free{{role="{role}"}} {BLOCKS}.0' in text
            assert f'splitserve_kv_blocks_used{{role="{role}"}} 0.0' in text
            assert f'splitserve_engine_running_sequences{{role="{role}"}} 0.0' in text

    def generate_body(self, rid: str, sampling: dict | None = None, prompt: list[int] = PROMPT) -> dict:
        return {"request_id": rid, "token_ids": prompt, "sampling": sampling or GREEDY}

    def prefill_async(self, rid: str, sampling: dict | None = None, endpoint: str | None = None) -> dict:
        """POST /prefill in a thread; the dict gets the response once it is back."""
        result: dict = {}
        body = {**self.generate_body(rid, sampling), "decode_kv_endpoint": endpoint or self.kv_endpoint}

        def run() -> None:
            result["response"] = httpx.post(f"{self.prefill}/prefill", json=body, timeout=60)

        result["thread"] = threading.Thread(target=run, daemon=True)
        result["thread"].start()
        return result

    def complete(self, rid: str, sampling: dict | None = None) -> list[int]:
        """A whole request, as the router runs it: /generate open, then /prefill."""
        with self.client.stream("POST", f"{self.decode}/generate", json=self.generate_body(rid, sampling)) as r:
            assert r.status_code == 200
            pre = self.prefill_async(rid, sampling)
            lines = [json.loads(line) for line in r.iter_lines() if line]
        pre["thread"].join(30)
        assert pre["response"].status_code == 200, pre["response"].text
        assert all("error" not in line for line in lines), lines
        return [t for line in lines for t in line["token_ids"]]

    def stop(self) -> None:
        self.client.close()
        self.group.stop()


@pytest.fixture(scope="module")
def workers(demo_model, tmp_path_factory):
    w = Workers(demo_model, tmp_path_factory.mktemp("logs"))
    try:
        w.reference = w.complete("reference")
        w.assert_idle()
        yield w
    finally:
        w.stop()


def reset_after_send(url: str, body: dict, delay_s: float) -> None:
    """Send POST ``body`` on a raw connection, then reset it (RST, as a client that crashed)."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload
    )
    time.sleep(delay_s)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_clients_that_reset_around_the_reserve_leave_no_block(workers):
    prompt = list(range(1, 500))
    threads = [
        threading.Thread(target=reset_after_send, args=(workers.decode, workers.generate_body(f"rst-{i}", prompt=prompt), d))
        for i, d in enumerate([0, 0.001, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08] * 4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    workers.assert_idle()


def test_a_client_gone_while_waiting_for_kv_leaves_no_block(workers):
    with workers.client.stream("POST", f"{workers.decode}/generate", json=workers.generate_body("wait")) as r:
        assert r.status_code == 200
        time.sleep(0.3)  # reserved; no prefill worker is sending
        assert workers.client.get(f"{workers.decode}/load").json()["free_blocks"] < BLOCKS
    workers.assert_idle()


def test_a_client_gone_while_the_kv_streams_in_leaves_no_block(workers):
    n = len(PROMPT)
    gate, sent_one = threading.Event(), threading.Event()

    def layers():  # a sender that sends layer 0, then stalls until released
        yield torch.zeros(2, n, workers.spec.num_kv_heads, workers.spec.head_dim)
        sent_one.set()
        gate.wait(30)
        raise RuntimeError("the test's sender gives up")

    sender = create_sender("tcp", workers.spec)
    outcome: dict = {}

    def send() -> None:
        try:
            sender.send("streaming", workers.kv_endpoint, layers(), 1, {"num_prompt_tokens": n}, num_tokens=n)
        except Exception as exc:  # noqa: BLE001 - the transfer is expected to fail; recorded
            outcome["error"] = exc

    with workers.client.stream("POST", f"{workers.decode}/generate", json=workers.generate_body("streaming")) as r:
        assert r.status_code == 200
        thread = threading.Thread(target=send, daemon=True)
        thread.start()
        assert sent_one.wait(10)
        time.sleep(0.1)
    try:
        workers.assert_idle()  # freed once the receiver stopped, while the sender still stalls
    finally:
        gate.set()
        thread.join(10)
        sender.close()
    assert "error" in outcome


def test_a_client_gone_while_running_leaves_no_block(workers):
    sampling = {**GREEDY, "max_tokens": 400}
    with workers.client.stream("POST", f"{workers.decode}/generate", json=workers.generate_body("running", sampling)) as r:
        pre = workers.prefill_async("running", sampling)
        lines = r.iter_lines()
        for _ in range(3):
            assert "token_ids" in json.loads(next(lines))
    pre["thread"].join(30)
    workers.assert_idle()


def test_a_failed_prefill_and_its_abandoned_decode_leave_no_block(workers):
    dead = f"127.0.0.1:{free_port()}"
    with workers.client.stream("POST", f"{workers.decode}/generate", json=workers.generate_body("pf")) as r:
        assert r.status_code == 200
        pre = workers.prefill_async("pf", endpoint=dead)
        pre["thread"].join(30)
        assert pre["response"].status_code == 502  # the router would now retry elsewhere
    workers.assert_idle()


@pytest.mark.parametrize("sampling", [{"seed": 2**64, "temperature": 1.0}, {"max_tokens": True}, {"top_k": 0}])
def test_a_bad_request_is_a_400_naming_the_field_and_leaves_no_block(workers, sampling):
    field = next(iter(sampling))
    r = workers.client.post(f"{workers.decode}/generate", json=workers.generate_body("bad", sampling))
    assert r.status_code == 400 and field in r.json()["error"]
    r = workers.client.post(f"{workers.prefill}/prefill", json={**workers.generate_body("bad", sampling), "decode_kv_endpoint": workers.kv_endpoint})
    assert r.status_code == 400 and field in r.json()["error"]
    r = workers.client.post(f"{workers.decode}/generate", json=workers.generate_body("bad-token", prompt=[1, workers.vocab]))
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]
    workers.assert_idle()


def test_a_first_token_outside_the_vocabulary_fails_only_its_request(workers):
    n = len(PROMPT)
    sender = create_sender("tcp", workers.spec)
    layers = [torch.zeros(2, n, workers.spec.num_kv_heads, workers.spec.head_dim)] * workers.spec.num_layers
    try:
        with workers.client.stream("POST", f"{workers.decode}/generate", json=workers.generate_body("badfirst")) as r:
            sender.send("badfirst", workers.kv_endpoint, layers, workers.vocab + 5, {"num_prompt_tokens": n}, num_tokens=n)
            lines = [json.loads(line) for line in r.iter_lines() if line]
    finally:
        sender.close()
    assert lines[-1]["finish_reason"] == "error" and "vocabulary" in lines[-1]["error"]
    assert workers.complete("after-badfirst") == workers.reference
    workers.assert_idle()


def test_other_requests_are_unaffected(workers):
    """Runs last: after every cancellation and failure above, the same tokens as before."""
    results = [None] * 4

    def run(i: int) -> None:
        results[i] = workers.complete(f"after-{i}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [workers.reference] * 4
    workers.assert_idle()
