"""Which KV a request keeps when it is parked for a regroup, on SGLang's own `Req` (so a field SGLang renames
fails here, not mid-recovery); the server tests cover the rest."""

from array import array
from types import SimpleNamespace

from sglang.srt.managers.schedule_batch import Req
from sglang.srt.sampling.sampling_params import SamplingParams

from sglang_ft.managers.park_requests import committed_kv_len


class Mode:
    def __init__(self, decode: bool):
        self.decode = decode

    def is_decode(self) -> bool:
        return self.decode


def request(prompt: int, outputs: int, committed: int, protected: int = 0, extend: int = 0):
    """A request as SGLang's scheduler leaves it: `extend` tokens of its prompt in the current prefill step."""
    req = Req("r", "", array("q", [1] * prompt), SamplingParams(max_new_tokens=64))
    req.output_ids = array("q", [2] * outputs)
    req.kv.kv_committed_len, req.kv.cache_protected_len = committed, protected
    req.prefix_len, req.extend_end = committed - extend, committed
    return req


def test_between_steps_every_token_but_the_newest_has_kv():
    req = request(prompt=10, outputs=4, committed=13)
    assert committed_kv_len(req, None) == 13


def test_a_decode_step_that_failed_mid_forward_loses_its_token():
    req = request(prompt=10, outputs=4, committed=14)  # the step had reserved slot 13 for output 4
    batch = SimpleNamespace(reqs=[req], forward_mode=Mode(decode=True))
    assert committed_kv_len(req, batch) == 13
    other = request(prompt=10, outputs=4, committed=13)  # not in the failed batch
    assert committed_kv_len(other, batch) == 13


def test_a_prefill_that_failed_keeps_only_its_cached_prefix():
    req = request(prompt=30, outputs=0, committed=30, protected=8, extend=22)
    batch = SimpleNamespace(reqs=[req], forward_mode=Mode(decode=False))
    assert committed_kv_len(req, batch) == 8


def test_never_below_the_prefix_the_radix_cache_already_holds():
    req = request(prompt=5, outputs=0, committed=5, protected=4, extend=5)
    batch = SimpleNamespace(reqs=[req], forward_mode=Mode(decode=False))
    assert committed_kv_len(req, batch) == 4
