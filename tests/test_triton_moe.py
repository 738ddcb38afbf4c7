"""MoE experts routed on the device (exllamav2/ops/triton/moe.py, moe_kernels.py) under the Triton interpreter, in
fp16: the block grouping covers every assignment once with no host sync; the kernels give the eager grouped path's
result (dense experts, and GGUF blocks of several types); a token's result is the same bits alone or in a batch;
a whole model decodes the torch backend's greedy tokens through them; the pre_down hook point still sees and edits
what the down projections read; experts the kernel cannot read are declined and run the other paths."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ops  # noqa: E402
from exllamav2.interventions import AddVector, add_edit  # noqa: E402
from exllamav2.moe_mlp import ExLlamaV2MoEMLP  # noqa: E402
from exllamav2.ops.triton import moe as tmoe  # noqa: E402
from host_sync import SyncTrace, host_syncs  # noqa: E402
from parity import save_hf_model  # noqa: E402
from test_moe import _build  # noqa: E402

F16 = torch.float16


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ops.set_backend(None)
    yield
    ops.set_backend(None)


def _load(name, tmp_path, dtype=F16):
    cfg = ExLlamaV2Config(save_hf_model(_build(name), tmp_path))
    cfg.dtype = dtype
    cfg.max_seq_len = 64
    model = ExLlamaV2(cfg)
    model.load()
    return model


def _moe_layers(model):
    return [m for m in model.modules if isinstance(m, ExLlamaV2MoEMLP)]


@pytest.mark.parametrize("T,k,E,bm", [(1, 2, 8, 16), (3, 2, 5, 16), (40, 4, 6, 16), (7, 3, 60, 4), (5, 1, 1, 2)])
def test_route_blocks_cover_every_assignment_once(T, k, E, bm):
    g = torch.Generator().manual_seed(T * 100 + E)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    with SyncTrace() as trace:
        rows, experts = tmoe.route_blocks(ids, E, bm)
    assert not host_syncs(trace.ops), host_syncs(trace.ops)
    A = T * k
    assert rows.shape == (experts.shape[0] * bm,) and experts.shape[0] == -(-A // bm) + min(E, A)
    flat = ids.reshape(-1)
    seen = []
    for b, e in enumerate(experts.tolist()):
        block = rows[b * bm:(b + 1) * bm].tolist()
        real = [r for r in block if r < A]
        if e < 0:
            assert not real, "a spare block holds assignments"
            continue
        assert real and all(r == A for r in block[len(real):]), "padding must follow a block's assignments"
        assert all(flat[r] == e for r in real), "an assignment in another expert's block"
        seen += real
    assert sorted(seen) == list(range(A))
    # within an expert, assignments keep their order
    for e in range(E):
        mine = [r for r in seen if flat[r] == e]
        assert mine == sorted(mine)


def _routing(moe, T, seed):
    x = torch.randn(T, moe.hidden_size, generator=torch.Generator().manual_seed(seed)).to(F16)
    weights, ids = moe.route(x)
    return x, weights, ids


def _device(moe, x, weights, ids):
    tables = tmoe.expert_tables(moe.w1, moe.w3, moe.w2, moe.act, x.dtype)
    assert not isinstance(tables, str), tables
    return tmoe.grouped_experts(x, weights, ids, tables, moe.act)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_dense_experts_give_the_grouped_paths_result(name, tmp_path):
    model = _load(name, tmp_path)
    moe = _moe_layers(model)[0]
    for T in (1, 5, 37):
        x, weights, ids = _routing(moe, T, T)
        want = moe.forward_grouped(x, weights, ids)
        got = _device(moe, x, weights, ids)
        assert got.dtype == want.dtype and got.shape == want.shape
        # fp16 results of the same fp16 weights summed in another order: within a few units of the last place
        torch.testing.assert_close(got, want, atol=2e-3, rtol=4e-3)
        assert (got != want).float().mean() < 0.2


def test_a_tokens_result_is_the_same_alone_and_batched(tmp_path):
    model = _load("mixtral", tmp_path)
    moe = _moe_layers(model)[0]
    x, weights, ids = _routing(moe, 9, 4)
    batched = _device(moe, x, weights, ids)
    for t in (0, 4, 8):
        alone = _device(moe, x[t:t + 1], weights[t:t + 1], ids[t:t + 1])
        assert torch.equal(alone[0], batched[t]), f"token {t}: its result depends on the other tokens"


def test_the_device_step_makes_no_host_sync(tmp_path):
    model = _load("mixtral", tmp_path)
    moe = _moe_layers(model)[0]
    x, weights, ids = _routing(moe, 3, 1)
    tables = tmoe.expert_tables(moe.w1, moe.w3, moe.w2, moe.act, F16)
    with SyncTrace() as trace:
        tmoe.grouped_experts(x, weights, ids, tables, moe.act)
    assert not host_syncs(trace.ops), host_syncs(trace.ops)


def spy_grouped_device(monkeypatch) -> list:
    """The token count of every call of the device-routed MoE path (moe_mlp.grouped_device), which still runs."""
    calls = []
    real = tmoe.grouped_experts
    monkeypatch.setattr("exllamav2.moe_mlp.grouped_device",
                        lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    return calls


def greedy(model, ids, steps: int, backend, max_seq_len: int = 64) -> torch.Tensor:
    """`steps` greedy tokens per row after the prompt `ids` (rows, length), every op on `backend` (None: the
    normal order, triton first)."""
    with ops.use_backend(backend):
        cache = ExLlamaV2Cache(model, batch_size=ids.shape[0], max_seq_len=max_seq_len)
        logits = model.forward(ids, cache, last_id_only=True)[:, -1]
        out = []
        for _ in range(steps):
            out.append(logits.argmax(-1, keepdim=True))
            logits = model.forward(out[-1], cache)[:, -1]
    return torch.cat(out, 1)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_model_decodes_the_torch_backends_tokens_through_the_device_path(name, tmp_path, monkeypatch):
    model = _load(name, tmp_path)
    calls = spy_grouped_device(monkeypatch)
    ids = torch.randint(0, 131, (2, 7), generator=torch.Generator().manual_seed(2))
    ref = greedy(model, ids, 4, "torch")
    assert not calls
    # triton first: the expert linears take its kernels, so the MoE layers route on the device
    got = greedy(model, ids, 4, None)
    assert torch.equal(got, ref)
    moes = _moe_layers(model)
    # the prompt's 14 rows (the model's last layer on the 2 sampled rows only: model.last_rows_layer), then 4
    # steps of 2 rows
    last = model.config.num_hidden_layers - 1
    prompt = [2 if m.layer_idx == last else 14 for m in moes]
    assert calls == prompt + [2] * (4 * len(moes)), calls
    assert all(m.device_path_declined is None for m in moes)


def test_pre_down_edits_reach_the_down_projections(tmp_path):
    model = _load("mixtral", tmp_path)
    moe = _moe_layers(model)[0]
    i = moe.layer_idx
    ids = torch.randint(0, 131, (1, 6), generator=torch.Generator().manual_seed(9))
    v = torch.zeros(moe.top_k * moe.interm_features)
    v[:moe.interm_features] = torch.randn(moe.interm_features, generator=torch.Generator().manual_seed(1))
    outs = {}
    for backend in ("torch", None):
        with ops.use_backend(backend):
            base = model.forward(ids)
            with add_edit(model, f"blocks.{i}.mlp.pre_down", AddVector(v)):
                edited = model.forward(ids)
        outs[backend] = (base, edited)
    moved = (outs[None][1] - outs[None][0]).float().abs().max()
    assert moved > 0.05, "the edit did not reach the device path's down projections"
    torch.testing.assert_close(outs[None][1], outs["torch"][1], atol=5e-3, rtol=5e-3)


def test_a_pre_down_hook_may_change_the_dtype(tmp_path):
    """A hook at mlp.pre_down that returns fp32 (a capture or edit computing in fp32): the down projections read
    its values in the model's dtype, as the grouped path's linears do."""
    from exllamav2.interventions.hooks import InterventionHook
    model = _load("mixtral", tmp_path)
    moe = _moe_layers(model)[0]
    ids = torch.randint(0, 131, (1, 5), generator=torch.Generator().manual_seed(2))
    outs = {}
    for backend in ("torch", None):
        inner = moe.pre_down_point
        moe.pre_down_point = InterventionHook(inner, None, lambda y, *a, **kw: y.float() * 1.5)
        try:
            with ops.use_backend(backend):
                outs[backend] = model.forward(ids)
        finally:
            moe.pre_down_point = inner
    assert torch.isfinite(outs[None]).all()
    torch.testing.assert_close(outs[None], outs["torch"], atol=5e-3, rtol=5e-3)


def test_gguf_experts_of_several_types(tmp_path):
    """Experts stored as GGUF blocks (one type per projection kind), each expert different, against the torch
    backend's dequantise-then-matmul of the same blocks."""
    from exllamav2.gguf import GGUFFile
    from exllamav2.quant.gguf import GgufWeight
    from test_gguf_support import write_tiny_gguf
    from types import SimpleNamespace
    E, up, down = 3, "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"

    def experts(qtype, name):
        files = [GGUFFile(write_tiny_gguf(str(tmp_path / f"{qtype}{e}.gguf"), qtype=qtype, hidden=256, heads=4,
                                          kv_heads=2, ffn=256, layers=1, seed=11 * e + len(qtype)))
                 for e in range(E)]
        out = []
        for f in files:
            n, k = f.shape(name)
            q = GgufWeight(name, [(f, name, n)], k, n, F16, "cpu", fast_path=False)
            out.append(SimpleNamespace(q=q))
        return out

    def linear(ns, backend):
        with ops.use_backend(backend):
            return ops.prepare_linear(None, None, ns.q, "cpu", F16)

    class Lin:  # what expert_tables asks of an expert linear: its kernel for a dtype
        def __init__(self, ns):
            self.ns = ns

        def kernel(self, dtype):
            return linear(self.ns, "triton")

    for t1, t3, t2 in (("Q4_0", "Q8_0", "Q4_K"), ("Q6_K", "Q4_1", "Q5_K"), ("Q5_0", "Q5_1", "Q6_K"),
                       ("Q2_K", "IQ4_NL", "IQ4_XS"), ("Q3_K", "IQ4_XS", "Q2_K")):
        w1, w3, w2 = experts(t1, up), experts(t3, up), experts(t2, down)
        tables = tmoe.expert_tables([Lin(n) for n in w1], [Lin(n) for n in w3], [Lin(n) for n in w2],
                                    torch.nn.functional.silu, F16)
        assert not isinstance(tables, str), tables
        g = torch.Generator().manual_seed(5)
        x = (torch.randn(4, 256, generator=g) * 0.5).to(F16)
        ids = torch.tensor([[0, 2], [1, 0], [2, 1], [2, 0]])
        weights = torch.rand(4, 2, generator=g)
        got = tmoe.grouped_experts(x, weights, ids, tables, torch.nn.functional.silu)
        want = torch.zeros_like(x)
        for t in range(4):
            for j in sorted(range(2), key=lambda j: int(ids[t, j])):
                e = int(ids[t, j])
                xt = x[t:t + 1]
                a = torch.nn.functional.silu(linear(w1[e], "torch")(xt)) * linear(w3[e], "torch")(xt)
                want[t] += (linear(w2[e], "torch")(a) * weights[t, j]).to(F16)[0]
        torch.testing.assert_close(got, want, atol=3e-3, rtol=5e-3)


