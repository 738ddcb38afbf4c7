"""The architecture registry: families are found by listing exllamav2/architectures/, so adding a family is one
new file there, with its ArchParams and its GGUF facts (GGUF architecture name, HF architecture, tensor names,
metadata -> config.json). The shared GGUF code holds no per-family table.

The one-file claim is checked for real: a fresh interpreter imports a copy of the package whose only change is
one new family module, which declares a new HF architecture and a new GGUF architecture with its own tensor
names; that family then loads from a GGUF file and gives the same logits as the same weights written as Llama."""

from __future__ import annotations

import ast
import os
import pkgutil
import shutil
import subprocess
import sys
import textwrap

import pytest

import exllamav2
import exllamav2.architectures as families
from exllamav2.architecture import (ExLlamaV2ArchParams, UnsupportedArchitectureError, gguf_architectures,
                                    supported_architectures)

PACKAGE_DIR = os.path.dirname(exllamav2.__file__)

# The new family, as a contributor would write it: this file is the whole change.
NEW_FAMILY = '''
"""TinyFam: Llama math under its own names; llama.cpp calls its post-attention norm "ffn_pre_norm"."""

from ..architecture import ArchParams, GGUFArch, register, register_gguf
from ..gguf.names import BLOCK_COMMON

register("TinyFamForCausalLM", ArchParams(family="tinyfam"), notes="test family")


def _gguf_config(meta, cfg):
    cfg["tinyfam_marker"] = int(meta.require(f"{meta.arch}.marker"))


register_gguf(GGUFArch("tinyfam", "TinyFamForCausalLM", "tinyfam",
                       {**BLOCK_COMMON, "ffn_pre_norm": "post_attention_layernorm"},
                       permuted_qk=True, head_dim_from_rope=True, config=_gguf_config))
'''

# Run in the fresh interpreter, with the copy first on sys.path.
CHECKS = '''
import os, sys
import numpy as np
import torch
from gguf import GGUFWriter

import exllamav2
assert exllamav2.__file__.startswith(sys.argv[1]), exllamav2.__file__  # the copy, not the installed tree
from exllamav2 import ExLlamaV2, ExLlamaV2Config
from exllamav2.architecture import ExLlamaV2ArchParams, UnsupportedArchitectureError, supported_architectures
from exllamav2.gguf import GGUFError, GGUFFile
from exllamav2.gguf.names import hf_tensor_name

archs = supported_architectures()
assert archs["TinyFamForCausalLM"].params.family == "tinyfam"
assert "LlamaForCausalLM" in archs and "Gemma3ForCausalLM" in archs  # the others are still found
assert hf_tensor_name("tinyfam", "blk.3.ffn_pre_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
assert hf_tensor_name("tinyfam", "blk.3.ffn_norm.weight") is None
assert hf_tensor_name("llama", "blk.3.ffn_pre_norm.weight") is None

def write(path, arch, norm2_name, marker=None):
    rng = np.random.default_rng(0)
    vocab, hidden, heads, kv, ffn, layers = 64, 64, 4, 2, 96, 2
    w = GGUFWriter(path, arch)
    w.add_block_count(layers); w.add_context_length(128); w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn); w.add_head_count(heads); w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-6); w.add_rope_freq_base(10000.0); w.add_vocab_size(vocab)
    w.add_rope_dimension_count(hidden // heads)
    if marker is not None:
        w.add_uint32(f"{arch}.marker", marker)
    def add(name, shape, offset=0.0):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1 + offset).astype(np.float32))
    d = hidden // heads
    add("token_embd.weight", (vocab, hidden))
    for i in range(layers):
        b = f"blk.{i}."
        add(b + "attn_norm.weight", (hidden,), 1.0)
        add(b + "attn_q.weight", (heads * d, hidden)); add(b + "attn_k.weight", (kv * d, hidden))
        add(b + "attn_v.weight", (kv * d, hidden)); add(b + "attn_output.weight", (hidden, heads * d))
        add(b + norm2_name + ".weight", (hidden,), 1.0)
        add(b + "ffn_gate.weight", (ffn, hidden)); add(b + "ffn_up.weight", (ffn, hidden))
        add(b + "ffn_down.weight", (hidden, ffn))
    add("output_norm.weight", (hidden,), 1.0)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path

tmp = sys.argv[2]
new = GGUFFile(write(os.path.join(tmp, "tiny-tinyfam.gguf"), "tinyfam", "ffn_pre_norm", marker=7))
ref = GGUFFile(write(os.path.join(tmp, "tiny-llama.gguf"), "llama", "ffn_norm"))
cfg = new.hf_config()
assert cfg["architectures"] == ["TinyFamForCausalLM"] and cfg["model_type"] == "tinyfam"
assert cfg["tinyfam_marker"] == 7  # the family's metadata -> config.json hook ran
assert "model.layers.1.post_attention_layernorm.weight" in new.keys()
assert sorted(new.keys()) == sorted(ref.keys())
for key in ref.keys():  # same values, q/k rows un-permuted the same way
    assert torch.equal(new.get_tensor(key), ref.get_tensor(key)), key

def logits(path):
    config = ExLlamaV2Config(path)
    config.dtype = "float32"
    model = ExLlamaV2(config)
    model.load()
    assert config.arch.lm.family == ("tinyfam" if "tinyfam" in path else "llama")
    with torch.inference_mode():
        return model.forward(torch.tensor([[1, 5, 9, 33, 60, 2, 17, 40]])).float()

a, b = logits(new.path), logits(ref.path)
torch.testing.assert_close(a, b, rtol=0, atol=1e-5)

# unknown architectures are still refused, naming the new family among the supported ones
try:
    ExLlamaV2ArchParams("NopeForCausalLM", {})
    raise AssertionError("not refused")
except UnsupportedArchitectureError as e:
    assert "TinyFamForCausalLM" in str(e) and "LlamaForCausalLM" in str(e), e
wrong = write(os.path.join(tmp, "nope.gguf"), "nope", "ffn_norm")
try:
    GGUFFile(wrong)
    raise AssertionError("not refused")
except GGUFError as e:
    assert "'nope' is not supported" in str(e) and "tinyfam" in str(e) and "llama" in str(e), e
print("NEW FAMILY OK")
'''


