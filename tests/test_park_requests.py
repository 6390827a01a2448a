"""Which KV a request keeps when it is parked for a regroup (pure logic; the server tests cover the rest)."""

from types import SimpleNamespace

from sglang_ft.managers.park_requests import committed_kv_len


class Mode:
    def __init__(self, decode: bool):
        self.decode = decode

    def is_decode(self) -> bool:
        return self.decode


def request(prompt: int, outputs: int, committed: int, protected: int = 0, extend: int = 0):
    kv = SimpleNamespace(kv_committed_len=committed, cache_protected_len=protected)
    return SimpleNamespace(kv=kv, origin_input_ids=[1] * prompt, output_ids=[2] * outputs, extend_input_len=extend)


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
