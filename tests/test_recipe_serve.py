"""recipes/serve.py as users start it: a real uvicorn server in a child process, spoken to over HTTP by real clients,
concurrent ones included; malformed requests get a 422 naming the field; the scores are the Python scorer's."""

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from pathlib import Path

import pytest
import torch

from pinfm_hf.serving import PinFMCandidateScorer
from test_serving import make_history, make_ranker, make_tokenizer


pytest.importorskip("fastapi")  # the [serve] extra (installed by scripts/setup.sh)
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port: int, method: str, path: str, body=None) -> tuple[int, dict]:
    connection = HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        payload = None if body is None else (body if isinstance(body, str) else json.dumps(body))
        connection.request(method, path, body=payload, headers={"content-type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A saved ranker and its tokenizer, served by `python recipes/serve.py` on a free port; yields (port, scorer)."""
    folder = tmp_path_factory.mktemp("ranker")
    tokenizer = make_tokenizer()
    model = make_ranker(tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "recipes" / "serve.py"), "--model", str(folder), "--port", str(port),
         "--threads", "1", "--max_wait_ms", "50", "--max_candidates", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        deadline = time.time() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"serve.py exited early:\n{process.stdout.read()[-3000:]}")
            try:
                if call(port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise TimeoutError("serve.py did not answer /health within 120 s")
            time.sleep(0.2)
        yield port, PinFMCandidateScorer(model, tokenizer)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_concurrent_requests_get_the_scorers_scores(server):
    port, scorer = server
    requests = [
        {"history": make_history(3 + i, seed=i), "candidates": ["m1", f"m{i + 2}", "never-seen"][: 1 + i % 3]}
        for i in range(12)
    ]
    with ThreadPoolExecutor(4) as pool:  # 4 concurrent clients: their requests share micro-batches
        answers = list(pool.map(lambda body: call(port, "POST", "/score", body), requests))
    for body, (status, answer) in zip(requests, answers):
        assert status == 200, answer
        expected = scorer.score(body["history"], body["candidates"])
        torch.testing.assert_close(torch.tensor(answer["logits"]), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(answer["scores"]), expected.sigmoid(), atol=1e-5, rtol=1e-5)
    status, health = call(port, "GET", "/health")
    assert status == 200 and health["status"] == "ok"
    assert health["requests"] >= len(requests) and health["batches"] <= health["requests"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"history": make_history(4), "candidates": ["m1", 2.5]}, "candidates.1"),
        ({"candidates": ["m1"]}, "history"),
        ({"history": make_history(4), "candidates": ["m1"], "request_time": "soon"}, "request_time"),
        ({"history": make_history(4)[:1] + [{"item_id": "m2", "action": "buy", "timestamp": 2_000_000}],
          "candidates": ["m1"]}, "action"),
        ({"history": make_history(4), "candidates": []}, "candidates"),
        ({"history": make_history(4), "candidates": ["m1"] * 21}, "candidates: 21 given"),
        ("{not json", "body"),
    ],
)
def test_malformed_requests_get_a_422_naming_the_field(server, body, field):
    port, _ = server
    status, answer = call(port, "POST", "/score", body)
    assert status == 422
    assert field in answer["detail"]
    assert call(port, "GET", "/health")[0] == 200  # the server goes on
