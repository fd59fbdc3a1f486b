"""PPO for a vision-language policy: rollout tensors, rewards and advantages, the clipped update.

LLaVA-RLHF (Sun et al., arXiv 2309.14525, Sec. 2.3; its released ``RLHF/models/ppo_trainer.py``;
ANCHORS §3) optimises the SFT policy against the reward model with PPO (Schulman et al. 2017) in
the RLHF form of Ziegler et al. 2019 / Ouyang et al. 2022. One rollout batch goes through:

    responses  <- sample the policy at temperature 1                  (the recipe: search.generate)
    score      <- reward model (with facts) + length / symbolic / end   (the recipe: rewards.shaping)
    logp, logp_ref, V <- one no-grad forward of the policy, of the frozen SFT model and of the
                         value model over prompt + response                          (make_rollout)
    r_t   = 10 * ( -0.1 * max(logp_t - logp_ref_t, 0)  [+ score at the last token] )
    A, R  = GAE(r, V; gamma = lambda = 1);   A <- whiten(A) over the whole batch
    2 epochs x minibatches:  loss = clipped policy loss + 0.1 * clipped value loss      (ppo_update)
                             [ + ptx_coef * NLL(replayed SFT conversations): InstructGPT's PPO-ptx,
                               off by default and not in LLaVA-RLHF; recipes/_ptx.py ]

The x10 (``REWARD_SCALE``) multiplies the whole per-token reward -- KL penalty included -- at the
start of GAE, as the released ``_estimate_advantage`` does with ``whiten_rewards=False``; the
returns the value model regresses on are in those scaled units too. The release adds the score at
the last column of its fixed-width response tensor and runs GAE over the padding as well; here it
sits on the last real token and padding is masked. With gamma = lambda = 1 the advantages of the
real tokens are the same (A_t = sum of rewards from t on - V_t).

Shapes. B rollouts; ``input_ids`` [B, T] is prompt + response, right-padded; the response-aligned
tensors are [B, R], R = the longest response; ``mask`` [B, R] marks the response tokens (the end
token included: emitting it is an action the policy learns). Token t of row b's response sits at
input position ``P_b + t`` and is predicted by the hidden state at ``positions[b, t] = P_b + t - 1``;
the value of the state before that token is read at the same position (a value model sees the
plain conversation, never the facts).

Processes. Under torchrun every rank holds full replicas of the policy and the value model, rolls
out its own share of the prompts and takes the same number of optimizer steps; gradients are
averaged over ranks before each step (what DDP does, written out) and advantages are whitened with
statistics over all ranks, so N ranks x b rollouts behave like one process with N x b.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from optim import gae, masked_mean, ppo_policy_loss, ppo_policy_stats, ppo_value_loss, shape_rewards
from optim import token_logprobs, whiten
from optim.distributed import get_world_size
from optim.logprobs import token_entropy
from recipes._ptx import ptx_loss


class PPODivergedError(RuntimeError):
    """A PPO loss, gradient norm or rollout statistic became inf/nan; no update was applied."""


# ---------------------------------------------------------------------------------------------
# the rollout batch
# ---------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One batch of rollouts, everything PPO needs (see the module docstring for the layout).

    Filled in two steps: ``make_rollout`` sets the inputs, the three forwards and the score;
    ``rewards_and_advantages`` the rest.
    """

    input_ids: torch.Tensor  # [B, T] long, prompt + response, right-padded
    pixel_values: torch.Tensor | None  # [B, 3, H, W], row b's image (None for text-only prompts)
    positions: torch.Tensor  # [B, R] long, input position whose hidden state predicts response token t
    tokens: torch.Tensor  # [B, R] long, the response tokens (pad id after the end)
    mask: torch.Tensor  # [B, R] bool, set on response tokens
    scores: torch.Tensor  # [B] float32, the sequence score (reward model + shaping), before the x10
    logprobs: torch.Tensor  # [B, R] float32, policy at rollout time ("old" log-probs)
    ref_logprobs: torch.Tensor  # [B, R] float32, the frozen SFT model
    values: torch.Tensor  # [B, R] float32, value model at rollout time ("old" values)
    rewards: torch.Tensor | None = None  # [B, R] float32, per-token rewards after the x10
    kl: torch.Tensor | None = None  # [B, R] float32, per-token KL estimate (k1 clamped at 0)
    advantages: torch.Tensor | None = None  # [B, R] float32, whitened
    returns: torch.Tensor | None = None  # [B, R] float32, value targets (advantages before whitening + values)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: torch.Tensor) -> "Rollout":
        """The rollouts ``rows`` (1-D long), with the padding no selected row needs trimmed away."""
        mask = self.mask[rows]
        width = max(int(mask.sum(1).max()), 1)  # R of this subset
        length = int(self.positions[rows][mask].max()) + 2  # T of this subset: last predicted token + 1
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or f.name == "pixel_values":
                picked[f.name] = None if value is None else value[rows]
            elif f.name == "input_ids":
                picked[f.name] = value[rows, :length]
            elif value.dim() == 2:
                picked[f.name] = value[rows, :width]
            else:
                picked[f.name] = value[rows]
        return Rollout(**picked)


