"""The decoding engine against independent references: a naive full-forward loop, rows decoded alone,
prompts decoded from scratch, and stopping rules worked out from unstopped runs."""

import pytest
import torch

from lvlm.config import preset
from lvlm.llava import LlavaForConditionalGeneration
from search.engine import Decoder, StepConfig, cache_rows, decode_step, generate
from search.sampling_ops import sample_tokens, seed_keys

IMAGE = 3  # the tiny preset's image token id


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(preset("tiny-llava")).eval()


@pytest.fixture(scope="module")
def prompts(model):
    """Three prompts of different lengths: one image, no image, two images."""
    g = torch.Generator().manual_seed(1)
    n_img = model.config.image_tokens_per_image
    px = lambda n: torch.randn(n, 3, 28, 28, generator=g)  # noqa: E731
    return [
        ([5, 6, 7] + [IMAGE] * n_img + [9, 10], px(1)),
        ([11, 12, 13, 14, 15, 16, 17], None),
        ([20] + [IMAGE] * n_img + [21, 22] + [IMAGE] * n_img + [23], px(2)),
    ]


def naive_decode(model, prompt, n_tokens, *, seed=None, temperature=0.0):
    """Reference: the full ``model(...)`` forward on the growing sequence, one token at a time."""
    ids, px = prompt
    seq, tokens, logps = list(ids), [], []
    with torch.no_grad():
        for t in range(n_tokens):
            logits = model(torch.tensor([seq]), px)[0, -1].float()
            logits_choice = logits.clone()
            logits_choice[IMAGE] = float("-inf")  # the engine never generates the image placeholder
            if temperature == 0.0:
                tok = int(logits_choice.argmax())
            else:
                key = seed_keys(torch.tensor([seed]))
                tok = int(sample_tokens(logits_choice[None], key, torch.tensor([t]), torch.tensor([temperature]))[0])
            tokens.append(tok)
            logps.append(float(torch.log_softmax(logits, -1)[tok]))
            seq.append(tok)
    return tokens, torch.tensor(logps)


def test_greedy_generate_matches_naive_full_forward_loop(model, prompts):
    out = generate(model, prompts, max_new_tokens=12, temperature=0.0, stop_ids=[])
    assert [g.prompt_index for g in out] == [0, 1, 2]
    for g, prompt in zip(out, prompts):
        tokens, logps = naive_decode(model, prompt, 12)
        assert g.tokens == tokens
        torch.testing.assert_close(g.logprobs, logps, atol=1e-5, rtol=0)
        assert g.finish_reason == "length"


def test_sampled_generate_matches_naive_loop_with_the_same_seed(model, prompts):
    out = generate(model, prompts[:1], max_new_tokens=10, temperature=1.0, seeds=[1234], stop_ids=[])
    tokens, logps = naive_decode(model, prompts[0], 10, seed=1234, temperature=1.0)
    assert out[0].tokens == tokens
    torch.testing.assert_close(out[0].logprobs, logps, atol=1e-5, rtol=0)


def test_temperature_to_zero_is_greedy(model, prompts):
    greedy = generate(model, prompts, max_new_tokens=10, temperature=0.0, stop_ids=[])
    cold = generate(model, prompts, max_new_tokens=10, temperature=1e-4, seeds=7, stop_ids=[])
    hot = generate(model, prompts, max_new_tokens=10, temperature=1.0, seeds=7, stop_ids=[])
    assert [g.tokens for g in cold] == [g.tokens for g in greedy]
    assert [g.tokens for g in hot] != [g.tokens for g in greedy]  # the test can tell sampling from greedy


def test_batch_of_rows_equals_each_row_alone(model, prompts):
    seeds = [11, 22, 33]
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=40, top_p=0.9, stop_ids=[])
    together = generate(model, prompts, seeds=seeds, **kw)
    for p in range(3):
        alone = generate(model, [prompts[p]], seeds=[seeds[p]], **kw)[0]
        assert together[p].tokens == alone.tokens
        torch.testing.assert_close(together[p].logprobs, alone.logprobs, atol=1e-5, rtol=0)


def test_fork_then_decode_equals_each_sample_from_scratch(model, prompts):
    seeds = [5, 6, 7, 8, 9, 10]  # prompt 0: 5, 6, 7; prompt 2: 8, 9, 10
    forked = generate(model, [prompts[0], prompts[2]], n=3, seeds=seeds, max_new_tokens=8, stop_ids=[])
    assert [(g.prompt_index, g.sample_index) for g in forked] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    for r, g in enumerate(forked):
        scratch = generate(model, [prompts[0] if r < 3 else prompts[2]], seeds=[seeds[r]], max_new_tokens=8,
                           stop_ids=[])[0]
        assert g.tokens == scratch.tokens
        torch.testing.assert_close(g.logprobs, scratch.logprobs, atol=1e-5, rtol=0)
    assert len({tuple(g.tokens) for g in forked[:3]}) == 3  # the seeds make the samples differ


