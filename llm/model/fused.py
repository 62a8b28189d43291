"""Fused training forward for LLaMA-architecture models on the CPU (float32), on the toolkit's custom operators.

:func:`enable_fused_training` swaps, per layer instance (the classes and paddlenlp stay untouched), the pieces
of paddlenlp's training forward whose paddle ops cost more than their arithmetic on the CPU (profiled on a
135M LLaMA, LoRA, 4 x 256 tokens: the RMSNorm chain, SiLU, the full ``[tokens, vocab]`` logits, their float32
cast and the cross-entropy took more time than every matmul together):

* ``*RMSNorm`` layers -> ``llm_rms_norm_train`` (one pass forward, one backward);
* the SwiGLU MLP -> ``down(llm_swiglu_train(gate(x), up(x)))``;
* attention -> rotary embedding and head transpose in one op (``llm_rope_train``), grouped-query scores without
  repeating K / V (each KV head's query heads in one matmul), ``softmax(scores * scale + mask)`` in one op, and
  only the score tiles that the causal / packed mask lets through (:mod:`llm.model.tiled_attention`);
* LoRA linears -> ``x W + ((x A) s) B``: the LoRA scale multiplies the rank-r product, not the output;
* ``LlamaForCausalLM`` with labels -> the LM head and the loss fused (:class:`HeadLoss`): only the rows with a
  label are projected (SFT prompts are not), in chunks, and each chunk's softmax-CE gradient is formed at once,
  so the ``[tokens, vocab]`` logits never exist. The loss is the mean CE over ``labels != ignore_index``, as
  paddlenlp's criterion computes it; the training outputs then carry no logits.

Each fused forward falls back to the original one outside its domain: static graph, non-CPU or non-float32
tensors, tensor / sequence parallelism, evaluation (``model.eval()``) or no labels. Nothing is fused when the
custom operators are not available (``LLM_KERNELS=0``, no compiler): :mod:`llm.kernels`.
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable
from typing import Any

import paddle
import paddle.nn.functional as F
from paddle.autograd import PyLayer
from paddlenlp.transformers.model_outputs import CausalLMOutputWithCrossAttentions

from llm import kernels
from llm.model import tiled_attention

IGNORE_INDEX = -100
#: rows of logits per chunk are capped so that a chunk stays under this many bytes (glibc reuses the block)
CHUNK_BYTES = 24 * 1024 * 1024
#: with a trainable head, one chunk may hold up to this many bytes of logits (fewer dW accumulations)
TRAINABLE_CHUNK_BYTES = 64 * 1024 * 1024


def _plain_cpu_f32(*tensors: paddle.Tensor) -> bool:
    return paddle.in_dynamic_mode() and all(
        t.dtype == paddle.float32 and t.place.is_cpu_place() for t in tensors
    )


def _override(layer: paddle.nn.Layer, fused: Callable[..., Any]) -> None:
    """Route ``layer.forward`` through ``fused(layer, original_forward, *args)`` (instance attribute only)."""
    original = layer.forward

    @functools.wraps(original)  # keeps the signature (PrefixModel inspects it)
    def forward(self: paddle.nn.Layer, *args: Any, **kwargs: Any) -> Any:
        return fused(self, original, *args, **kwargs)

    # straight into the instance dict: paddlenlp's PretrainedModel.__setattr__ would wrap a (*args, **kwargs)
    # forward and drop its return_dict / output_attentions / output_hidden_states arguments
    layer.__dict__["forward"] = types.MethodType(forward, layer)
    layer.__dict__["_llm_fused"] = True


# ------------------------------------------------------------------------------------------------- layers
def _rms_norm(layer: paddle.nn.Layer, original: Callable, hidden_states: paddle.Tensor) -> paddle.Tensor:
    if not (_plain_cpu_f32(hidden_states, layer.weight) and paddle.is_grad_enabled()):
        return original(hidden_states)
    ops = kernels.training_ops()
    return ops.llm_rms_norm_train(hidden_states, layer.weight, float(layer.variance_epsilon))


def _mlp(layer: paddle.nn.Layer, original: Callable, x: paddle.Tensor) -> paddle.Tensor:
    if not (_plain_cpu_f32(x) and paddle.is_grad_enabled()):
        return original(x)
    gate, up = layer.gate_proj(x), layer.up_proj(x)
    if not _plain_cpu_f32(gate, up):
        return original(x)
    return layer.down_proj(kernels.training_ops().llm_swiglu_train(gate, up))


def _lora_linear(
    layer: paddle.nn.Layer, original: Callable, x: paddle.Tensor, *args: Any, **kwargs: Any
) -> Any:
    if (
        layer.merged
        or layer.use_quick_lora
        or (layer.pissa and not layer.apply_pissa)
        or not _plain_cpu_f32(x)
    ):
        return original(x, *args, **kwargs)
    if (
        layer.weight.stop_gradient
        and layer.bias is None
        and not isinstance(layer.lora_dropout, paddle.nn.Dropout)
        and paddle.is_grad_enabled()
    ):
        return LoRAMatmul.apply(x, layer.weight, layer.lora_A, layer.lora_B, float(layer.scaling))
    out = F.linear(x=x, weight=layer.weight, bias=layer.bias)
    return out + paddle.matmul(
        paddle.matmul(layer.lora_dropout(x), layer.lora_A) * layer.scaling, layer.lora_B
    )


class LoRAMatmul(PyLayer):
    """``x W + ((x A) s) B`` with a frozen ``W``, forward and backward each accumulating into one output
    (no separate add / scale ops and their gradient nodes)."""

    @staticmethod
    def forward(
        ctx: Any, x: paddle.Tensor, weight: paddle.Tensor, a: paddle.Tensor, b: paddle.Tensor, scale: float
    ):
        with paddle.no_grad():
            xa = paddle.matmul(x, a)
            xa.scale_(scale)
            out = paddle.matmul(x, weight)
            out.add_(paddle.matmul(xa, b))
        ctx.save_for_backward(x, weight, a, b, xa)
        ctx.scale, ctx.need_dx = scale, not x.stop_gradient  # the first layers' input needs no gradient
        ctx.frozen = (a.stop_gradient, b.stop_gradient)
        return out

    @staticmethod
    def backward(ctx: Any, dy: paddle.Tensor) -> Any:
        x, weight, a, b, xa = ctx.saved_tensor()
        with paddle.no_grad():
            dxa = paddle.matmul(dy, b, transpose_y=True)  # d(xa) = dy B^T
            db = paddle.matmul(
                xa.reshape([-1, xa.shape[-1]]), dy.reshape([-1, dy.shape[-1]]), transpose_x=True
            )
            dxa.scale_(ctx.scale)  # d(x A) = s dy B^T
            da = paddle.matmul(
                x.reshape([-1, x.shape[-1]]), dxa.reshape([-1, dxa.shape[-1]]), transpose_x=True
            )
            dx = None
            if ctx.need_dx:
                dx = paddle.matmul(dy, weight, transpose_y=True)
                dx.add_(paddle.matmul(dxa, a, transpose_y=True))
        return dx, None, (None if ctx.frozen[0] else da), (None if ctx.frozen[1] else db)


def _attention(
    layer: paddle.nn.Layer,
    original: Callable,
    hidden_states: paddle.Tensor,
    position_ids: paddle.Tensor | None = None,
    past_key_value: Any = None,
    attention_mask: paddle.Tensor | None = None,
    output_attentions: bool = False,
    use_cache: bool = False,
    alibi: paddle.Tensor | None = None,
    npu_is_casual: bool = False,
) -> Any:
    config = layer.config
    plain = (
        paddle.is_grad_enabled()
        and layer.training
        and past_key_value is None
        and not (use_cache or output_attentions or npu_is_casual)
        and alibi is None
        and position_ids is not None
        and attention_mask is not None
        and len(attention_mask.shape) == 4
        and config.rope
        and not (layer.fuse_attention_qkv or layer.use_fused_rope or layer.sequence_parallel)
        and layer.reshard_layer is None
        and layer.kv_indices is None
        and not (config.use_flash_attention or config.use_long_sequence_strategies)
        and not (
            layer.enable_recompute
            and layer.layerwise_recompute
            and layer.recompute_granularity == "core_attn"
        )
        and _plain_cpu_f32(hidden_states, attention_mask)
    )
    if not plain:
        return original(
            hidden_states,
            position_ids,
            past_key_value,
            attention_mask,
            output_attentions,
            use_cache,
            alibi,
            npu_is_casual,
        )
    ops = kernels.training_ops()
    batch, seq = int(hidden_states.shape[0]), int(hidden_states.shape[1])
    heads, kv_heads, dim = layer.num_heads, layer.num_key_value_heads, layer.head_dim
    query = layer.q_proj(hidden_states).reshape([batch, seq, heads, dim])
    key = layer.k_proj(hidden_states).reshape([batch, seq, kv_heads, dim])
    value = layer.v_proj(hidden_states).reshape([batch, seq, kv_heads, dim])
    cos, sin = layer.rotary_emb(value, seq_len=seq)
    cos, sin = cos.squeeze(axis=[0, 2])[position_ids], sin.squeeze(axis=[0, 2])[position_ids]  # [B, S, D]
    query, key = ops.llm_rope_train(query, cos, sin), ops.llm_rope_train(key, cos, sin)  # [B, N, S, D]
    value = value.transpose([0, 2, 1, 3])
    scale = 1.0 / math.sqrt(dim)
    plans = tiled_attention.plan_for(attention_mask, position_ids)
    if plans is None or all(len(tiles) == 1 for tiles in plans):  # one tile per row: one batched product
        out = tiled_attention.full_attention(ops, query, key, value, attention_mask, scale)
    else:
        out = tiled_attention.tiled_attention(ops, query, key, value, attention_mask, scale, plans)
    out = out.transpose([0, 2, 1, 3]).reshape([batch, seq, heads * dim])
    return layer.o_proj(out)


# ------------------------------------------------------------------------------------------------- head + loss
class HeadLoss(PyLayer):
    """``mean(CE(hidden @ W, labels))`` over rows whose labels are all valid, gradients formed in the forward.

    ``hidden [N, H]``; ``weight [H, V]`` (``transpose=False``) or ``[V, H]``. The logits are produced chunk by
    chunk; each chunk's ``(softmax - onehot) / N`` gives ``dhidden`` (and ``dweight`` when the weight is
    trainable) immediately, and the backward scales them by the incoming gradient.
    """

    @staticmethod
    def forward(
        ctx: Any, hidden: paddle.Tensor, weight: paddle.Tensor, labels: paddle.Tensor, transpose: bool
    ):
        ops = kernels.training_ops()
        n, vocab = int(hidden.shape[0]), int(weight.shape[0 if transpose else 1])
        trainable = not weight.stop_gradient
        budget = TRAINABLE_CHUNK_BYTES if trainable else CHUNK_BYTES
        rows = max(1, min(n, budget // (4 * vocab)))
        total = paddle.zeros([1], dtype="float32")
        dhidden, dweight = [], None
        with paddle.no_grad():
            for start in range(0, n, rows):
                h = hidden[start : start + rows]
                logits = paddle.matmul(h, weight, transpose_y=transpose)
                loss, dlogits = ops.llm_softmax_ce(logits, labels[start : start + rows], 1.0 / n)
                del logits
                total = total + loss.sum()
                dhidden.append(paddle.matmul(dlogits, weight, transpose_y=not transpose))
                if trainable:
                    part = (
                        paddle.matmul(dlogits, h, transpose_x=True)
                        if transpose
                        else paddle.matmul(h, dlogits, transpose_x=True)
                    )
                    dweight = part if dweight is None else dweight.add_(part)
        ctx.grads = (paddle.concat(dhidden) if len(dhidden) > 1 else dhidden[0], dweight)
        return (total / n).reshape([])

    @staticmethod
    def backward(ctx: Any, grad: paddle.Tensor) -> Any:
        dhidden, dweight = ctx.grads
        ctx.grads = None
        if float(grad) == 1.0:  # loss.backward(): no copies (dweight is as large as the head)
            return dhidden, dweight
        scale = grad.reshape([1])
        return dhidden * scale, (None if dweight is None else dweight * scale)


def head_loss(
    hidden: paddle.Tensor, weight: paddle.Tensor, labels: paddle.Tensor, ignore_index: int = IGNORE_INDEX
) -> paddle.Tensor | None:
    """Mean cross-entropy of ``hidden [..., H]`` projected by ``weight`` against ``labels [...]`` over the
    positions whose label is not ``ignore_index``; None when no position has one (the caller falls back)."""
    h = int(hidden.shape[-1])
    transpose = int(weight.shape[0]) != h  # [V, H] (a tied embedding) rather than [H, V]
    flat = labels.reshape([-1])
    keep = paddle.nonzero(flat != ignore_index).reshape([-1])
    if int(keep.shape[0]) == 0:
        return None
    rows = paddle.gather(hidden.reshape([-1, h]), keep)
    return HeadLoss.apply(rows, weight, paddle.gather(flat, keep), transpose)


def _causal_lm(layer: paddle.nn.Layer, original: Callable, *args: Any, **kwargs: Any) -> Any:
    names = ("input_ids", "position_ids", "attention_mask", "inputs_embeds", "labels", "use_cache")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    labels, config = bound.get("labels"), layer.config
    if (
        labels is None
        or not layer.training
        or bound.get("use_cache")
        or bound.get("past_key_values") is not None
        or bound.get("output_attentions")
        or bound.get("output_hidden_states")
        or config.tensor_parallel_degree > 1
        or config.sequence_parallel
        or not _plain_cpu_f32(layer.lm_head.weight)
    ):
        return original(*args, **kwargs)
    base_kwargs = {k: v for k, v in bound.items() if k not in ("labels", "return_dict")}
    hidden = getattr(layer, layer.base_model_prefix)(**base_kwargs, return_dict=False)[0]
    loss = head_loss(
        hidden, layer.lm_head.weight, labels, getattr(layer.criterion, "ignore_index", IGNORE_INDEX)
    )
    if loss is None:
        return original(*args, **kwargs)
    return_dict = bound.get("return_dict")
    if return_dict if return_dict is not None else config.use_return_dict:
        return CausalLMOutputWithCrossAttentions(loss=loss)
    return (loss,)


# ------------------------------------------------------------------------------------------------- entry point
def _is_rms_norm(layer: paddle.nn.Layer) -> bool:
    weight = getattr(layer, "weight", None)
    return (
        type(layer).__name__.endswith("RMSNorm")
        and hasattr(layer, "variance_epsilon")
        and weight is not None
        and len(weight.shape) == 1
        and not getattr(getattr(layer, "config", None), "use_fused_rms_norm", False)
    )


def _is_swiglu_mlp(layer: paddle.nn.Layer) -> bool:
    return (
        type(layer).__name__ == "LlamaMLP"
        and not getattr(layer, "fuse_attention_ffn", False)
        and all(hasattr(layer, n) for n in ("gate_proj", "up_proj", "down_proj"))
    )


def enable_fused_training(model: paddle.nn.Layer) -> dict[str, int]:
    """Fuse the training forward of every LLaMA-architecture piece in ``model`` (see the module docstring);
    returns how many layers of each kind were fused ({} when the custom operators are unavailable)."""
    if kernels.training_ops() is None:
        return {}
    from paddlenlp.peft.lora.lora_layers import LoRALinear
    from paddlenlp.transformers import LlamaForCausalLM
    from paddlenlp.transformers.llama.modeling import LlamaAttention

    counts: dict[str, int] = {}
    for layer in model.sublayers(include_self=True):
        if getattr(layer, "_llm_fused", False):
            continue
        kind = None
        if _is_rms_norm(layer):
            kind, fused = "rms_norm", _rms_norm
        elif _is_swiglu_mlp(layer):
            kind, fused = "swiglu_mlp", _mlp
        elif type(layer) is LlamaAttention:
            kind, fused = "attention", _attention
        elif type(layer) is LoRALinear:
            kind, fused = "lora_linear", _lora_linear
        elif type(layer) is LlamaForCausalLM:
            kind, fused = "head_loss", _causal_lm
        if kind is not None:
            _override(layer, fused)
            counts[kind] = counts.get(kind, 0) + 1
    for layer in model.sublayers(
        include_self=True
    ):  # wrappers that copied a forward (LoRAModel: self.forward =
        bound = layer.__dict__.get("forward")  # model.forward) get the fused one
        target = getattr(bound, "__self__", None)
        if target is not None and target is not layer and getattr(target, "_llm_fused", False):
            layer.__dict__["forward"] = target.forward
    return counts
