"""The lmforge Trainer: transformers' Trainer fed by template encodings, with three changes.

1. The loss is a registered function over shifted labels (``--loss_type``), normalised by the
   labelled tokens of the whole accumulated batch, so gradient accumulation and packing give the
   same loss as one big padded batch. In training on CUDA (``--fused_ce``), the cross-entropy
   losses are computed from the last hidden states and the output weight chunk by chunk
   (``fused_ce``), never from full logits; where that cannot apply the reason is logged once.
2. Checkpoints are written into a staging folder and renamed into place with the tokenizer and
   ``args.json`` inside, so a crash mid-write never leaves a ``checkpoint-N`` that looks complete;
   the completion marker records every file's size and SHA-256, so a later resume can tell a
   damaged checkpoint from an intact one. A save that fills the disk stops the run with "No space
   left on device", the folder, what was free and what was needed; the previous checkpoint stays.
3. Evaluation reports token accuracy (or ``--eval_metric``) without keeping full logits.

And one for speed: no per-step read of a GPU value on the host. The Trainer's NaN/inf loss filter
and its input-token count each read a value every micro-step, which makes the host wait for the GPU
and leaves the GPU idle while the host prepares the next batch; here both stay on the device and the
token count is read only when a log line or a checkpoint needs it.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

from transformers import Trainer

from lmforge.utils.checkpoint import COMPLETE_MARKER, describe_files, disk_full_error, find_last_checkpoint, folder_size
from lmforge.utils.errors import SetupError
from lmforge.utils.io import atomic_write_text, replace_dir

logger = logging.getLogger(__name__)


class FusedLoss:
    """Cross-entropy from the hidden states the model returns while its output layer is bypassed."""

    def __init__(self, head: Any, label_smoothing: float, use_liger: bool):
        self.head = head
        self.label_smoothing = label_smoothing
        self.use_liger = use_liger

    def __call__(self, hidden: Any, labels: Any, loss_scale: Any, num_items_in_batch: Any) -> Any:
        import torch.nn.functional as F

        from lmforge.trainers.fused_ce import fused_linear_cross_entropy

        # hidden[t] predicts labels[t + 1]: shift the labels rather than copy the hidden states
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)
        scale = F.pad(loss_scale[:, 1:], (0, 1), value=0.0) if loss_scale is not None else None
        return fused_linear_cross_entropy(hidden, self.head.weight, targets, loss_scale=scale,
                                          num_items_in_batch=num_items_in_batch,
                                          label_smoothing=self.label_smoothing, use_liger=self.use_liger)


class LossOnlyEvaluation:
    """A mixin for trainers whose metrics are logged from ``compute_loss``: evaluation keeps the loss, no logits."""

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):
        import torch

        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


class LmforgeTrainer(Trainer):
    def __init__(self, *args: Any, loss_fn: Callable | None = None, lmforge_args: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        from lmforge.registry import LOSSES

        self.loss_fn = loss_fn or LOSSES.get("cross_entropy")
        self.lmforge_args = lmforge_args
        # Our loss divides by the labelled tokens of the whole accumulated batch (num_items_in_batch).
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self._fused_ce: FusedLoss | None | bool = None   # None: not decided yet; False: off
        # nan_guard must see NaN losses; otherwise a non-finite loss counts as the running mean (as the
        # Trainer's logging_nan_inf_filter does, which lmforge turns off: it reads the loss on the host)
        self.finite_loss_filter = "nan_guard" not in (getattr(lmforge_args, "callbacks", None) or [])
        self._tokens_seen: Any = None  # num_input_tokens_seen of all ranks, a device tensor
        self.final_save = False  # run_training's save after an early stop: write consolidated weights too
        self.offloader = None
        if getattr(lmforge_args, "activation_offloading", False):
            from lmforge.trainers.offload import ActivationOffloader

            self.offloader = ActivationOffloader()

    def compute_loss_context_manager(self) -> Any:
        """The Trainer's (autocast), plus ``--activation_offloading``'s saved-tensor hooks around every loss the
        trainers compute (SFT, preference, GRPO, GKD): what the forward pass saves for backward waits on the host."""
        stack = super().compute_loss_context_manager()
        if self.offloader is not None:
            stack.enter_context(self.offloader())
        return stack

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
            self._enable_fsdp_on_cpu()

    def _enable_fsdp_on_cpu(self) -> None:
        """accelerate applies FSDP only on accelerators, but torch's FSDP2 runs on CPU processes over gloo;
        lmforge turns it on there so that ``--fsdp`` on CPU shards as asked (and its parity with one
        process is tested on every CI run) instead of silently falling back to DDP."""
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        if state.distributed_type != DistributedType.MULTI_CPU:
            raise SetupError(f"--fsdp was not applied (accelerate chose {state.distributed_type})")
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        state.distributed_type = DistributedType.FSDP
        self.is_fsdp_enabled = True

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        loss_scale = inputs.pop("loss_scale", None)
        fused = self.fused_loss(model) if model.training and not return_outputs else None
        if fused is not None:
            with fused.head.returning_hidden_states():
                hidden = model(**inputs, use_cache=False).logits
            return fused(hidden, labels, loss_scale, num_items_in_batch) * self.global_token_scale(num_items_in_batch)
        outputs = model(**inputs, use_cache=False)
        logits = outputs.logits
        loss = self.loss_fn(
            logits[:, :-1], labels[:, 1:],
            loss_scale=loss_scale[:, 1:] if loss_scale is not None else None,
            num_items_in_batch=num_items_in_batch if model.training else None,
        )
        if model.training:
            loss = loss * self.global_token_scale(num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.finite_loss_filter:
            import torch

            mean = self._tr_loss / (1 + self.state.global_step - self._globalstep_last_logged)
            loss = torch.where(torch.isfinite(loss), loss, mean.to(loss.dtype))
        return loss

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        """Real tokens of this micro-batch, summed over ranks on the device (the count is read in ``log``).

        Padding-free batches have no attention mask and no padding: every token counts (comparing with
        the pad id, as the Trainer does, would drop real end-of-text tokens that share its id).
        """
        import torch

        mode = self.args.include_num_input_tokens_seen
        ids = inputs.get("input_ids") if hasattr(inputs, "get") else None
        if mode in ("no", False) or ids is None:
            return
        mask = inputs.get("attention_mask")
        if mode == "non_padding" and mask is not None:
            count = mask.sum().to(self.args.device, torch.int64).reshape(1)
        else:  # a fill on the device: building it on the host and copying it over would sync
            count = torch.full((1,), ids.numel(), dtype=torch.int64, device=self.args.device)
        if self._tokens_seen is None:
            self._tokens_seen = torch.tensor(int(self.state.num_input_tokens_seen), device=self.args.device)
        self._tokens_seen += self.accelerator.gather(count).sum()

    def _read_tokens_seen(self) -> None:
        if self._tokens_seen is not None:
            self.state.num_input_tokens_seen = int(self._tokens_seen.item())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the peak GPU memory so far (this process) to every training log line on CUDA."""
        import torch

        self._read_tokens_seen()
        if "loss" in logs and self.args.device.type == "cuda":
            logs["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(self.args.device) / 2 ** 30, 2)
        super().log(logs, start_time)

    def global_token_scale(self, num_items_in_batch: Any) -> int:
        """The factor that makes a loss normalised by the global batch's labelled tokens survive DDP/FSDP.

        ``num_items_in_batch`` counts the labelled tokens of all ranks and accumulation steps; each rank
        divides its own token losses by it, and the gradient all-reduce then *averages* over ranks, so
        every rank's loss is multiplied by the number of ranks (as transformers' own ``compute_loss``
        does). The loss curve then does not depend on how many processes share the batch.
        """
        if num_items_in_batch is None or not self.args.average_tokens_across_devices:
            return 1
        return self.accelerator.num_processes

    # ---- fused linear + cross-entropy ---------------------------------------------------
    def fused_loss(self, model: Any) -> FusedLoss | None:
        """The fused loss for this model, or None (plain logits); decided and logged on first use."""
        if self._fused_ce is None:
            self._fused_ce = self._decide_fused_loss(model) or False
        return self._fused_ce or None

    def _decide_fused_loss(self, model: Any) -> FusedLoss | None:
        from lmforge.arguments.train import switch
        from lmforge.registry import LOSSES
        from lmforge.trainers.output_head import check_output_head, resolve_output_head

        a = self.lmforge_args
        mode = switch(getattr(a, "fused_ce", "auto")) if a is not None else None
        if mode is False:
            return None
        on_cuda = next(model.parameters()).is_cuda
        if mode is None and not on_cuda:
            logger.info("fused cross-entropy: off on CPU (--fused_ce true turns it on)")
            return None
        smoothing = {id(LOSSES.get("cross_entropy")): 0.0,
                     id(LOSSES.get("label_smoothing_ce")): 0.1}.get(id(self.loss_fn))
        why = ""
        if smoothing is None:
            why = f"the loss {getattr(self.loss_fn, '__name__', self.loss_fn)!r} has no fused form"
        elif getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            why = "FSDP/DeepSpeed shard the output weight"
        head = None
        if not why:
            head, why = resolve_output_head(model)
        if not why:
            why = check_output_head(self.model, head)
        if why:
            if mode:
                raise SetupError(f"--fused_ce true: cannot apply: {why}")
            logger.warning("fused cross-entropy: off (%s); the loss uses full logits", why)
            return None
        liger = bool(getattr(a, "use_liger_kernel", False)) and on_cuda
        logger.info("fused cross-entropy: on (%s kernel, label smoothing %s)", "Liger" if liger else "lmforge",
                    smoothing)
        return FusedLoss(head, smoothing, liger)

    # ---- atomic checkpoints -------------------------------------------------------------
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        self._read_tokens_seen()
        run_dir = Path(self.args.output_dir)
        staging = run_dir / ".staging"
        name = f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging / name, ignore_errors=True)
        original = self._get_output_dir
        self._get_output_dir = lambda trial=None: str(staging)  # type: ignore[method-assign]
        try:
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._get_output_dir = original  # type: ignore[method-assign]
            if self.sharded_checkpoints and (self.final_save or self.state.global_step >= self.state.max_steps):
                self.save_consolidated(staging / name)
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                self._finish_checkpoint(staging / name, run_dir / name)
        except Exception as e:  # noqa: BLE001 - safetensors and torch raise their own types when the disk fills
            full = disk_full_error(e, run_dir, self._checkpoint_bytes(run_dir))
            if full is None:
                raise
            shutil.rmtree(staging / name, ignore_errors=True)  # give the space back; the last checkpoint stays
            previous = find_last_checkpoint(run_dir, verify=False)
            kept = f"the previous checkpoint {previous} is kept" if previous else "no earlier checkpoint exists"
            raise type(full)(full.errno, f"{full.strerror}. Saving {name} was abandoned and {kept}; free space "
                                         "(or point --output_dir at a larger disk) and resume with "
                                         "--resume_from_checkpoint last") from e
        self.accelerator.wait_for_everyone()

    @property
    def sharded_checkpoints(self) -> bool:
        """FSDP with sharded state: checkpoints hold per-rank shards that only FSDP can read back."""
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        return plugin is not None and "SHARDED" in str(plugin.state_dict_type)

    def save_consolidated(self, folder: Path) -> None:
        """Gather the sharded weights (every rank takes part) and write a plain transformers/peft folder."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # torch's own gather of FSDP2's DTensors into full tensors (on the CPU of rank 0)
        state_dict = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # tied parameters (embeddings and output head) come back as separate copies: keep the first name only,
        # as save_pretrained does for a model in one process
        first: dict[int, str] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            if first.setdefault(id(param), name) != name:
                state_dict.pop(name, None)
        if self.args.should_save:
            self._save(str(folder), state_dict=state_dict)

    def _checkpoint_bytes(self, run_dir: Path) -> int:
        """What a checkpoint here takes: the last one's size, else the weights and optimizer state in memory."""
        previous = find_last_checkpoint(run_dir, verify=False)
        if previous is not None:
            return folder_size(previous)
        params = [p for p in self.model.parameters() if p.requires_grad] or list(self.model.parameters())
        total = sum(p.numel() * p.element_size() for p in params)
        state = getattr(self.optimizer, "state", {}) if self.optimizer is not None else {}
        for per_param in state.values():
            total += sum(t.numel() * t.element_size() for t in per_param.values() if hasattr(t, "element_size"))
        return total

    def _finish_checkpoint(self, staged: Path, final: Path) -> None:
        from transformers.trainer_utils import rotate_checkpoints

        from lmforge.arguments import save_args

        if self.lmforge_args is not None:
            save_args(self.lmforge_args, staged)
        if self.processing_class is not None and not (staged / "tokenizer_config.json").exists():
            self.processing_class.save_pretrained(staged)
        marker = {"global_step": self.state.global_step, "files": describe_files(staged)}
        atomic_write_text(staged / COMPLETE_MARKER, json.dumps(marker, indent=1))
        replace_dir(staged, final)
        shutil.rmtree(staged.parent, ignore_errors=True) if not any(staged.parent.iterdir()) else None
        rotate_checkpoints(output_dir=str(final.parent), save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        logger.info("Saved %s", final)
