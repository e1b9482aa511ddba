"""Small helpers shared by the benchmark scripts: timing, peak memory, machine line, results."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {gpu}, Python {platform.python_version()}")


def median_time(fn, repeat: int = 5, warmup: int = 1, clock=time.perf_counter) -> float:
    """Median time of ``fn()`` in seconds (CUDA-synchronised when a GPU is in use): wall time,
    or any other ``clock`` (``time.process_time``: CPU time, which on a shared machine leaves
    out the moments the process waits for a core; meaningful with one thread)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = clock()
        fn()
        sync()
        times.append(clock() - start)
    return statistics.median(times)


def exact_rss_mode() -> None:
    """From now on, have glibc map every block >= 64 KiB on its own and return it on free, so
    that sampled RSS measures what a call really allocates (not memory recycled from earlier
    calls). Slows allocation down: call it after the timings, before the memory measurements."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 65536)
    libc.mallopt(m_trim_threshold, 0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def extra_peak_bytes(fn) -> int:
    """Peak resident memory that one call of ``fn()`` adds (CPU: RSS sampled every 0.5 ms;
    CUDA: the allocator's peak). Includes the output tensor."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
        peak[0] = max(peak[0], _rss_bytes())
    finally:
        stop.set()
        thread.join()
    del result
    return max(0, peak[0] - base)


def append_results(title: str, body: str) -> None:
    """Append a dated section with the machine and the exact command to RESULTS.md."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    text = (f"\n## {title}\n\n- date: {now}\n- machine: {machine_line()}\n"
            f"- command: `{command}`\n\n{body.rstrip()}\n")
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nEvery section is one run; ratios within a "
                           "section come from that run (the machine is shared and noisy).\n")
    with RESULTS.open("a") as f:
        f.write(text)
    print(f"appended to {RESULTS}")


def publish(title: str, body: str, write: bool) -> None:
    """Print a benchmark's ``body`` and, when ``write``, append it to RESULTS.md as ``title``."""
    print(body)
    if write:
        append_results(title, body)
