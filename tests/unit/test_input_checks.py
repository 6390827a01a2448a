"""What `--ft` refuses beyond upstream's own checks (the live server test sends them over HTTP)."""

from types import SimpleNamespace

import pytest
from sglang_ft.entrypoints.input_checks import check_generate_input, detokenize_error


@pytest.mark.parametrize("ids, message", [([5, 100], "token id 100"), ([-1, 3], "token id -1")])
def test_token_ids_outside_the_vocabulary_are_refused(ids, message):
    with pytest.raises(ValueError, match=message):
        check_generate_input(SimpleNamespace(sampling_params={}), ids, vocab_size=100)


def test_n_below_one_is_refused_and_good_requests_pass():
    with pytest.raises(ValueError, match="n must be at least 1"):
        check_generate_input(SimpleNamespace(sampling_params={"n": 0}), [1], vocab_size=100)
    check_generate_input(SimpleNamespace(sampling_params={"n": 2}), [0, 99], vocab_size=100)
    check_generate_input(SimpleNamespace(sampling_params=None), None, vocab_size=100)  # text not tokenized yet


def test_an_empty_input_is_refused_unless_embeddings_are_given():
    with pytest.raises(ValueError, match="The input is empty"):
        check_generate_input(SimpleNamespace(sampling_params={}, input_embeds=None), [], vocab_size=100)
    check_generate_input(SimpleNamespace(sampling_params={}, input_embeds=[[0.1, 0.2]]), [], vocab_size=100)


@pytest.mark.parametrize("tokens, bad", [([3, -1], -1), ([[1], [2, 100]], 100), ([], None), ([[0, 99]], None)])
def test_detokenize_refuses_ids_outside_the_vocabulary(tokens, bad):
    error = detokenize_error(tokens, vocab_size=100)
    assert (error is None) if bad is None else (f"token id {bad}," in error)
