"""Load test of a running `legora serve` on loopback (standard library only).

    python bench/serve_bench.py --base-url http://127.0.0.1:8000 --models base,a \
        --clients 16 --requests 4 --max-tokens 32

Each client thread sends `--requests` streaming completions one after the other
(models taken in turn from `--models`) and records, per request, the time to the first
token and the gaps between tokens. Prints the aggregate generated tokens per second,
TTFT and inter-token latency percentiles, and the count of each HTTP status (429 is
expected only beyond the server's queue).
"""

import argparse
import json
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections import Counter


def one(base_url, model, prompt, max_tokens, timeout):
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "stream": True}).encode()
    req = urllib.request.Request(base_url + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    stamps = []
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
        return 200, t0, stamps
    except urllib.error.HTTPError as e:
        return e.code, t0, []


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def run(args, clients):
    models = args.models.split(",")
    statuses, ttft, itl, tokens = Counter(), [], [], [0]
    lock = threading.Lock()

    def client(i):
        for j in range(args.requests):
            model = models[(i + j) % len(models)]
            code, t0, st = one(args.base_url, model, args.prompt, args.max_tokens, args.timeout)
            with lock:
                statuses[code] += 1
                tokens[0] += len(st)
                if st:
                    ttft.append(st[0] - t0)
                    itl.extend(b - a for a, b in zip(st, st[1:]))

    t = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    dt = time.perf_counter() - t
    print(f"clients={clients:3d} requests={clients * args.requests:4d} "
          f"statuses={dict(statuses)} text chunks/s={tokens[0] / dt:8.1f} "
          f"TTFT p50={pct(ttft, 50) * 1e3:7.1f} ms p99={pct(ttft, 99) * 1e3:7.1f} ms "
          f"ITL p50={pct(itl, 50) * 1e3:6.1f} ms p99={pct(itl, 99) * 1e3:6.1f} ms")
    return tokens[0] / dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--models", default="base")
    ap.add_argument("--clients", default="1,16", help="comma-separated client counts")
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("--timeout", type=float, default=120)
    args = ap.parse_args()
    rates = {c: run(args, c) for c in map(int, args.clients.split(","))}
    if 1 in rates and len(rates) > 1:
        for c, r in rates.items():
            if c != 1:
                print(f"speed-up at {c} clients over 1: {r / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
