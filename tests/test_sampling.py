"""In-step sampling ops (counter-based RNG, Gumbel-max, top-k / top-p), n-sample generation, response
log-probs and best-of-N with RLAIF-V's implicit reward."""

import math

import numpy as np
import pytest
import torch

from lvlm.config import preset
from lvlm.llava import LlavaForConditionalGeneration
from search.sampling import (best_of_n, implicit_reward, implicit_reward_scorer, response_logprobs,
                             sample_responses)
from search.sampling_ops import (diverse_greedy_tokens, filter_top_k_top_p, lowbias32, mix_seeds,
                                 sample_tokens, seed_keys, uniform_noise, vocab_keys)

# -- the RNG -----------------------------------------------------------------------------------


def lowbias32_numpy(x: np.ndarray) -> np.ndarray:
    """Reference on uint32, where multiplication wraps modulo 2^32 by definition."""
    x = x.astype(np.uint32)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x7FEB352D)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x846CA68B)
        x ^= x >> np.uint32(16)
    return x


def test_lowbias32_matches_uint32_reference():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.integers(0, 2**32, 10000, dtype=np.uint64), [0, 1, 2**31, 2**32 - 1]])
    got = lowbias32(torch.from_numpy(values.astype(np.int64))).numpy()
    np.testing.assert_array_equal(got, lowbias32_numpy(values).astype(np.int64))
    assert lowbias32(torch.tensor([1])).item() != 1  # it mixes


def test_uniform_noise_is_in_open_interval_and_uniform():
    u = uniform_noise(seed_keys(torch.arange(64, dtype=torch.long) * 1000003 - 5), torch.arange(64) % 3,
                      vocab_keys(4096))
    assert u.dtype == torch.float32 and u.shape == (64, 4096)
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005  # 262k values: std of the mean is 0.00056
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert float((hist - 0.1).abs().max()) < 0.005
    # Row-wise independence of seeds and counters: different (seed, counter) -> different noise.
    assert not torch.equal(u[0], u[1])
    same = uniform_noise(seed_keys(torch.tensor([7, 7])), torch.tensor([0, 1]), vocab_keys(16))
    assert not torch.equal(same[0], same[1])
    torch.testing.assert_close(uniform_noise(seed_keys(torch.tensor([7])), torch.tensor([1]), vocab_keys(16))[0],
                               same[1], atol=0, rtol=0)


def test_gumbel_max_samples_follow_softmax_at_temperature():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0])
    N, T = 40000, 0.7
    keys, counters = seed_keys(torch.arange(N, dtype=torch.long)), torch.zeros(N, dtype=torch.long)
    tokens = sample_tokens(logits.expand(N, 5).clone(), keys, counters, torch.full((N,), T))
    freq = torch.bincount(tokens, minlength=5).float() / N
    torch.testing.assert_close(freq, torch.softmax(logits / T, -1), atol=0.01, rtol=0)


def test_top_k_and_top_p_filters_by_hand():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()

    def keep(k, p):
        return torch.isfinite(filter_top_k_top_p(logits, torch.tensor([k]), torch.tensor([p])))[0].tolist()

    assert keep(0, 1.0) == [True, True, True, True]
    assert keep(1, 1.0) == [False, True, False, False]
    assert keep(3, 1.0) == [False, True, True, True]
    # nucleus: 0.5 (mass before 0), 0.3 (before 0.5), 0.15 (before 0.8), 0.05 (before 0.95)
    assert keep(0, 0.75) == [False, True, False, True]
    assert keep(0, 0.85) == [False, True, True, True]
    assert keep(0, 0.4) == [False, True, False, False]
    assert keep(2, 0.99) == [False, True, False, True]
    # Sampling respects the filters: at top_k=2 only tokens 1 and 3 appear, in ratio 0.5 : 0.3.
    N = 20000
    keys, counters = seed_keys(torch.arange(N, dtype=torch.long)), torch.zeros(N, dtype=torch.long)
    top_k, top_p = torch.full((N,), 2), torch.ones(N)
    tokens = sample_tokens(logits.expand(N, 4).clone(), keys, counters, torch.ones(N), top_k, top_p)
    freq = torch.bincount(tokens, minlength=4).float() / N
    torch.testing.assert_close(freq, torch.tensor([0.0, 0.625, 0.0, 0.375]), atol=0.015, rtol=0)


