"""What `--ft` refuses beyond upstream's own checks (the live server test sends them over HTTP)."""

from types import SimpleNamespace

import pytest
from sglang_ft.entrypoints.input_checks import check_generate_input


@pytest.mark.parametrize("ids, message", [([5, 100], "token id 100"), ([-1, 3], "token id -1")])
def test_token_ids_outside_the_vocabulary_are_refused(ids, message):
    with pytest.raises(ValueError, match=message):
        check_generate_input(SimpleNamespace(sampling_params={}), ids, vocab_size=100)


def test_n_below_one_is_refused_and_good_requests_pass():
    with pytest.raises(ValueError, match="n must be at least 1"):
        check_generate_input(SimpleNamespace(sampling_params={"n": 0}), [1], vocab_size=100)
    check_generate_input(SimpleNamespace(sampling_params={"n": 2}), [0, 99], vocab_size=100)
    check_generate_input(SimpleNamespace(sampling_params=None), [], vocab_size=100)  # text not tokenized yet