def test_experts_the_kernel_cannot_read_are_declined(tmp_path, monkeypatch):
    """A layer whose expert linears run another backend is declined with a reason and runs the grouped path; an
    activation the kernel lacks is declined too."""
    model = _load("mixtral", tmp_path)
    moe = _moe_layers(model)[0]
    why = tmoe.expert_tables(moe.w1, moe.w3, moe.w2, lambda t: t, F16)
    assert isinstance(why, str) and "activation" in why
    with ops.use_backend("torch"):
        why = tmoe.expert_tables(moe.w1, moe.w3, moe.w2, moe.act, F16)
    assert isinstance(why, str) and "another backend" in why
    # an expert whose forward was replaced by hand runs through it: the layer keeps the grouped path
    x = torch.randn(3, moe.hidden_size).to(F16)
    assert moe._device_tables(x) is not None
    # an expert wrapped in an Intervention runs through the wrapper: the layer leaves the device path, and comes
    # back when the wrapper is gone
    from exllamav2 import Intervention
    inner = moe.w2[0]
    moe.w2[0] = Intervention(inner, None, lambda y, *a, **kw: y * 2)
    assert moe._device_tables(x) is None and "wrapped" in moe.device_path_declined
    moe.w2[0] = inner
    assert moe._device_tables(x) is not None


