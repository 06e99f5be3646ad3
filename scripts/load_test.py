"""Load test of `mlx-mtp serve` on 127.0.0.1: a mixed workload, timed from the client side.

Starts a server (this checkout, or the one at --source, e.g. an older commit in a git
worktree), measures one stream alone, then replays, bounded in requests and time:
- two streams that keep going until 10 s after the long prompt is answered, then leave, and
  a chat turn;
- a long prompt (--long ids, default 8192; streamed, so its first token marks the end of
  its read) and a medium one (--medium, 4096);
- a short request sent just behind the long prompt;
- a non-streaming client that gives up after 2 s and retries with a small request;
- bad requests (NaN, a string for a number).

Streams that leave early count one token per chunk (a chunk carries one or more).

Reported: per request its time to first token and total time; the gaps between the
streamed chunks of the chats while the long prompt is read (p50/p95/max, against the
stream's solo step and the two streams' own gaps in the 10 s after it, when nothing is
read: a stream drafts more tokens a round where its text repeats, so its rounds, and its
gaps, grow over its text); aggregate completion tokens/s; and the rows still decoding or read
once every client has finished or left (must be 0).

    python scripts/load_test.py --json-out new.json
    git worktree add /tmp/old <commit> && python scripts/load_test.py --source /tmp/old --json-out old.json
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

AFTER = 10.0  # seconds the streams go on alone once the long prompt is answered

WORDS = ("the river ran past an old mill where a miller kept bees and counted the sacks of grain "
         "each autumn while children played by the water and the wheel turned slowly").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def text_of(n_words: int, seed: int) -> str:
    """Plain text of about n_words words (about as many tokens), different per seed."""
    return " ".join(WORDS[(i * 7 + seed * 13 + i // len(WORDS)) % len(WORDS)] for i in range(n_words))


class Client:
    """One request: its timings as the client sees them."""

    def __init__(self, name: str, url: str, body: dict, path: str = "completions"):
        self.name, self.url, self.body, self.path = name, url, body, path
        self.sent = self.first = self.done = None
        self.arrivals, self.tokens, self.status, self.error = [], 0, None, None
        self.leave = threading.Event()  # set: a streaming client disconnects

    def run(self, timeout: float = 600):
        self.sent = time.perf_counter()
        try:
            if self.body.get("stream"):
                self._stream(timeout)
            else:
                response = httpx.post(f"{self.url}/v1/{self.path}", content=self._content(), timeout=timeout,
                                      headers={"content-type": "application/json"})
                self.status = response.status_code
                self.first = self.done = time.perf_counter()
                if self.status == 200:
                    self.tokens = response.json()["usage"]["completion_tokens"]
        except httpx.TimeoutException:
            self.error = "gave up"
        self.done = self.done or time.perf_counter()
        return self

    def _content(self) -> bytes:
        return json.dumps(self.body).encode()  # (NaN allowed: a bad request is part of the load)

    def _stream(self, timeout):
        with httpx.stream("POST", f"{self.url}/v1/{self.path}", content=self._content(), timeout=timeout,
                          headers={"content-type": "application/json"}) as response:
            self.status = response.status_code
            for line in response.iter_lines():
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                self.first = self.first or now
                self.arrivals.append(now)
                chunk = json.loads(line[5:])
                if chunk.get("usage"):
                    self.tokens = chunk["usage"]["completion_tokens"]
                else:
                    self.tokens += 1  # at least one token per chunk; the last chunk says exactly
                if self.leave.is_set():
                    self.error = "left"
                    break
        self.done = time.perf_counter()

    def report(self, t0: float) -> dict:
        ms = lambda t: None if t is None else round((t - t0) * 1000)
        return {"name": self.name, "status": self.status, "error": self.error, "sent_ms": ms(self.sent),
                "ttft_s": None if self.first is None else round(self.first - self.sent, 2),
                "total_s": round(self.done - self.sent, 2), "completion_tokens": self.tokens}


def start_server(args, port: int, log) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if args.source:
        env["PYTHONPATH"] = str(Path(args.source).resolve())
    cmd = [sys.executable, "-c", "from mlx_mtp.cli import main; main()", "serve", "--port", str(port),
           "--max-batch", "8", *(["-m", args.model] if args.model else []), *args.server_arg]
    # (cwd: `python -c` puts it first on sys.path, before PYTHONPATH)
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=args.source or None)
    deadline = time.time() + 600  # a first run converts the embedded target
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server stopped: {open(log.name).read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.5)
    raise SystemExit("the server did not start in 10 minutes")


def gaps_within(clients, start: float, end: float) -> list:
    """Seconds between consecutive chunks of the streams, for chunks arriving in [start, end]."""
    gaps = []
    for c in clients:
        times = [t for t in c.arrivals if start <= t <= end]
        gaps += [b - a for a, b in zip(times, times[1:])]
    return gaps


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", "-m", help="A models.toml alias (default: the embedded pair).")
    parser.add_argument("--source", help="A checkout of mlx-mtp to serve from (default: the installed one).")
    parser.add_argument("--server-arg", action="append", default=[], help="A flag for `serve` (repeatable).")
    parser.add_argument("--long", type=int, default=8192, help="Words of the long prompt.")
    parser.add_argument("--medium", type=int, default=4096, help="Words of the medium prompt.")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--server-log", type=Path, help="Keep the server's log (its stderr) in this file.")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(args.server_log, "w+") if args.server_log else tempfile.NamedTemporaryFile("w+", suffix=".log")
    server = start_server(args, port, log)
    try:
        Client("warm-up", url, {"prompt": text_of(40, 0), "max_tokens": 8, "temperature": 0}).run()
        solo = Client("solo stream", url, {"prompt": text_of(30, 1), "max_tokens": 64, "temperature": 0,
                                           "stream": True}).run()
        solo_step = statistics.median(b - a for a, b in zip(solo.arrivals[1:], solo.arrivals[2:]))

        def completion(name, words, seed, max_tokens, **extra):
            return Client(name, url, {"prompt": text_of(words, seed), "max_tokens": max_tokens, "temperature": 0,
                                      **extra})

        # (completions of plain text: a base target's chat replies end after a sentence)
        chats = [completion(f"stream {i}", 30, 10 + i, 4000, stream=True) for i in range(2)]
        chat = Client("chat turn", url, {"messages": [{"role": "user", "content": "What is a mill?"}],
                                         "max_tokens": 32, "temperature": 0}, path="chat/completions")
        long = completion("long prompt", args.long, 2, 16, stream=True)  # streamed: its first token ends the read
        short = completion("short behind long", 12, 3, 16)
        medium = completion("medium prompt", args.medium, 4, 16)
        quitter = completion("gives up after 2 s", 20, 5, 3000)
        retry = completion("retry", 20, 5, 16)
        bad = [Client("bad: NaN", url, {"prompt": "x", "temperature": float("nan")}),
               Client("bad: max_tokens", url, {"prompt": "x", "max_tokens": "many"})]
        threads = []
        t0 = time.perf_counter()

        def at(seconds, fn):
            def go():
                time.sleep(max(0.0, t0 + seconds - time.perf_counter()))
                fn()
            threads.append(threading.Thread(target=go))
            threads[-1].start()

        for stream in chats:
            at(0, stream.run)
        at(2, long.run)
        at(3, short.run)
        at(3.5, chat.run)
        at(4, medium.run)
        at(5, lambda: (quitter.run(timeout=2), retry.run()))
        for i, b in enumerate(bad):
            at(6 + i, b.run)
        while long.done is None:
            time.sleep(0.2)
        time.sleep(AFTER)  # the streams alone again, at the same point of their text
        for stream in chats:
            stream.leave.set()
        for t in threads:
            t.join(timeout=900)
        wall = time.perf_counter() - t0
        time.sleep(1.0)  # the engine's next steps drop what clients left
        health = httpx.get(f"{url}/health").json()
        if health.get("rows", 0) + health.get("reading", 0):
            log.seek(0)
            print("rows still running 1 s after every client left; the server's log ends:\n"
                  + "".join(log.readlines()[-15:]), file=sys.stderr)
    finally:
        server.terminate()
        server.wait(timeout=30)

    everyone = chats + [long, short, chat, medium, quitter, retry] + bad
    reading = gaps_within(chats, long.sent, long.first or long.done)
    after = gaps_within(chats, long.done, long.done + AFTER)  # the two streams alone
    result = {
        "server": args.source or "this checkout",
        "server_args": args.server_arg,
        "solo_step_s": round(solo_step, 3),
        "requests": [c.report(t0) for c in everyone],
        "gaps_after_long_prompt_s": {"count": len(after), "p50": percentile(after, 0.5), "max": max(after, default=None)},
        "gaps_while_long_prompt_read_s": {
            "count": len(reading),
            "p50": percentile(reading, 0.5), "p95": percentile(reading, 0.95), "max": max(reading, default=None)},
        "aggregate_tokens_per_s": round(sum(c.tokens for c in everyone) / wall, 2),
        "wall_s": round(wall, 1),
        "rows_left_after_clients_left": health.get("rows", 0) + health.get("reading", 0),
        "health_at_end": health,
    }
    g = result["gaps_while_long_prompt_read_s"]
    print(f"server: {result['server']} {' '.join(args.server_arg)}")
    print(f"solo step {solo_step * 1000:.0f} ms")
    for r in result["requests"]:
        print(f"  {r['name']:<22} status {r['status']} {r['error'] or '':<9} ttft {r['ttft_s']} s, "
              f"total {r['total_s']} s, {r['completion_tokens']} tokens")
    if g["count"]:
        print(f"stream gaps while the long prompt is read: {g['count']} gaps, p50 {g['p50'] * 1000:.0f} ms, "
              f"p95 {g['p95'] * 1000:.0f} ms, max {g['max'] * 1000:.0f} ms "
              f"({g['max'] / solo_step:.1f}x the solo step)")
    if after:
        print(f"stream gaps in the {AFTER:.0f} s after it (nothing read): p50 {percentile(after, 0.5) * 1000:.0f} ms, "
              f"max {max(after) * 1000:.0f} ms; the max gap while reading is {g['max'] / percentile(after, 0.5):.1f}x that p50")
    print(f"short behind long: {short.done - short.sent:.1f} s vs the long prompt's {long.done - long.sent:.1f} s")
    print(f"aggregate {result['aggregate_tokens_per_s']} tokens/s over {result['wall_s']} s; "
          f"rows left after their clients left: {result['rows_left_after_clients_left']}")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
