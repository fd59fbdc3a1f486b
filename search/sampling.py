"""n responses per prompt from one prefill, their log-probs, and best-of-N (RLAIF-V; ANCHORS §2).

RLAIF-V collects its preference data from n = 10 responses per instruction, sampled at temperature
0.7 with up to 512 new tokens, "differing only in the random seed" (``sample_responses``). Its later
version scales inference with best-of-N under the aligned model's own implicit reward,

    r(y) = (beta / T) * (log pi_theta(y | x) - log pi_ref(y | x)),    T = number of response tokens

(``implicit_reward``, ``implicit_reward_scorer``). The policy's log-probs come free from generation
(the engine records the model's own temperature-1 log-probs); the reference's take one batched
forward over the padded prompt + response sequences (``response_logprobs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .engine import Generation, as_prompt, generate


def sample_responses(model, prompts: Sequence, *, n: int = 10, temperature: float = 0.7, max_new_tokens: int = 512,
                     top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_ids: Sequence[int] | None = None,
                     use_cuda_graph: bool = True) -> list[list[Generation]]:
    """``n`` sampled responses for every prompt (RLAIF-V's defaults), grouped by prompt.

    One batched prefill of all prompts, each forked to n rows, all rows decoded together. Response j
    of prompt p uses seed ``mix_seeds(seed, p, j)``. Returns ``[len(prompts)][n]`` ``Generation``s.
    """
    flat = generate(model, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, seeds=seed, stop_ids=stop_ids, use_cuda_graph=use_cuda_graph)
    return [flat[p * n:(p + 1) * n] for p in range(len(prompts))]


@torch.no_grad()
def response_logprobs(model, prompts: Sequence, responses: Sequence[Sequence[int]], *, batch_size: int = 8,
                      average: bool = False) -> torch.Tensor:
    """``log pi(response | prompt)`` summed over response tokens, from a full forward, for N pairs.

    prompts: N prompts (token ids or ``(input_ids, pixel_values or None)``); responses: N lists of
    token ids. Each row ``prompt + response`` is right-padded into a batch of ``batch_size`` rows and run
    through ``model(...)`` once; token t of the response is scored by the logits at the position
    before it: ``log_softmax(logits[len(prompt) + t - 1])[response[t]]``, in float32 (ANCHORS §4).
    average=True divides by the number of response tokens. Returns float32 [N].
    """
    if len(prompts) != len(responses):
        raise ValueError(f"response_logprobs: {len(prompts)} prompts but {len(responses)} responses")
    param = next(model.parameters())
    pad = model.config.pad_token_id or 0
    out = torch.zeros(len(prompts), dtype=torch.float32)
    for start in range(0, len(prompts), batch_size):
        rows = []
        for i in range(start, min(start + batch_size, len(prompts))):
            ids, px = as_prompt(prompts[i], f"prompts[{i}]")
            if len(responses[i]) == 0:
                raise ValueError(f"response_logprobs: responses[{i}] is empty")
            rows.append((ids, torch.as_tensor(list(responses[i]), dtype=torch.long), px))
        T = max(len(ids) + len(resp) for ids, resp, _ in rows)
        input_ids = torch.full((len(rows), T), pad, dtype=torch.long)
        for b, (ids, resp, _) in enumerate(rows):
            input_ids[b, : len(ids) + len(resp)] = torch.cat([ids, resp])
        images = [px for _, _, px in rows if px is not None]
        pixels = torch.cat(images).to(param.device, param.dtype) if images else None
        logits = model(input_ids.to(param.device), pixels)  # [b, T, V]
        for b, (ids, resp, _) in enumerate(rows):
            P, R = len(ids), len(resp)
            scored = logits[b, P - 1: P + R - 1].float()  # [R, V]: the logits that predict the response
            token_logps = scored.log_softmax(-1).gather(1, resp.to(scored.device)[:, None])[:, 0]
            out[start + b] = token_logps.sum().cpu() / (R if average else 1)
    return out


def implicit_reward(policy_logps: torch.Tensor, reference_logps: torch.Tensor, n_tokens: torch.Tensor, *,
                    beta: float = 0.1) -> torch.Tensor:
    """RLAIF-V's length-normalised implicit reward ``(beta / T) * (log pi - log pi_ref)``, all [N]."""
    n_tokens = torch.as_tensor(n_tokens, dtype=torch.float32)
    if bool((n_tokens <= 0).any()):
        raise ValueError("implicit_reward: every response needs at least one token (T > 0)")
    return beta / n_tokens * (torch.as_tensor(policy_logps, dtype=torch.float32) -
                              torch.as_tensor(reference_logps, dtype=torch.float32))


def implicit_reward_scorer(reference_model, *, beta: float = 0.1, policy_model=None,
                           batch_size: int = 8) -> Callable[[object, list[Generation]], torch.Tensor]:
    """A ``best_of_n`` scorer with RLAIF-V's self-feedback reward.

    The reference log-probs of the N responses of a prompt come from one batched forward of
    ``reference_model`` (``batch_size`` rows at a time). The policy log-probs are the sums recorded at
    generation, unless ``policy_model`` is given, in which case they are recomputed by a forward too
    (use that when the cache ran in bf16 and both sides should be computed alike).
    """

    def score(prompt, samples: list[Generation]) -> torch.Tensor:
        responses = [g.tokens for g in samples]
        reference = response_logprobs(reference_model, [prompt] * len(samples), responses, batch_size=batch_size)
        if policy_model is None:
            policy = torch.tensor([g.logprob_sum for g in samples], dtype=torch.float32)
        else:
            policy = response_logprobs(policy_model, [prompt] * len(samples), responses, batch_size=batch_size)
        return implicit_reward(policy, reference, torch.tensor([len(r) for r in responses]), beta=beta)

    return score


@dataclass
class BestOfN:
    best: Generation
    scores: torch.Tensor  # [n] float32, one per sample
    samples: list[Generation]


def best_of_n(model, prompts: Sequence, *, n: int, score_fn: Callable[[object, list[Generation]], torch.Tensor],
              **sampling) -> list[BestOfN]:
    """Best-of-N: sample n responses per prompt and keep the one ``score_fn`` rates highest.

    score_fn(prompt, samples) -> [n] scores (higher is better; ties go to the earliest sample), e.g.
    ``implicit_reward_scorer(reference)``. ``sampling``: keyword arguments of ``sample_responses``.
    Returns one ``BestOfN`` per prompt.
    """
    results = []
    for prompt, samples in zip(prompts, sample_responses(model, prompts, n=n, **sampling)):
        scores = torch.as_tensor(score_fn(prompt, samples), dtype=torch.float32).flatten().cpu()
        if scores.shape != (n,):
            raise ValueError(f"best_of_n: score_fn returned shape {tuple(scores.shape)} for {n} samples")
        results.append(BestOfN(samples[int(scores.argmax())], scores, samples))
    return results
