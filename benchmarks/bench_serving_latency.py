"""Latency of one scoring request, end to end, next to what the machine's matmul rate allows; and a server under load.

    TORCHINDUCTOR_COMPILE_THREADS=1 python benchmarks/bench_serving_latency.py --output benchmarks/results/serving_latency.json
    python benchmarks/bench_serving_latency.py --configs small --candidates 1000 --threads 1 --dtypes fp32 --runtimes eager

One request = a raw event history (256 events as `pipeline_pinfm` takes them: `{"item_id", "action", "timestamp"}`
dicts) and `C` raw candidate item ids -> `C` scores (Python floats): tokenisation, the DCAT context pass, the
crossing pass and the head, through [`pinfm_hf.serving.PinFMCandidateScorer`], eager (`runtime: eager`) or compiled
ahead of time with AOTInductor (`runtime: aoti`, `compile=True`; `build_s` is its one-off build). Model configs and
shapes are `bench_dcat.py`'s (history 256, vocabulary 20k, random weights; the item bias on); `int8` rows quantise the
item table row-wise. Requests cycle through 16 users. After `--warmup` requests, `--requests` are timed one after
another: p50, p99, requests/s (one client, back to back), and the CPU time of the thread (`cpu_p50_ms`, which other
jobs on the machine inflate less than wall time). glibc malloc is tuned first (`tune_allocator`), as the server does.

The hardware limit: every matmul of the request (linear layers; each attention call as its two batched matmuls,
the context pass's at full length as its kernel computes it) is recorded with its shapes, and `gflop` is their sum.
Those exact matmuls, replayed on random fp32 data at the same thread count right after each timed request (so both
see the same machine), run at the machine's matmul rate for this model, `matmul_gflops` (median of the replays).
`hardware_fraction = gflop / p50 / matmul_gflops`: 1.0 would be a request that does nothing but its matmuls.

`--server_load_seconds N` (default 20; 0 skips) then starts `recipes/serve.py` on the small model (eager, 1 torch
thread) and has 4 concurrent clients send 100-candidate requests for N seconds: sustained requests/s, p50/p99 and
failed requests under `server_load`. Every row first checks its scores against the naive path (each candidate
appended to the history and the whole sequence encoded) on a few candidates: `max_abs_diff_vs_naive`.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _report import emit
from bench_dcat import ACTIONS, CONFIGS, LENGTH, VOCAB


ROOT = Path(__file__).resolve().parents[1]
NUM_USERS = 16  # requests cycle through this many users' histories
NUM_HASH_BUCKETS = 64
NAIVE_CHECK = 8  # candidates per row checked against the naive path


def build_model_and_tokenizer(config_name: str, dtype: str):
    from pinfm_hf import PinFMConfig, PinFMForCTR, PinFMTokenizer

    actions = [f"action_{i}" for i in range(ACTIONS - 2)]  # + <pad>, <cand>
    items = [f"item_{i}" for i in range(VOCAB - 4 - NUM_HASH_BUCKETS)]  # + 4 specials + buckets = VOCAB
    tokenizer = PinFMTokenizer(items=items, actions=actions, num_hash_buckets=NUM_HASH_BUCKETS, model_max_length=LENGTH)
    torch.manual_seed(0)
    config = PinFMConfig(item_vocab_size=len(tokenizer), action_vocab_size=tokenizer.action_vocab_size,
                         max_position_embeddings=LENGTH + 1, hidden_dropout_prob=0.0, ctr_item_bias=True,
                         **CONFIGS[config_name])
    model = PinFMForCTR(config).eval()
    with torch.no_grad():
        model.ctr_item_bias.weight.normal_(0.0, 0.5)  # a trained bias is not zero: keep it on the measured path
    if dtype == "int8":
        model.quantize_item_embeddings("int8")
    return model, tokenizer


def make_requests(num_candidates: int, seed: int = 1) -> list[dict[str, Any]]:
    """`NUM_USERS` raw requests: 256-event histories and `num_candidates` candidate ids (some unseen: hash buckets)."""
    g = torch.Generator().manual_seed(seed)
    num_items = VOCAB - 4 - NUM_HASH_BUCKETS
    requests = []
    for _ in range(NUM_USERS):
        items = torch.randint(0, num_items, (LENGTH,), generator=g).tolist()
        actions = torch.randint(0, ACTIONS - 2, (LENGTH,), generator=g).tolist()
        times = torch.randint(0, 10**7, (LENGTH,), generator=g).sort().values.add(1_600_000_000).tolist()
        history = [{"item_id": f"item_{i}", "action": f"action_{a}", "timestamp": t} for i, a, t in zip(items, actions, times)]
        candidates = [f"item_{i}" for i in torch.randint(0, num_items, (num_candidates,), generator=g).tolist()]
        candidates[-1] = "fresh_item_never_seen"
        requests.append({"history": history, "candidates": candidates, "request_time": times[-1] + 60})
    return requests


def naive_logits(scorer, request: dict[str, Any], num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast-path logits of the first `num` candidates and those of appending each one to the history (`forward`)."""
    encoded = scorer.encode(request["history"], request["candidates"][:num], request["request_time"])
    fast = scorer.score_encoded([encoded])[0]
    T = encoded.input_ids.numel()
    with torch.inference_mode():
        naive = scorer.model(
            input_ids=torch.cat([encoded.input_ids.expand(num, T), encoded.candidate_ids[:, None]], 1),
            action_ids=torch.cat([encoded.action_ids.expand(num, T), torch.ones(num, 1, dtype=torch.long)], 1),
            timestamps=torch.cat([encoded.timestamps.expand(num, T), torch.full((num, 1), encoded.request_time)], 1),
        ).logits
    return fast, naive


