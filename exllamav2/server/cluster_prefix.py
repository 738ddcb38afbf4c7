"""Prefix-aware routing's bookkeeping, plain Python (the Ray Serve router over it: exllamav2/server/ray_router.py).

A request whose prompt starts with text a replica has already served goes to that replica, whose prefix cache (the
dynamic generator's cached pages) then skips the shared part of the prefill; otherwise the least-loaded replica
takes it. A prompt is cut into blocks of `block_chars` characters, each block's key hashing the whole text up to
its end (as the generator's page hashes chain over tokens), so a match is always a true prefix."""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict

BLOCK_CHARS = 64
# a replica holding the prefix keeps the request while it has at most this many more requests than the least loaded
IMBALANCE_LIMIT = 4
MAX_BLOCKS_PER_REPLICA = 200_000

# requests routed by the routers in this process: to a replica already holding a prefix of the prompt, or by load
# alone; read by the gateway's /metrics. Behind functions, since Ray may ship the router class by value (with
# copies of the module globals it names), while functions of this module are always imported by name.
_DECISIONS = {"prefix": 0, "least_loaded": 0}


def count_decision(how: str) -> None:
    _DECISIONS[how] += 1


def routing_decisions() -> dict[str, int]:
    return dict(_DECISIONS)


def routing_text(body) -> str:
    """The text whose prefix decides the replica: a completion's prompt (the first one of a list), or a chat's
    messages as role and content in order (the chat template renders them in this order, so equal message
    prefixes give equal rendered prefixes). Anything else (a body the engine will refuse) routes by load."""
    if not isinstance(body, dict):
        return ""
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt and isinstance(prompt[0], str) else None
    if isinstance(prompt, str):
        return prompt
    messages = body.get("messages")
    if not isinstance(messages, list):
        return ""
    parts = []
    for m in messages:
        if not isinstance(m, dict):
            break
        content = m.get("content")
        if isinstance(content, list):  # content parts: their text, in order
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and
                              isinstance(p.get("text"), str))
        if not isinstance(content, str):
            break
        parts.append(f"{m.get('role')}\x00{content}\x01")
    return "".join(parts)


def block_keys(text: str, block_chars: int = BLOCK_CHARS) -> list[bytes]:
    """One key per whole block of the text, each hashing everything up to the block's end."""
    keys = []
    h = hashlib.blake2b(digest_size=16)
    for end in range(block_chars, len(text) + 1, block_chars):
        h.update(text[end - block_chars:end].encode("utf-8", "surrogatepass"))
        keys.append(h.copy().digest())
    return keys


class PrefixTable:
    """Which replica has seen which prompt blocks (least recently used forgotten beyond `max_blocks` per
    replica), and how many requests each replica has in flight."""

    def __init__(self, block_chars: int = BLOCK_CHARS, imbalance_limit: int = IMBALANCE_LIMIT,
                 max_blocks: int = MAX_BLOCKS_PER_REPLICA):
        if block_chars < 1 or imbalance_limit < 0 or max_blocks < 1:
            raise ValueError(f"PrefixTable: block_chars >= 1, imbalance_limit >= 0 and max_blocks >= 1 expected, got "
                             f"{block_chars}, {imbalance_limit}, {max_blocks}")
        self.block_chars, self.imbalance_limit, self.max_blocks = block_chars, imbalance_limit, max_blocks
        self.blocks: dict[object, OrderedDict] = {}
        self.in_flight: dict[object, int] = {}

    def keep_only(self, replicas) -> None:
        """Forget replicas that are gone (a restarted replica comes back under a new id, with an empty cache)."""
        live = set(replicas)
        for r in [r for r in self.blocks if r not in live]:
            del self.blocks[r]
        for r in [r for r in self.in_flight if r not in live]:
            del self.in_flight[r]

    def matched_blocks(self, replica, keys: list[bytes]) -> int:
        held = self.blocks.get(replica)
        if not held:
            return 0
        n = 0
        for k in keys:
            if k not in held:
                break
            n += 1
        return n

    def choose(self, replicas: list, text: str) -> tuple[list, str]:
        """(replicas in order of preference, "prefix" or "least_loaded"). The replica with the longest matching
        prefix comes first unless it is more than `imbalance_limit` requests busier than the least loaded; then
        the others from least to most loaded (ties in random order)."""
        if not replicas:
            return [], "least_loaded"
        order = list(replicas)
        random.shuffle(order)
        order.sort(key=lambda r: self.in_flight.get(r, 0))
        keys = block_keys(text, self.block_chars)
        if keys:
            least = self.in_flight.get(order[0], 0)
            best, best_n = None, 0
            for r in order:
                n = self.matched_blocks(r, keys)
                if n > best_n and self.in_flight.get(r, 0) <= least + self.imbalance_limit:
                    best, best_n = r, n
            if best is not None:
                order.remove(best)
                return [best] + order, "prefix"
        return order, "least_loaded"

    def routed(self, replica, text: str) -> None:
        """A request sent: `started` and `remember` together."""
        self.started(replica)
        self.remember(replica, text)

    def started(self, replica) -> None:
        self.in_flight[replica] = self.in_flight.get(replica, 0) + 1

    def remember(self, replica, text: str) -> None:
        """The replica now holds the text's blocks (it will once it has prefilled them)."""
        keys = block_keys(text, self.block_chars)
        if not keys:
            return
        held = self.blocks.setdefault(replica, OrderedDict())
        for k in keys:
            held[k] = None
            held.move_to_end(k)
        while len(held) > self.max_blocks:
            held.popitem(last=False)

    def completed(self, replica) -> None:
        if self.in_flight.get(replica, 0) > 0:
            self.in_flight[replica] -= 1
