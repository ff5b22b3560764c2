"""Preference training and online RL: DPO and its variants, KTO, ORPO, SimPO, CPO, reward models, GRPO.

- ``losses``: the objectives as pure functions of per-sequence log-probs (formula + paper in each docstring)
- ``collator``: chosen and rejected rows into one batch (padded or padding-free); KTO's mismatched pairs
- ``trainer``: ``PreferenceTrainer``, the LmforgeTrainer subclass that scores sequences and logs rewards;
  the reference-model and metric helpers it shares with GRPO
- ``reward_model``: a sequence-classification head on a causal checkpoint, for ``rlhf_type rm``
- ``data``: ``builtin:arith-preference``, ``builtin:arith-rl`` and pairs made from a model's own samples
- ``grpo``: the GRPO objective as pure functions (advantages, clipped ratio, k3 KL, aggregation)
- ``grpo_trainer``: ``GRPOTrainer`` (rollouts, rewards, advantages, old/reference log-probs, the loss)
- ``rollout``: sampled trajectories from any engine, weight sync, the ``lmforge rollout`` client
- ``rewards``: outcome reward functions (``REWARDS``) and reward models as rewards
- ``prm``: process reward models (``PRMS``), for ``lmforge sample``
- ``multi_turn``: multi-turn schedulers (``MULTI_TURN``), the tool-call one built in

Importing this package imports nothing heavy; ``lmforge.pipelines.rlhf.rlhf_main`` runs it all (docs/grpo.md).
"""