class MatmulRecorder(TorchDispatchMode):
    """Records every matmul a request runs as `(batch, m, k, n)` (attention calls as their two batched matmuls)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, int, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == "linear":
            x, weight = args[0], args[1]
            self.shapes.append((1, x.numel() // x.shape[-1], x.shape[-1], weight.shape[0]))
        elif name in ("mm", "addmm", "bmm", "baddbmm"):
            a, b = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])
            batch = a.shape[0] if a.dim() == 3 else 1
            self.shapes.append((batch, a.shape[-2], a.shape[-1], b.shape[-1]))
        elif "scaled_dot_product" in name:
            q, k = args[0], args[1]
            batch, length, dim, keys = q.shape[0] * q.shape[1], q.shape[-2], q.shape[-1], k.shape[-2]
            self.shapes += [(batch, length, dim, keys), (batch, length, keys, dim)]  # q @ k^T, probs @ v
        return func(*args, **kwargs)

    @property
    def flops(self) -> float:
        return float(sum(2 * b * m * k * n for b, m, k, n in self.shapes))


class MatmulReplay:
    """The recorded matmuls on random fp32 operands (made beforehand), run back to back: the request's arithmetic alone."""

    def __init__(self, shapes: list[tuple[int, int, int, int]]):
        self.operands = [(torch.randn(b, m, k).squeeze(0), torch.randn(b, k, n).squeeze(0)) for b, m, k, n in shapes]
        self.flops = float(sum(2 * b * m * k * n for b, m, k, n in shapes))

    def __call__(self) -> float:
        """Seconds of one replay."""
        start = time.perf_counter()
        for a, b in self.operands:
            torch.matmul(a, b)
        return time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def bench_row(scorer, eager, config_name: str, num_candidates: int, threads: int, args) -> dict[str, Any]:
    """Time `scorer` on requests of `num_candidates`; `eager` (the same model, eager) records the matmuls."""
    torch.set_num_threads(threads)
    requests = make_requests(num_candidates)

    def serve(request: dict[str, Any]) -> list[float]:
        return scorer.score(request["history"], request["candidates"], request["request_time"]).tolist()

    fast, naive = naive_logits(scorer, requests[0], min(NAIVE_CHECK, num_candidates))
    recorder = MatmulRecorder()
    with recorder:  # the eager path: a compiled program's kernels are not torch operators
        eager.score(requests[0]["history"], requests[0]["candidates"], requests[0]["request_time"])
    replay = MatmulReplay(recorder.shapes)
    for i in range(args.warmup):
        serve(requests[i % NUM_USERS])
        replay()
    wall, cpu, replays = [], [], []
    for i in range(args.requests):  # each request next to one replay of its matmuls: both see the same machine
        t, c = time.perf_counter(), time.thread_time()
        serve(requests[i % NUM_USERS])
        cpu.append(time.thread_time() - c)
        wall.append(time.perf_counter() - t)
        replays.append(replay())
    rate = replay.flops / percentile(replays, 50) / 1e9
    gflop = recorder.flops / 1e9
    p50 = percentile(wall, 50)
    row = {
        "config": config_name, "candidates": num_candidates, "threads": threads,
        "dtype": "int8" if scorer.model.config.item_embedding_quantization == "int8" else "fp32",
        "p50_ms": round(p50 * 1e3, 2), "p99_ms": round(percentile(wall, 99) * 1e3, 2),
        "requests_per_s": round(args.requests / sum(wall), 1), "gflop": round(gflop, 4),
        "hardware_fraction": round(gflop / p50 / rate, 3),
        "runtime": "aoti" if scorer.compiled else "eager", "matmul_gflops": round(rate, 1),
        "cpu_p50_ms": round(percentile(cpu, 50) * 1e3, 2), "min_ms": round(min(wall) * 1e3, 2),
        "requests": args.requests, "max_abs_diff_vs_naive": float((fast - naive).abs().max()),
    }
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def bench_rows(args) -> list[dict[str, Any]]:
    """Every row; each model is built (and, for `aoti`, compiled) once for all its thread counts and candidate counts."""
    from pinfm_hf.serving import PinFMCandidateScorer

    rows = []
    for config_name in args.configs:
        for dtype in args.dtypes:
            model, tokenizer = build_model_and_tokenizer(config_name, dtype)
            eager = PinFMCandidateScorer(model, tokenizer)
            for runtime in args.runtimes:
                with tempfile.TemporaryDirectory() as build_dir:
                    start = time.perf_counter()
                    scorer = eager if runtime == "eager" else PinFMCandidateScorer(
                        model, tokenizer, compile=True, compiled_path=Path(build_dir) / "scorer_aoti.pt2"
                    )
                    build_s = round(time.perf_counter() - start, 1)
                    for threads in args.threads:
                        for num_candidates in args.candidates:
                            row = bench_row(scorer, eager, config_name, num_candidates, threads, args)
                            rows.append({**row, "build_s": build_s})
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_server_load(args) -> dict[str, Any]:
    """`recipes/serve.py` on the small model (1 torch thread); 4 clients send 100-candidate requests for N seconds."""
    model, tokenizer = build_model_and_tokenizer("small", "fp32")
    bodies = [json.dumps(r).encode() for r in make_requests(100, seed=2)]
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        port = free_port()
        command = [sys.executable, str(ROOT / "recipes" / "serve.py"), "--model", folder, "--port", str(port),
                   "--threads", "1", "--max_wait_ms", str(args.server_max_wait_ms)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.time() + 120
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                        if response.status == 200:
                            break
                except OSError:
                    if server.poll() is not None or time.time() > deadline:
                        raise RuntimeError(f"the server did not start:\n{server.stdout.read()}")
                    time.sleep(0.2)
            latencies, failures, lock = [], [], threading.Lock()
            stop_at = [0.0]
            ready = threading.Barrier(args.clients + 1)

            def client(index: int) -> None:
                connection = HTTPConnection("127.0.0.1", port, timeout=30)
                ready.wait()
                i = index
                while time.perf_counter() < stop_at[0]:
                    t = time.perf_counter()
                    try:
                        connection.request("POST", "/score", bodies[i % len(bodies)], {"Content-Type": "application/json"})
                        response = connection.getresponse()
                        payload = response.read()
                        ok = response.status == 200 and len(json.loads(payload)["scores"]) == 100
                    except Exception as error:  # a failed request is a result here, not a crash
                        ok, payload = False, repr(error).encode()
                        connection = HTTPConnection("127.0.0.1", port, timeout=30)
                    with lock:
                        (latencies if ok else failures).append(time.perf_counter() - t if ok else payload[:200])
                    i += args.clients
                connection.close()

            workers = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
            for w in workers:
                w.start()
            start = time.perf_counter()
            stop_at[0] = start + args.server_load_seconds
            ready.wait()
            for w in workers:
                w.join()
            elapsed = time.perf_counter() - start
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                health = json.loads(response.read())
        finally:
            server.terminate()
            server.wait(timeout=30)
    result = {
        "config": "small", "candidates": 100, "clients": args.clients, "server_threads": 1,
        "max_wait_ms": args.server_max_wait_ms, "seconds": round(elapsed, 1),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 50) * 1e3, 2) if latencies else None,
        "p99_ms": round(percentile(latencies, 99) * 1e3, 2) if latencies else None,
        "requests": len(latencies), "failed_requests": len(failures),
        "mean_batch_size": round(health["requests"] / max(health["batches"], 1), 2),
        "largest_batch": health["largest_batch"],
    }
    if failures:
        result["first_failure"] = str(failures[0])
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=sorted(CONFIGS))
    parser.add_argument("--candidates", nargs="+", type=int, default=[100, 1000])
    parser.add_argument("--threads", nargs="+", type=int, default=sorted({1, os.cpu_count() or 1}),
                        help="torch thread counts (default: 1 and all cores).")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8"],
                        help="Item table: fp32, or row-wise int8 (the rest of the model stays fp32).")
    parser.add_argument("--runtimes", nargs="+", default=["eager", "aoti"], choices=["eager", "aoti"],
                        help="eager PyTorch, or the AOTInductor build of the scorer (`PinFMCandidateScorer(compile=True)`).")
    parser.add_argument("--requests", type=int, default=200, help="Timed requests per row (after the warm-up).")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--no_tune_allocator", action="store_true",
                        help="Leave glibc malloc as it is (each request then maps fresh pages for its activations).")
    parser.add_argument("--server_load_seconds", type=float, default=20.0, help="0 skips the server load measurement.")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--server_max_wait_ms", type=float, default=2.0)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    from pinfm_hf.serving import tune_allocator

    tuned = False if args.no_tune_allocator else tune_allocator()
    rows = bench_rows(args)
    torch.set_num_threads(1)
    report = {
        "torch": torch.__version__, "device": "cpu", "cpu_count": os.cpu_count(), "history_length": LENGTH,
        "allocator_tuned": tuned, "rows": rows,
    }
    if args.server_load_seconds > 0:
        report["server_load"] = bench_server_load(args)
    emit(report, args.output)


if __name__ == "__main__":
    main()
