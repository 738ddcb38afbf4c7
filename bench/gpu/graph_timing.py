"""How the GPU benches time one call (bench_attention.py, bench_moe.py): median seconds per call after a warm-up."""

from __future__ import annotations

import statistics
import time


def median_seconds(fn, reps: int, cpu: bool, capture: bool | str = True) -> tuple[float, str]:
    """(median seconds per call, mark). On a GPU the call is captured once as a CUDA graph and replayed (kernel
    time, as the graph-captured decode step sees it): `capture=True` requires that, "try" falls back to eager calls
    when the capture fails, False times eager calls (a path known to sync with the host: a failed capture can leave
    the stream unusable); eager timings are marked "*". With `cpu` (Triton's interpreter): wall-clock per call."""
    fn()  # warm-up: compiles the kernels on a GPU, builds per-call metadata
    if cpu:
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts), ""
    import torch
    torch.cuda.synchronize()
    run, mark = fn, "*"
    if capture:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            run, mark = graph.replay, ""
        except Exception:  # noqa: BLE001  (a host sync inside fn)
            if capture != "try":
                raise
            torch.cuda.synchronize()
    run()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1000)
    return statistics.median(ts), mark
