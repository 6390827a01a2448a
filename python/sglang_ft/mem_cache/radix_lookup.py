"""Looking token sequences up in SGLang's radix cache from outside the scheduler's own prefix match: the key SGLang
builds for a request's tokens, and the KV slots of a prefix a match found."""

from __future__ import annotations

import types
from array import array

import torch


def radix_key(token_ids, extra_key, cache_salt, page_size: int):
    """SGLang's key for `token_ids` (with the request's extra key and cache salt), page-aligned as its match does."""
    from sglang_ft.sglang_surface import RadixKey

    return RadixKey(array("q", token_ids), extra_key, cache_salt=cache_salt).page_aligned(page_size)


def match_request(tree, req, page_size: int):
    """A queued request's tokens (its prompt and output so far) and SGLang's radix-cache match of them."""
    from sglang_ft.sglang_surface import MatchPrefixParams

    tokens = list(req.origin_input_ids) + list(req.output_ids)
    key = radix_key(tokens, req.extra_key, req.cache_salt, page_size)
    return tokens, tree.match_prefix(MatchPrefixParams(key=key))


def matched_slots(tree, match, req) -> torch.Tensor:
    """The KV slots of the prefix `match` found for `req` in SGLang's radix cache (either of its trees)."""
    probe = types.SimpleNamespace(last_node=match.last_device_node, prefix_len=match.device_prefix_len,
                                  extra_key=req.extra_key, rid=req.rid)
    return tree.prefix_device_indices(probe)
