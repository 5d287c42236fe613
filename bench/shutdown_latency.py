"""How long shutdown() takes: the stdlib's socketserver against servekit, side by side.

The stdlib's serve_forever() wakes every poll_interval (default 0.5 s) to look at its
shutdown flag, so shutdown() waits for 0 to poll_interval seconds, about half of it on
average. servekit's loop also waits on a wake-up channel, so shutdown() returns as soon
as the loop has stopped.

Each trial starts serve_forever() with the default poll_interval in a thread, waits a
random delay (so the call lands anywhere in the poll cycle), then times shutdown().

Usage: python bench/shutdown_latency.py [--trials N] [--poll-interval S] [--markdown]
"""

from __future__ import annotations

import argparse
import random
import socketserver
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import servekit


def trial(module: object, poll_interval: float, rng: random.Random) -> float:
    server = module.TCPServer(("127.0.0.1", 0), module.BaseRequestHandler)  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(poll_interval,))
    thread.start()
    # A random point in the poll cycle (the delay is a test input, not synchronisation).
    time.sleep(poll_interval * (1 + rng.random()))
    start = time.perf_counter()
    server.shutdown()
    elapsed = time.perf_counter() - start
    thread.join()
    server.server_close()
    return elapsed


def summarise(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": statistics.median(ordered) * 1000,
        "p90_ms": ordered[int(0.9 * (len(ordered) - 1))] * 1000,
        "max_ms": ordered[-1] * 1000,
        "mean_ms": statistics.fmean(ordered) * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--poll-interval", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    results: dict[str, list[float]] = {"stdlib socketserver": [], "servekit": []}
    # Interleave the two so that any drift of the machine affects both alike.
    for _ in range(args.trials):
        results["stdlib socketserver"].append(trial(socketserver, args.poll_interval, rng))
        results["servekit"].append(trial(servekit, args.poll_interval, rng))
    stdlib = summarise(results["stdlib socketserver"])
    print(
        f"shutdown() latency, {args.trials} trials each, poll_interval={args.poll_interval}s, "
        f"Python {sys.version.split()[0]}\n"
    )
    print("| server | median | p90 | max | median vs stdlib |")
    print("|---|---:|---:|---:|---:|")
    for name, samples in results.items():
        s = summarise(samples)
        ratio = stdlib["median_ms"] / s["median_ms"] if s["median_ms"] else float("inf")
        print(
            f"| {name} | {s['median_ms']:.2f} ms | {s['p90_ms']:.2f} ms | {s['max_ms']:.2f} ms "
            f"| {'1x' if name.startswith('stdlib') else f'{ratio:,.0f}x faster'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
