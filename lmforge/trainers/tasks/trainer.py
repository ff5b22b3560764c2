"""TaskTrainer: the lmforge Trainer (atomic checkpoints, callbacks, several processes) with a task's loss.

Only ``compute_loss`` changes: the batch of :class:`~lmforge.trainers.tasks.collator.TaskCollator`
goes through the model once (:func:`lmforge.model.tasks.task_forward`, the same pass the serving
engine runs) and the task's registered loss scores it; classifiers use the model's own loss for
their problem type. The loss of a micro-batch is a mean over its queries (or rows), and the
Trainer divides it by the accumulation steps, so accumulated micro-batches average like one batch.

With several processes, an embedding model's in-batch negatives are the documents of *every*
process (gathered with their gradients, ``utils/distributed.py:all_gather_with_grad``), so N
processes train on the same comparisons as one process with their batches joined.

``accuracy`` (the fraction of queries whose positive scored highest, or of rows classified right)
is logged beside the loss, ``eval_accuracy`` in evaluation.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.model.tasks import task_forward
from lmforge.trainers.tasks.losses import loss_for
from lmforge.trainers.trainer import LmforgeTrainer, LossOnlyEvaluation
from lmforge.utils import distributed as dist

logger = logging.getLogger(__name__)


class TaskTrainer(LossOnlyEvaluation, LmforgeTrainer):
    def __init__(self, *args: Any, task: str, pooling: str = "last", yes_no: tuple[int, int] | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        a = self.lmforge_args
        self.task, self.pooling, self.yes_no = task, pooling, yes_no
        self.task_loss = None if task == "seq_cls" else loss_for(task, a.loss_type)
        # a mean per micro-batch: the Trainer divides by the accumulation steps (no token counts here)
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self._accuracy = {"train": torch.zeros(2, dtype=torch.float64), "eval": torch.zeros(2, dtype=torch.float64)}

    # ------------------------------------------------------------------------------------ losses

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        if self.task == "seq_cls":
            loss, correct = self._classifier_loss(model, inputs)
        elif self.task == "embedding":
            loss, correct = self._embedding_loss(model, inputs)
        else:
            scores = task_forward(model, inputs, self.task, yes_no=self.yes_no)
            loss, correct = self.task_loss(scores, inputs["pair_labels"], inputs["group_sizes"],
                                           temperature=self.lmforge_args.listwise_temperature)
        self._count("train" if model.training else "eval", correct)
        return (loss, {}) if return_outputs else loss

    def _classifier_loss(self, model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["labels"])
        logits, labels = out.logits.detach(), inputs["labels"]
        kind = getattr(model.config, "problem_type", None)
        if kind == "single_label_classification":
            correct = (logits.argmax(-1) == labels).float()
        elif kind == "multi_label_classification":  # every class decided right
            correct = ((logits > 0) == (labels > 0.5)).all(-1).float()
        else:
            correct = None
        return out.loss, correct

    def _embedding_loss(self, model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.lmforge_args
        vectors = task_forward(model, inputs, "embedding", pooling=self.pooling)
        b = inputs["pair_label"].shape[0]
        queries, docs = vectors[:b], vectors[b:]
        counts, hashes = inputs["negative_counts"], inputs["doc_hash"]
        offset = 0
        if a.infonce_use_batch and dist.world_size() > 1:
            docs, offset = dist.all_gather_with_grad(docs)
            hashes = torch.tensor([h for part in dist.gather_objects(hashes.tolist()) for h in part],
                                  device=hashes.device)
        n = docs.shape[0]
        rows = torch.arange(b, device=docs.device)
        positive = offset + rows
        own = torch.zeros((b, n), dtype=torch.bool, device=docs.device)
        own[rows, positive] = True
        starts = offset + b + torch.cumsum(counts, 0) - counts
        for i in range(b):
            own[i, starts[i]:starts[i] + counts[i]] = True
        # a document with the same ids as the row's positive is that positive again, not a negative
        same = hashes[None, :] == hashes[positive][:, None]
        same[rows, positive] = False
        own &= ~same
        mask = ~same if a.infonce_use_batch else own
        losses, first = [], None
        for dim in [None, *a.matryoshka_dims]:
            q = F.normalize(queries[:, :dim].float(), dim=-1)
            d = F.normalize(docs[:, :dim].float(), dim=-1)
            loss, correct = self.task_loss(q, d, positive, mask, own=own, label=inputs["pair_label"],
                                           temperature=a.infonce_temperature, margin=a.contrastive_margin)
            losses.append(loss)
            first = correct if first is None else first
        return torch.stack(losses).mean(), first

    # ------------------------------------------------------------------------------------ metrics

    def _count(self, split: str, correct: torch.Tensor | None) -> None:
        if correct is None:
            return
        stat = torch.stack([correct.sum().double(), torch.tensor(float(correct.numel()), dtype=torch.float64,
                                                                  device=correct.device)])
        stat = dist.global_sum(stat.to(dist.collective_device()))
        self._accuracy[split] += stat.cpu()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        total, count = self._accuracy[split].tolist()
        if count:
            logs[f"{'eval_' if split == 'eval' else ''}accuracy"] = round(total / count, 6)
            self._accuracy[split].zero_()
        super().log(logs, start_time)
