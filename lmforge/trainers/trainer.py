"""The lmforge Trainer: transformers' Trainer fed by template encodings, with three changes.

1. The loss is a registered function over shifted labels (``--loss_type``), normalised by the
   labelled tokens of the whole accumulated batch, so gradient accumulation and packing give the
   same loss as one big padded batch.
2. Checkpoints are written into a staging folder and renamed into place with the tokenizer and
   ``args.json`` inside, so a crash mid-write never leaves a ``checkpoint-N`` that looks complete.
3. Evaluation reports token accuracy (or ``--eval_metric``) without keeping full logits.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

from transformers import Trainer

from lmforge.utils.checkpoint import COMPLETE_MARKER
from lmforge.utils.io import atomic_write_text, replace_dir

logger = logging.getLogger(__name__)



class LmforgeTrainer(Trainer):
    def __init__(self, *args: Any, loss_fn: Callable | None = None, lmforge_args: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        from lmforge.registry import LOSSES

        self.loss_fn = loss_fn or LOSSES.get("cross_entropy")
        self.lmforge_args = lmforge_args
        # Our loss divides by the labelled tokens of the whole accumulated batch (num_items_in_batch).
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        loss_scale = inputs.pop("loss_scale", None)
        outputs = model(**inputs, use_cache=False)
        logits = outputs.logits
        loss = self.loss_fn(
            logits[:, :-1], labels[:, 1:],
            loss_scale=loss_scale[:, 1:] if loss_scale is not None else None,
            num_items_in_batch=num_items_in_batch if model.training else None,
        )
        return (loss, outputs) if return_outputs else loss

    # ---- atomic checkpoints -------------------------------------------------------------
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        run_dir = Path(self.args.output_dir)
        staging = run_dir / ".staging"
        name = f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging / name, ignore_errors=True)
        original = self._get_output_dir
        self._get_output_dir = lambda trial=None: str(staging)  # type: ignore[method-assign]
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._get_output_dir = original  # type: ignore[method-assign]
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            self._finish_checkpoint(staging / name, run_dir / name)
        self.accelerator.wait_for_everyone()

    def _finish_checkpoint(self, staged: Path, final: Path) -> None:
        from transformers.trainer_utils import rotate_checkpoints

        from lmforge.arguments import save_args

        if self.lmforge_args is not None:
            save_args(self.lmforge_args, staged)
        if self.processing_class is not None and not (staged / "tokenizer_config.json").exists():
            self.processing_class.save_pretrained(staged)
        atomic_write_text(staged / COMPLETE_MARKER, json.dumps({"global_step": self.state.global_step}))
        replace_dir(staged, final)
        shutil.rmtree(staged.parent, ignore_errors=True) if not any(staged.parent.iterdir()) else None
        rotate_checkpoints(output_dir=str(final.parent), save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        logger.info("Saved %s", final)