def pack_sequences(prompts: Sequence[torch.Tensor], responses: Sequence[Sequence[int]], *,
                   pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt + response rows -> ``(input_ids [B, T], positions [B, R], tokens [B, R], mask [B, R])``.

    prompts: B 1-D id tensors (image tokens already expanded); responses: B lists of generated ids,
    each at least one token. Right padding with ``pad_id``; masked response slots get position 0.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"pack_sequences: {len(prompts)} prompts but {len(responses)} responses")
    empty = [i for i, r in enumerate(responses) if len(r) == 0]
    if empty:
        raise ValueError(f"pack_sequences: responses {empty[:5]} are empty (a rollout has at least one token)")
    B = len(prompts)
    T = max(len(p) + len(r) for p, r in zip(prompts, responses))
    R = max(len(r) for r in responses)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    positions = torch.zeros((B, R), dtype=torch.long)
    tokens = torch.full((B, R), pad_id, dtype=torch.long)
    mask = torch.zeros((B, R), dtype=torch.bool)
    for b, (prompt, response) in enumerate(zip(prompts, responses)):
        P, n = len(prompt), len(response)
        response = torch.as_tensor(list(response), dtype=torch.long)
        input_ids[b, :P] = torch.as_tensor(prompt, dtype=torch.long)
        input_ids[b, P:P + n] = response
        positions[b, :n] = torch.arange(P - 1, P + n - 1)
        tokens[b, :n] = response
        mask[b, :n] = True
    return input_ids, positions, tokens, mask


# ---------------------------------------------------------------------------------------------
# the three forwards
# ---------------------------------------------------------------------------------------------


