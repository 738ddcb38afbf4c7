"""`python -m exllamav2 chat`: talk to an instruction-tuned model through its own chat template. With -p it answers
one prompt and exits; without, it reads one message per line from stdin (/exit or end of input to quit,
/clear to forget the conversation)."""

from __future__ import annotations

import argparse
import sys

from . import CLIError, add_model_args, add_sampling_args, load_model, sampler_settings, status
from .generate import encode_prompt, report, stream_completion

NAME = "chat"

# turn-end markers of common chat formats; a model's own EOS ids may not include them
TURN_END_PIECES = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(NAME, help="chat with the model (one-shot with -p)",
                              description=__doc__.split(":", 1)[1].strip())
    p.add_argument("-p", "--prompt", default=None, help="answer this one message and exit")
    p.add_argument("-s", "--system", default=None, help="system prompt")
    add_model_args(p)
    add_sampling_args(p)
    return p


def stop_tokens(tokenizer) -> list[int]:
    ids = list(tokenizer.eos_token_ids)
    for piece in TURN_END_PIECES:
        token_id = tokenizer.extended_piece_to_id.get(piece)
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    return ids


def render(tokenizer, messages: list[dict]) -> str:
    from exllamav2.tokenizer.chat_template import ChatTemplateError
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except ChatTemplateError:
        # no template: a plain transcript
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nAssistant:"


class Conversation:
    def __init__(self, args, config, tokenizer, generator, settings):
        self.args, self.config, self.tokenizer, self.generator, self.settings = args, config, tokenizer, generator, settings
        self.messages: list[dict] = []
        self.clear()

    def clear(self) -> None:
        self.messages = [{"role": "system", "content": self.args.system}] if self.args.system else []

    def prompt_ids(self):
        budget = self.generator.cache.max_seq_len - min(self.args.max_tokens, self.generator.cache.max_seq_len // 2)
        while True:
            ids = encode_prompt(self.tokenizer, self.config, render(self.tokenizer, self.messages))
            first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            if ids.shape[-1] <= budget or len(self.messages) - first <= 1:
                return ids
            del self.messages[first:first + 2]  # forget the oldest exchange

    def answer(self, text: str) -> dict:
        self.messages.append({"role": "user", "content": text})
        stats = stream_completion(self.generator, self.prompt_ids(), self.settings, self.args.max_tokens, self.args.seed)
        sys.stdout.write("\n")
        sys.stdout.flush()
        self.messages.append({"role": "assistant", "content": stats["text"].strip()})
        return stats


def run(args) -> int:
    from exllamav2.generator.streaming import ExLlamaV2StreamingGenerator

    if args.max_tokens <= 0:
        raise CLIError(f"--max-tokens must be positive, got {args.max_tokens}")
    settings = sampler_settings(args)
    config, model, cache, tokenizer = load_model(args)
    generator = ExLlamaV2StreamingGenerator(model, cache, tokenizer)
    generator.set_stop_conditions(stop_tokens(tokenizer))
    chat = Conversation(args, config, tokenizer, generator, settings)

    if args.prompt is not None:
        report(args, chat.answer(args.prompt))
        return 0

    interactive = sys.stdin.isatty()
    if interactive:
        status(args, "Type a message and press Enter (/clear forgets the conversation, /exit or Ctrl-D quits).")
    while True:
        if interactive:
            sys.stdout.write("\n> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/clear":
            chat.clear()
            status(args, "(conversation cleared)")
            continue
        stats = chat.answer(text)
        if interactive:
            report(args, stats)
    return 0
