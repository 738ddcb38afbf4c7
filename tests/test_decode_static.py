"""The decode steps keep nothing on the host (the shape a CUDA-graph capture needs, exllamav2/runtime/):

- the paged decode step (runtime/paged_decode.py, what the dynamic generator compiles) runs the same ops on the
  same shapes step after step, whatever the sequences' lengths and pages, and syncs with the host only inside the
  one attention op that the GPU backend replaces with a kernel;
- the contiguous decode step (runtime/decode.py) never syncs with the host.

What counts as a host sync: tests/host_sync.py."""

from __future__ import annotations

import torch

from exllamav2 import ExLlamaV2Cache
from exllamav2.runtime.decode import DecodeRunner
from exllamav2.runtime.paged_decode import paged_decode_step

from host_sync import SyncTrace as Trace
from host_sync import host_syncs as syncs


def test_paged_decode_step_is_static_and_sync_free(tmp_path):
    from test_dynamic_tiny import build_tiny_dir, load_tiny
    model, _ = load_tiny(build_tiny_dir(tmp_path, sliding_window=6), "bfloat16")
    ps, b, pages = 4, 3, 48
    cache = ExLlamaV2Cache(model, 1, ps * pages)
    g = torch.Generator().manual_seed(0)
    traces = []
    with torch.inference_mode():
        for step in range(4):  # other lengths and other pages every step
            past = torch.randint(1, 40, (b,), generator=g)
            table = torch.randperm(pages, generator=g)[:b * 12].view(b, 12)
            table = torch.cat((table, torch.zeros(b, pages - 12, dtype=torch.long)), 1)
            ids = torch.randint(0, 1000, (1, b), generator=g)
            with Trace() as t:
                logits = paged_decode_step(model, ids, cache, table, past, ps, ps * pages)
            assert logits.shape == (b, model.config.vocab_size) and torch.isfinite(logits).all()
            traces.append(t.ops)
    # the first step builds the rotary tables (once per model, as any warm-up before a graph capture would)
    assert traces[1] == traces[2] == traces[3], "the step's ops or shapes changed between steps"
    assert not syncs(traces[1]), f"host syncs in the paged decode step: {syncs(traces[1])}"
    # attention: one op per layer (on the CPU the C++ op for every sequence, elsewhere the Python custom op)
    assert sum(name.startswith(("exllamav2.paged_decode_attention", "exllamav2_cpu.paged_decode_attention"))
               for name, _ in traces[1]) == model.config.num_hidden_layers


def test_contiguous_decode_step_never_syncs(tmp_path):
    from test_dynamic_tiny import build_tiny_dir, load_tiny
    model, _ = load_tiny(build_tiny_dir(tmp_path), "bfloat16")
    cache = ExLlamaV2Cache(model, 2, 64)
    model.forward(torch.randint(0, 1000, (2, 5)), cache)
    runner = DecodeRunner(model, compile=False)
    names = []
    with torch.inference_mode():
        for _ in range(4):
            ids = torch.randint(0, 1000, (2, 1))
            with Trace() as t:
                runner(ids, cache)
            assert not syncs(t.ops), f"host syncs in the decode step: {syncs(t.ops)}"
            names.append([n for n, _ in t.ops])
    # after the first step (which allocates the runner's input buffer) every step runs the same ops
    assert names[1] == names[2] == names[3]
    assert cache.current_seq_len == 9
