"""Load test of `serve` on localhost: N concurrent clients against the same N requests sent one at a time
(writes benchmarks/results/serve_http.md).

The server (chameleon.serve.server, in a thread of this process) serves a `chameleon` run of the smoke profile on
SmolLM2-135M (causal protocol, one epoch, trained into a temp folder as bench_serving does; or --run DIR).
Each request is one prompt (the first words of a validation extract) with max_tokens MAX_NEW; the client is
urllib in a thread pool. "concurrent": all N requests at once, so the server's window gathers them into
batches of up to --max-batch, one adapter per group; "one at a time": each request waits for the previous
answer, so every batch holds one prompt. Reported: wall time, requests/s, generated tokens/s, and p50 / p95
latency of a request. Then the load test stops: N requests each way, nothing else.

    python -m benchmarks.bench_serve_http                      # N = 32, window 20 ms, max batch 32
    python -m benchmarks.bench_serve_http --n 64 --window-ms 50 --run results/cpu/lm/runs/<run>
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.bench_serving import prompts_pool, trained
from benchmarks.timing import write_report
from chameleon.serve.server import background, create_app
from chameleon.serve.adapter import Adapter

MAX_NEW = 16
OUT = Path(__file__).resolve().parent / "results" / "serve_http.md"


def request(url: str, prompt: str) -> tuple[float, int]:
    """(seconds, completion tokens) of one completion request."""
    body = json.dumps({"prompt": prompt, "max_tokens": MAX_NEW}).encode()
    t0 = time.perf_counter()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as response:
        answer = json.loads(response.read())
    return time.perf_counter() - t0, answer["usage"]["completion_tokens"]


def measure(url: str, prompts: list[str], concurrent: bool) -> dict:
    t0 = time.perf_counter()
    if concurrent:
        with ThreadPoolExecutor(len(prompts)) as pool:
            done = list(pool.map(lambda p: request(url, p), prompts))
    else:
        done = [request(url, p) for p in prompts]
    wall = time.perf_counter() - t0
    latencies = sorted(s for s, _ in done)
    return {"wall": wall, "rps": len(prompts) / wall, "tps": sum(n for _, n in done) / wall,
            "p50": statistics.median(latencies), "p95": latencies[min(len(latencies) - 1, round(0.95 * len(latencies)) - 1)]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a finished run folder (default: train a smoke chameleon run on SmolLM2)")
    parser.add_argument("--n", type=int, default=32, help="requests each way (default 32)")
    parser.add_argument("--window-ms", type=int, default=20)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--group", default="route", choices=["route", "kmeans", "single"])
    args = parser.parse_args()
    adapter = Adapter.from_run(args.run, device="cpu") if args.run else trained(Path(tempfile.mkdtemp()), "chameleon")
    prompts = prompts_pool()[:args.n]
    app = create_app(adapter, args.group, window_ms=args.window_ms, max_batch=args.max_batch, max_queue=max(64, args.n))
    load = os.getloadavg()
    with background(app) as url:
        request(url, prompts[0])  # warm-up
        rows = {"one at a time": measure(url, prompts, concurrent=False),
                "concurrent": measure(url, prompts, concurrent=True)}
    command = "python -m benchmarks.bench_serve_http " + " ".join(sys.argv[1:])
    md = [f"# serve over HTTP: {args.n} requests, concurrent vs one at a time", "",
          f"`{command.strip()}`, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load average at start {load[0]:.2f}; {adapter.cfg.regime} on {adapter.cfg.backbone}, "
          f"grouping {args.group}, window {args.window_ms} ms, max batch {args.max_batch}, {MAX_NEW} new tokens at most "
          "per request (EOS may stop earlier).", "",
          "| clients | wall s | requests/s | tokens/s | p50 latency s | p95 latency s |", "|---|---|---|---|---|---|"]
    md += [f"| {name} | {r['wall']:.2f} | {r['rps']:.2f} | {r['tps']:.1f} | {r['p50']:.3f} | {r['p95']:.3f} |"
           for name, r in rows.items()]
    write_report(OUT, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