def _quantized_experts_folder(name, tmp_path, fmt):
    """The tiny model with every expert linear in EXL2 (random codes, each expert its own mix of widths and group
    sizes, so the experts' group tables and K tiles differ, and a random q_perm) or GPTQ (RTN, 4 bits in groups of
    8, one grouping for every expert, as a GPTQ file has)."""
    import os
    from safetensors.torch import load_file, save_file
    from exllamav2.quant import gptq_quantize
    from exllamav2.quant.exl2 import exl2_pack
    path = save_hf_model(_build(name), tmp_path)
    st = os.path.join(path, "model.safetensors")
    sd = load_file(st)
    g = torch.Generator().manual_seed(8)
    layouts = {48: [[(6, 16), (4, 32)], [(5, 32), (3, 16)], [(8, 16), (4, 16), (2, 16)]],
               24: [[(4, 16), (3, 8)], [(8, 8), (4, 8), (3, 8)]]}
    for i, key in enumerate(sorted(n[:-len(".weight")] for n in sd if ".experts." in n)):
        w = sd.pop(key + ".weight")
        n, k = w.shape
        if fmt == "gptq":
            t = gptq_quantize(w.float(), group_size=8, sym=False)
        else:
            groups = layouts[k][i % len(layouts[k])]
            codes = torch.cat([torch.randint(0, 1 << b, (r, n), generator=g) for b, r in groups])
            t = exl2_pack(codes, groups, torch.randint(4, 16, (len(groups), n), generator=g),
                          torch.full((len(groups),), float(w.abs().amax()) / 24).half(), torch.randperm(k, generator=g))
        sd.update({f"{key}.{s}": v.contiguous() for s, v in t.items()})
    save_file(sd, st)
    if fmt == "gptq":
        import json
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 8}
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg, f)
    return path


