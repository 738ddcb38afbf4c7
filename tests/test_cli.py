"""`python -m exllamav2 ...` in a subprocess, on the default model (SmolLM2-135M-Instruct). Each model load in a
subprocess costs ~10-30 s on 2 shared cores, so only one-shot chat loads a model by default; the rest:
`python -m pytest -m slow tests/test_cli.py`."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str, stdin: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "exllamav2", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


@pytest.fixture(scope="module", autouse=True)
def default_model_installed(smollm2_gguf):
    return smollm2_gguf


def test_chat_one_shot_prints_an_answer():
    r = cli("chat", "-p", "What is the capital of France?", "--greedy", "--max-tokens", "16", "--quiet")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 0
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_chat_reads_stdin_until_exit():
    r = cli("chat", "--greedy", "--max-tokens", "4", "--quiet", stdin="Hello!\n/exit\nnever read\n")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 0


def test_bad_model_path_is_one_line_error():
    r = cli("chat", "-m", "/no/such/model", "-p", "hi")
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "/no/such/model" in lines[0] and lines[0].startswith("error:")
    assert "Traceback" not in r.stderr


def test_debug_shows_traceback(tmp_path):
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("hello")
    r = cli("info", "-m", str(not_a_model), "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr
    r = cli("info", "-m", str(not_a_model))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "notes.txt" in r.stderr


def test_info_lists_architectures():
    r = cli("info", "--architectures")
    assert r.returncode == 0, r.stderr
    assert "LlamaForCausalLM" in r.stdout


@pytest.mark.slow
def test_info_describes_default_model():
    r = cli("info", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "LlamaForCausalLM" in r.stdout
    assert re.search(r"Parameters:\s+13[45]\.\d M", r.stdout), r.stdout
    assert "model.layers.29" in r.stdout and "GGUF" in r.stdout
    # the shipped file's Q8_0 token embedding stays in its blocks, and the format line lists the lattice types
    assert re.search(r"model\.embed_tokens .* GGUF Q8_0, rows dequantized on lookup", r.stdout), r.stdout
    assert "IQ2_XXS" in r.stdout.split("Format:")[1].splitlines()[0]
    assert re.search(r"CPU matmuls:\s+int16 activations", r.stdout), r.stdout
    r = cli("info", "--quiet", "--no-modules", "--cpu-activations", "int8")
    assert r.returncode == 0 and re.search(r"CPU matmuls:\s+int8 activations", r.stdout), r.stdout + r.stderr


def test_cpu_activations_option_sets_the_kernels_precision():
    import argparse

    from exllamav2 import ops
    from exllamav2.commands import add_model_args, apply_kernel_args
    from exllamav2.commands.serve import add_parser as add_serve_parser

    p = argparse.ArgumentParser()
    add_model_args(p)
    serve = add_serve_parser(argparse.ArgumentParser().add_subparsers())
    before = ops.cpu_activations()
    try:
        for parser in (p, serve):
            apply_kernel_args(parser.parse_args(["--cpu-activations", "int8"]))
            assert ops.cpu_activations() == "int8"
            apply_kernel_args(parser.parse_args([]))  # not given: the process's choice stands
            assert ops.cpu_activations() == "int8"
            apply_kernel_args(parser.parse_args(["--cpu-activations", "int16"]))
            assert ops.cpu_activations() == "int16"
    finally:
        ops.set_cpu_activations(before)
    r = cli("generate", "--cpu-activations", "int4")
    assert r.returncode != 0 and "--cpu-activations" in r.stderr and "int4" in r.stderr


@pytest.mark.slow
def test_ppl_of_a_small_file(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    r = cli("ppl", str(text), "--length", "64", "--stride", "32", "--max-tokens", "128", "--quiet")
    assert r.returncode == 0, r.stderr
    ppl = float(re.search(r"Perplexity: ([0-9.]+)", r.stdout).group(1))
    assert 1.0 < ppl < 20.0  # a repeated sentence is easy to predict


def test_ppl_missing_file():
    r = cli("ppl", "/no/such/file.txt")
    assert r.returncode != 0 and "/no/such/file.txt" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_generate_prints_prompt_and_continuation():
    r = cli("generate", "-p", "The capital of France is", "--greedy", "--max-tokens", "8", "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is") and len(r.stdout.strip()) > len("The capital of France is")
