"""Shared set-up for the converter tests: a tiny random Llama HF folder with a small BPE tokenizer trained on the
built-in calibration text, and logits comparison against HF transformers in fp32. (No tests here.)"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

from exllamav2 import ExLlamaV2, ExLlamaV2Config
from exllamav2.conversion.calibration import read_calibration_text
from parity import make_tiny, save_hf_model

VOCAB = 512
ROWS, LENGTH = 6, 128


def make_tiny_llama(path, tied: bool = False, layers: int = 2) -> str:
    text, _ = read_calibration_text(None)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=tied,
                      bos_token_id=0, eos_token_id=1)
    save_hf_model(make_tiny(LlamaForCausalLM, cfg, init_scale=0.05), path)
    tok.save(str(path / "tokenizer.json"))
    return str(path)


def held_out_ids(model_dir: str) -> torch.Tensor:
    """Tokens of a text absent from the calibration data."""
    text = ("The committee reviewed the proposal for a new footbridge across the canal, and after some debate about "
            "the cost, which had risen from 2.1 to 2.6 million, agreed to ask the engineers for a lighter design. "
            "def area(r):\n    return 3.14159 * r * r\n\"Will it be ready by spring?\" she asked. \"Probably not.\"")
    ids = Tokenizer.from_file(f"{model_dir}/tokenizer.json").encode(text).ids
    return torch.tensor(ids[:96]).unsqueeze(0)


def hf_logits(model_dir: str, ids: torch.Tensor) -> torch.Tensor:
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return hf(ids).logits.float()


def load_ours(model_dir: str) -> ExLlamaV2:
    cfg = ExLlamaV2Config(model_dir)
    cfg.dtype = torch.float32
    model = ExLlamaV2(cfg)
    model.load()
    return model


def rel_error(model: ExLlamaV2, ids: torch.Tensor, ref: torch.Tensor) -> float:
    with torch.inference_mode():
        out = model.forward(ids).float()
    return float((out - ref).norm() / ref.norm())
