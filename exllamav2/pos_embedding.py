"""Learned absolute position embedding (GPT-2's `wpe`): adds wpe[position] to the token embeddings.

Positions are the ones RoPE would use (`attn_params.get_positions`: past_len + i, shifted by position_offsets
for left padding), so caches, chunked prefill and padded batches see the same positions as the attention does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attn_params import Params
from .module import ExLlamaV2Module, MissingTensorError, TensorShapeError


class ExLlamaV2PosEmbedding(ExLlamaV2Module):
    name = "PosEmbedding"

    def __init__(self, model, key, archparams=None):
        super().__init__(model, key, archparams)
        self.embedding = None
        self.max_positions = self.config.native_max_seq_len
        self.assumed_footprint = self.max_positions * self.config.hidden_size * 2

    def load(self, device_context: bool = True):
        w = self.load_weight()
        if w is None:
            raise MissingTensorError(f"{self.key}.weight: tensor not found in the model files")
        if isinstance(w, tuple):
            w = w[0]
        h = self.config.hidden_size
        if w.dim() != 2 or w.shape[1] != h:
            raise TensorShapeError(f"{self.key}.weight: shape {list(w.shape)}, expected [positions, {h}]")
        self.max_positions = w.shape[0]
        self.embedding = w

    def unload(self):
        self.embedding = None

    def numel(self) -> int:
        return self.max_positions * self.config.hidden_size

    def forward(self, hidden_states, cache=None, attn_params=None, past_len=None, intermediates=False,
                loras=None, **kwargs):
        b, s = hidden_states.shape[0], hidden_states.shape[1]
        if attn_params is None:
            past = past_len if past_len is not None else (cache.current_seq_len if cache is not None else 0)
            attn_params = Params(b, s, past)
        pos, end = attn_params.get_positions(hidden_states.device)
        if end > self.max_positions:
            raise ValueError(f"{self.key}: position {end - 1} is beyond the learned position embedding "
                             f"({self.max_positions} positions)")
        y = hidden_states + F.embedding(pos, self.embedding).to(hidden_states.dtype)
        return {"hidden_states": y} if intermediates else y
