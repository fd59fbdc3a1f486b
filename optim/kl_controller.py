"""KL-penalty coefficients for PPO: fixed, or adapted towards a target KL.

The PPO reward carries a per-token penalty -beta * KL(pi || pi_ref) (see `optim.ppo.shape_rewards`).
LLaVA-RLHF keeps beta fixed at 0.1 (ANCHORS §3); Ziegler et al. (2019, section 2.2) instead
adapt it so that the measured KL tracks a target. Both expose the same two members:

    controller.value                      the current beta (a float)
    controller.update(current_kl, n_steps)  called once per PPO batch

These are classes only because they hold one number of state between updates.
"""


class FixedKLController:
    """A constant KL coefficient; `update` does nothing (LLaVA-RLHF's released setting)."""

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ValueError(f"FixedKLController: kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def __repr__(self) -> str:
        return f"FixedKLController(kl_coef={self.value})"


class AdaptiveKLController:
    """Proportional controller of Ziegler et al. 2019 (section 2.2):

        e    = clip(current_kl / target - 1, -0.2, 0.2)
        beta = beta * (1 + e * n_steps / horizon)

    Example: beta 0.2, KL 12, target 6, n_steps 256, horizon 10000: e = 0.2 (clipped from 1),
    beta = 0.2 * (1 + 0.2 * 0.0256) = 0.201024.

    Args:
        init_kl_coef: starting beta (>= 0).
        target: the KL (nats per sequence, as measured by the caller) to steer towards, > 0.
        horizon: how many samples it takes to move beta by a factor (1 + e); > 0.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if init_kl_coef < 0:
            raise ValueError(f"AdaptiveKLController: init_kl_coef must be >= 0, got {init_kl_coef}")
        if not target > 0:
            raise ValueError(f"AdaptiveKLController: target must be > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"AdaptiveKLController: horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """current_kl: a float or 0-d tensor (converted with float()); n_steps: samples seen."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value}, target={self.target}, horizon={self.horizon})"
