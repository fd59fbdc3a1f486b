"""CSR's calibrated scorer: hand-worked values with a stand-in CLIP, and a real beam search on tiny models."""

import math

import pytest
import torch
from torch import nn

from lvlm.clip import CLIPModel
from lvlm.config import preset
from lvlm.llava import LlavaForConditionalGeneration
from rewards.clip_score import clip_score
from rewards.csr_scorer import CalibratedScorer
from search.sentence_beam import Candidates, mean_logprob_score, sentence_beam_search


class TableCLIP(nn.Module):
    """A stand-in CLIP with features chosen by hand.

    encode_image: the image's feature is its pixel values [0, 0, 0, :2]; encode_text: row
    ids[:, 0] of a fixed table. Counts the images it encodes.
    """

    TEXT_FEATURES = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [0.0, 3.0], [2.0, 0.0]])

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.images_encoded = 0
        self.text_calls = []

    def encode_image(self, pixel_values):
        self.images_encoded += pixel_values.shape[0]
        return pixel_values[:, 0, 0, :2].clone()

    def encode_text(self, input_ids):
        self.text_calls.append(input_ids.shape[0])
        return self.TEXT_FEATURES[input_ids[:, 0]]


def table_tokenize(texts):
    return torch.tensor([[int(t[1:])] for t in texts])  # "t2" -> [[2]]


def hand_images():
    images = torch.zeros(2, 3, 4, 4)
    images[0, 0, 0, :2] = torch.tensor([1.0, 0.0])  # prompt 0's image feature
    images[1, 0, 0, :2] = torch.tensor([0.0, 2.0])  # prompt 1's image feature
    return images


def hand_candidates():
    # prompt 0: candidates t0, t1 (group 0) and t3 (group 1); prompt 1: t2, t1 (group 2)
    logprobs = [torch.tensor([-1.0, -3.0]), torch.tensor([-0.5]), torch.tensor([-2.0, -2.0, -5.0]),
                torch.tensor([-0.1, -0.3]), torch.tensor([-4.0])]
    return Candidates(
        token_ids=[[10, 11], [12], [13, 14, 15], [16, 17], [18]], logprobs=logprobs,
        texts=["t0", "t1", "t3", "t2", "t1"], prompt_index=[0, 0, 0, 1, 1], parent=[0, 0, 1, 0, 0],
        group=[0, 0, 1, 2, 2], image_index=[0, 0, 0, 1, 1], prefix_token_ids=[[], [], [7], [], []], depth=0,
        pixel_values=None)


# Worked out by hand from the tables above:
#   R_I: t0 vs (1,0): cos = 1/sqrt(2) -> 70.7107; t1 vs (1,0): cos = -1 -> 0; t3 vs (1,0): cos = 1 -> 100;
#        t2 vs (0,2): cos = 1 -> 100; t1 vs (0,2): cos = 0 -> 0
#   R_T (mean): -2, -0.5, -3, -0.2, -4       R_T (sum): -4, -0.5, -9, -0.4, -4
R_I = [100 / math.sqrt(2), 0.0, 100.0, 100.0, 0.0]
R_T_MEAN = [-2.0, -0.5, -3.0, -0.2, -4.0]
R_T_SUM = [-4.0, -0.5, -9.0, -0.4, -4.0]


def test_calibrated_values_by_hand():
    clip = TableCLIP()
    scorer = CalibratedScorer(clip, table_tokenize, hand_images(), lam=0.9)
    assert clip.images_encoded == 2  # each prompt's image, once, at construction
    got = scorer(hand_candidates())
    expected = [0.9 * i + 0.1 * t for i, t in zip(R_I, R_T_MEAN)]
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-4, rtol=0)
    torch.testing.assert_close(scorer.last_clip_scores, torch.tensor(R_I), atol=1e-4, rtol=0)
    torch.testing.assert_close(scorer.last_self_scores, torch.tensor(R_T_MEAN))
    assert clip.text_calls == [5]  # all texts of the depth in one encode_text

    scorer(hand_candidates())  # a second depth: no image is encoded again
    assert clip.images_encoded == 2 and clip.text_calls == [5, 5]
    assert scorer.parts_by_path[(0, (7, 13, 14, 15))] == pytest.approx((100.0, -3.0))

    summed = CalibratedScorer(TableCLIP(), table_tokenize, list(hand_images()), lam=0.5, self_reduce="sum")
    expected = [0.5 * i + 0.5 * t for i, t in zip(R_I, R_T_SUM)]
    torch.testing.assert_close(summed(hand_candidates()), torch.tensor(expected), atol=1e-4, rtol=0)


