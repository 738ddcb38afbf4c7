"""CPU benchmark: exllamav2's fast path, HF transformers and llama.cpp on the same GGUF, interleaved in one run.

    python bench/bench_cpu.py [-m MODEL] [--compile] [--threads N] [--reps R]

Same options as `python -m exllamav2 bench`; see exllamav2/fast/benchmark.py for what each column measures.
"""

import argparse
import sys

from exllamav2.commands.bench import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
