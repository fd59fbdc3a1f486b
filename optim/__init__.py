"""optim: the losses of DPO, Bradley-Terry reward modelling and PPO, LoRA, and one training loop."""

from .dpo import DPO_LOSS_TYPES, dpo_loss, dpo_with_sft_loss, preference_metrics
from .kl_controller import AdaptiveKLController, FixedKLController
from .logprobs import sequence_logprobs, token_entropy, token_logprobs
from .lora import LoRALinear, apply_lora, load_lora, lora_state_dict, merge_lora, save_lora
from .ppo import (KL_KINDS, gae, kl_estimate, masked_entropy, masked_mean, ppo_policy_loss, ppo_policy_stats,
                  ppo_value_loss, shape_rewards, whiten)
from .reward_loss import reward_accuracy, reward_model_loss
from .train import (NonFiniteLossError, TrainConfig, TrainResult, batch_for_ranks, latest_checkpoint, load_trainable,
                    lr_at, train)
