"""End to end on real models from their GGUF files, with HF transformers (loading the same GGUF, fp32) as the
oracle: logits, greedy generations through both generators, and perplexity of tests/data/ppl_text.txt.

Both models and the perplexity checks run in the default suite (about 2-3 minutes together on 2 idle cores).
The Gemma tests skip only while the engine does not register Gemma3ForCausalLM."""

from __future__ import annotations

import os

import pytest
import torch

from exllamav2.architecture import supported_architectures
from exllamav2.cache import ExLlamaV2Cache
from exllamav2.config import ExLlamaV2Config
from exllamav2.generator import ExLlamaV2BaseGenerator, ExLlamaV2Sampler, ExLlamaV2StreamingGenerator
from exllamav2.model import ExLlamaV2
from exllamav2.perplexity import model_logits_fn, perplexity
from exllamav2.tokenizer import ExLlamaV2Tokenizer

PPL_TEXT = os.path.join(os.path.dirname(__file__), "data", "ppl_text.txt")
GREEDY_TOKENS = 64
PROMPT = [{"role": "user", "content": "Name three things a lighthouse keeper does every day, briefly."}]


class Loaded:
    def __init__(self, path: str, arch: str):
        self.path = path
        self.config = ExLlamaV2Config(path)
        if self.config.architecture != arch:
            raise AssertionError(f"{path}: expected architecture {arch}, got {self.config.architecture}")
        self.config.dtype = torch.float32
        self.config.max_seq_len = 2048
        self.config.max_input_len = 2048
        self.model = ExLlamaV2(self.config)
        self.model.load()
        self.tokenizer = ExLlamaV2Tokenizer(self.config)
        self.cache = ExLlamaV2Cache(self.model, max_seq_len=256)
        self.requires_bos = bool(self.config.arch.lm.requires_bos)
        self._hf = None
        self._greedy: dict = {}

    @property
    def hf(self):
        if self._hf is None:
            import transformers  # a test dependency (with accelerate, which its GGUF loader needs)
            self._hf = transformers.AutoModelForCausalLM.from_pretrained(
                os.path.dirname(self.path), gguf_file=os.path.basename(self.path), dtype=torch.float32).eval()
        return self._hf

    def chat_text(self) -> tuple[str, bool]:
        """The chat-formatted prompt, and whether BOS must be added in front of it."""
        from exllamav2.tokenizer.chat_template import ChatTemplateError
        try:
            text = self.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)
        except ChatTemplateError:  # base models (Gemma-3-270M) ship no template: a plain transcript
            text = ("The following is a conversation between a curious visitor and the keeper of a lighthouse.\n"
                    f"Visitor: {PROMPT[0]['content']}\nKeeper:")
        return text, self.requires_bos and not text.startswith(self.tokenizer.bos_token)

    def chat_ids(self) -> torch.Tensor:
        text, add_bos = self.chat_text()
        return self.tokenizer.encode(text, add_bos=add_bos, encode_special_tokens=True)

    def hf_greedy(self, ids: torch.Tensor, n: int) -> list[int]:
        key = (tuple(ids[0].tolist()), n)
        if key not in self._greedy:
            self._greedy[key] = self._hf_generate(ids, n)
        return self._greedy[key]

    def _hf_generate(self, ids: torch.Tensor, n: int) -> list[int]:
        with torch.inference_mode():
            out = self.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                   eos_token_id=None, pad_token_id=self.tokenizer.pad_token_id,
                                   top_k=None, top_p=None, temperature=None)
        return out[0, ids.shape[-1]:].tolist()


def _require_arch(arch: str) -> None:
    assert arch in supported_architectures(), f"{arch} is not registered"


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return Loaded(smollm2_gguf, "LlamaForCausalLM")


@pytest.fixture(scope="module")
def gemma3():
    _require_arch("Gemma3ForCausalLM")
    from exllamav2.default_models import gemma3_gguf_path
    return Loaded(gemma3_gguf_path(), "Gemma3ForCausalLM")


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def real(request):
    return request.getfixturevalue(request.param)


# --- the checks, shared by both models ------------------------------------------------------------------------

def test_loads_from_gguf(real):
    assert real.model.loaded and real.config.gguf_path
    ids = real.chat_ids()
    assert 30 <= ids.shape[-1] <= 80
    logits = real.model.forward(ids)
    assert logits.shape == (1, ids.shape[-1], real.config.vocab_size) and torch.isfinite(logits).all()


def test_logits_match_hf(real):
    ids = real.chat_ids()
    ours = real.model.forward(ids)
    with torch.inference_mode():
        ref = real.hf(ids).logits.float()
    # fp32 on both sides; the difference of two valid summation orders grows with the logits' size (max |logit|
    # ~38 for SmolLM2, ~28 for Gemma 3), so the bound is relative to it: 1e-4 x max(1, max |ref|)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4 * max(1.0, ref.abs().max().item()))


