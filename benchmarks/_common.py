"""Shared helpers for the benchmark scripts: timing, peak memory, tables, JSON."""

import json
import os
import platform
import statistics
import threading
import time

import torch


def machine_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def cpu_memory_probe(extra_args: list[str]) -> dict:
    """Re-run this script in a child process for CPU peak-memory figures only.

    glibc keeps freed blocks resident and raises its mmap threshold after large frees, so
    in a process that has already run a forward, resident-set growth says nothing. The child
    runs with the threshold fixed at 64 KiB (every large tensor mmapped and unmapped), so
    its resident-set growth tracks live tensor memory; its page faults would distort timing,
    which is why latency is measured in the parent. The child prints one JSON line.
    """
    import subprocess
    import sys

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, *sys.argv, *extra_args], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _RssSampler:
    """Peak resident-set growth over a block, sampled every millisecond (CPU runs)."""

    def __enter__(self):
        self.base = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.final = _rss_bytes()
        self.peak = max(self.peak, self.final)

    @property
    def growth(self) -> int:
        """Peak resident-set growth over the block."""
        return self.peak - self.base

    @property
    def final_growth(self) -> int:
        """Resident-set growth left at the end of the block."""
        return self.final - self.base


def peak_memory_mib(fn, device: str) -> float:
    """Peak memory growth (MiB) over one call of ``fn()`` (CUDA allocator or sampled RSS)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with _RssSampler() as sampler:
        fn()
    return sampler.growth / 2**20


def measure_pair(fn_a, fn_b, device: str, warmup: int, repeats: int) -> tuple[dict, dict]:
    """Median latency (ms) and peak memory (MiB) of two functions, timed in turns.

    The two take turns run by run, so that load from other processes and clock changes fall
    on both alike.
    """
    return tuple(measure_turns([fn_a, fn_b], device, warmup, repeats))


def measure_turns(fns, device: str, warmup: int, repeats: int, memory: bool = True) -> list:
    """``measure_pair`` for any number of functions: each run, every function once in turn.

    ``memory=False`` skips the peak-memory pass (``peak_mem_mib`` is then ``nan``).
    """
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        for fn in fns:
            fn()
    sync()
    times: list[list] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            sync()
            bucket.append((time.perf_counter() - start) * 1000)
    return [
        {
            "latency_ms": statistics.median(t),
            "peak_mem_mib": peak_memory_mib(fn, device) if memory else float("nan"),
        }
        for fn, t in zip(fns, times)
    ]


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format)."""
    header = " | ".join(h for _, h, _ in columns)
    print("| " + header + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(format(row[k], f) for k, _, f in columns) + " |")


def _finite(value):
    """NaN (a table's "not applicable") as null, so the file is standard JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(_finite(payload), f, indent=2, allow_nan=False)
        print(f"wrote {path}")


def connect_when_listening(port: int, process, timeout: float, failure) -> object:
    """An ``openpi_client`` ``WebsocketClientPolicy`` on ``127.0.0.1:port`` once the server
    child ``process`` listens (polled every 0.3 s); ``SystemExit(failure())`` when it exits
    or ``timeout`` seconds pass first (``failure`` says where its log is)."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    deadline = time.time() + timeout
    while True:
        try:
            return WebsocketClientPolicy(host="127.0.0.1", port=port)
        except Exception:  # noqa: BLE001 - refused or cut off: not listening yet
            if time.time() > deadline or process.poll() is not None:
                raise SystemExit(failure()) from None
            time.sleep(0.3)
