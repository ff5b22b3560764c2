"""Preference training: DPO and its variants, KTO, ORPO, SimPO, CPO, and reward models.

- ``losses``: the objectives as pure functions of per-sequence log-probs (formula + paper in each docstring)
- ``collator``: chosen and rejected rows into one batch (padded or padding-free); KTO's mismatched pairs
- ``trainer``: ``PreferenceTrainer``, the LmforgeTrainer subclass that scores sequences and logs rewards
- ``reward_model``: a sequence-classification head on a causal checkpoint, for ``rlhf_type rm``
- ``data``: ``builtin:arith-preference`` and pairs made from a model's own samples

Importing this package imports nothing heavy; ``lmforge.pipelines.rlhf.rlhf_main`` runs it all.
"""
