"""The decoder of the Llama family, re-laid-out for paged, continuously batched generation.

Supported by architecture, not by name: any transformers causal LM whose decoder layers have
``self_attn.{q,k,v,o}_proj`` (optionally ``q_norm``/``k_norm``, as Qwen3), an RMS-normed gated-SiLU
MLP ``mlp.{gate,up,down}_proj`` and RoPE from the model's own rotary module (so every RoPE variant
that transformers implements — default, linear, llama3, yarn, ... — comes out the same). That covers
Llama 2/3, Qwen2/2.5, Qwen3, Mistral and their fine-tunes.

Why not run the transformers module itself: its attention works on padded ``[batch, seq]`` tensors
and a contiguous cache, while this engine batches a flat list of tokens from many sequences at
different positions and reads keys and values from a paged cache. The weights are taken from the
loaded transformers model: q/k/v and gate/up are fused into one matrix each (one GEMM instead of
three or two), everything else is shared.

LoRA adapters are applied per token: each adapter's A matrices sit side by side (``x @ A_all``), a
mask keeps the columns of the token's own adapter, and the B matrices (scale folded in) map back.
Two dense GEMMs whatever the mix of adapters in the batch, and the shapes do not depend on it, so
decode steps with adapters can be captured in a CUDA graph too.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_SUB = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
        "down": ("down_proj",)}
_GROUP_WIDTH = {group: len(subs) for group, subs in _SUB.items()}  # sub-projections sharing one fused matrix


class UnsupportedModelError(ValueError):
    """The model's architecture is not one the native engine implements."""


@dataclass
class AttentionMeta:
    """Where each token of a flat batch reads and writes the paged cache (see attention.py)."""

    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32
    query_start_loc: torch.Tensor  # [B+1] int32
    max_query_len: int
    lora_idx: torch.Tensor | None = None  # [T] int64, -1 = base


@dataclass
class _Layer:
    ln1: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    ln2: torch.Tensor
    gate_up_w: torch.Tensor
    down_w: torch.Tensor
    sliding_window: int | None
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # group -> (A_all, B_all)