def test_rank_variant_by_hand():
    scorer = CalibratedScorer(TableCLIP(), table_tokenize, hand_images(), lam=0.9, normalize="rank")
    got = scorer(hand_candidates())
    # group 0 (t0, t1): R_T -2 < -0.5 -> ranks 1, 1/2; R_I 70.7 > 0 -> ranks 1/2, 1
    # group 1 (t3 alone): ranks 1, 1; group 2 (t2, t1): R_T -0.2 > -4 -> 1/2, 1; R_I 100 > 0 -> 1/2, 1
    lower_is_better = [0.1 * 1 + 0.9 * 0.5, 0.1 * 0.5 + 0.9 * 1, 1.0, 0.1 * 0.5 + 0.9 * 0.5, 1.0]
    torch.testing.assert_close(got, -torch.tensor(lower_is_better), atol=1e-6, rtol=0)


def test_lam_zero_needs_no_clip():
    scorer = CalibratedScorer(None, None, None, lam=0.0)
    candidates = hand_candidates()
    torch.testing.assert_close(scorer(candidates), torch.tensor(R_T_MEAN))
    torch.testing.assert_close(scorer(candidates), mean_logprob_score(candidates))
    assert scorer.last_clip_scores.tolist() == [0.0] * 5


def depth_candidates(texts, prompt_index, prefixes, first_token):
    """Candidates of one depth: one token each (first_token, first_token + 1, ...), after the given paths."""
    n = len(texts)
    return Candidates(
        token_ids=[[first_token + i] for i in range(n)], logprobs=[torch.tensor([-1.0])] * n, texts=list(texts),
        prompt_index=list(prompt_index), parent=[0] * n, group=list(range(n)), image_index=list(prompt_index),
        prefix_token_ids=[list(p) for p in prefixes], depth=len(prefixes[0]), pixel_values=None)


def test_redundant_sentences_earn_no_clip_score():
    # Text features (TableCLIP): t0 (1, 1), t2 (0, 3), t3 (2, 0); prompt 0's image (1, 0), prompt 1's (0, 2).
    # cos(t0, t3) = cos(t0, t2) = 1/sqrt(2) = 0.7071; cos(t0, t0) = 1; cos(t2, t3) = 0.
    def run(redundant_cos):
        scorer = CalibratedScorer(TableCLIP(), table_tokenize, hand_images(), lam=1.0, redundant_cos=redundant_cos)
        scorer(depth_candidates(["t0", "t0"], [0, 1], [[], []], 10))  # paths (0, [10]) and (1, [11])
        # depth 1 after prompt 0's "t0": t0 again, t3, t2; and prompt 1's t3 after its own "t0"
        r1 = scorer(depth_candidates(["t0", "t3", "t2", "t3"], [0, 0, 0, 1], [[10], [10], [10], [11]], 20))
        # depth 2 after prompt 0's "t0", "t3": t0 repeats the first sentence, not the second
        r2 = scorer(depth_candidates(["t0", "t2"], [0, 0], [[10, 21], [10, 21]], 30))
        return r1.tolist(), r2.tolist()

    r1, r2 = run(None)  # the paper: every sentence scored against the image alone
    assert r1 == pytest.approx([100 / math.sqrt(2), 100.0, 0.0, 0.0], abs=1e-3)
    assert r2 == pytest.approx([100 / math.sqrt(2), 0.0], abs=1e-3)
    r1, r2 = run(0.8)  # the repeats of t0 (cos 1) score 0; t3 and t2 (cos 0.71 with t0) keep theirs
    assert r1 == pytest.approx([0.0, 100.0, 0.0, 0.0], abs=1e-3)
    assert r2 == pytest.approx([0.0, 0.0], abs=1e-3)
    r1, _ = run(0.7)  # at 0.7 t3 is within reach of t0 too, on prompt 0's path only
    assert r1 == pytest.approx([0.0, 0.0, 0.0, 0.0], abs=1e-3)
    scorer = CalibratedScorer(TableCLIP(), table_tokenize, hand_images(), lam=1.0, redundant_cos=0.99)
    scorer(depth_candidates(["t0"], [0], [[]], 10))
    # prompt 1 has no sentence yet: the same tokens on another prompt's path are not its ancestors
    assert scorer(depth_candidates(["t2"], [1], [[10]], 20)).tolist() == pytest.approx([100.0], abs=1e-3)


