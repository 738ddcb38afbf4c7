"""Token embedding: ids (b, s) -> (b, s, hidden)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .module import ExLlamaV2Module, MissingTensorError, TensorShapeError


class ExLlamaV2Embedding(ExLlamaV2Module):
    name = "Embedding"

    def __init__(self, model, key, archparams=None):
        super().__init__(model, key, archparams)
        self.embedding = None
        self.native_vocab_size = self.config.vocab_size
        self.assumed_footprint = self.config.vocab_size * self.config.hidden_size * 2

    def load(self, device_context: bool = True):
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

    def unload(self):
        self.embedding = None

    def numel(self) -> int:
        return self.config.vocab_size * self.config.hidden_size

    def forward(self, hidden_states, cache=None, attn_params=None, past_len=None,
                intermediates=False, loras=None, **kwargs):
        ids = hidden_states.to(self.embedding.device).clamp(min=0)
        y = F.embedding(ids, self.embedding)
        if self.archparams.normalize_embeddings:
            # HF rounds the normaliser to the activation dtype before multiplying
            y = y * torch.tensor(self.config.hidden_size ** 0.5, dtype=y.dtype)
        if self.archparams.residual_stream_fp32:
            y = y.float()
        return {"hidden_states": y} if intermediates else y
