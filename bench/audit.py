"""Audit speed and memory on a synthetic store of ImageNet size (1.28 M rows by default).

Builds a store of random top-5 maps (15 x 15, 1000 classes; bench/store_read.py's
build_random_store) in a temporary directory (or reuses --store), then runs the whole
`trt_relabel.audit.audit` into a report folder: the per-row pass over the store in chunks,
audit.csv, labels.json and index.html with its galleries (label maps only: there are no photos).
Prints the rows per second of the pass over the store and of the whole audit, by the wall clock
and per CPU second of this process (a figure that other processes on the machine disturb less),
and the peak of the process's anonymous memory (RssAnon, sampled every 50 ms: the pages of the
memory-mapped store are file cache, not counted).

    python bench/audit.py [--rows 1281167] [--store DIR] [--chunk-rows 2048]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from store_read import build_random_store  # noqa: E402

from trt_relabel.audit import audit  # noqa: E402


def anonymous_memory_mib() -> float:
    """RssAnon of this process in MiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_281_167)
    parser.add_argument("--store", type=Path, help="Existing store to audit (default: build a random one).")
    parser.add_argument("--chunk-rows", type=int, default=2048)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        store = args.store
        if store is None:
            started = time.perf_counter()
            store = build_random_store(Path(tmp) / "store", args.rows)
            print(f"built a random store of {args.rows} rows in {time.perf_counter() - started:.0f} s")
        peak, marks, stop = [anonymous_memory_mib()], {}, threading.Event()

        def sample() -> None:
            while not stop.wait(0.05):
                peak.append(anonymous_memory_mib())

        def progress(done: int, total: int) -> None:
            if done == total:
                marks["pass"] = time.perf_counter()
                marks["pass_cpu"] = time.process_time()

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started, started_cpu = time.perf_counter(), time.process_time()
        summary = audit(store, Path(tmp) / "report", top=50, chunk_rows=args.chunk_rows, progress=progress)
        finished, finished_cpu = time.perf_counter(), time.process_time()
        stop.set()
        sampler.join()
    rows = summary.num_labelled
    pass_s, total_s = marks["pass"] - started, finished - started
    pass_cpu, total_cpu = marks["pass_cpu"] - started_cpu, finished_cpu - started_cpu
    print(
        f"audited {rows} rows: pass over the store {pass_s:.1f} s ({rows / pass_s:,.0f} rows/s; "
        f"{pass_cpu:.1f} CPU s of this process, {rows / pass_cpu:,.0f} rows per CPU s)"
    )
    print(
        f"whole audit (+ audit.csv, labels.json, index.html) {total_s:.1f} s ({rows / total_s:,.0f} rows/s; "
        f"{total_cpu:.1f} CPU s, {rows / total_cpu:,.0f} rows per CPU s)"
    )
    print(f"peak anonymous memory {max(peak):,.0f} MiB (chunks of {args.chunk_rows} rows)")


if __name__ == "__main__":
    main()
