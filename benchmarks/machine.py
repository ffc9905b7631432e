"""The machine a benchmark ran on, so runs on different machines can be read side by side: CPU
model, the bf16 matrix-unit flags (AMX, AVX512-BF16), a quick measured bf16 and fp32 matmul rate,
torch threads, and the load average (this project's CPUs are shared: a loaded machine reads
slow, so record the load next to every number).

    from machine import describe, print_machine, load_1m   # benchmarks/ is on sys.path for its scripts
"""

from __future__ import annotations

import os
import platform
import resource
import threading
import time
from typing import Any

FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512f", "avx2")


def cpu_info() -> dict[str, Any]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "flags": {f: f in flags for f in FLAGS}}


def load_1m() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def matmul_gflops(dtype_name: str, n: int = 1024, seconds: float = 0.3) -> float:
    """Best-of rate of an n x n matmul in ``dtype_name`` ("bf16" or "fp32") with torch's threads."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def describe(probe: bool = True) -> dict[str, Any]:
    """CPU model and flags, host name, torch threads, load, measured bf16/fp32 matmul GFLOP/s (about
    1 s; ``probe=False``: not measured, None, for runs too small for the figure to mean anything)."""
    import torch

    info = cpu_info()
    info.update(host=platform.node(), torch=torch.__version__, threads=torch.get_num_threads(), load_1m=load_1m(),
                bf16_matmul_gflops=round(matmul_gflops("bf16")) if probe else None,
                fp32_matmul_gflops=round(matmul_gflops("fp32")) if probe else None)
    return info


def print_machine(info: dict[str, Any]) -> None:
    flags = " ".join(f"{k}={'yes' if v else 'no'}" for k, v in info["flags"].items())
    print(f"machine: {info['cpu']} ({info['cores']} cores; {flags}){' on ' + info['host'] if info.get('host') else ''}")
    rate = ("not measured" if info.get("bf16_matmul_gflops") is None else
            f"bf16 {info['bf16_matmul_gflops']} GFLOP/s, fp32 {info['fp32_matmul_gflops']} GFLOP/s")
    print(f"  torch {info['torch']}, {info['threads']} threads, 1-min load {info['load_1m']}, matmul 1024^2: {rate}")


def rss_gib() -> float:
    """Current resident set size (Linux /proc; peak-so-far elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="utf-8") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


class PeakRSS:
    """``with PeakRSS() as p: ...; p.gib``: the largest RSS seen while the block ran (sampled every
    ``interval`` s by a thread), so each engine of one process gets its own peak."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.gib = interval, 0.0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.gib = max(self.gib, rss_gib())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.gib = rss_gib()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.gib = max(self.gib, rss_gib())
