"""The OpenAI-compatible server, for real: `dspark-serve` in its own process on 127.0.0.1 over
the tiny exported pair, driven by the `openai` client and by plain HTTP, stopped by its pid."""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import export_tiny_pair

openai = pytest.importorskip("openai", reason="the openai client comes with the dev extra")
pytest.importorskip("fastapi", reason="the server needs the serve extra")

KEY = "test-key"
MODEL = "tiny"
SLOTS = 2
PROMPTS = ["t5 t6 t7 t8 t9", "t20", "t30 t31 t32 t33 t34 t35", "t50 t51"]
MAX_TOKENS = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return export_tiny_pair(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def server(export):
    """(base url, port): a server with 2 slots, a queue of 2 and an API key."""
    port = _free_port()
    log = open(export.parent / f"server-{port}.log", "w")
    proc = subprocess.Popen(
        ["timeout", "900", sys.executable, "-m", "dspark_runtime.server.cli", str(export),
         "--port", str(port), "--max-batch", str(SLOTS), "--max-queue", "2", "--api-key", KEY,
         "--model-name", MODEL, "--schedule", "fixed", "--max-context", "256"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if _get(port, "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, (export.parent / f"server-{port}.log").read_text()
            assert time.monotonic() < deadline, "the server did not start in 120 s"
            time.sleep(0.3)
        yield f"http://127.0.0.1:{port}/v1", port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def solo(export):
    """Greedy output of each prompt alone through Pipeline.generate (what `run` prints)."""
    from dspark_runtime.pipeline import Pipeline

    with Pipeline.from_bundle(export, schedule="fixed") as pipe:
        raw = [pipe.generate([pipe.tokenizer.encode_prompt(p, raw=True)],
                             max_new_tokens=MAX_TOKENS).requests[0] for p in PROMPTS]
        chat = pipe.generate(PROMPTS[:1], max_new_tokens=MAX_TOKENS).requests[0]
    return raw, chat


def _get(port: int, path: str, headers: dict | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    return response.status, response.read().decode()


def _post(port: int, path: str, body: str | dict, key: str | None = KEY
          ) -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn.request("POST", path, body if isinstance(body, str) else json.dumps(body), headers)
    response = conn.getresponse()
    return response.status, dict(response.getheaders()), json.loads(response.read() or b"{}")


def _completion(client, prompt: str, **kwargs):
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS,
                                      temperature=0, **kwargs)


def test_completions_equal_the_runtime_alone_and_concurrently(client, solo):
    raw, chat = solo
    alone = [_completion(client, p) for p in PROMPTS]
    assert [c.choices[0].text for c in alone] == [r.text for r in raw]
    assert [c.usage.completion_tokens for c in alone] == [len(r.token_ids) for r in raw]
    extra = alone[0].model_extra["dspark"]
    assert extra["rounds"] == len(raw[0].accepted) and extra["tau"] == pytest.approx(raw[0].tau)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # 4 requests on 2 slots: 2 wait their turn
        together = list(pool.map(lambda p: _completion(client, p), PROMPTS))
    assert [c.choices[0].text for c in together] == [r.text for r in raw]
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=MAX_TOKENS,
        temperature=0)
    assert reply.choices[0].message.content == chat.text
    assert reply.usage.prompt_tokens == chat.prompt_length
    long = [{"role": "user", "content": " ".join(PROMPTS)}]
    first, again = (client.chat.completions.create(model=MODEL, messages=long, temperature=0,
                                                   max_tokens=MAX_TOKENS) for _ in range(2))
    assert again.choices[0].message.content == first.choices[0].message.content
    # the second prompt is what the first request left in its slot, all but its last token
    assert again.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens - 1


def test_streaming_gives_the_same_text(client, solo):
    raw, chat = solo
    pieces = [c.choices[0].text for c in _completion(client, PROMPTS[2], stream=True)]
    assert "".join(pieces) == raw[2].text and len(pieces) > 1
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=MAX_TOKENS,
        temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.text
    assert chunks[-1].usage.completion_tokens == len(chat.token_ids)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_stop_strings_cut_the_text(client, solo):
    raw, _ = solo
    words = raw[0].text.split()
    stop = " " + words[2]
    reply = _completion(client, PROMPTS[0], stop=[stop])
    assert reply.choices[0].text == raw[0].text[:raw[0].text.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": 3}, "temperature"),
    ({"model": "other"}, "model"), ({"prompt": "t1 " * 300}, "prompt"),
    ({"top_p": 0.5}, "top_p"), ({"prompt": ""}, "prompt")])
def test_bad_requests_get_openai_errors(server, body, param):
    status, _, reply = _post(server[1], "/v1/completions",
                             {"model": MODEL, "prompt": "t5", "max_tokens": 4, **body})
    assert status == 400, reply
    assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["param"] == param


def test_malformed_json_wrong_key_and_the_server_stays_up(server, client):
    status, _, reply = _post(server[1], "/v1/completions", "{not json")
    assert status == 400 and "not valid JSON" in reply["error"]["message"]
    for key in (None, "wrong"):
        status, _, reply = _post(server[1], "/v1/completions",
                                 {"model": MODEL, "prompt": "t5"}, key=key)
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="t5", max_tokens=0)
    assert _get(server[1], "/health")[0] == 200
    assert [m.id for m in client.models.list()] == [MODEL]


def test_full_queue_answers_503_with_retry_after(server):
    long = {"model": MODEL, "prompt": "t5 t6", "max_tokens": 200, "temperature": 1}
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: _post(server[1], "/v1/completions", long), range(8)))
    statuses = sorted(r[0] for r in replies)
    assert statuses.count(200) >= SLOTS + 1 and 503 in statuses, statuses
    busy = next(r for r in replies if r[0] == 503)
    assert busy[1].get("retry-after") == "1" and busy[2]["error"]["code"] == "server_overloaded"


def test_a_client_that_disconnects_frees_its_slot(server):
    port = server[1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": "t5 t6", "max_tokens": 230, "temperature": 1,
         "stream": True}), {"Content-Type": "application/json",
                            "Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 30
    while True:
        health = json.loads(_get(port, "/health")[1])
        metrics = _get(port, "/metrics")[1]
        cancelled = re.search(r'dspark_requests_total\{outcome="cancelled"\} (\d+)', metrics)
        if health["running"] == 0 and cancelled and float(cancelled.group(1)) >= 1:
            break
        assert time.monotonic() < deadline, (health, metrics)
        time.sleep(0.2)


def test_metrics_report_load_acceptance_and_latency(server, client):
    _completion(client, PROMPTS[0])
    status, text = _get(server[1], "/metrics")
    assert status == 200
    for name in ("dspark_requests_total", "dspark_queue_depth", "dspark_running_requests",
                 "dspark_generated_tokens_total", "dspark_round_tokens_count",
                 "dspark_verify_length_sum", "dspark_rounds_total",
                 "dspark_time_to_first_token_seconds_bucket",
                 "dspark_inter_token_latency_seconds_count"):
        assert name in text, name
    rounds = float(re.search(r"^dspark_round_tokens_count (\S+)", text, re.M).group(1))
    assert rounds > 0
