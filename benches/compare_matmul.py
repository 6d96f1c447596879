#!/usr/bin/env python3
"""Matmul GFLOP/s of portalora next to numpy's, same shapes, same machine, same run.

Usage: benches/compare_matmul.py [path/to/portalora] [extra bench args...]
Prints one row per shape: portalora's median (min..max) GFLOP/s, numpy's median, and the ratio.
numpy is the reference a CPU user already has; on a real GPU the ratio says how far ahead the
GPU is. Without numpy the portalora column is printed alone.
"""
import json
import subprocess
import sys
import time


def numpy_gflops(np, m, k, n, op, repeats=5, target_s=0.3):
    rng = np.random.default_rng(42)
    a = rng.uniform(-1, 1, (k, m) if op[0] == "t" else (m, k)).astype(np.float32)
    b = rng.uniform(-1, 1, (n, k) if op[1] == "t" else (k, n)).astype(np.float32)
    aa = a.T if op[0] == "t" else a
    bb = b.T if op[1] == "t" else b
    np.matmul(aa, bb)
    t = time.perf_counter()
    np.matmul(aa, bb)
    iters = max(1, int(target_s / max(time.perf_counter() - t, 1e-6)))
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(iters):
            np.matmul(aa, bb)
        per = (time.perf_counter() - t) / iters
        rates.append(2.0 * m * n * k / per / 1e9)
    rates.sort()
    return rates[len(rates) // 2]


def main():
    exe = sys.argv[1] if len(sys.argv) > 1 else "portalora"
    out = subprocess.run([exe, "bench", "matmul", "--json", *sys.argv[2:]], check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    try:
        import numpy as np
    except ImportError:
        np = None
        print("numpy not installed: showing portalora alone (pip install numpy for the comparison)")
    print(f"{'M':>6} {'K':>6} {'N':>6} {'op':<3} {'path':<9} {'portalora GFLOP/s':>24} {'numpy':>9} {'ratio':>7}")
    for r in rows:
        ref = numpy_gflops(np, r["m"], r["k"], r["n"], r.get("op", "nn")) if np else None
        ours = f"{r['gflops']:.1f} ({r['min']:.1f}..{r['max']:.1f})"
        ref_s = f"{ref:.1f}" if ref else "-"
        ratio = f"{r['gflops'] / ref:.2f}" if ref else "-"
        print(f"{r['m']:>6} {r['k']:>6} {r['n']:>6} {r.get('op', 'nn'):<3} {r.get('path', '?'):<9} {ours:>24} {ref_s:>9} {ratio:>7}")


if __name__ == "__main__":
    main()
