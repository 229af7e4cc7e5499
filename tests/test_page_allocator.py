"""PageAllocator: the scratch page, all-or-nothing alloc, LIFO reuse, and bad frees."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsgl.engine.page_allocator import SCRATCH_PAGE, PageAllocator


def test_fresh_pool_hands_out_every_page_but_the_scratch_page():
    alloc = PageAllocator(5)
    assert (alloc.num_total, alloc.num_free, alloc.num_used) == (4, 4, 0)
    assert alloc.alloc(4) == [1, 2, 3, 4]
    assert alloc.num_free == 0 and alloc.num_used == 4
    assert not alloc.is_free(SCRATCH_PAGE)
    alloc.check_integrity()


def test_alloc_is_all_or_nothing():
    alloc = PageAllocator(5)
    assert alloc.alloc(3) == [1, 2, 3]
    assert alloc.alloc(2) is None
    assert alloc.num_free == 1
    assert alloc.alloc(0) == []
    assert alloc.alloc(1) == [4]


def test_recently_freed_pages_come_back_first_in_order():
    alloc = PageAllocator(10)
    alloc.alloc(6)
    alloc.free([5, 2])
    alloc.free([4])
    assert alloc.alloc(1) == [4]
    assert alloc.alloc(2) == [5, 2]
    assert alloc.alloc(1) == [7]  # then the never-used pages
    alloc.check_integrity()


@pytest.mark.parametrize(
    ("pages", "message"),
    [
        ([3], "double free of page 3"),
        ([0], "cannot free page 0"),
        ([8], "cannot free page 8"),
        ([-1], "cannot free page -1"),
        ([1, 2, 1], r"pages \[1\] appear twice"),
    ],
)
def test_bad_free_names_the_page_and_changes_nothing(pages, message):
    alloc = PageAllocator(8)
    alloc.alloc(2)  # pages 1 and 2 are in use, 3..7 free
    with pytest.raises(ValueError, match=message):
        alloc.free(pages)
    assert alloc.num_free == 5 and not alloc.is_free(1) and not alloc.is_free(2)
    alloc.check_integrity()


def test_bad_arguments():
    with pytest.raises(ValueError, match="got 1"):
        PageAllocator(1)
    alloc = PageAllocator(4)
    with pytest.raises(ValueError, match="-2"):
        alloc.alloc(-2)
    with pytest.raises(ValueError, match="page 4"):
        alloc.is_free(4)
    with pytest.raises(TypeError):
        alloc.free([1.0])


def test_numpy_page_ids_are_accepted():
    alloc = PageAllocator(4)
    pages = alloc.alloc(3)
    alloc.free(np.asarray(pages))
    assert alloc.num_free == 3
    alloc.check_integrity()


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 20), st.lists(st.tuples(st.booleans(), st.integers(0, 6)), max_size=40))
def test_matches_a_set_model(num_pages, ops):
    alloc, held = PageAllocator(num_pages), []
    for is_alloc, n in ops:
        if is_alloc:
            pages = alloc.alloc(n)
            if n > num_pages - 1 - len(held):
                assert pages is None
                continue
            assert len(pages) == n and not set(pages) & set(held)
            held += pages
        else:
            n = min(n, len(held))
            alloc.free(held[:n])
            assert all(alloc.is_free(p) for p in held[:n])
            del held[:n]
        alloc.check_integrity()
        assert sorted(alloc.free_pages() + held) == list(range(1, num_pages))
