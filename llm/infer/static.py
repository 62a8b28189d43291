"""Static export of the per-step kernel and a ``paddle.inference`` (CPU) engine running it.

:func:`export_engine` converts the family's fast step kernel (:mod:`llm.infer.decoders`) with
``paddle.jit.to_static`` -- one program serves prefill and decode: token ids, positions, attention biases
and the past KV cache in, last-position logits and the step's new KV entries out, batch and sequence
dimensions dynamic -- and saves ``{model_prefix}.pdmodel``/``.pdiparams`` (default stem ``model``) plus
``engine.json`` (inputs, outputs, geometry, file stem) and, for a prefix-tuned model, ``prefix_cache.npz``.
:func:`load_static_engine` wraps a ``paddle.inference`` predictor in the same
:class:`~llm.infer.decoders.runner.KernelRunner` the dynamic fast path uses (KV buffers are handed to the
predictor zero-copy), so the decode loop, sampling and stopping are shared. All nine families export; a model outside a kernel's supported configuration (e.g.
llama with ALiBi) is refused with :class:`ModelError`. A quantized model (:mod:`llm.quant`) exports its low-bit
weights as int8 / uint8 persistables with their float32 scales (dequantized inside the graph by
:func:`llm.infer.decoders.quant.quant_linear`), never as float copies.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import numpy as np
import paddle
from paddle import inference
from paddlenlp.peft import PrefixModelForCausalLM

from llm import kernels as lk
from llm.errors import ConfigError, ModelError
from llm.infer.decoders import FAST_FAMILIES, build_kernel, fastmm
from llm.infer.decoders.runner import KernelRunner, StepFn
from llm.infer.engine import Engine

MODEL_STEM = "model"  # default file stem (``model_prefix``)
META_FILE = "engine.json"
PREFIX_FILE = "prefix_cache.npz"
FORMAT_VERSION = 1
BASE_INPUTS = ("input_ids", "positions", "new_bias", "past_bias", "past_keypos")
#: operator library a ``custom_ops`` export needs loaded before its predictor is created (:mod:`llm.kernels`)
CUSTOM_OPS = "llm.kernels"


def _input_specs(kernel: Any, dtype: str) -> list[paddle.static.InputSpec]:
    spec = paddle.static.InputSpec
    caches = [
        spec([None, kernel.kv_heads, None, kernel.head_dim], dtype, f"past_{kind}_{layer}")
        for layer in range(kernel.num_layers)
        for kind in ("k", "v")
    ]
    return [
        spec([None, None], "int64", "input_ids"),
        spec([None, None], "int64", "positions"),
        spec([None, 1, None, None], "float32", "new_bias"),
        spec([None, 1, 1, None], "float32", "past_bias"),
        spec([None, None], "float32", "past_keypos"),
        caches,
    ]


def check_stem(stem: str) -> str:
    """``stem`` if it is a plain file stem (no directory part, no extension), else :class:`ConfigError`."""
    if (
        not stem
        or os.path.basename(stem) != stem
        or stem in (".", "..")
        or stem.endswith((".pdmodel", ".json"))
    ):
        raise ConfigError(f"model_prefix must be a plain file stem such as 'model', got {stem!r}")
    return stem


def export_engine(
    model: Any,
    output_path: str,
    *,
    max_seq_len: int,
    dtype: str = "float32",
    model_prefix: str = MODEL_STEM,
    kernels: bool | None = None,
    quant_lm_head: bool = False,
) -> None:
    """Export ``model`` (CausalLM with LoRA merged, or a ``PrefixModel``) for :func:`load_static_engine`
    as ``{model_prefix}.pdmodel`` / ``.pdiparams`` + ``engine.json``.

    ``kernels``: the program's weight products are the toolkit's custom operators (:mod:`llm.kernels`; plain
    weight layouts, the loader needs the operator library) -- ``None``: when they are available (not with
    ``LLM_KERNELS=0``); ``False``: paddle ops only (a portable program, blocked layouts as before).
    ``quant_lm_head``: the program stores and reads an int8 per-channel copy of the LM head."""
    from llm.model import family_of

    check_stem(model_prefix)
    family = family_of(model).name
    if dtype != "float32":
        raise ConfigError(f"static export supports dtype float32 on CPU, got {dtype!r}")
    use_ops = fastmm.enabled() if kernels is None else bool(kernels)
    if use_ops and not fastmm.enabled():
        raise ConfigError(f"kernels=True, but the llm kernels are unavailable ({lk.unavailable_reason()})")
    try:
        with contextlib.nullcontext() if use_ops else fastmm.paddle_layouts():
            kernel = build_kernel(model)
    except ModelError as err:
        raise ModelError(
            f"cannot export this {family} model: static export runs the family's step kernel and {err} "
            f"(kernels exist for {', '.join(FAST_FAMILIES)} in their standard configurations); "
            "use the dynamic mode instead"
        ) from None
    if kernel.dtype_name != dtype:
        raise ConfigError(f"the model is {kernel.dtype_name}, but dtype={dtype!r} was asked for")
    kernel.eval()
    if quant_lm_head:
        kernel.quantize_head()
    kernel.enable_blocked_head(*kernel.head_layout())
    prefix = kernel.prefix_cache(model) if isinstance(model, PrefixModelForCausalLM) else None
    prefix_len = int(prefix[0][0].shape[2]) if prefix else 0
    limit = kernel.max_positions - (prefix_len if kernel.positions_after_prefix else 0)
    if int(max_seq_len) < 2 or int(max_seq_len) > limit:
        raise ConfigError(f"max_seq_len must be in [2, {limit}] for this model, got {max_seq_len}")
    os.makedirs(output_path, exist_ok=True)
    specs = _input_specs(kernel, dtype)
    feeds = [s for s in specs[:-1] if s.name != "past_keypos" or kernel.uses_keypos] + specs[-1]
    with fastmm.graph_kernels() if kernel.fast_mm else contextlib.nullcontext():
        static_kernel = paddle.jit.to_static(kernel, input_spec=specs, full_graph=True)
        paddle.jit.save(static_kernel, os.path.join(output_path, model_prefix), input_spec=feeds)
    if prefix:
        arrays = {
            f"{kind}_{i}": t.numpy() for i, (k, v) in enumerate(prefix) for kind, t in (("k", k), ("v", v))
        }
        np.savez(os.path.join(output_path, PREFIX_FILE), **arrays)
    meta = {
        "format_version": FORMAT_VERSION,
        "family": family,
        "model_prefix": model_prefix,
        "dtype": dtype,
        "max_seq_len": int(max_seq_len),
        "prefix_len": prefix_len,
        "geometry": kernel.describe(),
        "inputs": [s.name for s in feeds],
        "outputs": ["logits"] + [f"new_{kind}_{i}" for i in range(kernel.num_layers) for kind in ("k", "v")],
        "custom_ops": CUSTOM_OPS if kernel.fast_mm else [],
        "notes": "one program for prefill and decode; biases are additive (0 / -1e9); caches [b, kv, T, d]",
    }
    with open(os.path.join(output_path, META_FILE), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2)


def read_meta(path: str, model_prefix: str | None = None) -> dict[str, Any]:
    """``engine.json`` of an exported directory, its model files checked (:class:`ModelError` when missing).

    The file stem comes from ``engine.json``; ``model_prefix`` (if given and not the default ``model``)
    must match it.
    """
    meta_file = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_file):
        raise ModelError(f"{path}: not an exported engine (no {META_FILE}; create it with export_model.py)")
    with open(meta_file, encoding="utf-8") as fh:
        meta = json.load(fh)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{meta_file}: unsupported format_version {meta.get('format_version')!r}")
    stem = meta.setdefault("model_prefix", MODEL_STEM)
    if model_prefix not in (None, MODEL_STEM, stem):
        raise ConfigError(
            f"{path} was exported with model_prefix {stem!r}, not {model_prefix!r}; pass --model_prefix {stem} "
            "or leave it unset"
        )
    missing = [
        stem + ext for ext in (".pdmodel", ".pdiparams") if not os.path.isfile(os.path.join(path, stem + ext))
    ]
    if missing:
        raise ModelError(f"{path}: exported engine incomplete, missing {', '.join(missing)}")
    return meta


def require_custom_ops(path: str, meta: dict[str, Any]) -> None:
    """Load the operator library an export was traced with (``engine.json`` ``custom_ops``) into this process --
    ``paddle.inference`` resolves custom operators from the process's registry when the predictor is created --
    or raise :class:`ModelError` when it cannot be loaded here."""
    if not meta.get("custom_ops"):
        return
    if not lk.available():
        raise ModelError(
            f"{path} was exported with the toolkit's CPU kernels ({meta['custom_ops']} custom operators), which are "
            f"unavailable here ({lk.unavailable_reason()}); export the model again with LLM_KERNELS=0 for a "
            "program of paddle operators only"
        )


def make_predictor(
    path: str, *, mkldnn: bool = False, threads: int | None = None, model_prefix: str = MODEL_STEM
) -> Any:
    """A CPU ``paddle.inference`` predictor for ``path`` (oneDNN only when ``mkldnn``)."""
    stem = os.path.join(path, model_prefix)
    config = inference.Config(stem + ".pdmodel", stem + ".pdiparams")
    config.disable_gpu()
    config.disable_glog_info()
    config.switch_ir_optim(True)
    config.enable_memory_optim()
    if threads is None:
        threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1)
    config.set_cpu_math_library_num_threads(int(threads))
    if mkldnn:
        config.enable_mkldnn()
    else:  # paddle 2.6 CPU inference turns oneDNN on by default
        config.disable_mkldnn()
    return inference.create_predictor(config)


def predictor_step_fn(predictor: Any, meta: dict[str, Any], prefill_predictor: Any = None) -> StepFn:
    """Adapt predictors to the runner's split step-function signature (caches are shared zero-copy).

    ``prefill_predictor`` (optional) runs the multi-token calls, ``predictor`` the one-token decode steps.
    """
    layers = int(meta["geometry"]["num_layers"])

    def bind(pred: Any) -> tuple[Any, set[str], dict[str, Any], list[Any]]:
        names = set(pred.get_input_names())
        handles = {name: pred.get_input_handle(name) for name in names}
        return pred, names, handles, [pred.get_output_handle(n) for n in pred.get_output_names()]

    decode = bind(predictor)
    prefill = bind(prefill_predictor) if prefill_predictor is not None else decode

    def run(ids, positions, new_bias, past_bias, keypos, past_k, past_v):
        pred, names, handles, outputs = prefill if ids.shape[1] > 1 else decode

        def feed(name: str, value: Any) -> None:
            if name not in names:  # pruned from the program (e.g. past_keypos without ALiBi)
                return
            if isinstance(value, paddle.Tensor):
                handles[name].share_external_data(value if value.is_contiguous() else value.contiguous())
            else:
                handles[name].copy_from_cpu(np.ascontiguousarray(value))

        feed("input_ids", ids)
        feed("positions", positions.astype(np.int64))
        feed("new_bias", new_bias)
        feed("past_bias", past_bias)
        feed("past_keypos", np.asarray(keypos, dtype=np.float32))
        for layer in range(layers):
            feed(f"past_k_{layer}", past_k[layer])
            feed(f"past_v_{layer}", past_v[layer])
        pred.run()
        arrays = [h.copy_to_cpu() for h in outputs]
        new = [paddle.to_tensor(a) for a in arrays[1:]]
        return arrays[0], new[0::2], new[1::2]

    return run


def load_static_engine(
    path: str,
    *,
    device: str = "cpu",
    max_batch_size: int = 8,
    mkldnn: bool | str | None = None,
    model_prefix: str | None = None,
) -> Engine:
    """An :class:`Engine` over an :func:`export_engine` directory, run by ``paddle.inference``.

    ``mkldnn``: ``False`` (plain CPU kernels), ``True`` (oneDNN for every call) or ``"prefill"`` (a second,
    oneDNN predictor for the prompt, for a faster prefill, while oneDNN decode steps are slower than
    plain ones; costs a second copy of the weights). ``None`` reads ``LLM_STATIC_MKLDNN``
    (``0``/``1``/``prefill``), default ``False``. The file stem is read from ``engine.json`` (see
    :func:`read_meta` for ``model_prefix``).
    """
    if device != "cpu":
        raise ConfigError(
            f"the static engine runs on cpu only here (paddle is a CPU build), got device={device!r}"
        )
    meta = read_meta(path, model_prefix)
    stem = meta["model_prefix"]
    require_custom_ops(path, meta)
    if mkldnn is None:
        mkldnn = {"1": True, "prefill": "prefill"}.get(os.environ.get("LLM_STATIC_MKLDNN", "0"), False)
    if mkldnn not in (True, False, "prefill"):
        raise ConfigError(f"mkldnn must be True, False or 'prefill', got {mkldnn!r}")
    predictor = make_predictor(path, mkldnn=mkldnn is True, model_prefix=stem)
    prefill_predictor = make_predictor(path, mkldnn=True, model_prefix=stem) if mkldnn == "prefill" else None
    prefix = None
    if int(meta.get("prefix_len", 0)):
        data = np.load(os.path.join(path, PREFIX_FILE))
        layers = int(meta["geometry"]["num_layers"])
        prefix = [(paddle.to_tensor(data[f"k_{i}"]), paddle.to_tensor(data[f"v_{i}"])) for i in range(layers)]
    runner = KernelRunner(
        predictor_step_fn(predictor, meta, prefill_predictor),
        meta["geometry"],
        prefix=prefix,
        max_seq_len=int(meta["max_seq_len"]),
        dtype=meta["dtype"],
        kind="static/paddle.inference"
        + ("+llm-kernels" if meta.get("custom_ops") else "")
        + {True: "+mkldnn", "prefill": "+mkldnn-prefill"}.get(mkldnn, ""),
    )
    return Engine(runner, max_batch_size=max_batch_size)
