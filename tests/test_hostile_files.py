"""Hostile or damaged files get a prompt error naming the file and field (issue #21): config.json fields are
type- and range-checked and checked against the tensors before any module is built, a cache larger than the
machine is refused naming max_seq_len, a GGUF with a damaged vocabulary names its file, and a broken steering
file's error shows its path relative to the interventions folder, never the server's own path."""

from __future__ import annotations

import time

import pytest

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
from exllamav2.config import ConfigError

# the tiny Llama folder, its per-test copy and the config editor are test_bad_inputs.py's
from test_bad_inputs import edit_config, good_dir, model_dir  # noqa: F401  (good_dir, model_dir: pytest fixtures)


@pytest.mark.parametrize("changes,field,words", [
    ({"num_hidden_layers": 1_000_000_000}, "num_hidden_layers", "layers"),
    ({"num_hidden_layers": 3}, "num_hidden_layers", "layers 0..1"),
    ({"hidden_size": "32"}, "hidden_size", "the string '32'"),
    ({"hidden_size": 32.5}, "hidden_size", "integer"),
    ({"hidden_size": 64, "head_dim": 8}, "hidden_size", "embedding"),
    ({"num_attention_heads": True}, "num_attention_heads", "integer"),
    ({"max_position_embeddings": 10 ** 12}, "max_position_embeddings", "1..2147483647"),
    ({"max_position_embeddings": -5}, "max_position_embeddings", "1.."),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps", "number"),
    ({"intermediate_size": 0}, "intermediate_size", "1.."),
])
def test_bad_config_fields_name_the_file_and_field(model_dir, changes, field, words):
    edit_config(model_dir, **changes)
    t = time.time()
    with pytest.raises(ConfigError) as e:
        ExLlamaV2Config(str(model_dir))
    assert time.time() - t < 10
    msg = str(e.value)
    assert "config.json" in msg and f"'{field}'" in msg and words in msg, msg


def test_integral_floats_and_good_configs_still_load(model_dir):
    edit_config(model_dir, hidden_size=32.0, num_hidden_layers=2)
    cfg = ExLlamaV2Config(str(model_dir))
    assert cfg.hidden_size == 32 and isinstance(cfg.hidden_size, int)


def test_cache_larger_than_the_machine_names_max_seq_len(model_dir):
    edit_config(model_dir, max_position_embeddings=2_000_000_000)
    cfg = ExLlamaV2Config(str(model_dir))
    model = ExLlamaV2(cfg)
    with pytest.raises(ValueError, match=r"max_seq_len=2000000000.*max_position_embeddings=2000000000.*config\.json"):
        ExLlamaV2Cache(model, 1)  # the config's context: 2e9 positions x 2 layers x 2 heads x 8 x 2 bytes x 2
    with pytest.raises(ValueError, match=r"max_seq_len=1000000000000"):
        ExLlamaV2Cache(model, 1, 10 ** 12)


def test_serve_engine_refuses_an_impossible_context_before_loading(model_dir):
    from exllamav2.server import load_engine

    edit_config(model_dir, max_position_embeddings=2_000_000_000)
    t = time.time()
    with pytest.raises(ValueError, match=r"max_seq_len=.*max_position_embeddings=2000000000"):
        load_engine(str(model_dir), dtype="float32")
    assert time.time() - t < 30


def test_gguf_with_a_damaged_vocabulary_names_the_file(tmp_path):
    from exllamav2.default_models import smollm2_gguf_path
    from exllamav2.tokenizer.gguf_metadata import read_gguf_metadata
    from exllamav2.tokenizer.gguf_tokenizer import tokenizer_from_gguf

    path = smollm2_gguf_path()
    meta = dict(read_gguf_metadata(path))
    tokens = list(meta["tokenizer.ggml.tokens"])
    merge = meta["tokenizer.ggml.merges"][0]
    victim = merge.split(" ")[1]
    tokens[tokens.index(victim)] = "\u2603damaged"  # a token the merges need is gone
    meta["tokenizer.ggml.tokens"] = tokens
    with pytest.raises(ValueError) as e:
        tokenizer_from_gguf(path, metadata=meta)
    assert path in str(e.value) and "vocabulary" in str(e.value)


def test_broken_steering_file_error_shows_the_relative_path(tmp_path):
    from test_dynamic_tiny import build_tiny_dir, load_tiny
    from exllamav2.interventions import from_request
    from exllamav2.interventions.requests import InterventionRequestError

    root = tmp_path / "steer"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    model, _ = load_tiny(build_tiny_dir(tmp_path / "m"))
    with pytest.raises(InterventionRequestError) as e:
        from_request(model, [{"point": "blocks.0.resid_post", "edit": "add", "file": "sub/bad.safetensors"}],
                     file_root=str(root))
    msg = str(e.value)
    assert "sub/bad.safetensors" in msg and str(root) not in msg and str(tmp_path) not in msg, msg
