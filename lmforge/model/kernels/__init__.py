"""Training kernels: what makes a training step faster or smaller without changing its result.

- ``varlen_attention``: attention over padding-free packed batches with a variable-length kernel
  (flash-attn, PyTorch's flash varlen op), registered with transformers' ``AttentionInterface``.
- ``lean_layers``: RMSNorm and SwiGLU as autograd functions that keep fewer activations for the
  backward pass.
- ``compile``: compile small element-wise functions on CUDA, fall back to eager anywhere else.

``lmforge.model.patches`` decides which of these a model gets; the fused linear + cross-entropy
loss lives with the losses (``lmforge.trainers.fused_ce``).
"""