def test_greedy_streaming_matches_hf(real):
    ids = real.chat_ids()
    expected = real.hf_greedy(ids, GREEDY_TOKENS)
    gen = ExLlamaV2StreamingGenerator(real.model, real.cache, real.tokenizer)
    gen.set_stop_conditions([])  # HF ran without stopping at EOS
    gen.begin_stream_ex(ids, ExLlamaV2Sampler.Settings.greedy(), max_new_tokens=GREEDY_TOKENS)
    tokens = []
    while True:
        r = gen.stream_ex()
        tokens += r["chunk_token_ids"][0].tolist()
        if r["eos"]:
            break
    assert r["eos_reason"] == "max_new_tokens"
    assert tokens == expected


def test_greedy_base_generator_matches_hf(real):
    ids = real.chat_ids()
    expected = real.hf_greedy(ids, GREEDY_TOKENS)
    gen = ExLlamaV2BaseGenerator(real.model, real.cache, real.tokenizer)
    text, add_bos = real.chat_text()
    out = gen.generate_simple(text, ExLlamaV2Sampler.Settings.greedy(), GREEDY_TOKENS, encode_special_tokens=True,
                              stop_token=None, completion_only=True, add_bos=add_bos)
    assert gen.sequence_ids[0, :ids.shape[-1]].tolist() == ids[0].tolist()
    assert gen.sequence_ids[0, ids.shape[-1]:].tolist() == expected
    assert out == real.tokenizer.decode(torch.tensor(expected))


def test_perplexity_matches_hf(real):
    with open(PPL_TEXT, encoding="utf-8") as f:
        ids = real.tokenizer.encode(f.read())[0]
    assert ids.shape[0] >= 2000
    bos = real.tokenizer.bos_token_id if real.requires_bos else None

    def hf_logits(window):
        with torch.inference_mode():
            return real.hf(window).logits

    ours = perplexity(model_logits_fn(real.model), ids, length=1024, stride=512, bos_token_id=bos)
    real.fp32_perplexity = ours   # for the bf16 check below
    ref = perplexity(hf_logits, ids, length=1024, stride=512, bos_token_id=bos)
    assert ours.scored_tokens == ref.scored_tokens >= 2000
    assert 1.0 < ref.perplexity < 100.0  # the model reads English prose, not noise
    assert abs(ours.perplexity / ref.perplexity - 1.0) < 0.005


# --- the model in its default dtype (bf16) on the CPU's packed kernels, against the same fp32 oracle -------------

def test_bf16_model_runs_every_linear_packed_and_tracks_the_fp32_oracle(real):
    """A bf16 load runs every linear through the CPU's C++ GEMV on the file's own blocks (a Q4_K_M file mixes
    Q4_K, Q5_0, Q6_K and Q8_0), holds no dense copy, and its logits stay near HF's fp32 ones: bf16 activations
    round each dot product to 2^-8 relative, so the bound is on the whole logit tensor's relative error (measured
    0.029 SmolLM2, 0.007 Gemma 3) and the top-1 agreement (1.00 and 0.94). Gemma's fp32 residual stream once handed
    its q/k/v fp32 activations, and prefill failed on the query/value dtype mismatch."""
    from exllamav2.ops.cpu import kernels
    from exllamav2.ops.cpu.gemv_linear import GgufGemvKernel
    config = ExLlamaV2Config(real.path)
    config.max_seq_len = config.max_input_len = 2048
    model = ExLlamaV2(config)
    model.load()
    assert model.dtype == torch.bfloat16
    ids = real.chat_ids()
    logits = model.forward(ids).float()
    with torch.inference_mode():
        ref = real.hf(ids).logits.float()
    assert ((logits - ref).norm() / ref.norm()).item() < 0.05
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.85
    if kernels.ready():   # without a compiler the fallback runs (tests/test_cpu_kernels_build.py); the rest holds
        linears = [v for mod in model.modules for v in (mod, *vars(mod).values()) if hasattr(v, "_kernels")]
        prepared = [k for lin in linears for k in lin._kernels.values() if k is not False]
        assert prepared and all(isinstance(k, GgufGemvKernel) for k in prepared), {type(k).__name__ for k in prepared}
        from exllamav2.gguf.header import read_header
        file_bytes = sum(t.n_bytes for t in read_header(real.path).tensors if len(t.shape) == 2)
        packed_bytes = sum(k.nbytes() for k in prepared)
        # the file's 2-D weights, the K-quants' sub-block scales unpacked (Q4_K: 4.625 bits per weight against 4.5)
        assert file_bytes <= packed_bytes <= 1.04 * file_bytes, (packed_bytes, file_bytes)
    # perplexity of the prose through the packed kernels against the exact fp32 path (itself within 0.5% of HF):
    # measured +0.03% (SmolLM2) and +0.15% (Gemma 3)
    with open(PPL_TEXT, encoding="utf-8") as f:
        ids = real.tokenizer.encode(f.read())[0]
    bos = real.tokenizer.bos_token_id if real.requires_bos else None
    fp32 = getattr(real, "fp32_perplexity", None) or perplexity(model_logits_fn(real.model), ids, length=1024,
                                                                 stride=512, bos_token_id=bos)
    bf16 = perplexity(model_logits_fn(model), ids, length=1024, stride=512, bos_token_id=bos)
    assert bf16.scored_tokens == fp32.scored_tokens
    assert abs(bf16.perplexity / fp32.perplexity - 1.0) < 0.01, (bf16.perplexity, fp32.perplexity)
