"""Constrained decoding: grammars over the tokenizer, token masks, jump-forward."""
