"""ExLlamaV2: the module list built from the architecture's params, weight loading, and forward passes."""

from __future__ import annotations

import math

import torch

from .attn import ExLlamaV2Attention
from .attn_params import Params
from .embedding import ExLlamaV2Embedding
from .linear import ExLlamaV2Linear
from .mlp import ExLlamaV2MLP
from .module import TensorShapeError, interventions_alive
from .norms import make_norm
from .rope import RotaryEmbedding
from .runtime.stack_chunk import fresh_stack_chunk


class ExLlamaV2:
    def __init__(self, config, lazy_load: bool = False, archparams=None):
        self.config = config
        self.archparams = archparams if archparams is not None else config.arch.lm
        ap, keys = self.archparams, self.archparams.keys
        self.default_device_idx = 0 if torch.cuda.is_available() else -1
        self.dtype = config.resolved_dtype("cuda:0" if self.default_device_idx >= 0 else "cpu")
        self.loaded = False
        self._rotary: dict = {}
        self.decode_runner = None  # runtime/decode.py, set by compile_decode()

        self.modules = []
        self.modules.append(ExLlamaV2Embedding(self, keys["embed_tokens"], ap))
        if keys.get("learned_pos_emb"):
            from .pos_embedding import ExLlamaV2PosEmbedding
            self.modules.append(ExLlamaV2PosEmbedding(self, keys["learned_pos_emb"], ap))
        for i in range(config.num_hidden_layers):
            self.modules += self.build_layer(i)
        self.modules.append(make_norm(self, keys["norm"], ap))
        self.modules.append(self.build_head())
        self.head_layer_idx = len(self.modules) - 1
        self.cache_map: dict = {}
        self._update_maps()

    # ------------------------------------------------------------------ construction

    def layer_sliding_window(self, i: int) -> int:
        return self.config.sliding_window if self.config.layer_types[i] == "sliding_attention" else 0

    def build_layer(self, i: int) -> list:
        ap, keys = self.archparams, self.archparams.keys
        key = f"{keys['layers']}.{i}"
        window = self.layer_sliding_window(i)
        rope_index = 1 if self.config.layer_types[i] == "sliding_attention" else 0
        if ap.parallel_decoder_blocks:
            from .parallel_decoder import ExLlamaV2ParallelDecoder
            return [ExLlamaV2ParallelDecoder(self, key, i, sliding_window=window, archparams=ap, rope_index=rope_index)]
        attn = ExLlamaV2Attention(self, key, i, sliding_window=window, archparams=ap, rope_index=rope_index)
        if ap.is_moe and i not in ap.moe_dense_layers:
            from .moe_mlp import ExLlamaV2MoEMLP
            mlp = ExLlamaV2MoEMLP(self, key, i, archparams=ap)
        else:
            mlp = ExLlamaV2MLP(self, key, i, archparams=ap)
        return [attn, mlp]

    def build_head(self):
        cfg, ap, keys = self.config, self.archparams, self.archparams.keys
        tied = cfg.tie_word_embeddings
        head = ExLlamaV2Linear(self, keys["embed_tokens"] if tied else keys["lm_head"], cfg.hidden_size,
                               cfg.vocab_size, ap.head_bias, prescale=cfg.logit_scale, is_sub_module=False,
                               max_out_len=cfg.max_output_len, archparams=ap)
        if not tied:
            head.alt_key = keys["embed_tokens"]  # checkpoints that leave out lm_head share the embedding
        return head

    def _update_maps(self):
        self.modules_dict = {}
        for m in self.modules:
            subs = getattr(m, "submodules", None)
            for s in (subs if subs else [m]):
                self.modules_dict[s.key] = s
        kv = [i for i, m in enumerate(self.modules) if getattr(m, "kv_layer", False)]
        self.last_kv_layer_idx = kv[-1] if kv else 0

    def kv_modules(self) -> list:
        return [m for m in self.modules if getattr(m, "kv_layer", False)]

    def rotary_for_layer(self, layer_idx: int, rope_index: int = 0) -> RotaryEmbedding:
        cfg = self.config
        lt = "sliding_attention" if (rope_index == 1 and "sliding_attention" in cfg.rope_parameters) else "full_attention"
        if lt not in self._rotary:
            rp = cfg.rope_parameters[lt]
            self._rotary[lt] = RotaryEmbedding(rp, cfg.head_dim, cfg.rotary_dim, cfg.native_max_seq_len,
                                               self.archparams.rope_style, scale_pos_emb=cfg.scale_pos_emb,
                                               alpha=cfg.scale_alpha_value, table_len=cfg.max_seq_len)
        return self._rotary[lt]

    def rope_length_key(self, total_len: int) -> tuple:
        """Which frequencies the model's rotary embeddings rotate a sequence `total_len` long with: all zeros
        unless a length-dependent RoPE (longrope, dynamic NTK) changes them with the length (the dynamic
        generator keeps K/V computed at other frequencies out of a prompt's prefix matches)."""
        return tuple(r.length_key(total_len) for r in self._rotary.values())

    # ------------------------------------------------------------------ loading

    def set_device_map(self, allocation, embed_cpu: bool = True) -> list:
        """Place modules greedily on CUDA devices by weight footprint, `allocation` in GB per device.
        Returns the GB left per device."""
        left = [a * 1024 ** 3 for a in allocation]
        dev = 0
        for i, m in enumerate(self.modules):
            if i == 0 and embed_cpu:
                m.set_device_idx(-1)
                continue
            fp = m.weight_footprint()
            while dev < len(left) - 1 and fp > left[dev]:
                dev += 1
            m.set_device_idx(dev)
            left[dev] -= fp
        return [x / 1024 ** 3 for x in left]

    def load(self, gpu_split=None, lazy: bool = False, stats: bool = False, callback=None, callback_gen=None,
             progress: bool = False):
        for _ in self.load_gen(gpu_split, lazy, stats, callback, callback_gen, progress):
            pass

    def load_gen(self, gpu_split=None, lazy: bool = False, stats: bool = False, callback=None, callback_gen=None,
                 progress: bool = False):
        if gpu_split is not None and torch.cuda.is_available():
            self.set_device_map(gpu_split)
        self._update_cache_map()
        if lazy:
            return
        mods = self.modules
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(mods), desc="Loading model", unit="module", leave=False)
        for i, m in enumerate(mods):
            try:
                m.load()
            except TensorShapeError as e:
                raise TensorShapeError(self._shape_error_source(str(e))) from None
            if bar is not None:
                bar.update(1)
            if callback is not None:
                callback(i + 1, len(mods))
            if callback_gen is not None:
                yield from callback_gen(i + 1, len(mods))
            yield i + 1, len(mods)
        if bar is not None:
            bar.close()
        from .util import release_freed_memory
        release_freed_memory()
        self.loaded = True

    def _shape_error_source(self, message: str) -> str:
        """A module's shape error ("KEY: shape ..., expected ...") with the file that holds KEY, and the GGUF
        tensor's own name, in front."""
        key = message.split(":", 1)[0]
        for k in (key, key.rsplit(".", 1)[0] + ".weight"):
            src = self.config.tensor_file_map.get(k)
            if src is not None:
                where = getattr(src, "path", str(src))
                if hasattr(src, "gguf_name") and k == key:
                    where += f" (tensor '{src.gguf_name(key)}')"
                return f"{where}: {message}"
        return f"{self.config.model_dir}: {message}"

    def load_autosplit(self, cache=None, reserve_vram=None, last_id_only=False, callback=None, callback_gen=None,
                       progress: bool = False):
        """Places everything on the first CUDA device (or the CPU), then allocates the cache."""
        self.load(progress=progress, callback=callback, callback_gen=callback_gen)
        if cache is not None:
            cache.update_cache_tensors()

    def compile_decode(self, batch_sizes=(1,), max_seq_len: int | None = None, progress: bool = True,
                       options: dict | None = None, freeze: bool = False, paged: bool | None = None,
                       check_guards: bool = False):
        """Compile the decode step once (runtime/decode.py): every later `forward` of one token per row on a plain
        cache, from any generator, runs the compiled step. Compiled for caches of `batch_sizes` rows and
        `max_seq_len` positions (default: config.max_seq_len); a cache of another shape compiles once more on first
        use. Minutes the first time on a machine, then loaded from inductor's on-disk cache. Returns the runner;
        `compile_seconds` says what the compile cost. `freeze` folds the weights into the graph as constants
        (runtime/compile.py says when that pays, and why it is off). `paged`: the dynamic generator's decode steps
        through the runner too (runtime/paged_decode.py: CUDA graphs on a GPU, a compiled step per bucket of
        sequence counts on the CPU, compiled at its first use); default on, `paged=False` keeps them eager.
        `check_guards`: let dynamo check its guards at every step instead of once per kind of call
        (runtime/guards.py says what that costs and what it covers)."""
        if not self.loaded:
            raise RuntimeError("the model is not loaded: call model.load() first")
        from .runtime.decode import DecodeRunner
        self.decode_runner = None
        self.decode_runner = DecodeRunner(self, compile=True, progress=progress, options=options,
                                          batch_sizes=batch_sizes, max_seq_len=max_seq_len, freeze=freeze, paged=paged,
                                          check_guards=check_guards)
        return self.decode_runner

    def final_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The head's output as the API returns it: fp32, with the final logit softcap where the family has one."""
        x = x.float()
        cap = self.config.final_logit_softcapping
        return torch.tanh(x / cap) * cap if cap else x

    def _update_cache_map(self):
        self.cache_map = {m.layer_idx: m.device() for m in self.kv_modules()}

    def unload(self):
        for m in self.modules:
            m.unload()
        self.loaded = False
        self.decode_runner = None  # its compiled steps read the unloaded weights

    def is_quant(self) -> bool:
        return any(m.is_quant() for m in self.kv_modules())

    def update_loras(self):
        for m in self.modules:
            if hasattr(m, "update_loras"):
                m.update_loras()

    def get_cache_devices(self) -> list:
        return sorted(set(self.cache_map.values()))

    def numel(self) -> int:
        return sum(m.numel() for m in self.modules)

    # ------------------------------------------------------------------ forward

    @fresh_stack_chunk
    @torch.inference_mode()
    def forward(self, input_ids, cache=None, input_mask=None, preprocess_only: bool = False,
                last_id_only: bool = False, loras=None, return_last_state: bool = False, position_offsets=None,
                abort_event=None, cpu_logits: bool = False, **kwargs):
        """Logits (batch, seq, vocab) in fp32 (only the last position with `last_id_only`), or None with
        `preprocess_only` / when `abort_event` is set. With a cache, inputs longer than max_input_len are
        processed in chunks and `cache.current_seq_len` advances by the input length."""
        if not self.loaded:
            raise RuntimeError("the model is not loaded: call model.load() first")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        bsz, q_len = input_ids.shape
        cfg = self.config
        runner = self.decode_runner
        if runner is not None and runner.applies(input_ids, cache, input_mask, position_offsets, loras, preprocess_only,
                                                 return_last_state, abort_event, kwargs):
            cache.check_room(1)
            if bsz > cache.batch_size:
                raise ValueError(f"batch of {bsz} rows does not fit a cache built for batch_size={cache.batch_size}")
            return runner(input_ids, cache)
        if cache is None:
            if q_len > cfg.max_seq_len:
                raise ValueError(f"input of {q_len} tokens is longer than max_seq_len={cfg.max_seq_len}")
            r = self.forward_chunk(input_ids, None, input_mask, preprocess_only, last_id_only, loras,
                                   return_last_state, position_offsets, abort_event, **kwargs)
            return _result(r, return_last_state)
        cache.check_room(q_len)
        if bsz > cache.batch_size:
            raise ValueError(f"batch of {bsz} rows does not fit a cache built for batch_size={cache.batch_size}")
        start = cache.current_seq_len
        try:
            out = self._forward_chunked(input_ids, cache, input_mask, preprocess_only, last_id_only, loras,
                                        return_last_state, position_offsets, abort_event, cpu_logits, **kwargs)
        except BaseException:
            cache.current_seq_len = start  # nothing of this input counts as cached after a failure
            raise
        if out is None:
            cache.current_seq_len = start  # aborted: likewise
            return None
        return _result(out, return_last_state) if not preprocess_only else None

    def _forward_chunked(self, input_ids, cache, input_mask, preprocess_only, last_id_only, loras,
                         return_last_state, position_offsets, abort_event, cpu_logits, **kwargs) -> dict | None:
        bsz, q_len = input_ids.shape
        cfg = self.config
        chunk = max(1, cfg.max_input_len * cfg.max_batch_size // bsz)
        logits, last_state = [], []
        beg = 0
        while beg < q_len:
            # also bound q_len x k_len of each chunk by max_attention_size, as the original does
            past = cache.current_seq_len
            att = int((math.sqrt(past * past + 4 * cfg.max_attention_size) - past) / 2)
            end = min(beg + max(1, min(chunk, att)), q_len)
            last = end == q_len
            r = self.forward_chunk(input_ids[:, beg:end], cache, input_mask, preprocess_only or (last_id_only and not last),
                                   last_id_only, loras, return_last_state, position_offsets, abort_event,
                                   rope_ahead=q_len - end, **kwargs)
            if r is None:
                return None
            if r.get("logits") is not None:
                logits.append(r["logits"].cpu() if cpu_logits else r["logits"])
            if r.get("last_state") is not None:
                last_state.append(r["last_state"])
            beg = end
        if preprocess_only:
            return {"logits": None, "last_state": None}
        return {"logits": torch.cat(logits, 1), "last_state": torch.cat(last_state, 1) if last_state else None}

    def forward_chunk(self, input_ids, cache=None, input_mask=None, preprocess_only=False, last_id_only=False,
                      loras=None, return_last_state=False, position_offsets=None, abort_event=None,
                      attn_params=None, extract_state_indices=None, rope_ahead: int = 0, **kwargs) -> dict | None:
        bsz, q_len = input_ids.shape[:2]
        past = cache.current_seq_len if cache is not None else 0
        if attn_params is None:
            attn_params = Params(bsz, q_len, past, input_mask, position_offsets)
            attn_params.rope_ahead = rope_ahead
        past = attn_params.past_len
        x = input_ids
        states = {}
        last_state = None
        prune = self._pruned_layer(q_len, preprocess_only, last_id_only, attn_params, extract_state_indices)
        for idx, module in enumerate(self.modules):
            if abort_event is not None and abort_event.is_set():
                return None
            if idx == self.head_layer_idx:
                if last_id_only:
                    x = x[:, -1:]
                if return_last_state:
                    last_state = x
            dev = module.device()
            if idx > 0 and (dev != "cpu" or x.device.type != "cpu") and x.device != torch.device(dev):
                x = x.to(dev)
            if idx == prune:
                x = module.forward(x, cache=cache, attn_params=attn_params, past_len=past, loras=loras,
                                   out_rows="none" if preprocess_only else "last", **kwargs)
            else:
                x = module.forward(x, cache=cache, attn_params=attn_params, past_len=past, loras=loras, **kwargs)
            if extract_state_indices is not None and idx in extract_state_indices:
                states[idx] = x
            if preprocess_only and idx == self.last_kv_layer_idx:
                x = None
                break
        if cache is not None:
            cache.current_seq_len = past + q_len
        if x is not None:
            x = self.final_logits(x)
        return {"logits": x, "last_state": last_state, "states": states}


    def _pruned_layer(self, q_len, preprocess_only, last_id_only, attn_params, extract_state_indices) -> int:
        """Where forward_chunk starts computing the last position only (-1: nowhere): for a call that wants the
        last position's logits or none, unless extracted states look at the rows after the last KV layer."""
        if q_len < 2 or not (preprocess_only or last_id_only) or getattr(attn_params, "paged", False):
            return -1
        idx = self.last_rows_layer()
        if extract_state_indices is not None and any(i >= idx for i in extract_state_indices):
            return -1
        return idx

    def last_rows_layer(self) -> int:
        """The last KV layer's index when the modules after it may run on some rows only (-1 otherwise). A call
        needs every layer's k/v, but after the last KV layer's attention only the rows whose logits it wants
        (llama.cpp prunes the same way): that attention returns those rows (its `out_rows`), and the modules after
        it, which must all be per-position, run on them. Not while an intervention could look at the other rows,
        nor where the last KV layer is not a plain attention."""
        idx = self.last_kv_layer_idx
        if type(self.modules[idx]) is not ExLlamaV2Attention or interventions_alive():
            return -1
        if not all(m.per_position for m in self.modules[idx + 1:]):
            return -1
        return idx


def _result(r: dict | None, return_last_state: bool):
    if r is None:
        return None
    if return_last_state:
        return r["logits"], r["last_state"]
    return r["logits"]