@pytest.mark.parametrize("fmt,kernel", [("exl2", "Exl2Kernel"), ("gptq", "GptqKernel")])
def test_quantized_experts_route_on_the_device(fmt, kernel, tmp_path, monkeypatch):
    """EXL2 experts (each with its own groups) and GPTQ experts: the kernels against the grouped path (the
    experts' own linears), a token alone against the batch, and greedy decoding equal to the torch backend's."""
    cfg = ExLlamaV2Config(_quantized_experts_folder("qwen3_moe", tmp_path, fmt))
    cfg.dtype = F16
    cfg.max_seq_len = 64
    model = ExLlamaV2(cfg)
    model.load()
    moe = _moe_layers(model)[0]
    assert moe.w1[0].is_quant() and type(moe.w1[0].kernel(F16)).__name__ == kernel
    x, weights, ids = _routing(moe, 6, 3)
    got = _device(moe, x, weights, ids)
    torch.testing.assert_close(got, moe.forward_grouped(x, weights, ids), atol=3e-3, rtol=5e-3)
    assert torch.equal(_device(moe, x[2:3], weights[2:3], ids[2:3])[0], got[2])

    calls = spy_grouped_device(monkeypatch)
    prompt = torch.randint(0, 131, (1, 6), generator=torch.Generator().manual_seed(4))
    ref = greedy(model, prompt, 4, "torch")
    assert not calls
    assert torch.equal(greedy(model, prompt, 4, None), ref)
    assert calls


