"""The shared parity runner: every architecture is checked the same way against HF transformers.

`save_hf_model(hf_model, dir)` writes a tiny random HF model as safetensors; `ParityRunner(dir, hf_model)` then
checks our logits against HF in fp32 (prefill and cached decode), cache vs no cache, a left-padded batch against
each prompt alone, chunked prefill against one pass, bf16 against HF fp32, and each module's intermediates
against the HF tensors captured with torch hooks.
"""

from __future__ import annotations

import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config

TOL_FP32 = 1e-4


def save_hf_model(hf_model, path) -> str:
    hf_model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def make_tiny(model_cls, config, seed: int = 0, init_scale: float | None = None):
    """Build an HF model in fp32 eval mode with eager attention; optionally rescale the random weights so that
    tiny models produce logits of a realistic spread."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    m = model_cls(config).float().eval()
    if init_scale is not None:
        with torch.no_grad():
            for name, p in m.named_parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, init_scale)
                elif "norm" in name or "ln" in name:
                    p.normal_(1.0, 0.1) if "weight" in name else p.normal_(0.0, 0.1)
                else:
                    p.normal_(0.0, 0.05)
    return m


class ParityRunner:
    def __init__(self, model_dir: str, hf_model, seed: int = 1, prompt_len: int = 32, decode_steps: int = 16,
                 max_seq_len: int = 128, tol: float = TOL_FP32, cache_equals_full: bool = True):
        self.model_dir = model_dir
        self.hf = hf_model
        self.tol = tol
        self.prompt_len = prompt_len
        self.decode_steps = decode_steps
        self.max_seq_len = max_seq_len
        g = torch.Generator().manual_seed(seed)
        self.vocab = hf_model.config.get_text_config().vocab_size
        n = prompt_len + decode_steps
        self.ids = torch.randint(0, self.vocab, (1, n), generator=g)
        self.cache_equals_full = cache_equals_full
        with torch.no_grad():
            # HF's own cached decode: differs from the full pass only for length-dependent RoPE (dynamic NTK);
            # run it first, because HF's dynamic RoPE keeps the longest length seen as state
            out = hf_model(self.ids[:, :prompt_len], use_cache=True)
            steps, past = [out.logits], out.past_key_values
            for i in range(prompt_len, n):
                out = hf_model(self.ids[:, i:i + 1], past_key_values=past, use_cache=True)
                steps.append(out.logits)
                past = out.past_key_values
            self.ref_cached = torch.cat(steps, 1).float()
            self.ref = hf_model(self.ids).logits.float()

    def load(self, dtype="float32", **options):
        cfg = ExLlamaV2Config(self.model_dir)
        cfg.dtype = dtype
        cfg.max_seq_len = self.max_seq_len
        for k, v in options.items():
            setattr(cfg, k, v)
        model = ExLlamaV2(cfg)
        model.load()
        return model

    # ---------------------------------------------------------------- checks

    def check_prefill_and_decode(self, model=None):
        model = model or self.load()
        p = self.prompt_len
        full = model.forward(self.ids)
        _assert_close(full, self.ref, self.tol, "full forward (no cache) vs HF")
        cache = ExLlamaV2Cache(model, max_seq_len=self.max_seq_len)
        logits = [model.forward(self.ids[:, :p], cache)]
        for i in range(p, self.ids.shape[1]):
            logits.append(model.forward(self.ids[:, i:i + 1], cache))
        cached = torch.cat(logits, 1)
        _assert_close(cached, self.ref_cached, self.tol, "prefill + cached decode vs HF")
        if self.cache_equals_full:
            _assert_close(cached, full, self.tol, "cache vs no cache")
        assert cache.current_seq_len == self.ids.shape[1]
        return model

    def check_padded_batch(self, model=None, lengths=(32, 19, 7)):
        if not self.cache_equals_full:
            return  # dynamic NTK RoPE depends on the batch's longest row, so rows alone legitimately differ
        model = model or self.load(max_batch_size=len(lengths))
        g = torch.Generator().manual_seed(7)
        prompts = [torch.randint(0, self.vocab, (n,), generator=g) for n in lengths]
        steps = 4
        alone = []
        for pr in prompts:
            cache = ExLlamaV2Cache(model, max_seq_len=self.max_seq_len)
            out = [model.forward(pr.unsqueeze(0), cache, last_id_only=True)]
            tok = out[-1].argmax(-1)
            for _ in range(steps):
                out.append(model.forward(tok, cache))
                tok = out[-1][:, -1:].argmax(-1)
            alone.append(torch.cat(out, 1)[0])
        maxlen = max(lengths)
        ids = torch.zeros(len(prompts), maxlen, dtype=torch.long)
        mask = torch.zeros(len(prompts), maxlen + steps, dtype=torch.bool)
        for r, pr in enumerate(prompts):
            ids[r, maxlen - len(pr):] = pr
            mask[r, maxlen - len(pr):] = True
        offsets = torch.tensor([[len(pr) - maxlen] for pr in prompts])
        cache = ExLlamaV2Cache(model, batch_size=len(prompts), max_seq_len=self.max_seq_len)
        out = [model.forward(ids, cache, input_mask=mask[:, :maxlen], position_offsets=offsets, last_id_only=True)]
        tok = out[-1].argmax(-1)
        for s in range(steps):
            total = maxlen + s + 1
            out.append(model.forward(tok, cache, input_mask=mask[:, :total], position_offsets=offsets))
            tok = out[-1][:, -1:].argmax(-1)
        batched = torch.cat(out, 1)
        for r in range(len(prompts)):
            _assert_close(batched[r], alone[r], self.tol * 10, f"padded batch row {r} vs alone")

    def check_chunked_prefill(self, chunk: int = 7):
        whole = self.load()
        cache = ExLlamaV2Cache(whole, max_seq_len=self.max_seq_len)
        ref = whole.forward(self.ids, cache)
        chunked = self.load(max_input_len=chunk)
        cache2 = ExLlamaV2Cache(chunked, max_seq_len=self.max_seq_len)
        out = chunked.forward(self.ids, cache2)
        if not self.cache_equals_full:
            return
        _assert_close(out, ref, self.tol, f"chunked prefill ({chunk}-token chunks) vs one pass")
        last = chunked.forward(self.ids, ExLlamaV2Cache(chunked, max_seq_len=self.max_seq_len), last_id_only=True)
        _assert_close(last, ref[:, -1:], self.tol, "chunked prefill, last_id_only")

    def check_bf16(self, rel: float = 0.03):
        model = self.load("bfloat16")
        cache = ExLlamaV2Cache(model, max_seq_len=self.max_seq_len)
        out = model.forward(self.ids, cache)
        assert out.dtype == torch.float32
        scale = self.ref.abs().max().item()
        err = (out - self.ref).abs().max().item()
        assert err <= rel * max(scale, 1.0), f"bf16 vs HF fp32: max |diff| {err:.4g} > {rel} x {scale:.4g}"

    def check_intermediates(self, model=None, hf_names=None):
        """Compare each decoder module's intermediates with HF tensors captured by hooks. `hf_names` maps our
        intermediate name to (hf module name, "in"|"out") given the module's key; defaults follow the common HF
        layout (norm outputs, o_proj/down_proj inputs, decoder layer outputs)."""
        model = model or self.load()
        # full length for dynamic NTK RoPE: HF keeps the longest length seen as state
        ids = self.ids[:, :self.prompt_len] if self.cache_equals_full else self.ids
        captured = {}
        hooks = []
        named = dict(self.hf.named_modules())

        def hook_for(name, where):
            def fn(mod, args, out):
                captured[name] = (args[0] if where == "in" else (out[0] if isinstance(out, tuple) else out)).detach()
            return fn

        wanted = []
        for m in model.modules:
            for iname, (hname, where) in (hf_names(m) if hf_names else default_hf_names(m, model)).items():
                if hname in named:
                    wanted.append((m, iname, hname))
                    hooks.append(named[hname].register_forward_hook(hook_for(hname, where)))
        with torch.no_grad():
            hf_out = self.hf(ids, output_hidden_states=True)
        for h in hooks:
            h.remove()
        assert wanted, "no intermediates matched HF module names"
        x = ids
        checked = 0
        from exllamav2.attn_params import Params
        params = Params(1, ids.shape[1], 0)
        for m in model.modules:
            r = m.forward(x, attn_params=params, intermediates=True)
            for mod, iname, hname in wanted:
                if mod is m:
                    _assert_close(r[iname], captured[hname].float(), self.tol, f"{m.key}: intermediate '{iname}'")
                    checked += 1
            x = r["hidden_states"]
        layer_outs = hf_out.hidden_states[1:-1]
        ours = _layer_outputs(model, ids)
        for i, (a, b) in enumerate(zip(ours, layer_outs)):
            _assert_close(a, b, self.tol, f"hidden state after layer {i}")
        assert checked > 0

    def run_all(self, intermediates: bool = True, hf_names=None):
        model = self.check_prefill_and_decode()
        self.check_padded_batch()
        self.check_chunked_prefill()
        self.check_bf16()
        if intermediates:
            self.check_intermediates(model, hf_names)


def default_hf_names(module, model) -> dict:
    name = getattr(module, "name", "")
    ap = model.archparams
    if name == "Attention":
        out = {"attn_output": (module.o_proj.key, "in")}
        if module.pre_layernorm is not None:
            out["post_norm"] = (module.pre_layernorm.key, "out")
        return out
    if name == "MLP":
        out = {"pre_down": (module.down_proj.key, "in")}
        if module.pre_layernorm is not None:
            out["post_norm"] = (module.pre_layernorm.key, "out")
        return out
    return {}


def _layer_outputs(model, ids) -> list:
    """Residual stream after each decoder layer (output of each layer's last module)."""
    from exllamav2.attn_params import Params
    params = Params(1, ids.shape[1], 0)
    x = ids
    outs = []
    layer_of = {}
    for i, m in enumerate(model.modules):
        li = getattr(m, "layer_idx", None)
        if li is not None:
            layer_of[i] = li
    for i, m in enumerate(model.modules[:-2]):
        x = m.forward(x, attn_params=params)
        li = layer_of.get(i)
        nxt = layer_of.get(i + 1)
        if li is not None and nxt != li:
            outs.append(x.float())
    return outs


def _assert_close(a, b, tol, what):
    a, b = a.float(), b.float()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    err = (a - b).abs().max().item()
    assert err <= tol, f"{what}: max |diff| {err:.3g} > {tol:g}"
