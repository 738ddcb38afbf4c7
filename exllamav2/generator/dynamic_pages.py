"""Page table of the dynamic generator: which cache pages are in use, and which hold a known prefix.

A page that is completely filled with prompt tokens gets a hash chained over all pages before it
(h_i = blake2b(h_{i-1} || tokens_i)), so the hash names the whole prefix up to the page's end. A later job whose
prompt hashes to the same chain reuses those pages instead of prefilling them. Pages no job references stay
valid (and findable by hash) until they are recycled, least recently used first.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


def page_hashes(tokens: list[int], page_size: int, salt: bytes = b"") -> list[bytes]:
    """Chained 16-byte blake2b hashes of every full page of `tokens`; `salt` starts the chain (K/V that the same
    tokens give differently, e.g. at other RoPE frequencies, must not match)."""
    out: list[bytes] = []
    prev = salt
    arr = torch.tensor(tokens, dtype=torch.int64).numpy() if tokens else None
    for p in range(len(tokens) // page_size):
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(arr[p * page_size:(p + 1) * page_size].tobytes())
        prev = h.digest()
        out.append(prev)
    return out


@dataclass
class CachePage:
    index: int
    phash: bytes | None = None
    ref_count: int = 0
    access_serial: int = 0


class PageTable:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1:
            raise ValueError(f"the cache must hold at least one page of {page_size} tokens")
        self.page_size = page_size
        self.pages = [CachePage(i) for i in range(num_pages)]
        self.by_hash: dict[bytes, CachePage] = {}
        self._serial = 0

    @property
    def num_pages(self) -> int:
        return len(self.pages)

    def num_free_pages(self) -> int:
        """Pages no job references (they may still hold a reusable prefix)."""
        return sum(1 for p in self.pages if p.ref_count == 0)

    def num_used_pages(self) -> int:
        """Pages some job references."""
        return self.num_pages - self.num_free_pages()

    def num_cached_pages(self) -> int:
        return len(self.by_hash)

    def _touch(self, page: CachePage) -> None:
        self._serial += 1
        page.access_serial = self._serial

    def match(self, hashes: list[bytes]) -> list[CachePage]:
        """The longest run of pages, from the start, whose prefix hashes are known."""
        out = []
        for h in hashes:
            page = self.by_hash.get(h)
            if page is None:
                break
            out.append(page)
        return out

    def acquire(self, hashes: list[bytes], total_pages: int) -> tuple[list[int], int] | None:
        """Pages for a job needing `total_pages`, reusing the known prefix among `hashes` (only pass hashes of
        pages the job may skip). Returns (page indices, number of reused pages), or None if too few are free."""
        reused = self.match(hashes)[:total_pages]
        fresh = self._fresh(total_pages - len(reused), {p.index for p in reused})
        if fresh is None:
            return None
        for p in reused + fresh:
            p.ref_count += 1
            self._touch(p)
        return [p.index for p in reused + fresh], len(reused)

    def allocate(self, n: int) -> list[int] | None:
        """`n` more pages for a job that grows (no prefix to reuse), or None if too few are free."""
        fresh = self._fresh(n, set())
        if fresh is None:
            return None
        for p in fresh:
            p.ref_count += 1
            self._touch(p)
        return [p.index for p in fresh]

    def _fresh(self, need: int, exclude: set[int]) -> list[CachePage] | None:
        free = [p for p in self.pages if p.ref_count == 0 and p.index not in exclude]
        if need > len(free):
            return None
        # unhashed pages first, then the least recently used cached prefixes
        free.sort(key=lambda p: (p.phash is not None, p.access_serial))
        fresh = free[:max(0, need)]
        for p in fresh:
            if p.phash is not None and self.by_hash.get(p.phash) is p:
                del self.by_hash[p.phash]
            p.phash = None
        return fresh

    def register(self, index: int, phash: bytes) -> None:
        """Mark a page as holding the prefix named by `phash` (its K/V are written)."""
        page = self.pages[index]
        if page.phash == phash or phash in self.by_hash:
            return
        page.phash = phash
        self.by_hash[phash] = page

    def forget(self, index: int) -> None:
        page = self.pages[index]
        if page.phash is not None and self.by_hash.get(page.phash) is page:
            del self.by_hash[page.phash]
        page.phash = None

    def release(self, indices: list[int]) -> None:
        for i in indices:
            page = self.pages[i]
            if page.ref_count <= 0:
                raise RuntimeError(f"page {i} released more often than acquired")
            page.ref_count -= 1
            self._touch(page)

    def reset(self) -> None:
        if any(p.ref_count for p in self.pages):
            raise RuntimeError("cannot reset the page table while jobs hold pages")
        for p in self.pages:
            p.phash = None
            p.access_serial = 0
        self.by_hash.clear()
