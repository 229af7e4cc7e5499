"""The free list of KV-cache pages.

The KV pool on the device is `num_pages` pages of `page_size` token slots each (slot =
page * page_size + offset). This allocator owns the pages nobody holds; the radix cache owns the
cached ones and the scheduler the ones running requests hold. Every page is in exactly one of
those three places (DESIGN §2), which the engine checks with each owner's `check_integrity()`.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterable

logger = logging.getLogger(__name__)

# Padding tokens of a shape bucket write their KV here; no request ever reads it.
SCRATCH_PAGE = 0


class PageAllocator:
    """Hands out pages 1..num_pages-1; page 0 (`SCRATCH_PAGE`) is reserved forever.

    Contract: `alloc(n)` is all-or-nothing and its pages belong to the caller until `free` gives
    them back; freeing a page that is already free, out of range, or the scratch page raises
    ValueError naming it, and changes nothing. Both calls cost O(pages moved), not O(pool size).
    Pages are reused last-in-first-out, so `free(x)` then `alloc(len(x))` returns `x` again.
    """

    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
        self._num_pages = num_pages
        # The free pages as a stack, top at the end: a fresh pool hands out 1, 2, 3, ...
        self._stack: list[int] = list(range(num_pages - 1, 0, -1))
        # _is_free[p] == 1 iff p is on the stack: O(1) double-free detection.
        self._is_free = bytearray(num_pages)
        self._is_free[1:] = b"\x01" * (num_pages - 1)

    @property
    def num_free(self) -> int:
        """Pages `alloc` can hand out now."""
        return len(self._stack)

    @property
    def num_total(self) -> int:
        """Usable pages: every page but the scratch page."""
        return self._num_pages - 1

    @property
    def num_used(self) -> int:
        """Usable pages that are not free (cached or held by requests)."""
        return self.num_total - self.num_free

    def alloc(self, n: int) -> list[int] | None:
        """Returns `n` distinct free pages, or None (and changes nothing) if fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages: {n}")
        if n > len(self._stack):
            return None
        if n == 0:
            return []
        pages = self._stack[-n:]
        del self._stack[-n:]
        pages.reverse()
        for p in pages:
            self._is_free[p] = 0
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Gives `pages` back. All are checked before any is freed, so a bad call is a no-op."""
        pages = [operator.index(p) for p in pages]
        for p in pages:
            if not SCRATCH_PAGE < p < self._num_pages:
                raise ValueError(f"cannot free page {p}: usable pages are 1..{self._num_pages - 1}")
            if self._is_free[p]:
                raise ValueError(f"double free of page {p}")
        if len(set(pages)) != len(pages):
            dups = sorted({p for p in pages if pages.count(p) > 1})
            raise ValueError(f"pages {dups} appear twice in one free() call")
        for p in pages:
            self._is_free[p] = 1
        # Reversed so the first page of this call is the first one the next alloc returns.
        self._stack.extend(reversed(pages))

    def is_free(self, page: int) -> bool:
        """Whether `page` is free; the scratch page never is."""
        if not 0 <= page < self._num_pages:
            raise ValueError(f"page {page} is out of range 0..{self._num_pages - 1}")
        return bool(self._is_free[page])

    def free_pages(self) -> list[int]:
        """A copy of the free pages (for the engine's page accounting)."""
        return list(self._stack)

    def check_integrity(self) -> None:
        """Asserts the stack and the membership bytes agree: no duplicates, all in range. O(N)."""
        assert self._is_free[SCRATCH_PAGE] == 0, "the scratch page is marked free"
        assert len(set(self._stack)) == len(self._stack), "a page is on the free list twice"
        for p in self._stack:
            assert SCRATCH_PAGE < p < self._num_pages, f"free page {p} out of range"
            assert self._is_free[p], f"page {p} on the free list but not marked free"
        assert sum(self._is_free) == len(self._stack), "a page is marked free but not on the list"
