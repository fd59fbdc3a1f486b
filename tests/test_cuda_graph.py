"""On CUDA: the captured decode step replays exactly what the eager step computes, and never syncs.

Skipped without a GPU."""

import pytest
import torch

from lvlm.config import preset
from lvlm.llava import LlavaForConditionalGeneration
from search.engine import Decoder, StepConfig, cache_rows, decode_step, generate
from search.sentence_beam import sentence_beam_search

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

IMAGE = 3


def _model(dtype):
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(preset("tiny-llava")).to("cuda", dtype).eval()


def _prompts(dtype):
    g = torch.Generator().manual_seed(1)
    px = lambda n: torch.randn(n, 3, 28, 28, generator=g).to(dtype)  # noqa: E731
    return [([5, 6, 7] + [IMAGE] * 4 + [9, 10], px(1)), ([11, 12, 13, 14, 15, 16, 17], None),
            ([20] + [IMAGE] * 4 + [21, 22], px(1))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_k=50, top_p=0.9)])
def test_graph_replay_equals_eager(dtype, sampling):
    model, prompts = _model(dtype), _prompts(dtype)
    kw = dict(n=3, max_new_tokens=24, seeds=3, stop_ids=[2], **sampling)
    eager = generate(model, prompts, use_cuda_graph=False, **kw)
    graph = generate(model, prompts, use_cuda_graph=True, **kw)
    for e, g in zip(eager, graph):
        assert e.tokens == g.tokens
        assert e.finish_reason == g.finish_reason
        torch.testing.assert_close(e.logprobs, g.logprobs, atol=1e-5, rtol=0)


def test_beam_search_with_graphs_equals_eager_over_several_buckets():
    model, prompts = _model(torch.float32), _prompts(torch.float32)
    kw = dict(delimiter_ids=list(range(100, 116)), stop_ids=[2, 60, 61, 62], n_candidates=3, k=2,
              max_sentence_tokens=8, max_sentences=4, max_total_tokens=30, seed=0)
    for proposal in ("sample", "diverse"):
        eager = sentence_beam_search(model, prompts, proposal=proposal, use_cuda_graph=False, **kw)
        graph = sentence_beam_search(model, prompts, proposal=proposal, use_cuda_graph=True, **kw)
        for e_list, g_list in zip(eager, graph):
            assert [r.tokens for r in e_list] == [r.tokens for r in g_list]
            torch.testing.assert_close(torch.tensor([r.score for r in e_list]),
                                       torch.tensor([r.score for r in g_list]), atol=1e-5, rtol=0)


def test_graphs_are_captured_per_bucket_and_reused():
    model, prompts = _model(torch.float32), _prompts(torch.float32)
    dec = Decoder(model, max_rows=8, max_seq=64, max_new_tokens=8, use_cuda_graph=True)
    dec.prefill(prompts)
    dec.run_until_stop(3, max_new_tokens=8, temperature=0.0)  # bucket 4
    dec.run_until_stop(2, max_new_tokens=8, temperature=0.0)  # bucket 2
    dec.run_until_stop(3, max_new_tokens=8, temperature=0.0)  # bucket 4 again: replayed
    assert sorted(b for b, _ in dec._graphs) == [2, 4]


def test_decode_step_never_syncs():
    model, prompts = _model(torch.bfloat16), _prompts(torch.bfloat16)
    dec = Decoder(model, max_rows=3, max_seq=64, max_new_tokens=8, use_cuda_graph=False)
    dec.prefill(prompts)
    s = dec.state
    s.budget.fill_(8)
    s.temperature.fill_(0.7)
    s.top_k.fill_(20)
    s.top_p.fill_(0.9)
    s.done.zero_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            for config in (StepConfig("sample", True), StepConfig("greedy"), StepConfig("diverse", False, 3, 3.0)):
                decode_step(dec.lm, cache_rows(dec.cache, 3), s.rows(3), config)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert s.n_generated.tolist() == [3, 3, 3]