def test_reorder_keeps_the_right_rows(model, prompts):
    order = [2, 0, 2, 1]
    dec = Decoder(model, max_rows=4, max_seq=64, max_new_tokens=6, eos_ids=[])
    dec.prefill(prompts)
    dec.reorder(order)
    out = dec.run_until_stop(4, max_new_tokens=6, temperature=0.0)
    for r, p in enumerate(order):
        tokens, logps = naive_decode(model, prompts[p], 6)
        assert out.row(r)[0] == tokens
        torch.testing.assert_close(out.row(r)[1], logps, atol=1e-5, rtol=0)


def test_same_seed_same_samples_different_seed_different_samples(model, prompts):
    kw = dict(max_new_tokens=12, temperature=1.0, stop_ids=[])
    a = generate(model, prompts[1:2], seeds=[42], **kw)[0].tokens
    b = generate(model, prompts[1:2], seeds=[42], **kw)[0].tokens
    c = generate(model, prompts[1:2], seeds=[43], **kw)[0].tokens
    assert a == b
    assert a != c


def _expected_stop(tokens, stop_set, budget):
    """Where an unstopped sequence would have stopped: (tokens kept, reason)."""
    for i, t in enumerate(tokens[:budget]):
        if t in stop_set:
            return tokens[: i + 1], "hit"
    return tokens[:budget], "length"


def test_stop_on_eos_delimiter_and_budget_per_row(model, prompts):
    free = generate(model, prompts, max_new_tokens=16, temperature=0.0, stop_ids=[])
    # Stop ids chosen from the free runs: row 0 meets the eos id at step 3, row 1 the delimiter at step 5.
    eos = free[0].tokens[3]
    delim = next(t for t in free[1].tokens[5:] if t != eos)
    stopped = generate(model, prompts, max_new_tokens=16, temperature=0.0, stop_ids=[eos], delimiter_ids=[delim])
    n_finished_early = 0
    for g, f in zip(stopped, free):
        keep, how = _expected_stop(f.tokens, {eos, delim}, 16)
        assert g.tokens == keep
        torch.testing.assert_close(g.logprobs, f.logprobs[: len(keep)])
        expected_reason = "length" if how == "length" else ("eos" if keep[-1] == eos else "delimiter")
        assert g.finish_reason == expected_reason
        n_finished_early += len(keep) < 16
    assert stopped[0].finish_reason == "eos" and len(stopped[0].tokens) <= 4
    assert n_finished_early >= 2 or any(g.finish_reason == "length" for g in stopped)

    # Per-row budgets: other rows continue after one row runs out.
    dec = Decoder(model, max_rows=3, max_seq=64, max_new_tokens=16, eos_ids=[])
    dec.prefill(prompts)
    out = dec.run_until_stop(3, max_new_tokens=[2, 16, 9], temperature=0.0)
    assert out.n_tokens.tolist() == [2, 16, 9]
    assert out.finish_reason == ["length"] * 3
    for r, f in enumerate(free):
        assert out.row(r)[0] == f.tokens[: [2, 16, 9][r]]


def test_compacting_finished_rows_changes_nothing_visible(model, prompts):
    """With sync_every=2 the decoder moves running rows to the front mid-run and steps fewer rows;
    outputs, and every row's cache and next-token logits afterwards, must equal a run without it."""
    runs = []
    for compact in (False, True):
        dec = Decoder(model, max_rows=6, max_seq=64, max_new_tokens=12, eos_ids=[], sync_every=2, compact=compact)
        dec.prefill(prompts)
        dec.reorder([0, 1, 2, 0, 1, 2])
        out = dec.run_until_stop(6, max_new_tokens=[12, 1, 2, 3, 12, 2], seeds=[1, 2, 3, 4, 5, 6], temperature=1.0)
        runs.append((out, dec))
    (a, dec_a), (b, dec_b) = runs
    assert torch.equal(a.tokens, b.tokens) and a.finish_reason == b.finish_reason
    torch.testing.assert_close(a.logprobs, b.logprobs)
    assert torch.equal(dec_a.cache.lengths, dec_b.cache.lengths)
    torch.testing.assert_close(dec_a.state.next_logits, dec_b.state.next_logits)
    for r, length in enumerate(dec_a.cache.lengths.tolist()):  # the valid prefix of every row
        torch.testing.assert_close(dec_a.cache.k[:, r, :, :length], dec_b.cache.k[:, r, :, :length])
        torch.testing.assert_close(dec_a.cache.v[:, r, :, :length], dec_b.cache.v[:, r, :, :length])
    # and the run is what decoding each row alone gives
    for r, p in enumerate([0, 1, 2, 0, 1, 2]):
        alone = generate(model, [prompts[p]], seeds=[r + 1], max_new_tokens=[12, 1, 2, 3, 12, 2][r], stop_ids=[])[0]
        assert b.row(r)[0] == alone.tokens