def _linear(module: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    base = getattr(module, "base_layer", module)  # a peft LoRA layer wraps the original Linear
    return base.weight, base.bias


def _decoder(model: Any) -> Any:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    dec = inner.get_decoder() if hasattr(inner, "get_decoder") else getattr(inner, "model", None)
    if dec is None or not hasattr(dec, "layers"):
        raise UnsupportedModelError(f"{type(inner).__name__}: no decoder with .layers found; the native engine runs "
                                    "Llama/Qwen2/Qwen3/Mistral-style models (use --infer_backend hf for this one)")
    return inner, dec


def check_architecture(model: Any) -> None:
    """Raise :class:`UnsupportedModelError` naming what is missing, before any weight is touched."""
    inner, dec = _decoder(model)
    cfg = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
    name = type(inner).__name__
    act = getattr(cfg, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(f"{name}: hidden_act {act!r} (the native engine implements SiLU-gated MLPs)")
    layer = dec.layers[0]
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    need = [("self_attn." + p, attn) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    need += [("mlp." + p, mlp) for p in ("gate_proj", "up_proj", "down_proj")]
    missing = [n for n, parent in need if parent is None or not hasattr(parent, n.split(".")[1])]
    for n in ("input_layernorm", "post_attention_layernorm"):
        if not hasattr(layer, n):
            missing.append(n)
    if not hasattr(dec, "rotary_emb"):
        missing.append("rotary_emb")
    if missing:
        raise UnsupportedModelError(
            f"{name} ({getattr(cfg, 'model_type', '?')}) is not a Llama-family decoder: no {', '.join(missing)}. "
            "The native engine runs Llama/Qwen2/Qwen3/Mistral-style models; use --infer_backend hf for this one.")
    for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm"):
        if hasattr(layer, n):
            raise UnsupportedModelError(f"{name}: extra norm {n} (Gemma-style); use --infer_backend hf")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As transformers computes it: float32 statistics, cast back before the weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class NativeModel:
    """Weights plus a forward over a flat token batch; the KV cache is passed in."""

    def __init__(self, hf_model: Any, *, max_model_len: int, attention: Callable, write_kv: Callable):
        check_architecture(hf_model)
        inner, dec = _decoder(hf_model)
        cfg = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
        self.config = cfg
        self.num_layers = len(dec.layers)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.hidden_size = cfg.hidden_size
        self.eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
        self.scale = self.head_dim ** -0.5
        self.attention, self.write_kv = attention, write_kv
        self.fused = False  # set by the engine on CUDA (kernels.py); the torch path is the reference
        embed = inner.get_input_embeddings()
        self.embed = embed.weight
        self.embed_scale = getattr(embed, "embed_scale", None)
        self.vocab_size = self.embed.shape[0]
        self.device, self.dtype = self.embed.device, self.embed.dtype
        self.norm = dec.norm.weight
        head = inner.get_output_embeddings()
        self.lm_head = _linear(head)[0] if head is not None else self.embed
        # cos/sin for every position, from the model's own rotary module (all RoPE variants).
        # Qwen2-VL: which rotary frequencies follow the time/height/width axis (vision.mrope_cos_sin)
        self.mrope_section = getattr(dec.rotary_emb, "mrope_section", None)
        positions = torch.arange(max_model_len, device=self.device)[None]
        if self.mrope_section is not None:  # its rotary module wants [3, batch, T] (older transformers: only that)
            positions = positions[None].expand(3, 1, -1)
        probe = torch.zeros(1, device=self.device, dtype=self.dtype)
        with torch.no_grad():
            cos, sin = dec.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)
        self.layers = [self._layer(i, layer, cfg) for i, layer in enumerate(dec.layers)]
        self.lora_slots: dict[str, int] = {}

    def _layer(self, i: int, layer: Any, cfg: Any) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        (qw, qb), (kw, kb), (vw, vb) = _linear(attn.q_proj), _linear(attn.k_proj), _linear(attn.v_proj)
        qkv_b = torch.cat([qb, kb, vb]) if qb is not None else None
        ow, ob = _linear(attn.o_proj)
        window = getattr(cfg, "sliding_window", None)
        types = getattr(cfg, "layer_types", None)
        if types is not None:
            window = window if types[i] == "sliding_attention" else None
        elif not getattr(cfg, "use_sliding_window", True):
            window = None
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        return _Layer(
            ln1=layer.input_layernorm.weight, qkv_w=torch.cat([qw, kw, vw]), qkv_b=qkv_b,
            q_norm=q_norm.weight if q_norm is not None else None, k_norm=k_norm.weight if k_norm is not None else None,
            o_w=ow, o_b=ob, ln2=layer.post_attention_layernorm.weight,
            gate_up_w=torch.cat([_linear(mlp.gate_proj)[0], _linear(mlp.up_proj)[0]]),
            down_w=_linear(mlp.down_proj)[0], sliding_window=window)

    def own_weights(self) -> None:
        """Clone the tensors still shared with the transformers model (a caller's model stays untouched
        by :meth:`load_weights`: an RL trainer's frozen LoRA base must not receive merged weights)."""
        tied = self.lm_head is self.embed
        self.embed, self.norm = self.embed.clone(), self.norm.clone()
        self.lm_head = self.embed if tied else self.lm_head.clone()
        for layer in self.layers:
            for name in ("ln1", "o_w", "o_b", "ln2", "down_w", "q_norm", "k_norm"):
                t = getattr(layer, name)
                if t is not None:
                    setattr(layer, name, t.clone())

    # ---- weights updates (RL: the trainer pushes its weights after each step) ----------------
    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy transformers-named weights (``model.layers.3.self_attn.q_proj.weight``, ...) in place.

        Returns how many tensors were taken; names that are not part of the decoder are ignored.
        """
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        inter = self.layers[0].gate_up_w.shape[0] // 2
        spans = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv),
                 "gate_proj": (0, inter), "up_proj": (inter, 2 * inter)}
        taken = 0
        for name, tensor in named:
            name = name.replace("base_model.model.", "").replace(".base_layer", "")
            parts = name.split(".")
            with torch.no_grad():
                if name.endswith("embed_tokens.weight"):
                    self.embed.copy_(tensor)
                elif name == "lm_head.weight":
                    self.lm_head.copy_(tensor)
                elif name in ("model.norm.weight", "norm.weight", "model.language_model.norm.weight"):
                    self.norm.copy_(tensor)
                elif "layers" in parts:
                    k = parts.index("layers")
                    layer, mod, kind = self.layers[int(parts[k + 1])], parts[-2], parts[-1]
                    if mod in ("q_proj", "k_proj", "v_proj"):
                        lo, hi = spans[mod]
                        (layer.qkv_w if kind == "weight" else layer.qkv_b)[lo:hi].copy_(tensor)
                    elif mod in ("gate_proj", "up_proj"):
                        lo, hi = spans[mod]
                        layer.gate_up_w[lo:hi].copy_(tensor)
                    else:
                        target = {"o_proj": layer.o_w if kind == "weight" else layer.o_b, "down_proj": layer.down_w,
                                  "input_layernorm": layer.ln1, "post_attention_layernorm": layer.ln2,
                                  "q_norm": layer.q_norm, "k_norm": layer.k_norm}.get(mod)
                        if target is None:
                            continue
                        target.copy_(tensor)
                else:
                    continue
            taken += 1
        return taken

    # ---- LoRA --------------------------------------------------------------------------------
    def set_lora(self, peft_model: Any, names: list[str]) -> None:
        """Take the LoRA weights of ``names`` from a peft model; slot i serves adapter names[i]."""
        if not names:
            return
        _, dec = _decoder(peft_model)
        for n in names:
            cfg = peft_model.peft_config[n]
            if getattr(cfg, "use_dora", False):
                raise UnsupportedModelError(f"adapter {n!r} is DoRA; the native engine applies plain LoRA "
                                            "(merge it with `lmforge export --merge_lora true`, or use --infer_backend hf)")
            if getattr(cfg, "modules_to_save", None):
                raise UnsupportedModelError(f"adapter {n!r} trains whole modules ({cfg.modules_to_save}); merge it first")
        ranks = {n: peft_model.peft_config[n].r for n in names}
        rank = max(ranks.values())
        N = len(names)
        for layer, hf_layer in zip(self.layers, dec.layers):
            mods = {**{p: getattr(hf_layer.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
                    **{p: getattr(hf_layer.mlp, p) for p in ("gate_proj", "up_proj", "down_proj")}}
            for group, subs in _SUB.items():
                if not any(n in getattr(mods[s], "lora_A", {}) for s in subs for n in names):
                    continue
                S = len(subs)
                in_dim = _linear(mods[subs[0]])[0].shape[1]
                outs = [_linear(mods[s])[0].shape[0] for s in subs]
                A = torch.zeros(in_dim, N * S * rank, device=self.device, dtype=self.dtype)
                B = torch.zeros(N * S * rank, sum(outs), device=self.device, dtype=self.dtype)
                for j, n in enumerate(names):
                    off = 0
                    for s_i, s in enumerate(subs):
                        m = mods[s]
                        if n in getattr(m, "lora_A", {}):
                            a, b = m.lora_A[n].weight, m.lora_B[n].weight  # [r, in], [out, r]
                            r = a.shape[0]
                            col = (j * S + s_i) * rank
                            A[:, col:col + r] = a.T.to(self.dtype)
                            B[col:col + r, off:off + outs[s_i]] = (b.T * m.scaling[n]).to(self.dtype)
                        off += outs[s_i]
                layer.lora[group] = (A, B)
        self.lora_slots = {n: i for i, n in enumerate(names)}
        # Column -> adapter slot of each fused group's A_all (its width is N x sub-projections x rank).
        self._lora_owner = {S: torch.arange(N * S * rank, device=self.device) // (S * rank)
                            for S in set(_GROUP_WIDTH.values())}
        logger.info("native engine: %d LoRA adapter(s) applied per token (rank %d)", N, rank)

    def _lora_masks(self, lora_idx: torch.Tensor) -> dict[int, torch.Tensor]:
        """Per group width: [T, columns] 1 where a column belongs to the token's own adapter."""
        return {S: (owner[None, :] == lora_idx[:, None]).to(self.dtype) for S, owner in self._lora_owner.items()}

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMeta,
                k_cache: list[torch.Tensor], v_cache: list[torch.Tensor], *,
                image_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Final-normed hidden states [T, hidden] of a flat batch of tokens.

        ``image_embeds``: (rows, values) replacing those tokens' embeddings (a vision tower's output);
        ``rope``: per-token cos/sin [T, D] used instead of the tables at ``positions`` (3-D M-RoPE).
        """
        T = input_ids.shape[0]
        h = F.embedding(input_ids, self.embed)
        if self.embed_scale is not None:
            h = h * self.embed_scale
        if image_embeds is not None:
            rows, values = image_embeds
            h = h.index_copy(0, rows, values.to(h.dtype))
        masks = self._lora_masks(meta.lora_idx) if self.lora_slots and meta.lora_idx is not None else None
        nq, nkv, d = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.head_dim

        def proj(x: torch.Tensor, layer: _Layer, group: str, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
            """x @ weight.T (+ bias), plus each token's own LoRA delta for this group of projections."""
            out = F.linear(x, weight, bias)
            if masks is not None and group in layer.lora:
                A, B = layer.lora[group]
                out = out + ((x @ A) * masks[_GROUP_WIDTH[group]]) @ B
            return out

        cos_t, sin_t = (self.cos, self.sin) if rope is None else (rope[0].contiguous(), rope[1].contiguous())
        if rope is not None:  # the kernel indexes its tables by position: index the per-token rows by token
            positions = torch.arange(T, device=h.device)
        if self.fused:
            return self._forward_fused(h, positions, meta, k_cache, v_cache, proj, cos_t, sin_t)
        cos, sin = cos_t[positions][:, None, :], sin_t[positions][:, None, :]
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer.ln1, self.eps)
            qkv = proj(x, layer, "qkv", layer.qkv_w, layer.qkv_b)
            q = qkv[:, :nq].view(T, self.num_heads, d)
            k = qkv[:, nq:nq + nkv].view(T, self.num_kv_heads, d)
            v = qkv[:, nq + nkv:].view(T, self.num_kv_heads, d)
            if layer.q_norm is not None:
                q, k = rms_norm(q, layer.q_norm, self.eps), rms_norm(k, layer.k_norm, self.eps)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.write_kv(k, v, k_cache[i], v_cache[i], meta.slot_mapping)
            o = self.attention(q, k_cache[i], v_cache[i], meta.block_tables, meta.seq_lens, meta.query_start_loc,
                               meta.max_query_len, self.scale, sliding_window=layer.sliding_window)
            o = o.reshape(T, nq)
            out = proj(o, layer, "o", layer.o_w, layer.o_b)
            h = h + out
            x = rms_norm(h, layer.ln2, self.eps)
            gu = proj(x, layer, "gate_up", layer.gate_up_w)
            g, u = gu.chunk(2, dim=-1)
            a = F.silu(g) * u
            out = proj(a, layer, "down", layer.down_w)
            h = h + out
        return rms_norm(h, self.norm, self.eps)

    def _forward_fused(self, h: torch.Tensor, positions: torch.Tensor, meta: AttentionMeta,
                       k_cache: list[torch.Tensor], v_cache: list[torch.Tensor], proj: Callable,
                       cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The same computation with the fused kernels (CUDA): residual adds ride along the norms."""
        from lmforge.infer.native import kernels

        T = h.shape[0]
        nq = self.num_heads * self.head_dim
        x, residual = kernels.add_rms_norm(h, None, self.layers[0].ln1, self.eps)
        for i, layer in enumerate(self.layers):
            qkv = proj(x, layer, "qkv", layer.qkv_w, layer.qkv_b)
            kernels.rope_and_cache(qkv, positions, cos, sin, meta.slot_mapping, k_cache[i], v_cache[i],
                                   self.num_heads, self.num_kv_heads, self.head_dim, layer.q_norm, layer.k_norm,
                                   self.eps)
            q = qkv[:, :nq].view(T, self.num_heads, self.head_dim)
            o = self.attention(q, k_cache[i], v_cache[i], meta.block_tables, meta.seq_lens, meta.query_start_loc,
                               meta.max_query_len, self.scale, sliding_window=layer.sliding_window)
            o = o.reshape(T, nq)
            out = proj(o, layer, "o", layer.o_w, layer.o_b)
            x, residual = kernels.add_rms_norm(out, residual, layer.ln2, self.eps)
            gu = proj(x, layer, "gate_up", layer.gate_up_w)
            a = kernels.silu_and_mul(gu)
            out = proj(a, layer, "down", layer.down_w)
            nxt = self.layers[i + 1].ln1 if i + 1 < len(self.layers) else self.norm
            x, residual = kernels.add_rms_norm(out, residual, nxt, self.eps)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head)  # the model's dtype: the sampler upcasts only where it must
