"""Token embedding: ids (b, s) -> (b, s, hidden). A GGUF file's block-quantized table stays in its blocks (on the
CPU the file's memory map, on a GPU its bytes), the looked-up rows dequantised per forward
(exllamav2/quant/gguf_embedding.py); otherwise a dense table."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .module import ExLlamaV2Module, MissingTensorError, TensorShapeError


class ExLlamaV2Embedding(ExLlamaV2Module):
    name = "Embedding"

    def __init__(self, model, key, archparams=None):
        super().__init__(model, key, archparams)
        self.embedding = None
        self.table = None   # GgufEmbeddingTable: the file's blocks instead of `embedding`
        self.native_vocab_size = self.config.vocab_size
        self.assumed_footprint = self.config.vocab_size * self.config.hidden_size * 2

    def load(self, device_context: bool = True):
        self.table = self._gguf_table()
        if self.table is not None:
            return
        w = self.load_weight()
        if w is None:
            raise MissingTensorError(f"{self.key}.weight: tensor not found in the model files")
        if isinstance(w, tuple):
            w = w[0]
        v, h = self.config.vocab_size, self.config.hidden_size
        if w.dim() != 2 or w.shape[1] != h or w.shape[0] < v:
            raise TensorShapeError(f"{self.key}.weight: shape {list(w.shape)}, expected [{v}, {h}]")
        if self.config.scale_emb != 1.0:
            w = torch.nn.Parameter(w * self.config.scale_emb, requires_grad=False)
        self.embedding = w

    def _gguf_table(self):
        name = f"{self.key}.weight"
        src = self._source(name)
        if src is None or getattr(self.config, "gguf_dequantize", False) or self.config.scale_emb != 1.0:
            return None
        from .quant.gguf_embedding import gguf_embedding_table
        table = gguf_embedding_table(src, name, self.device())
        if table is not None:
            v, h = self.config.vocab_size, self.config.hidden_size
            if table.width != h or table.vocab < v:
                raise TensorShapeError(f"{name}: shape {[table.vocab, table.width]}, expected [{v}, {h}]")
        return table

    def unload(self):
        self.embedding = None
        self.table = None

    def numel(self) -> int:
        return self.config.vocab_size * self.config.hidden_size

    def forward(self, hidden_states, cache=None, attn_params=None, past_len=None,
                intermediates=False, loras=None, **kwargs):
        if self.table is not None:
            y = self.table.lookup(hidden_states.clamp(min=0), self.model.dtype)
        else:
            ids = hidden_states.to(self.embedding.device).clamp(min=0)
            y = F.embedding(ids, self.embedding)
        if self.archparams.normalize_embeddings:
            # HF rounds the normaliser to the activation dtype before multiplying
            y = y * torch.tensor(self.config.hidden_size ** 0.5, dtype=y.dtype)
        if self.archparams.residual_stream_fp32:
            y = y.float()
        return {"hidden_states": y} if intermediates else y