def test_bucketed_graph_path_logic_on_cpu(model, prompts, monkeypatch):
    """The CUDA-graph path's bookkeeping, run on CPU: rows rounded up to power-of-two buckets (extra rows
    finished from the start), one "graph" per (bucket, config), a smaller bucket after compaction, and
    the capture's warm-up (every row marked finished, steps run, state restored) leaving no trace.
    The stand-in for ``capture_step`` does what it does, minus the CUDA stream and graph."""
    import search.engine as engine

    captured = []

    def fake_capture(step, *, pool, state, done, warmup=2):
        saved = [t.clone() for t in state]
        done.fill_(True)
        for _ in range(warmup):
            step()
        for t, value in zip(state, saved):
            t.copy_(value)
        captured.append(step.args[2].done.shape[0])  # the bucket: rows of the state view

        class Graph:
            replay = staticmethod(step)
        return Graph

    monkeypatch.setattr(engine, "capture_step", fake_capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    budgets, seeds = [12, 1, 2, 3, 12], [1, 2, 3, 4, 5]
    dec = Decoder(model, max_rows=6, max_seq=64, max_new_tokens=12, eos_ids=[], sync_every=2)
    dec.use_cuda_graph = True  # as on a GPU
    dec.prefill(prompts)
    dec.reorder([0, 1, 2, 0, 1])
    out = dec.run_until_stop(5, max_new_tokens=budgets, seeds=seeds, temperature=1.0)
    # 5 rows -> bucket min(8, max_rows=6); after step 2 three rows run -> bucket 4; after step 4 two -> 2
    assert captured == [6, 4, 2]
    for r, p in enumerate([0, 1, 2, 0, 1]):
        alone = generate(model, [prompts[p]], seeds=[seeds[r]], max_new_tokens=budgets[r], stop_ids=[])[0]
        assert out.row(r)[0] == alone.tokens
        torch.testing.assert_close(out.row(r)[1], alone.logprobs, atol=1e-5, rtol=0)


class _HostSync(RuntimeError):
    pass


def test_decode_step_performs_no_host_sync(model, prompts, monkeypatch):
    dec = Decoder(model, max_rows=3, max_seq=64, max_new_tokens=8, eos_ids=[2])
    dec.prefill(prompts)
    # Set the rows up as run_until_stop would, then run bare steps with every sync path booby-trapped.
    s = dec.state
    s.budget.fill_(8)
    s.seed_keys.copy_(seed_keys(torch.tensor([1, 2, 3])))
    s.temperature.fill_(0.8)
    s.top_k.fill_(20)
    s.top_p.fill_(0.9)
    s.done.zero_()
    s.done[1] = True  # a finished row rides along

    def trap(*args, **kwargs):
        raise _HostSync("host sync inside the decode step")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, trap)
    try:
        torch.tensor([1.0]).item()
    except _HostSync:
        pass
    else:
        raise AssertionError("the trap is not armed")
    lengths_before = dec.cache.lengths.clone()
    with torch.no_grad():
        for config in (StepConfig("sample", True), StepConfig("greedy"), StepConfig("diverse", False, 3, 3.0)):
            decode_step(dec.lm, cache_rows(dec.cache, 3), dec.state.rows(3), config)
    monkeypatch.undo()
    assert (dec.cache.lengths - lengths_before).tolist() == [3, 0, 3]  # the finished row did not advance
    assert s.n_generated.tolist() == [3, 0, 3]


def test_bad_arguments_are_clear_errors(model, prompts):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, prompts[:1], stop_ids=[100000])
    dec = Decoder(model, max_rows=2, max_seq=20, max_new_tokens=8)
    with pytest.raises(ValueError, match="no room"):
        dec.prefill([list(range(4, 30))])
    dec.prefill([[4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]])
    with pytest.raises(ValueError, match="larger max_seq"):
        dec.run_until_stop(1, max_new_tokens=8)