def test_new_family_is_one_file(tmp_path):
    copy_root = tmp_path / "tree"
    shutil.copytree(PACKAGE_DIR, copy_root / "exllamav2", ignore=shutil.ignore_patterns("__pycache__"))
    (copy_root / "exllamav2" / "architectures" / "tinyfam.py").write_text(NEW_FAMILY)
    script = tmp_path / "checks.py"
    script.write_text(CHECKS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(copy_root), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(script), str(copy_root), str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "NEW FAMILY OK" in r.stdout, r.stdout + r.stderr
    # the tree this session runs is untouched
    assert "TinyFamForCausalLM" not in supported_architectures()
    assert "tinyfam" not in gguf_architectures()


def test_every_family_module_is_discovered():
    supported_architectures()
    modules = [m.name for m in pkgutil.iter_modules(families.__path__)
               if not m.name.startswith("_") and m.name not in families.HELPER_MODULES]
    assert len(modules) >= 14
    for name in modules:
        assert f"{families.__name__}.{name}" in sys.modules, name
    # the package lists no family by hand: its __init__ imports nothing
    tree = ast.parse(open(families.__file__).read())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_gguf_architectures_read_as_registered_families():
    ggufs = gguf_architectures()
    assert {"llama", "qwen2", "qwen3", "gemma3"} <= set(ggufs)
    archs = supported_architectures()
    for name, spec in ggufs.items():
        assert spec.name == name
        assert spec.hf_architecture in archs, (name, spec.hf_architecture)


def test_shared_gguf_code_names_no_family():
    """gguf/names.py and gguf/metadata.py hold only generic machinery: no GGUF or HF architecture string."""
    family_strings = set(gguf_architectures()) | set(supported_architectures())
    for fname in ("names.py", "metadata.py", "reader.py", "convert.py"):
        path = os.path.join(PACKAGE_DIR, "gguf", fname)
        consts = {n.value for n in ast.walk(ast.parse(open(path).read()))
                  if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not consts & family_strings, (fname, consts & family_strings)


def test_unknown_architecture_is_refused_with_the_list():
    with pytest.raises(UnsupportedArchitectureError) as e:
        ExLlamaV2ArchParams("FancyNewForCausalLM", {})
    msg = str(e.value)
    assert "FancyNewForCausalLM" in msg
    for name in supported_architectures():
        assert name in msg
