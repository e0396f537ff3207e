"""Host-side bookkeeping of the engine's KV pages: a free list and reference counts.

Pages are shared by reference count: a fork takes a reference on each full page of its source's
prefix, and a page returns to the free list when its last holder drops it. Page 0 is the null page
(``models.NULL_PAGE``) and is never handed out.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from atpo_jax.models import NULL_PAGE


class KVPoolExhausted(RuntimeError):
    """The KV page pool cannot hold what was asked; the caller waits, preempts, or raises the pool."""


class PageAllocator:
    """Reference-counted pages ``1 .. num_pages - 1``.

    Attributes:
      peak_used: the most pages in use at once since the last :meth:`reset_peak`.
      waits: requests refused for lack of pages (each a chain that had to wait).
    """

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(
                f"a page pool needs >= 2 pages (one is the null page), got {num_pages}"
            )
        self.num_pages = num_pages
        self._refs = np.zeros(num_pages, np.int32)
        # Lowest ids first: deterministic, and a small run touches the start of the pool only.
        self._free = list(range(num_pages - 1, NULL_PAGE, -1))
        self.peak_used = 0
        self.waits = 0

    @property
    def capacity(self) -> int:
        """Pages that sequences can hold (all but the null page)."""
        return self.num_pages - 1

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.capacity - len(self._free)

    def refs(self, page: int) -> int:
        return int(self._refs[page])

    def allocate(self, count: int) -> list[int]:
        """``count`` fresh pages with one reference each; raises :class:`KVPoolExhausted` (taking
        nothing) when fewer are free."""
        if count > len(self._free):
            self.waits += 1
            raise KVPoolExhausted(
                f"{count} KV pages needed, {len(self._free)} of {self.capacity} free"
            )
        pages = [self._free.pop() for _ in range(count)]
        self._refs[pages] = 1
        self.peak_used = max(self.peak_used, self.used)
        return pages

    def share(self, pages: Iterable[int]) -> None:
        """One more reference on each page (a fork's shared prefix)."""
        for page in pages:
            if self._refs[page] < 1:
                raise ValueError(f"page {page} is not in use and cannot be shared")
            self._refs[page] += 1

    def release(self, pages: Iterable[int]) -> None:
        """Drops one reference per page; pages without references return to the free list."""
        for page in pages:
            if self._refs[page] < 1:
                raise ValueError(f"page {page} released more often than it was taken")
            self._refs[page] -= 1
            if self._refs[page] == 0:
                self._free.append(page)

    def reset_peak(self) -> None:
        self.peak_used = self.used
        self.waits = 0

    def check_empty(self) -> None:
        """Raises if any page is still referenced (a leak), naming how many."""
        if self.used:
            held = int(np.count_nonzero(self._refs))
            raise AssertionError(f"KV page leak: {held} pages still referenced")
