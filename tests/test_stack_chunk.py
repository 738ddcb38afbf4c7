"""runtime/stack_chunk.py: a loop of Python calls that crosses a CPython stack-chunk boundary maps a chunk in and out
on every call (page faults each time); under `fresh_stack_chunk` it never does, from any caller's depth. Page faults
are read from getrusage (Linux counts minor faults per process)."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from exllamav2.runtime import stack_chunk
from exllamav2.runtime.stack_chunk import fresh_stack_chunk

pytestmark = pytest.mark.skipif(not stack_chunk.NEEDED or not sys.platform.startswith("linux"),
                                reason="CPython 3.14+ keeps a spare chunk; minor-fault counts are read on Linux")

# Depths scanned: one 16 KiB chunk is a little over 130 frames of at_depth below, so every boundary position is met.
DEPTHS = range(0, 300)


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def at_depth(d: int, fn):
    return fn() if d == 0 else at_depth(d - 1, fn)


def worst_faults_per_call(fn, calls: int = 4, rounds: int = 3) -> float:
    """The most page faults per call of fn() over every caller depth in DEPTHS.

    At each depth the fewest of `rounds` measurements counts: chunk thrash repeats at its depth every time, while
    a fault from elsewhere (the allocator growing its heap, another thread of the test run) comes once and would
    otherwise decide the maximum over 300 depths."""
    worst = 0.0
    for d in DEPTHS:
        def run():
            fn()  # warm: the first call may fault for other reasons
            best = float("inf")
            for _ in range(rounds):
                f0 = faults()
                for _ in range(calls):
                    fn()
                best = min(best, (faults() - f0) / calls)
            return best
        worst = max(worst, at_depth(d, run))
    return worst


def leaf(x):
    return x + 1


def hot_loop():
    """A decode step's shape: one frame calling many small functions."""
    x = 0
    for _ in range(200):
        x = leaf(x)
    return x


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="3.13's later releases keep a spare chunk too (gh-142183)")
def test_a_loop_on_a_chunk_boundary_faults_on_every_inner_call():
    # the phenomenon the decorator exists for, on this interpreter: at some depth each leaf() call opens a chunk
    assert worst_faults_per_call(hot_loop) >= 100


def test_fresh_stack_chunk_keeps_the_loop_in_one_chunk_at_every_depth():
    assert worst_faults_per_call(fresh_stack_chunk(hot_loop)) <= 8  # the chunk it opens: ~3 pages a call


def test_nested_anchors_run_directly_and_results_pass_through():
    inner = fresh_stack_chunk(lambda a, b=2: (a, b))
    outer = fresh_stack_chunk(lambda: inner(1, b=3))
    assert outer() == (1, 3)
    assert worst_faults_per_call(fresh_stack_chunk(lambda: [hot_loop() for _ in range(2)])) <= 8

    def boom():
        raise ValueError("x")
    with pytest.raises(ValueError):
        fresh_stack_chunk(boom)()
    assert not getattr(stack_chunk._local, "inside", False), "an exception must not leave the flag set"


def test_model_forward_is_anchored(tmp_path):
    from test_dynamic_tiny import build_tiny_dir, load_tiny
    from exllamav2 import ExLlamaV2Cache

    model, _ = load_tiny(build_tiny_dir(tmp_path / "m"))
    cache = ExLlamaV2Cache(model, batch_size=1, max_seq_len=512)
    ids = torch.tensor([[5, 6, 7, 8]])
    tok = torch.tensor([[9]])

    def step(forward):
        def run():
            if cache.current_seq_len > 400:
                cache.current_seq_len = 0
                forward(model, ids, cache)
            return forward(model, tok, cache)
        return run

    model.forward(ids, cache)
    plain = worst_faults_per_call(step(type(model).forward.__wrapped__), calls=2)
    anchored = worst_faults_per_call(step(type(model).forward), calls=2)
    assert anchored <= 8, anchored
    if sys.version_info < (3, 13):  # 3.13's later releases keep a spare chunk too (gh-142183)
        assert plain > anchored + 10, (plain, anchored)  # the eager forward thrashes at some depth without it
