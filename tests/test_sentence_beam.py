"""CSR's sentence-level beam search on the tiny model: consistency of scores and tokens, agreement with
a search that re-encodes every prefix, and agreement with a brute-force reference written with
full forwards and plain Python lists."""

import pytest
import torch

from lvlm.config import preset
from lvlm.llava import LlavaForConditionalGeneration
from search.sampling_ops import mix_seeds, sample_tokens, seed_keys
from search.sentence_beam import (Response, Sentence, chosen_and_rejected, default_decode_fn, select_top_bottom,
                                  sentence_beam_search)

IMAGE = 3
DELIMITERS = list(range(100, 116))  # one token in 8 ends a sentence
EOS = [2, 60, 61, 62, 63, 64, 65, 66]  # one in 16 ends the response
SETTINGS = dict(delimiter_ids=DELIMITERS, stop_ids=EOS, max_sentence_tokens=6, max_sentences=3, max_total_tokens=16)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(preset("tiny-llava")).eval()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [([5, 6, 7] + [IMAGE] * 4 + [9, 10], torch.randn(1, 3, 28, 28, generator=g)),
            ([11, 12, 13, 14], None)]


def token_hash_score(ids):
    """A hand-made deterministic sentence score: a function of the token ids alone."""
    return ((sum(t * (i + 1) for i, t in enumerate(ids)) * 37) % 101) / 10.0


def hash_scorer(candidates):
    return torch.tensor([token_hash_score(ids) for ids in candidates.token_ids])


def test_select_top_bottom_by_hand():
    scores = [0.3, 0.9, 0.1, 0.5, 0.7, 0.2]
    assert select_top_bottom(scores, 2, 2) == [1, 4, 5, 2]
    assert select_top_bottom(scores, 1, 2) == [1, 5, 2]  # the released code's top 1 + bottom 2
    assert select_top_bottom(scores[:3], 2, 2) == [1, 0, 2]  # fewer than 2k nodes: all, each once
    assert select_top_bottom([1.0, 1.0, 1.0, 1.0, 1.0], 1, 1) == [0, 4]  # ties: proposal order
    assert select_top_bottom([], 2, 2) == []


def test_chosen_and_rejected_picks_extremes():
    def resp(score):
        return Response(0, [], score, [], torch.zeros(0), "", "eos", ())

    rs = [resp(1.0), resp(3.0), resp(-2.0), resp(0.5)]
    chosen, rejected = chosen_and_rejected(rs)
    assert chosen is rs[1] and rejected is rs[2]
    assert chosen_and_rejected(rs[:1]) is None


def test_search_returns_consistent_distinct_responses(model, prompts):
    results = sentence_beam_search(model, prompts, n_candidates=4, k=2, seed=0, **SETTINGS)
    assert len(results) == 2
    eos = set(EOS)
    for p, responses in enumerate(results):
        assert len({tuple(r.tokens) for r in responses}) >= 3  # several distinct finished responses
        for r in responses:
            assert r.prompt_index == p and r.finish_reason in ("eos", "length")
            assert abs(r.score - sum(s.score for s in r.sentences)) < 1e-5
            joined = [t for s in r.sentences for t in s.token_ids]
            assert r.tokens[: len(joined)] == joined
            trailing = r.tokens[len(joined):]  # an end-of-sequence-only candidate that ended the path
            assert trailing == [] or (r.finish_reason == "eos" and trailing[-1] in eos)
            assert 1 <= len(r.sentences) <= 3 and len(r.tokens) <= 16 + 6
            for s in r.sentences:
                torch.testing.assert_close(torch.tensor(s.score), s.logprobs.mean(), atol=1e-6, rtol=0)
                assert len(s.text.strip()) >= 4
                end = s.token_ids[-1]
                assert (s.finish_reason == "eos") == (end in eos)
                assert s.finish_reason != "delimiter" or end in DELIMITERS
                assert s.finish_reason != "length" or len(s.token_ids) == 6 or sum(
                    len(x.token_ids) for x in r.sentences) == 16
            # The recorded log-probs are the model's: teacher-forced full forward of prompt + response.
            ids, px = prompts[p]
            with torch.no_grad():
                logits = model(torch.tensor([ids + r.tokens]), px)[0, len(ids) - 1: -1].float()
            expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(r.tokens)[:, None])[:, 0]
            torch.testing.assert_close(r.logprobs, expected, atol=1e-5, rtol=0)
        chosen, rejected = chosen_and_rejected(responses)
        assert chosen.score == max(r.score for r in responses)
        assert rejected.score == min(r.score for r in responses)


@pytest.mark.parametrize("proposal", ["sample", "diverse"])
def test_cache_reuse_equals_recomputing_every_prefix_and_prompts_are_independent(model, prompts, proposal):
    kw = dict(n_candidates=3, k=1, k_bottom=2, proposal=proposal, **SETTINGS)
    seeds = [40, 41]
    # sync_every=2: the cached run also compacts its finished rows mid-sentence (see Decoder).
    together = sentence_beam_search(model, prompts, reuse_cache=True, seed=seeds, sync_every=2, **kw)
    for p in range(2):
        alone = sentence_beam_search(model, [prompts[p]], reuse_cache=False, seed=[seeds[p]], **kw)[0]
        assert [r.tokens for r in together[p]] == [r.tokens for r in alone]
        assert [r.path for r in together[p]] == [r.path for r in alone]
        torch.testing.assert_close(torch.tensor([r.score for r in together[p]]),
                                   torch.tensor([r.score for r in alone]), atol=1e-5, rtol=0)


