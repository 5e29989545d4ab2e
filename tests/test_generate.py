"""The sampler: temperatures too small to sample with are greedy (no NaN from dividing by ~1e-308)."""
import warnings

import numpy as np
import pytest

from molmo_edge.runtime.generate import GREEDY_BELOW, GenerationOptions, generate, pick_token


@pytest.mark.parametrize("temperature", [0.0, 5e-324, 1e-308, 1e-12, GREEDY_BELOW / 2])
def test_tiny_temperatures_are_greedy_without_nan(temperature):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 30, 5000).astype(np.float32)
    with warnings.catch_warnings(), np.errstate(all="raise"):   # an overflow or NaN would raise here
        warnings.simplefilter("error")
        picks = {pick_token(logits, GenerationOptions(temperature=temperature, top_p=tp), rng) for tp in (1.0, 5e-324, 0.5)}
    assert picks == {int(np.argmax(logits))}


def test_small_but_real_temperatures_still_sample():
    logits = np.zeros(8, np.float32)   # a flat distribution: sampling must spread over the tokens
    rng = np.random.default_rng(1)
    with np.errstate(all="raise"):
        picks = [pick_token(logits, GenerationOptions(temperature=GREEDY_BELOW), rng) for _ in range(200)]
    assert len(set(picks)) == 8
    peaked = np.array([0.0, 1.0, 0.0], np.float32)   # at 1e-6 a gap of 1 logit is certainty (exp underflows to 0: fine)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        assert pick_token(peaked, GenerationOptions(temperature=GREEDY_BELOW), rng) == 1


def test_generate_with_a_denormal_temperature_equals_greedy():
    table = np.random.default_rng(2).normal(0, 5, (50, 50)).astype(np.float32)   # next-token logits per token

    def run(temperature):
        opts = GenerationOptions(max_new_tokens=12, temperature=temperature, seed=3)
        return generate(table[0], lambda t: table[t], opts, eos_id=-1, decode=lambda ids: " ".join(map(str, ids)))
    greedy = run(0.0)
    assert greedy == run(1e-308) == run(5e-324)
    assert greedy[1] == "length" and len(greedy[0]) == 12
