"""A paged sequence's attention rows do not depend on how its prompt was cut into chunks (the dynamic generator
cuts prompts by a step budget shared with the other jobs): ops/torch_ref/attention.attend_sequence sends queries in
blocks aligned on absolute positions, so each row sees the same keys through the same kernel either way."""

from __future__ import annotations

import pytest
import torch

from exllamav2.ops import dispatch
from exllamav2.ops.cpu import attention as cpu_attention
from exllamav2.ops.torch_ref.attention import attend_sequence, window_mask


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("window", [0, 20])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rows_equal_whatever_the_chunking(backend, window, dtype):
    g = torch.Generator().manual_seed(0)
    hq, hk, d, kv_len, q_len = 6, 2, 64, 75, 50
    kflat = torch.randn(128, hk, d, generator=g).to(dtype)
    vflat = torch.randn(128, hk, d, generator=g).to(dtype)
    q = torch.randn(1, hq, q_len, d, generator=g).to(dtype)
    first = kv_len - q_len

    def run(a, b):  # rows [a, b) of the prompt as one chunk, keys up to its last row
        n = first + b
        return attend_sequence(q[:, :, a:b], kflat, vflat, n, 3, None, window_mask(n, b - a, window, "cpu"),
                               0.125, 0.0)

    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    with dispatch.use_backend(None if backend == "auto" else backend):
        kernel = backend == "auto" and cpu_attention.takes(q[:, :, :1], kflat[:1, None], kflat[:1, None], None, 0.0)
        whole = run(0, q_len)
        for cuts in ([0, 13, q_len], [0, 1, 2, 31, q_len], [0, 16, 17, q_len]):
            parts = torch.cat([run(a, b) for a, b in zip(cuts, cuts[1:])], 1)
            if kernel:  # the C++ kernel: bit for bit
                assert torch.equal(parts, whole), cuts
            else:  # torch's SDPA: its rows round with the call's shape
                assert torch.allclose(parts.float(), whole.float(), atol=tol, rtol=tol), cuts
        # and against plain attention over each row's own keys (fp32 math), so the blocks drop no key
        ref = []
        for i in range(q_len):
            pos = first + i
            keys = torch.arange(pos + 1)
            keep = keys > pos - window if window else torch.ones_like(keys, dtype=torch.bool)
            ks = kflat[3:3 + pos + 1].float()[keep]
            vs = vflat[3:3 + pos + 1].float()[keep]
            qi = q[0, :, i].float()
            kk = ks.repeat_interleave(hq // hk, 1).transpose(0, 1)  # (hq, t, d)
            vv = vs.repeat_interleave(hq // hk, 1).transpose(0, 1)
            p = torch.softmax((kk @ qi.unsqueeze(-1)).squeeze(-1) * 0.125, -1)
            ref.append((p.unsqueeze(1) @ vv).squeeze(1))
        ref = torch.stack(ref)  # (q_len, hq, d)
        assert torch.allclose(whole[0].float(), ref, atol=tol, rtol=tol)
