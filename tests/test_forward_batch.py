"""The decode fast path of `pack_chunks` builds exactly what the general loop builds."""

import dataclasses

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsgl.model import forward_batch as fb


@st.composite
def decode_steps(draw):
    G = draw(st.sampled_from([1, 4, 16]))
    n = draw(st.integers(1, 9))
    chunks = []
    for s in range(n):
        prefix = draw(st.integers(0, 60))
        pages = [1 + 100 * s + i for i in range(-(-(prefix + 1) // G) + draw(st.integers(0, 2)))]
        chunks.append(fb.SeqChunk([draw(st.integers(0, 999))], prefix, pages))
    shape = fb.fit_shape(chunks, G)
    extra = draw(st.integers(0, 2))  # buckets larger than needed, as warm-up shapes are
    shape = dataclasses.replace(shape, T=shape.T << extra, S=shape.S << extra, R=shape.R << extra)
    return chunks, G, shape


@settings(max_examples=200, deadline=None)
@given(decode_steps())
def test_single_token_path_equals_general_loop(step):
    chunks, G, shape = step
    fast = fb.pack_chunks(chunks, G, shape)
    slow = fb._pack_any(chunks, G, shape)
    for field in dataclasses.fields(fb.ForwardBatch):
        a, b = getattr(fast, field.name), getattr(slow, field.name)
        np.testing.assert_array_equal(a, b, err_msg=field.name)
        assert np.asarray(a).dtype == np.asarray(b).dtype, field.name
