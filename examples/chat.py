"""A short multi-turn chat through the model's own chat template, streamed. The streaming generator reuses the
cache for the conversation so far, so each turn only processes the new messages.

    python examples/chat.py [MODEL] [--tokens N]"""

import argparse
import sys

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
from exllamav2.default_models import smollm2_gguf_path
from exllamav2.generator import ExLlamaV2Sampler, ExLlamaV2StreamingGenerator

parser = argparse.ArgumentParser()
parser.add_argument("model", nargs="?", default=None)
parser.add_argument("--tokens", type=int, default=128)
args = parser.parse_args()

config = ExLlamaV2Config(args.model or smollm2_gguf_path())
config.max_seq_len = 2048
model = ExLlamaV2(config)
model.load(progress=True)
tokenizer = ExLlamaV2Tokenizer(config)
cache = ExLlamaV2Cache(model, max_seq_len=config.max_seq_len)
generator = ExLlamaV2StreamingGenerator(model, cache, tokenizer)
generator.set_stop_conditions(tokenizer.eos_token_ids)
settings = ExLlamaV2Sampler.Settings(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05)

messages = [{"role": "system", "content": "You are a concise assistant."}]
for question in ["What is the tallest mountain on Earth?", "And how tall is it?"]:
    messages.append({"role": "user", "content": question})
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = tokenizer.encode(prompt, encode_special_tokens=True)
    generator.begin_stream_ex(ids, settings, max_new_tokens=args.tokens, seed=0)
    print(f"User: {question}\nAssistant: ", end="")
    answer = ""
    while True:
        result = generator.stream_ex()
        answer += result["chunk"]
        sys.stdout.write(result["chunk"])
        sys.stdout.flush()
        if result["eos"]:
            break
    print("\n")
    messages.append({"role": "assistant", "content": answer.strip()})
