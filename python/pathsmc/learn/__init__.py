"""Objectives and small training loops for twists / soft values (issue 11).

One objective per module, all written on tensors of per-path quantities so that the same
function serves the diffusion chains of :mod:`pathsmc.diffusion` and the token models of
:mod:`pathsmc.targets.sequence`:

- :mod:`.path_consistency`: path consistency / trajectory balance and its sub-trajectory
  (c-step) form;
- :mod:`.log_variance`: the log-variance divergence (no learned log Z);
- :mod:`.contrastive`: contrastive twist learning (mass-covering KL on every marginal);
- :mod:`.elbo`: the mode-seeking KL (ELBO) through reparameterized paths;
- :mod:`.value_network`: twists ``V_θ(x, t)`` (usable by ``steer(mode="twisted")``) and
  ``V_θ(prefix)`` for token models;
- :mod:`.diffusion_paths`, :mod:`.token_paths`: sampling paths (SMC, detached) and computing
  the per-step log-ratios ``log p_ref − log q_θ`` with gradients;
- :mod:`.chain_paths`: the same for a diffusers chain (:class:`ChainValue`, paths, log-ratios,
  :func:`train_chain_twist`);
- :mod:`.noisy_classifier`: the soft values of a classifier reward, learned for every class at
  once as a classifier of noisy states (soft-label regression on plain-chain paths);
- :mod:`.lm_twist`: token-local twists for causal LMs (``lm_smc``), learned the same way
  from the LM's own samples (:class:`PrefixValue`, :func:`fit_lm_twist`);
- :mod:`.replay`: a replay buffer of detached paths; :mod:`.train`: training loops.
"""

from pathsmc.learn.chain_paths import (
    ChainPaths,
    ChainValue,
    chain_log_ratios,
    chain_loss,
    chain_states,
    sample_chain_paths,
    train_chain_twist,
)
from pathsmc.learn.contrastive import contrastive_twist_loss
from pathsmc.learn.diffusion_paths import (
    DiffusionPaths,
    diffusion_log_ratios,
    reparameterized_log_weights,
    sample_diffusion_paths,
)
from pathsmc.learn.elbo import elbo_loss
from pathsmc.learn.lm_twist import PrefixValue, fit_lm_twist, lm_twist_loss, plain_lm_paths
from pathsmc.learn.log_variance import log_variance_loss, path_log_weights
from pathsmc.learn.noisy_classifier import (
    FitHistory,
    NoisyClassifier,
    bounded_reward_labels,
    fit_class_twist,
    soft_label_loss,
    train_noisy_classifier,
)
from pathsmc.learn.path_consistency import consistency_residuals, path_consistency_loss
from pathsmc.learn.replay import ReplayBuffer
from pathsmc.learn.token_paths import TokenPaths, sample_token_paths, token_log_ratios
from pathsmc.learn.train import train_diffusion_twist, train_token_twist
from pathsmc.learn.value_network import TokenValue, ValueNetwork

__all__ = [
    "ChainPaths",
    "ChainValue",
    "DiffusionPaths",
    "FitHistory",
    "NoisyClassifier",
    "PrefixValue",
    "ReplayBuffer",
    "TokenPaths",
    "TokenValue",
    "ValueNetwork",
    "bounded_reward_labels",
    "chain_log_ratios",
    "chain_loss",
    "chain_states",
    "consistency_residuals",
    "contrastive_twist_loss",
    "diffusion_log_ratios",
    "elbo_loss",
    "fit_class_twist",
    "fit_lm_twist",
    "lm_twist_loss",
    "log_variance_loss",
    "path_consistency_loss",
    "path_log_weights",
    "plain_lm_paths",
    "reparameterized_log_weights",
    "sample_chain_paths",
    "soft_label_loss",
    "sample_diffusion_paths",
    "sample_token_paths",
    "token_log_ratios",
    "train_chain_twist",
    "train_diffusion_twist",
    "train_noisy_classifier",
    "train_token_twist",
]
