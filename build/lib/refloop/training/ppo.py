"""PPO pieces of SC-Tune's describer update, as pure tensor functions.

Shapes: (batch, tokens) with a 0/1 `mask` of real completion tokens (right padding).
"""

from __future__ import annotations

import torch


def token_rewards(
    logp_policy: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor, final_reward: torch.Tensor, beta: float
) -> torch.Tensor:
    """SC-Tune Eq. 2: R_t = 1[t = T] * IoU(B, B_hat) - beta * (log pi_theta - log pi_ref) on every token.

    T is each row's last real token; `final_reward` holds IoU(B, B_hat) per row.
    """
    rewards = -beta * (logp_policy - logp_ref) * mask
    last = mask.long().sum(dim=1) - 1
    rows = torch.arange(mask.shape[0], device=mask.device)
    has_tokens = last >= 0
    rewards[rows[has_tokens], last[has_tokens]] += final_reward[has_tokens].to(rewards.dtype)
    return rewards


def value_free_advantages(rewards: torch.Tensor, mask: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """SC-Tune Eq. 3: A_t = sum_{i >= t} R_i - R(baseline); REINFORCE-with-baseline, no value net."""
    masked = rewards * mask
    returns = masked.flip(1).cumsum(1).flip(1)
    return (returns - baseline[:, None].to(returns.dtype)) * mask


def clipped_policy_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    num_tokens: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SC-Tune Eq. 1: -E_t[min(r_t A_t, clip(r_t, 1-eps, 1+eps) A_t)], r_t = pi_new / pi_old,
    averaged over real tokens. Returns the loss and diagnostics (approx-KL, clip fraction).
    `num_tokens` divides instead of this batch's token count: summed over the micro-batches of a
    minibatch, losses (and diagnostics) then equal the whole minibatch's."""
    log_ratio = (logp_new - logp_old) * mask
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages
    n = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
    loss = -(torch.minimum(unclipped, clipped) * mask).sum() / n
    with torch.no_grad():
        # k3 estimator of KL(old || new) (Schulman), unbiased and non-negative.
        approx_kl = (((ratio - 1) - log_ratio) * mask).sum() / n
        clipfrac = (((ratio - 1).abs() > clip_eps).float() * mask).sum() / n
    return loss, {"approx_kl": float(approx_kl), "clipfrac": float(clipfrac)}


def pad_rows(rows: list[torch.Tensor], value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D tensors into (batch, max_len) with a mask."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=rows[0].dtype if rows else torch.float32)
    mask = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return out, mask