def _gather_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, D] at positions [B, R] -> [B, R, D]."""
    return hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))


def policy_logprobs(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, positions: torch.Tensor,
                    tokens: torch.Tensor, *, with_entropy: bool = False):
    """``log pi(token_t | prompt, tokens_<t)`` [B, R] float32 of a LLaVA model (differentiable).

    The language-model head runs only at the response positions (the prompt, image tokens
    included, needs no logits): hidden states [B, T, D] -> gathered [B, R, D] -> logits [B, R, V].
    At temperature 1, the release's rollout temperature, these are the sampling log-probs.
    with_entropy=True also returns the per-token entropy [B, R] (detached), for logging.
    """
    hidden = model.hidden_states(input_ids, pixel_values)  # [B, T, D]
    logits = model.language_model.lm_head(_gather_positions(hidden, positions))  # [B, R, V]
    logprobs = token_logprobs(logits, tokens)
    if with_entropy:
        return logprobs, token_entropy(logits.detach())
    return logprobs


def value_estimates(value_model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                    positions: torch.Tensor) -> torch.Tensor:
    """V(state before response token t) [B, R] float32: the value head at ``positions`` (differentiable).

    value_model: a ``rewards.RewardModel`` (``value_model_from``); its ``token_scores`` applies the
    scalar head at every position of the plain conversation.
    """
    return value_model.token_scores(input_ids, pixel_values).gather(1, positions)


def _batched(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@torch.no_grad()
def make_rollout(policy, reference, value_model, prompts: Sequence[torch.Tensor], pixel_values: torch.Tensor | None,
                 responses: Sequence[Sequence[int]], scores: torch.Tensor, *, pad_id: int,
                 micro_batch: int = 16) -> Rollout:
    """The rollout tensors for sampled responses: log-probs under policy and reference, and values.

    prompts: B prompt id tensors; pixel_values: [B, 3, H, W] (row b's image) or None; responses: B
    generated id lists (end token included when emitted); scores: [B] sequence scores. Every model
    runs in eval mode under no_grad, ``micro_batch`` rows at a time, on the policy's device. The
    policy's log-probs come from a forward identical to the one the update uses (not from the
    decoder's cache), so the first PPO ratio is exactly 1.
    """
    input_ids, positions, tokens, mask = pack_sequences(prompts, responses, pad_id=pad_id)
    scores = torch.as_tensor(scores, dtype=torch.float32).flatten()
    if scores.shape != (len(prompts),):
        raise ValueError(f"make_rollout: {scores.numel()} scores for {len(prompts)} rollouts")
    device = next(policy.parameters()).device
    modes = [(m, m.training) for m in (policy, reference, value_model)]
    for m, _ in modes:
        m.eval()
    out = {"logprobs": [], "ref_logprobs": [], "values": []}
    for rows in _batched(len(prompts), micro_batch):
        ids, pos, tok = input_ids[rows].to(device), positions[rows].to(device), tokens[rows].to(device)
        px = None if pixel_values is None else pixel_values[rows].to(device)
        out["logprobs"].append(policy_logprobs(policy, ids, px, pos, tok).float().cpu())
        out["ref_logprobs"].append(policy_logprobs(reference, ids, px, pos, tok).float().cpu())
        out["values"].append(value_estimates(value_model, ids, px, pos).float().cpu())
    for m, was_training in modes:
        m.train(was_training)
    zero = torch.zeros_like(mask, dtype=torch.float32)
    tensors = {k: torch.where(mask, torch.cat(v), zero) for k, v in out.items()}
    return Rollout(input_ids=input_ids, pixel_values=pixel_values, positions=positions, tokens=tokens, mask=mask,
                   scores=scores, **tensors)


# ---------------------------------------------------------------------------------------------
# rewards and advantages
# ---------------------------------------------------------------------------------------------


def whiten_across_ranks(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``optim.whiten`` with the mean and (unbiased) variance taken over every rank's valid positions.

    One process: exactly ``optim.whiten(x, mask)``. Under torchrun: the count, sum and sum of squared
    deviations are summed over ranks first (LLaVA-RLHF whitens over the "full batch").
    """
    if get_world_size() == 1:
        return whiten(x, mask)
    keep = mask.bool()
    count_sum = torch.stack([keep.sum().to(torch.float64), torch.where(keep, x, 0).sum().to(torch.float64)])
    dist.all_reduce(count_sum)
    n, mean = count_sum[0], count_sum[1] / count_sum[0].clamp_min(1)
    if n < 2:
        raise ValueError(f"whiten_across_ranks: needs at least 2 valid positions over all ranks, got {int(n)}")
    squares = torch.where(keep, (x.double() - mean) ** 2, 0).sum()
    dist.all_reduce(squares)
    var = squares / (n - 1)
    out = (x.double() - mean) * torch.rsqrt(var + 1e-8)
    return torch.where(keep, out, 0).to(x.dtype)


def rewards_and_advantages(rollout: Rollout, *, kl_coef: float = 0.1, kl_kind: str = "k1_clamped",
                           reward_scale: float = 10.0, gamma: float = 1.0, lam: float = 1.0,
                           whiten_advantages: bool = True) -> Rollout:
    """Fill in ``rewards``, ``kl``, ``advantages`` and ``returns`` of a rollout (in place; returned).

        kl_t      = max(logp_t - logp_ref_t, 0)                      (kl_kind "k1_clamped", as released)
        r_t       = reward_scale * (-kl_coef * kl_t + [t = last] * score)
        A, R      = gae(r, V; gamma, lam)                            (returns = A + V, before whitening)
        A         = whiten(A) over every valid token of the batch (all ranks)

    Source: LLaVA-RLHF's released ``_shape_reward`` and ``_estimate_advantage`` (beta 0.1, x10,
    gamma = lambda = 1, whitened advantages); ``optim.shape_rewards`` / ``optim.gae`` / ``optim.whiten``.
    """
    rewards, kl = shape_rewards(rollout.scores, rollout.logprobs, rollout.ref_logprobs, rollout.mask,
                                kl_coef=kl_coef, kl_kind=kl_kind)
    rewards = reward_scale * rewards  # the release's "rewards * 10.0": KL terms and score alike
    advantages, returns = gae(rewards, rollout.values, rollout.mask, gamma=gamma, lam=lam)
    if whiten_advantages:
        advantages = whiten_across_ranks(advantages, rollout.mask)
    rollout.rewards, rollout.kl, rollout.advantages, rollout.returns = rewards, kl, advantages, returns
    for name in ("rewards", "advantages", "returns"):
        if not bool(torch.isfinite(getattr(rollout, name)).all()):
            raise PPODivergedError(f"non-finite {name} in the rollout (scores {rollout.scores.tolist()[:8]} ...); "
                                   "check the reward model and the KL (policy far from the reference?)")
    return rollout


@torch.no_grad()
def rollout_stats(rollout: Rollout) -> dict:
    """Per-batch means for the progress line (floats): sequence score, KL per sequence (the penalised
    estimate, summed over tokens), response tokens, and the values and returns per token."""
    mask = rollout.mask
    lengths = mask.sum(1).float()
    kl_per_sequence = rollout.kl.sum(1) if rollout.kl is not None else torch.zeros(len(rollout))
    return {
        "score": rollout.scores.mean().item(),
        "kl_seq": kl_per_sequence.mean().item(),
        "length": lengths.mean().item(),
        "value": masked_mean(rollout.values, mask).item(),
        "return": masked_mean(rollout.returns, mask).item() if rollout.returns is not None else 0.0,
    }


# ---------------------------------------------------------------------------------------------
# the update
# ---------------------------------------------------------------------------------------------


def ppo_loss(policy, value_model, batch: Rollout, *, clip_eps: float = 0.2, value_clip_eps: float = 0.2,
             vf_coef: float = 0.1) -> tuple[torch.Tensor, dict]:
    """``ppo_policy_loss + vf_coef * ppo_value_loss`` on one micro-batch, and its statistics.

    Source: the released ``compute_policy_loss`` / ``compute_value_loss`` (policy clip 0.2, value clip
    0.2, value-loss coefficient 0.1; their sum is what one optimizer step reduces). The policy's
    log-probs and the values are recomputed with gradients; the rollout's old ones are the anchors of
    the two clips. Means are over the micro-batch's response tokens. Returns (loss, detached stats).
    """
    device = next(policy.parameters()).device
    ids, pos, tok = batch.input_ids.to(device), batch.positions.to(device), batch.tokens.to(device)
    px = None if batch.pixel_values is None else batch.pixel_values.to(device)
    mask = batch.mask.to(device)
    old_logprobs, advantages = batch.logprobs.to(device), batch.advantages.to(device)
    logprobs, entropy = policy_logprobs(policy, ids, px, pos, tok, with_entropy=True)
    values = value_estimates(value_model, ids, px, pos)
    policy_loss = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=clip_eps)
    value_loss = ppo_value_loss(values, batch.values.to(device), batch.returns.to(device), mask,
                                clip_eps=value_clip_eps)
    stats = ppo_policy_stats(logprobs.detach(), old_logprobs, advantages, mask, clip_eps=clip_eps)
    stats.update(policy_loss=policy_loss.detach(), value_loss=value_loss.detach(),
                 entropy=masked_mean(entropy, mask))
    return policy_loss + vf_coef * value_loss, stats