def brute_force_search(model, prompt, *, C, k, k_bottom, seed, temperature=1.0, min_chars=4):
    """Reference: CSR's search spelled out with plain lists, every token from a full forward of
    image + prompt + path (no cache, no batching), the same seeds, rules and selection by sorting."""
    ids, px = prompt
    eos, delims = set(EOS), set(DELIMITERS)
    cap, max_sentences, max_total = SETTINGS["max_sentence_tokens"], SETTINGS["max_sentences"], \
        SETTINGS["max_total_tokens"]

    def propose(path, prefix, c, budget):
        row_seed = mix_seeds(mix_seeds(seed, 0), *path, c)  # prompt 0's seed, then the path
        seq, tokens = ids + prefix, []
        with torch.no_grad():
            for t in range(budget):
                logits = model(torch.tensor([seq]), px)[0, -1].float()
                logits[IMAGE] = float("-inf")
                key = seed_keys(torch.tensor([row_seed]))
                tok = int(sample_tokens(logits[None], key, torch.tensor([t]), torch.tensor([temperature]))[0])
                tokens.append(tok)
                seq.append(tok)
                if tok in eos:
                    return tokens, "eos"
                if tok in delims:
                    return tokens, "delimiter"
        return tokens, "length"

    beams = [((), [], 0.0, 0)]  # (path, tokens, cumulative score, number of sentences)
    responses = []
    while beams:
        nodes = []
        for path, tokens, score, n_sent in beams:
            ended = False
            for c in range(C):
                new, reason = propose(path, tokens, c, min(cap, max_total - len(tokens)))
                text = default_decode_fn([t for t in new if t not in eos])
                if len(text.strip()) < min_chars:
                    if reason == "eos" and n_sent > 0 and not ended:
                        ended = True
                        responses.append((path, tokens + new, score, "eos"))
                    continue
                nodes.append((path + (c,), tokens + new, score + token_hash_score(new), n_sent + 1, reason))
        ranked = sorted(range(len(nodes)), key=lambda i: -nodes[i][2])
        kept = ranked if len(ranked) <= k + k_bottom else ranked[:k] + ranked[len(ranked) - k_bottom:]
        beams = []
        for i in kept:
            path, tokens, score, n_sent, reason = nodes[i]
            if reason == "eos":
                responses.append((path, tokens, score, "eos"))
            elif n_sent >= max_sentences or len(tokens) >= max_total:
                responses.append((path, tokens, score, "length"))
            else:
                beams.append((path, tokens, score, n_sent))
    return responses


def test_selection_matches_brute_force_reference(model, prompts):
    for seed in (0, 1):
        got = sentence_beam_search(model, prompts[:1], n_candidates=3, k=1, k_bottom=1, seed=seed,
                                   score_fn=hash_scorer, **SETTINGS)[0]
        expected = brute_force_search(model, prompts[0], C=3, k=1, k_bottom=1, seed=seed)
        assert len(got) >= 2
        assert [(r.path, r.tokens, r.finish_reason) for r in got] == [(e[0], e[1], e[3]) for e in expected]
        torch.testing.assert_close(torch.tensor([r.score for r in got]), torch.tensor([e[2] for e in expected]))


def test_score_fn_sees_every_candidate_of_a_depth_at_once(model, prompts):
    calls = []

    def recording_scorer(candidates):
        calls.append(candidates)
        return torch.tensor([float(len(t)) for t in candidates.token_ids])

    results = sentence_beam_search(model, prompts, n_candidates=3, k=1, seed=2, score_fn=recording_scorer,
                                   **SETTINGS)
    assert [c.depth for c in calls] == list(range(len(calls)))
    first = calls[0]
    assert set(first.prompt_index) == {0, 1}  # both prompts' candidates in one call
    assert first.pixel_values.shape == (1, 3, 28, 28)
    for i in range(len(first)):
        assert first.image_index[i] == (0 if first.prompt_index[i] == 0 else -1)
        assert first.parent[i] == 0 and first.prefix_token_ids[i] == []
        assert first.texts[i] == default_decode_fn([t for t in first.token_ids[i] if t not in EOS])
    for r in results[0] + results[1]:  # scores are the scorer's: sentence lengths
        assert all(s.score == len(s.token_ids) for s in r.sentences)
    assert isinstance(results[0][0].sentences[0], Sentence)


def test_bad_arguments(model, prompts):
    with pytest.raises(ValueError, match="proposal"):
        sentence_beam_search(model, prompts, proposal="beam", **SETTINGS)
    with pytest.raises(ValueError, match="2 scores for"):
        sentence_beam_search(model, prompts, score_fn=lambda c: torch.zeros(2), n_candidates=3, **SETTINGS)
