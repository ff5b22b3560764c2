"""``--activation_offloading true``: the activations a training step keeps for its backward pass wait in host memory.

torch's own ``torch.autograd.graph.save_on_cpu`` moves every saved tensor, weights included, with one blocking copy
each: a 0.5B model would copy its whole weights to the host and back on every micro-step. So the hooks here are
written by hand, on torch's ``saved_tensors_hooks``: only activations leave the GPU (tensors with a ``grad_fn``,
of at least ``min_bytes``; weights, frozen or not, are leaves and stay), they go to pinned host memory on a
copy stream of their own, so the forward pass does not wait for them, and each comes back when backward
unpacks it. What the GPU still holds is the weights, the optimizer state, one layer's working set and the
copies in flight; the price is PCIe traffic of about two copies of the activations per step (how much
that costs is measured in benchmarks/RESULTS.md). With gradient checkpointing only the checkpointed layers'
inputs are saved, so offloading them leaves almost nothing on the GPU between layers.

Every tensor is copied back exactly as it was (same dtype, shape and strides), so the loss and the gradients
equal those of a run without offloading.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator


class ActivationOffloader:
    """Pack/unpack hooks for ``torch.autograd.graph.saved_tensors_hooks``; one per trainer, reused every step.

    ``device`` is where activations are kept meanwhile (``cpu``); on a machine without CUDA the hooks still run
    (tests use them to show the round trip is exact) but copy between host tensors."""

    MIN_BYTES = 1 << 20  # smaller saved tensors stay: a copy costs more than it frees

    def __init__(self, min_bytes: int | None = None, device: str = "cpu"):
        self.min_bytes, self.device = self.MIN_BYTES if min_bytes is None else min_bytes, device
        self.offloaded_bytes = 0  # this step's, for logs and tests
        self._stream: Any = None

    def _copy_stream(self, tensor: Any) -> Any:
        import torch

        if self._stream is None:
            self._stream = torch.cuda.Stream(tensor.device)
        return self._stream

    def pack(self, tensor: Any) -> Any:
        import torch

        nbytes = tensor.numel() * tensor.element_size()
        if tensor.grad_fn is None or nbytes < self.min_bytes or tensor.is_sparse or tensor.device.type == "meta":
            return tensor  # weights and inputs (leaves) and small tensors stay where they are
        if tensor.device.type == "cuda":
            host = torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, pin_memory=True)
            stream = self._copy_stream(tensor)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is written by now
            with torch.cuda.stream(stream):
                host.copy_(tensor, non_blocking=True)
            tensor.record_stream(stream)  # its memory is not reused before the copy has read it
            event = torch.cuda.Event()
            event.record(stream)
            self.offloaded_bytes += nbytes
            return ("cuda", tensor.device, host, event)
        host = torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, device=self.device)
        host.copy_(tensor)
        self.offloaded_bytes += nbytes
        return ("host", tensor.device, host, None)

    def unpack(self, packed: Any) -> Any:
        import torch

        if not isinstance(packed, tuple):
            return packed
        kind, device, host, event = packed
        if kind == "cuda":
            event.synchronize()  # the host copy is complete before it is read back
            return host.to(device, non_blocking=True)
        return host.to(device)

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        import torch

        self.offloaded_bytes = 0
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield
