"""Serving benchmark: `mlx_lm.server` (plain decoding, continuous batching) against
`mlx-mtp serve` on the same embedded target, one server after the other.

For N = 1, 4, 8 concurrent clients, each client streams one completion of a prompt of its
own (the built-in bench prompts as plain text: the embedded target is a base model), greedy,
with the real `openai` client. Reported per server and N: aggregate tokens/s (all completion
tokens over the wall time of the N requests), median time to first token, and median
per-request tokens/s (after its first token). Both servers use MKL here (mlx_mtp loads it
before MLX in both processes). Greedy texts must agree between the servers.

    python scripts/bench_server.py --clients 1,4,8 -n 128 --json-out server.json
"""

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai

from mlx_mtp.bench.report import machine_info
from mlx_mtp.bench.runner import load_prompts
from mlx_mtp.checkpoints.embedded import ensure_target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, target: str, port: int, max_batch: int) -> subprocess.Popen:
    if kind == "mlx-lm":
        code = ("import sys, mlx_mtp; from mlx_lm.server import main; "
                f"sys.argv = ['mlx_lm.server', '--model', {target!r}, '--port', '{port}', "
                f"'--decode-concurrency', '{max_batch}', '--log-level', 'WARNING']; main()")
    else:
        code = f"import sys; from mlx_mtp.cli import main; sys.argv = ['mlx-mtp', 'serve', '--port', '{port}', " \
               f"'--max-batch', '{max_batch}']; main()"
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"{kind} server did not start")


def one_request(client, model: str, prompt: str, max_tokens: int) -> dict:
    tic = time.perf_counter()
    first, text, tokens = None, [], 0
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                       stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].text)
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        elif chunk.model_extra.get("usage"):
            tokens = chunk.model_extra["usage"]["completion_tokens"]
    end = time.perf_counter()
    first = first or end
    return {"ttft": first - tic, "tokens": tokens, "seconds": end - tic,
            "tps": (tokens - 1) / (end - first) if end > first else 0.0, "text": "".join(text)}


def measure(url: str, model: str, prompts, clients: int, max_tokens: int) -> dict:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    one_request(client, model, prompts[0], 8)  # warm-up
    chosen = [prompts[i % len(prompts)] for i in range(clients)]
    tic = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(lambda p: one_request(client, model, p, max_tokens), chosen))
    wall = time.perf_counter() - tic
    return {
        "clients": clients,
        "aggregate_tps": sum(r["tokens"] for r in runs) / wall,
        "median_ttft": statistics.median(r["ttft"] for r in runs),
        "median_request_tps": statistics.median(r["tps"] for r in runs),
        "tokens": [r["tokens"] for r in runs],
        "texts": [r["text"] for r in runs],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("-n", "--max-tokens", type=int, default=128)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    prompts = [p for kind in load_prompts().values() for p in kind]
    target = str(ensure_target())
    results = {}
    for kind, model in (("mlx-lm", target), ("mlx-mtp", "gemma-3-270m")):
        port = free_port()
        process = start(kind, target, port, max(clients))
        try:
            results[kind] = [measure(f"http://127.0.0.1:{port}", model, prompts, n, args.max_tokens) for n in clients]
        finally:
            process.terminate()
            process.wait()
    print(f"{'clients':>7} {'server':>8} {'agg tok/s':>10} {'TTFT s':>7} {'req tok/s':>10}  same text")
    for i, n in enumerate(clients):
        for kind in results:
            r = results[kind][i]
            same = r["texts"] == results["mlx-lm"][i]["texts"]
            print(f"{n:>7} {kind:>8} {r['aggregate_tps']:>10.1f} {r['median_ttft']:>7.2f} "
                  f"{r['median_request_tps']:>10.1f}  {'yes' if same else 'NO'}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"results": results, "max_tokens": args.max_tokens, "machine": machine_info()}, f, indent=1)


if __name__ == "__main__":
    main()