def test_constructor_errors():
    with pytest.raises(ValueError, match="lam > 0 needs clip"):
        CalibratedScorer(None, table_tokenize, hand_images())
    with pytest.raises(ValueError, match="lam must lie"):
        CalibratedScorer(TableCLIP(), table_tokenize, hand_images(), lam=1.5)
    with pytest.raises(ValueError, match="normalize"):
        CalibratedScorer(TableCLIP(), table_tokenize, hand_images(), normalize="mean")
    with pytest.raises(ValueError, match="redundant_cos"):
        CalibratedScorer(TableCLIP(), table_tokenize, hand_images(), redundant_cos=-1.0)
    scorer = CalibratedScorer(TableCLIP(), table_tokenize, hand_images()[:1])
    with pytest.raises(ValueError, match="images of 1 prompts"):
        scorer(hand_candidates())


# -- a real search: tiny-llava proposes, tiny-clip judges ------------------------------------

IMAGE = 3  # tiny-llava's image token
CLIP_BOS, CLIP_EOS, CLIP_PAD = 1, 127, 0


def number_text_clip_ids(texts):
    """CLIP ids for the search's default texts (token ids written as numbers): start, words, end."""
    rows = [[CLIP_BOS] + [int(w) % 120 + 2 for w in text.split()][:14] + [CLIP_EOS] for text in texts]
    ids = torch.full((len(rows), max(len(r) for r in rows)), CLIP_PAD)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids


def test_beam_search_with_the_scorer():
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(preset("tiny-llava")).eval()
    clip = CLIPModel(preset("tiny-clip")).eval()
    g = torch.Generator().manual_seed(3)
    llava_images = torch.randn(2, 1, 3, 28, 28, generator=g)
    clip_images = torch.randn(2, 3, 28, 28, generator=g)  # CLIP's own preprocessing of the same images
    prompts = [([5, 6, 7] + [IMAGE] * 4 + [9, 10], llava_images[0]), ([11] + [IMAGE] * 4 + [12, 13], llava_images[1])]
    scorer = CalibratedScorer(clip, number_text_clip_ids, clip_images, lam=0.9)
    results = sentence_beam_search(model, prompts, delimiter_ids=list(range(100, 116)), stop_ids=[2, 60, 61, 62],
                                   n_candidates=3, k=1, max_sentence_tokens=5, max_sentences=3, max_total_tokens=12,
                                   score_fn=scorer, seed=0, use_cuda_graph=False)
    n_sentences = 0
    for p, responses in enumerate(results):
        assert responses
        for r in responses:
            assert abs(r.score - sum(s.score for s in r.sentences)) < 1e-4
            for s, (r_i, r_t) in zip(r.sentences, scorer.sentence_parts(r)):
                reference_i = float(clip_score(clip, clip_images[p : p + 1], number_text_clip_ids([s.text]))[0])
                reference_t = float(s.logprobs.mean())
                assert r_i == pytest.approx(reference_i, abs=1e-3)
                assert r_t == pytest.approx(reference_t, abs=1e-5)
                assert s.score == pytest.approx(0.9 * reference_i + 0.1 * reference_t, abs=1e-3)
                n_sentences += 1
    assert n_sentences >= 4
