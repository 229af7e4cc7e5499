"""Pages for requests: the allocator and the radix cache behind one small interface.

Every page is in exactly one place: free (allocator), cached (radix tree), or owned by one
request (`req.pages[req.num_tree_pages:]`). `check_integrity` proves it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from jaxsgl.engine.page_allocator import PageAllocator
from jaxsgl.engine.radix_cache import MatchResult, RadixCache
from jaxsgl.engine.request import Request

logger = logging.getLogger(__name__)


class KVManager:
    def __init__(self, num_pages: int, page_size: int, disable_radix_cache: bool = False):
        self.page_size = page_size
        self.allocator = PageAllocator(num_pages)
        self.cache = RadixCache(page_size, disable=disable_radix_cache)
        self.num_evicted_pages = 0

    @property
    def num_usable_pages(self) -> int:
        return self.allocator.num_total

    @property
    def num_available_pages(self) -> int:
        """Pages a new allocation can get: free ones plus unlocked cached ones."""
        return self.allocator.num_free + self.cache.num_evictable_pages

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def match(self, req: Request, limit: int) -> MatchResult:
        """The cached prefix of `req.tokens[:limit]` (whole pages only)."""
        return self.cache.match_prefix(req.tokens[:limit], req.namespace)

    def attach_prefix(self, req: Request, match: MatchResult) -> None:
        """Give a request with no KV the matched prefix: lock it, point at its pages."""
        assert req.kv_len == 0 and not req.pages and req.last_node is None
        self.cache.lock(match.node)
        req.last_node = match.node
        req.pages = list(match.pages)
        req.num_tree_pages = len(match.pages)
        req.kv_len = match.num_tokens

    def reserve(self, req: Request, num_tokens: int) -> bool:
        """Make `req.pages` cover `num_tokens` tokens, evicting cached pages if needed.
        Returns False, changing nothing, when the pool cannot provide them."""
        need = self.pages_for(num_tokens) - len(req.pages)
        if need <= 0:
            return True
        pages = self.alloc(need)
        if pages is None:
            return False
        req.pages += pages
        return True

    def alloc(self, n: int) -> list[int] | None:
        short = n - self.allocator.num_free
        if short > 0:
            if short > self.cache.num_evictable_pages:
                return None
            evicted = self.cache.evict(short)
            self.num_evicted_pages += len(evicted)
            self.allocator.free(evicted)
        return self.allocator.alloc(n)

    def cache_computed(self, req: Request) -> None:
        """Insert the request's computed whole pages into the tree and re-lock its new end, so
        requests sharing the prefix can use it while this one still runs."""
        if self.cache.disable:
            return
        num_pages = req.kv_len // self.page_size
        if num_pages <= req.num_tree_pages:
            return
        tokens = req.tokens[: num_pages * self.page_size]
        already = self.cache.insert(tokens, req.pages[:num_pages], req.namespace)
        # Pages between what we held from the tree and what it had meanwhile are duplicates.
        dup = req.pages[req.num_tree_pages : already // self.page_size]
        self.allocator.free(dup)
        match = self.cache.match_prefix(tokens, req.namespace)
        assert match.num_tokens == num_pages * self.page_size, (match.num_tokens, num_pages)
        self.cache.lock(match.node)
        if req.last_node is not None:
            self.cache.unlock(req.last_node)
        req.last_node = match.node
        req.pages[:num_pages] = match.pages
        req.num_tree_pages = num_pages

    def release(self, req: Request, keep: bool = True) -> None:
        """Drop everything `req` holds. With `keep`, its computed pages stay cached first."""
        if keep:
            self.cache_computed(req)
        if req.last_node is not None:
            self.cache.unlock(req.last_node)
        self.allocator.free(req.pages[req.num_tree_pages :])
        req.pages, req.num_tree_pages, req.last_node, req.kv_len = [], 0, None, 0

    def flush(self) -> int:
        pages = self.cache.flush()
        self.allocator.free(pages)
        return len(pages)

    def check_integrity(self, holders: Iterable[Request]) -> None:
        """free + cached + owned by requests = all usable pages, each exactly once."""
        self.allocator.check_integrity()
        self.cache.check_integrity()
        free = self.allocator.free_pages()
        cached = self.cache.all_pages()
        cached_set = set(cached)
        owned: list[int] = []
        for req in holders:
            assert set(req.pages[: req.num_tree_pages]) <= cached_set, req.rid
            assert req.kv_len <= len(req.pages) * self.page_size, req.rid
            owned += req.pages[req.num_tree_pages :]
        everything = free + cached + owned
        assert len(everything) == len(set(everything)), "a page is in two places"
        assert set(everything) == set(range(1, self.allocator.num_total + 1)), (
            f"pages lost: {self.allocator.num_total - len(everything)}"
        )