def test_graphed_decode_step_routes_moe_on_the_device(tmp_path, monkeypatch):
    """The GPU decode step's static buffers (runtime/cuda_graphs.py, run eagerly on the CPU here) with every op on
    the triton backend: the MoE layers take the device-routed kernels with no host sync in the step once its
    first run built their tables, and each row gets the torch backend's tokens (3 sequences in the 4-row bucket,
    the spare row copying the first)."""
    from exllamav2.runtime.cuda_graphs import GraphedDecode
    from exllamav2.runtime.paged_decode import paged_decode_step
    model = _load("mixtral", tmp_path)
    ps, pages, b = 8, 12, 3
    g = torch.Generator().manual_seed(3)
    steps = []
    for _ in range(3):
        table = torch.randperm(pages, generator=g)[:b * 4].view(b, 4)
        steps.append((torch.randint(0, 131, (1, b), generator=g), table, torch.randint(1, 30, (b,), generator=g)))
    cache = ExLlamaV2Cache(model, 1, ps * pages)
    with torch.inference_mode():
        for kc, vc in zip(cache.key_states, cache.value_states):  # a random K/V history
            kc.copy_(torch.randn(kc.shape, generator=g).to(kc.dtype))
            vc.copy_(torch.randn(vc.shape, generator=g).to(vc.dtype))
        ref_cache = ExLlamaV2Cache(model, 1, ps * pages)
        for c, r in zip(cache.key_states + cache.value_states, ref_cache.key_states + ref_cache.value_states):
            r.copy_(c)
        with ops.use_backend("torch"):
            want = [paged_decode_step(model, ids, ref_cache, torch.cat((table, torch.zeros(b, pages - 4,
                                      dtype=torch.long)), 1), past, ps, ref_cache.max_seq_len)
                    for ids, table, past in steps]
        calls = []
        real = tmoe.grouped_experts
        monkeypatch.setattr("exllamav2.moe_mlp.grouped_device",
                            lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
        graphs = GraphedDecode(model, progress=False)
        for i, (ids, table, past) in enumerate(steps):
            with SyncTrace() as trace:
                got = graphs(cache, ids, table, past, ps)
            if i > 0:
                assert not host_syncs(trace.ops), host_syncs(trace.ops)
            torch.testing.assert_close(got.float(), want[i].float(), atol=5e-3, rtol=5e-3)
            assert torch.equal(got.argmax(-1), want[i].argmax(-1))
    assert calls == [4] * (3 * len(_moe_layers(model))), calls


def test_graph_warm_up_takes_the_captures_path(tmp_path):
    """Inside runtime.graph_step.graph_step() (a capture's warm-up) a step of more than DENSE_ROWS tokens routes on
    the device as the capture will; outside it, such a step takes the grouped path's matmuls."""
    from exllamav2.ops.triton import linear as tl_linear
    from exllamav2.runtime.graph_step import graph_step
    model = _load("mixtral", tmp_path)
    moe = _moe_layers(model)[0]
    x = torch.randn(tl_linear.DENSE_ROWS + 1, moe.hidden_size).to(F16)
    assert moe._device_tables(x[:2]) is not None
    assert moe._device_tables(x) is None
    with graph_step():
        assert moe._device_tables(x) is not None
    assert moe._device_tables(x) is None


def test_aligned_dense_experts_promise_vector_loads_and_compute_the_same():
    """Experts whose rows start 64-byte aligned take the kernels' aligned variant (moe.py checks the promise it
    makes the compiler: misaligned experts must not get it), with the grouped computation's results."""
    import torch.nn.functional as F
    from exllamav2.ops.triton.linear import DenseKernel

    class Lin:
        def __init__(self, w):
            self.k = DenseKernel(w, None)

        def kernel(self, dtype):
            return self.k

    g = torch.Generator().manual_seed(4)
    H, I, E = 64, 96, 4
    w1, w3 = ([torch.randn(I, H, generator=g).to(F16) * 0.1 for _ in range(E)] for _ in range(2))
    w2 = [torch.randn(H, I, generator=g).to(F16) * 0.1 for _ in range(E)]
    tables = tmoe.expert_tables(*([Lin(w) for w in ws] for ws in (w1, w3, w2)), F.silu, F16)
    # torch allocates 64-byte aligned; rows of 64 and 96 halves are whole multiples of 64 bytes
    assert all(t.aligned for t in tables)
    x = torch.randn(5, H, generator=g).to(F16)
    weights, ids = torch.topk(torch.softmax(torch.randn(5, E, generator=g), -1), 2)
    got = tmoe.grouped_experts(x, weights, ids, tables, F.silu)
    want = torch.zeros_like(x)
    for t in range(5):
        for j in sorted(range(2), key=lambda j: int(ids[t, j])):
            e = int(ids[t, j])
            a = F.silu(F.linear(x[t:t + 1], w1[e])) * F.linear(x[t:t + 1], w3[e])
            want[t] += (F.linear(a, w2[e]) * weights[t, j]).to(F16)[0]
    torch.testing.assert_close(got, want, atol=2e-3, rtol=4e-3)
    # a misaligned view (one element in) is not promised anything
    buf = torch.zeros(I * H + 1, dtype=F16)
    odd = buf[1:].view(I, H)
    t = tmoe.ExpertTables([DenseKernel(odd, None)] * E, "w1")
    assert not t.aligned


def test_gptq_experts_with_and_without_act_order_share_the_kernel():
    """GPTQ experts of one projection, some in row order (scales read a row per tile) and some act-order (each
    row's group looked up): all run the looked-up variant, against each expert's own GPTQ linear."""
    import torch.nn.functional as F
    from exllamav2.quant import gptq_quantize, make_quant_weight

    g = torch.Generator().manual_seed(6)
    H, I, E = 128, 64, 3

    def expert(n, k, act_order):
        w = torch.randn(n, k, generator=g) * 0.1
        hess = torch.eye(k) + torch.diag(torch.rand(k, generator=g)) if act_order else None
        t = gptq_quantize(w, group_size=64, sym=False, act_order=act_order, hessian=hess)
        q = make_quant_weight(f"e{n}x{k}", t, k, n, F16, "cpu")
        with ops.use_backend("triton"):
            fast = ops.prepare_linear(None, None, q, "cpu", F16)
        with ops.use_backend("torch"):
            ref = ops.prepare_linear(None, None, q, "cpu", F16)
        return fast, ref

    class Lin:
        def __init__(self, k):
            self.k = k

        def kernel(self, dtype):
            return self.k

    w1, w3, w2 = ([expert(n, k, e == 1) for e in range(E)] for n, k in ((I, H), (I, H), (H, I)))
    assert [k.seq_groups for k, _ in w1] == [True, False, True]
    tables = tmoe.expert_tables(*([Lin(f) for f, _ in ws] for ws in (w1, w3, w2)), F.silu, F16)
    assert not isinstance(tables, str), tables
    x = (torch.randn(4, H, generator=g) * 0.5).to(F16)
    ids = torch.tensor([[1, 0], [2, 1], [0, 2], [1, 2]])
    weights = torch.rand(4, 2, generator=g)
    got = tmoe.grouped_experts(x, weights, ids, tables, F.silu)
    want = torch.zeros_like(x)
    for t in range(4):
        for j in sorted(range(2), key=lambda j: int(ids[t, j])):
            e = int(ids[t, j])
            a = F.silu(w1[e][1](x[t:t + 1])) * w3[e][1](x[t:t + 1])
            want[t] += (w2[e][1](a) * weights[t, j]).to(F16)[0]
    torch.testing.assert_close(got, want, atol=3e-3, rtol=5e-3)


def test_a_changed_expert_weight_is_seen(tmp_path):
    """Setting an expert linear's weight drops its kernels (ExLlamaV2Linear.weights_changed): the layer's expert
    tables are rebuilt, and the device path computes with the new weight."""
    model = _load("mixtral", tmp_path)
    moe = _moe_layers(model)[0]
    x, weights, ids = _routing(moe, 4, 8)
    before = moe._device_tables(x)
    assert before is not None
    for lin in moe.w2:
        lin.weight = torch.zeros_like(lin.weight)
    after = moe._device_tables(x)
    assert after is not None and after is not before
    assert torch.equal(tmoe.grouped_experts(x, weights, ids, after, moe.act), torch.zeros_like(x))