def _average_gradients(params: Sequence[torch.Tensor]) -> None:
    """Average every parameter's gradient over ranks (a no-op in one process)."""
    world = get_world_size()
    if world == 1:
        return
    for p in params:
        if p.grad is None:  # keep the collective calls aligned across ranks
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)


def ppo_update(policy, value_model, optimizer: torch.optim.Optimizer, rollout: Rollout, *,
               policy_params: Sequence[torch.Tensor], value_params: Sequence[torch.Tensor], epochs: int = 2,
               minibatches: int = 2, micro_batch: int = 16, clip_eps: float = 0.2, value_clip_eps: float = 0.2,
               vf_coef: float = 0.1, grad_clip: float = 1.0, joint_clip: bool = True,
               lr_at_step: Callable[[int], float], step: int = 0, seed: int = 0, ptx_coef: float = 0.0,
               replay_batch: Callable[[int], dict] | None = None) -> tuple[int, dict]:
    """``epochs`` passes over the rollout in ``minibatches`` shuffled minibatches, one AdamW step each.

    LLaVA-RLHF as released: 2 PPO epochs per rollout batch (512 rollouts, step batch 256 -> 2
    minibatches), one optimizer over the policy and value parameters, their gradients clipped to norm
    1.0 together (``joint_clip=True``). With ``joint_clip=False`` each model's gradient is clipped to
    ``grad_clip`` on its own: the value loss of x10-scaled returns can have a gradient far larger than
    the policy's, and a joint clip then shrinks the policy's step along with it. Each minibatch is
    split into micro-batches of ``micro_batch`` rows; their losses (token means) are weighted by row
    share and accumulated, gradients are averaged over ranks, clipped, and applied with the learning
    rate ``lr_at_step(step)``. ``step`` counts optimizer steps over the whole run (it drives the
    schedule); the shuffles come from ``seed`` and ``step``. With ``ptx_coef`` > 0, each optimizer step
    also adds ``ptx_coef`` x the answer NLL of ``replay_batch(step)`` (a ``recipes.sft`` batch of replayed
    SFT conversations, ``recipes._ptx``) to the policy's gradient, before the clip (InstructGPT's PPO-ptx).

    Every rank must call this with the same ``epochs`` and ``minibatches`` (it takes exactly
    ``epochs * minibatches`` optimizer steps). Raises ``PPODivergedError`` before applying an update
    whose loss or gradient norm is not finite. Returns (the new step, mean statistics as floats).
    """
    if (ptx_coef > 0) != (replay_batch is not None):
        raise ValueError(f"ppo_update: ptx_coef={ptx_coef} needs a replay_batch exactly when it is > 0")
    if len(rollout) < minibatches:
        raise ValueError(f"ppo_update: {len(rollout)} rollouts on this rank, fewer than {minibatches} minibatches")
    device = next(policy.parameters()).device
    params = list(policy_params) + list(value_params)
    policy.train()
    value_model.train()
    totals: dict[str, float] = {}
    n_steps = 0
    for epoch in range(epochs):
        order = torch.randperm(len(rollout), generator=torch.Generator().manual_seed(seed * 1_000_003 + step))
        for minibatch in torch.tensor_split(order, minibatches):
            sums: dict[str, torch.Tensor] = {}
            for micro in torch.split(minibatch, micro_batch):
                loss, stats = ppo_loss(policy, value_model, rollout.select(micro), clip_eps=clip_eps,
                                       value_clip_eps=value_clip_eps, vf_coef=vf_coef)
                weight = len(micro) / len(minibatch)
                (loss * weight).backward()
                for k, v in dict(stats, loss=loss.detach()).items():
                    sums[k] = sums.get(k, torch.zeros((), device=device)) + weight * v.float()
            if replay_batch is not None:
                replay = {k: v.to(device) if torch.is_tensor(v) else v for k, v in replay_batch(step).items()}
                ptx_nll, ptx_stats = ptx_loss(policy, replay)
                (ptx_coef * ptx_nll).backward()
                sums.update({k: v.float() for k, v in ptx_stats.items()})
            _average_gradients(params)
            groups = {"policy_grad_norm": [p for p in policy_params if p.grad is not None],
                      "value_grad_norm": [p for p in value_params if p.grad is not None]}
            for name, group in groups.items():  # the norms before clipping, logged
                sums[name] = torch.nn.utils.get_total_norm([p.grad for p in group]).float()
            if joint_clip:
                joint = torch.sqrt(sums["policy_grad_norm"] ** 2 + sums["value_grad_norm"] ** 2)
                torch.nn.utils.clip_grads_with_norm_(groups["policy_grad_norm"] + groups["value_grad_norm"],
                                                     grad_clip, joint)
            else:
                for name, group in groups.items():
                    torch.nn.utils.clip_grads_with_norm_(group, grad_clip, sums[name])
            keys = sorted(sums)
            reduced = torch.stack([sums[k].reshape(()) for k in keys]).to(device)
            if get_world_size() > 1:  # statistics averaged over ranks (the norms are the same everywhere)
                dist.all_reduce(reduced)
                reduced /= get_world_size()
            values = dict(zip(keys, reduced.tolist()))
            bad = [k for k in ("loss", "policy_grad_norm", "value_grad_norm", "ptx_nll")
                   if k in values and not math.isfinite(values[k])]
            if bad:
                optimizer.zero_grad(set_to_none=True)
                raise PPODivergedError(
                    f"PPO diverged at optimizer step {step + 1} (epoch {epoch + 1}): non-finite "
                    + ", ".join(f"{k} = {values[k]}" for k in bad)
                    + f"; policy loss {values['policy_loss']:.4g}, value loss {values['value_loss']:.4g}, "
                    f"approx KL {values['approx_kl']:.4g}. The update was not applied. Lower the learning rate, "
                    "or check the reward model's scores")
            for group in optimizer.param_groups:
                group["lr"] = lr_at_step(step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            n_steps += 1
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + v
    return step, {k: v / max(n_steps, 1) for k, v in totals.items()}