def test_temperature_zero_is_exact_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    tokens = sample_tokens(logits, seed_keys(torch.arange(6)), torch.zeros(6, dtype=torch.long), torch.zeros(6))
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_diverse_groups_penalise_earlier_choices_of_siblings():
    # Two sibling blocks of 3 groups. Block 0: token 0 leads token 1 by 1.0 and token 2 by 5.0.
    lp = torch.tensor([[-1.0, -2.0, -6.0, -9.0]]).expand(6, 4).clone()
    lp[3:] = torch.tensor([-1.0, -8.0, -9.0, -1.5])  # block 1: 0 and 3 are close
    group = torch.tensor([0, 1, 2, 0, 1, 2])
    block = torch.tensor([0, 0, 0, 1, 1, 1])
    tokens = diverse_greedy_tokens(lp, group, block, torch.ones(6, dtype=torch.bool), 3, penalty=3.0)
    # block 0: g0 -> 0; g1: 0 penalised to -4 -> 1 (-2); g2: 0 at -4, 1 at -5 -> 0 (-4 beats -5 and -6)
    # block 1: g0 -> 0; g1: 0 at -4, 3 at -1.5 -> 3; g2: 0 at -4, 3 at -4.5 -> 0
    assert tokens.tolist() == [0, 1, 0, 0, 3, 0]
    # An inactive (finished) group's choice does not count against later groups.
    active = torch.tensor([False, True, True, True, True, True])  # g1: no penalty -> 0; g2: 0 at -4 -> 1
    assert diverse_greedy_tokens(lp, group, block, active, 3, 3.0).tolist()[:3] == [0, 0, 1]
    active = torch.tensor([True, False, True, True, True, True])  # g2 sees only g0's 0 -> 1
    assert diverse_greedy_tokens(lp, group, block, active, 3, 3.0).tolist()[:3] == [0, 1, 1]


def test_mix_seeds_depends_on_every_value_and_order():
    seeds = {mix_seeds(0, p, j) for p in range(30) for j in range(30)}
    assert len(seeds) == 900
    assert mix_seeds(1, 2) != mix_seeds(2, 1)
    assert mix_seeds(1, 2) == mix_seeds(1, 2)
    assert 0 <= mix_seeds(-5, 2**40) < 2**63


# -- n samples, log-probs, best-of-N ---------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    return LlavaForConditionalGeneration(preset("tiny-llava")).eval()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(4)
    return [([5, 6] + [3] * 4 + [7, 8], torch.randn(1, 3, 28, 28, generator=g)), ([9, 10, 11, 12], None)]


def test_sample_responses_shape_and_logprobs_match_a_full_forward(model, prompts):
    groups = sample_responses(model, prompts, n=4, max_new_tokens=10, temperature=0.7, seed=1, stop_ids=[2])
    assert [len(g) for g in groups] == [4, 4]
    assert len({tuple(g.tokens) for g in groups[0]}) > 1  # differing only in the seed, yet different
    flat = [g for group in groups for g in group]
    prompt_of = [prompts[g.prompt_index] for g in flat]
    summed = response_logprobs(model, prompt_of, [g.tokens for g in flat], batch_size=3)
    torch.testing.assert_close(summed, torch.tensor([g.logprob_sum for g in flat]), atol=1e-4, rtol=0)
    averaged = response_logprobs(model, prompt_of, [g.tokens for g in flat], average=True)
    torch.testing.assert_close(averaged, summed / torch.tensor([len(g.tokens) for g in flat]), atol=1e-5, rtol=0)


def test_response_logprobs_by_hand_on_one_row(model, prompts):
    ids, px = prompts[0]
    response = [40, 41, 42]
    with torch.no_grad():
        logits = model(torch.tensor([ids + response]), px)[0].float()
    expected = sum(float(torch.log_softmax(logits[len(ids) - 1 + t], -1)[response[t]]) for t in range(3))
    got = response_logprobs(model, [prompts[0]], [response])
    assert math.isclose(float(got[0]), expected, abs_tol=1e-5)


def test_implicit_reward_formula():
    r = implicit_reward(torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0]), torch.tensor([4, 2]), beta=0.5)
    torch.testing.assert_close(r, torch.tensor([0.5 / 4 * 2.0, 0.5 / 2 * -1.0]))
    with pytest.raises(ValueError, match="at least one token"):
        implicit_reward(torch.zeros(1), torch.zeros(1), torch.zeros(1))


def test_best_of_n_picks_the_highest_score(model, prompts):
    score = lambda prompt, samples: torch.tensor([float(sum(g.tokens) % 17) for g in samples])  # noqa: E731
    results = best_of_n(model, prompts, n=5, score_fn=score, max_new_tokens=6, temperature=1.0, seed=3)
    for res in results:
        by_hand = [sum(g.tokens) % 17 for g in res.samples]
        assert res.best is res.samples[by_hand.index(max(by_hand))]


def test_implicit_reward_scorer_against_direct_computation(model, prompts):
    torch.manual_seed(9)
    reference = LlavaForConditionalGeneration(preset("tiny-llava")).eval()
    same = best_of_n(model, prompts[:1], n=3, score_fn=implicit_reward_scorer(model), max_new_tokens=6, seed=5)[0]
    torch.testing.assert_close(same.scores, torch.zeros(3), atol=2e-6, rtol=0)  # policy = reference -> 0
    res = best_of_n(model, prompts[:1], n=3, score_fn=implicit_reward_scorer(reference, beta=0.1),
                    max_new_tokens=6, seed=5)[0]
    expected = []
    with torch.no_grad():
        for g in res.samples:
            ids, px = prompts[0]
            seq = torch.tensor([ids + g.tokens])
            lp = lambda m: sum(float(torch.log_softmax(m(seq, px)[0, len(ids) - 1 + t].float(), -1)[tok])  # noqa
                               for t, tok in enumerate(g.tokens))
            expected.append(0.1 / len(g.tokens) * (lp(model) - lp(reference)))
    torch.testing.assert_close(res.scores, torch.tensor(expected), atol=1e-5, rtol=0)
    assert res.best is res.samples[int(torch.tensor(expected).argmax())]
