"""Every Triton kernel compiled ahead of time for sm_90 (H100/H200), sm_89 (RTX 4090) and sm_86 (RTX 3090) with
Triton's own compiler, no GPU needed: it catches what the interpreter lets through (a tl.dot dimension below 16,
tiles whose shared memory a GPU would refuse to launch).

Kernels come from a registry: every module in exllamav2/ops/triton/ that declares `AOT_SPECS` (a list of
{"kernel", "signature", "constexprs", optional "options": {num_warps, num_stages}, optional "aot_default"}; see
exllamav2/ops/triton/__init__.py::kernel_modules). The default suite compiles the specs a module marks
"aot_default" (else each kernel's first spec) for sm_86 (the tightest shared-memory limit, 99 KB a block) and sm_90
(the H200 the bench runs on); `pytest -m slow` compiles every spec for all three."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from exllamav2.ops.triton import kernel_modules, kernels  # noqa: E402

# The most shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin), bytes.
SHARED_PER_BLOCK = {90: 227 * 1024, 89: 99 * 1024, 86: 99 * 1024}
DEFAULT_ARCHS = (86, 90)


def _cases():
    cases = []
    for name in kernel_modules():
        try:
            specs = kernels(name, interpret=False).AOT_SPECS
        except Exception as e:  # a module that does not import fails its own case, not the collection
            cases.append(pytest.param(name, -1, 90, id=f"{name}-import", marks=pytest.mark.xfail(
                reason=f"import failed: {e!r}", strict=True)))
            continue
        chosen = {s["kernel"] for s in specs if s.get("aot_default")}
        seen = set()
        for i, spec in enumerate(specs):
            # the default suite: the specs a module marks "aot_default", else each kernel's first spec
            default = spec.get("aot_default") if spec["kernel"] in chosen else spec["kernel"] not in seen
            seen.add(spec["kernel"])
            for cc in (90, 89, 86):
                marks = () if default and cc in DEFAULT_ARCHS else (pytest.mark.slow,)
                cases.append(pytest.param(name, i, cc, id=f"{name}-{i}-{spec['kernel']}-sm{cc}", marks=marks))
    return cases


@pytest.mark.parametrize("module,index,cc", _cases())
def test_kernel_compiles_for_the_gpu(module, index, cc, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    mod = kernels(module, interpret=False)
    spec = mod.AOT_SPECS[index]
    fn = getattr(mod, spec["kernel"])
    options = dict(spec.get("options", {}))
    compiled = triton.compile(ASTSource(fn, spec["signature"], spec["constexprs"]),
                              target=GPUTarget("cuda", cc, 32), options=options)
    assert compiled.asm.get("cubin"), f"{module}.{spec['kernel']}: no cubin for sm_{cc}"
    shared = compiled.metadata.shared
    assert shared <= SHARED_PER_BLOCK[cc], (
        f"{module}.{spec['kernel']} {spec['constexprs']} needs {shared} bytes of shared memory, sm_{cc} allows "
        f"{SHARED_PER_BLOCK[cc]} a block")
    if "num_warps" in options:
        assert compiled.metadata.num_warps == options["num_warps"]


def test_every_linear_kernel_is_registered():
    """The kernels the linear backend launches are all in the AOT registry."""
    names = set(kernel_modules())
    assert {"exl2_kernels", "gptq_kernels", "linear_kernels"} <= names
    for module, launched in (("exl2_kernels", "exl2_matmul"), ("gptq_kernels", "gptq_matmul")):
        specs = [s for s in kernels(module, interpret=False).AOT_SPECS if s["kernel"] == launched]
        assert {s["constexprs"]["DEQUANT"] for s in specs} == {False, True}        # both modes
        assert {s["signature"]["x_ptr"] for s in specs} == {"*fp16", "*bf16"}      # both activation types
    assert "splitk_reduce" in {s["kernel"] for s in kernels("linear_kernels", interpret=False).AOT_SPECS}
    # each EXL2 BLOCK_K the kernel may pick is compiled
    mod = kernels("exl2_kernels", interpret=False)
    assert {s["constexprs"]["BLOCK_K"] for s in mod.AOT_SPECS} == set(mod.BLOCK_K_CHOICES)
