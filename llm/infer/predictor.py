"""``predictor.py``: the :class:`Predictor` API and the CLI (spec §4.3, §5).

* **Dynamic** (default): the model is loaded (paddlenlp or HF layout), a ``--lora_path`` adapter is checked
  against the model and merged in memory, a ``--prefix_path`` adapter wraps it in a ``PrefixModel``, and
  :func:`llm.infer.create_engine` builds the generation engine.
* **Static** (``--mode static``): ``--model_name_or_path`` is an ``export_model.py`` output directory,
  loaded with :func:`llm.infer.static.load_static_engine`.
* **Quantized** (``--quant_type``, :mod:`llm.infer.quantized`): a quantized directory loads as it is (its type
  must match), a float model is round-to-nearest quantized at load (weight-only types); the step kernels run
  the low-bit weights (:mod:`llm.infer.decoders.quant`). ``--inference_model`` (PaddleNLP's fused predictor)
  selects the toolkit's own engine: the fast step kernel, no generic fallback.

Prompts are encoded with the training code path (:func:`llm.data.encode_example` /
:func:`llm.data.build_prompt_ids`): with a chat template a conversation ``[[user, bot], ..., [query]]`` is
system + history rounds + final user turn (each segment tokenized separately); without one, a plain
string (or the first user turn) is tokenized with special tokens. Prompts are left-truncated to
``src_length``; outputs are decoded with ``skip_special_tokens=True``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import llm  # noqa: F401  (zlib fix before paddle)
from llm.errors import ConfigError, DataError, ModelError, exit_on_user_error
from llm.fileio import read_json, staged_file
from llm.infer.arguments import (
    ModelArgument,
    PredictorArgument,
    position_limit,
    resolve_lengths,
    sampling_settings,
)
from llm.infer.streaming import stream_text
from llm.outputs import require_complete, unfinished_training_hint

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "你好，请问你是谁?"
Prompt = str | Sequence[Sequence[str]]


# ------------------------------------------------------------------------------------------ helpers
def default_device() -> str:
    """``gpu`` when paddle is compiled with CUDA, else ``cpu``."""
    import paddle

    return "gpu" if paddle.is_compiled_with_cuda() else "cpu"


def set_device(device: str | None) -> str:
    """Select the paddle device (``gpu``/``cpu``); asking for a GPU on a CPU-only build is an error."""
    import paddle

    device = device or default_device()
    if device == "gpu" and not paddle.is_compiled_with_cuda():
        raise ConfigError(
            "device 'gpu' needs a CUDA build of paddle; this one is CPU-only (use --device cpu)"
        )
    paddle.set_device(device)
    return device


def require_model_dir(path: str | None) -> str:
    """``path`` if it is a complete directory with ``config.json``, else a one-line :class:`ModelError`."""
    if not path:
        raise ConfigError("missing required argument 'model_name_or_path' (pass --model_name_or_path DIR)")
    if not os.path.isdir(path):
        raise ModelError(f"model directory not found: '{path}'")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(
            f"{path}: no config.json (expected a model directory or an export_model.py output)"
            f"{unfinished_training_hint(path)}"
        )
    require_complete(path)
    return path


def check_dtype(dtype: str) -> None:
    """Refuse a dtype the current device cannot run (one line naming the dtypes it can)."""
    from llm.model.loading import check_device_dtype

    check_device_dtype(dtype)


def adapter_dtype(args: PredictorArgument) -> str:
    """``--dtype``, else the LoRA/prefix config's dtype, else float32."""
    if args.dtype:
        return args.dtype
    for path, name in ((args.lora_path, "lora_config.json"), (args.prefix_path, "prefix_config.json")):
        if path and os.path.isfile(os.path.join(path, name)):
            dtype = read_json(os.path.join(path, name), name).get("dtype")
            if dtype in ("float32", "float16", "bfloat16"):
                return dtype
    return "float32"


# ------------------------------------------------------------------------------------------ Predictor
class Predictor:
    """Encode prompts, run the engine, decode outputs; ``predict`` for batches, ``stream`` for text pieces."""

    def __init__(
        self,
        engine: Any,
        tokenizer: Any,
        *,
        src_length: int,
        max_length: int,
        generation: Any,
        batch_size: int = 1,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.src_length = int(src_length)
        self.max_length = int(max_length)
        self.generation = generation
        self.batch_size = int(batch_size)

    # -------------------------------------------------------------- construction
    @classmethod
    def from_args(cls, args: PredictorArgument) -> Predictor:
        """Build the tokenizer, model/engine and generation settings described by ``args``."""
        from llm.infer import create_engine

        path = require_model_dir(args.model_name_or_path)
        set_device(args.device)
        sampling_settings(args, path)  # fail fast on bad settings, before any weights load
        if args.mode == "static":
            return cls._from_static(args, path)
        check_dtype(adapter_dtype(args))  # before a Hugging Face directory is converted and cached
        loaded = load_dynamic(args, path)
        backend = "fast" if args.inference_model else "auto"
        engine = create_engine(
            loaded.model,
            max_batch_size=args.batch_size,
            dtype=loaded.dtype,
            backend=backend,
            quant_lm_head=args.quant_lm_head,
        )
        return cls._finish(args, path, engine, loaded.tokenizer, loaded.src_length, loaded.max_length)

    @classmethod
    def from_pretrained(cls, model_name_or_path: str, **kwargs: Any) -> Predictor:
        """Shortcut for ``from_args(PredictorArgument(model_name_or_path=..., **kwargs))``."""
        return cls.from_args(PredictorArgument(model_name_or_path=model_name_or_path, **kwargs))

    @classmethod
    def _from_static(cls, args: PredictorArgument, path: str) -> Predictor:
        """An exported directory: lengths default to the export's and must fit its ``max_seq_len``."""
        from llm.infer.export import check_static_dir, read_export_info
        from llm.infer.static import load_static_engine
        from llm.tokenizer import load_tokenizer

        if args.lora_path or args.prefix_path:
            raise ConfigError(
                "--lora_path/--prefix_path work in dynamic mode only; pass them to export_model.py instead "
                "(LoRA is merged and the prefix is stored at export time)"
            )
        check_static_dir(path, args.model_prefix)
        check_static_quant(path, args.quant_type, args.quant_group_size)
        if args.quant_lm_head and not read_export_info(path).get("quant_lm_head"):
            raise ConfigError(
                f"--quant_lm_head: {path} was exported with the float LM head (the head's format is fixed at export); "
                "export it again with --quant_lm_head, or drop the flag"
            )
        tokenizer = load_tokenizer(path, chat_template=args.chat_template)
        engine = load_static_engine(
            path,
            device=args.device or default_device(),
            max_batch_size=args.batch_size,
            model_prefix=args.model_prefix,
        )
        info = read_export_info(path)
        src_length, max_length = args.src_length, args.max_length
        if src_length is None and max_length is None and info.get("src_length") and info.get("max_length"):
            src_length, max_length = int(info["src_length"]), int(info["max_length"])
        src_length, max_length = resolve_lengths(
            src_length, max_length, int(engine.max_seq_len), what="the exported model"
        )
        return cls._finish(args, path, engine, tokenizer, src_length, max_length)

    @classmethod
    def _finish(
        cls, args: PredictorArgument, path: str, engine: Any, tokenizer: Any, src_length: int, max_length: int
    ) -> Predictor:
        from llm.infer import GenerationConfig

        settings = sampling_settings(args, path)
        limit = int(getattr(engine, "max_seq_len", src_length + max_length))
        if src_length + max_length > limit:
            raise ConfigError(
                f"src_length ({src_length}) + max_length ({max_length}) = {src_length + max_length} exceeds the "
                f"engine's limit of {limit} tokens; lower --src_length or --max_length"
            )
        greedy = settings["decode_strategy"] != "sampling"
        generation = GenerationConfig(
            max_new_tokens=max_length,
            decode_strategy=settings["decode_strategy"],
            top_k=0 if greedy else int(settings["top_k"]),
            top_p=1.0 if greedy else float(settings["top_p"]),
            temperature=1.0 if greedy else float(settings["temperature"]),
            repetition_penalty=float(settings["repetition_penalty"]),
            num_beams=int(settings["num_beams"]),
            eos_token_ids=tuple(tokenizer.eos_token_ids),
            pad_token_id=int(tokenizer.pad_token_id),
            seed=args.seed,
        ).validate()
        return cls(
            engine,
            tokenizer,
            src_length=src_length,
            max_length=max_length,
            generation=generation,
            batch_size=args.batch_size,
        )

    # -------------------------------------------------------------- encoding
    def prompt_ids(self, prompt: Prompt, context: dict[str, Any] | None = None) -> list[int]:
        """Model input ids of a string or a conversation ``[[user, bot], ..., [query]]``."""
        from llm.data import build_prompt_ids

        history, query = split_conversation(prompt)
        template = self.tokenizer.chat_template
        if template is None and history:
            logger.warning("conversation without a chat template: only the first user turn is used")
            history, query = [], history[0][0]
        return build_prompt_ids(self.tokenizer, template, history, query, self.src_length, context)

    # -------------------------------------------------------------- generation
    def generate_ids(self, batch: list[list[int]]) -> list[list[int]]:
        """New token ids for each prompt (cut at the first stop id, in case the engine returns one)."""
        stops = set(self.generation.eos_token_ids)
        outs = []
        for out in self.engine.generate(batch, self.generation):
            cut = next((i for i, t in enumerate(out) if t in stops), len(out))
            outs.append(list(out[:cut]))
        return outs

    def predict(self, prompts: Sequence[Prompt], return_tokens: bool = False) -> Any:
        """Texts generated for ``prompts`` (strings or conversations); with ``return_tokens`` also the ids."""
        ids = [self.prompt_ids(p) for p in prompts]
        tokens: list[list[int]] = []
        for start in range(0, len(ids), self.batch_size):
            tokens += self.generate_ids(ids[start : start + self.batch_size])
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return (texts, tokens) if return_tokens else texts

    def stream(self, prompt: Prompt) -> Iterator[str]:
        """Yield the generated text of one prompt piece by piece (never splitting a character)."""
        stops = set(self.generation.eos_token_ids)

        def tokens() -> Iterator[int]:
            for token in self.engine.stream(self.prompt_ids(prompt), self.generation):
                if token in stops:
                    return
                yield token

        yield from stream_text(self.tokenizer, tokens(), skip_special_tokens=True)


def split_conversation(prompt: Prompt) -> tuple[list[tuple[str, str]], str]:
    """``(history, query)`` of a string or ``[[user, bot], ..., [query]]``; malformed input is a ConfigError."""
    if isinstance(prompt, str):
        return [], prompt
    rounds = list(prompt) if isinstance(prompt, list | tuple) else None
    shape = "a string or a conversation [[user, bot], ..., [query]]"
    if not rounds or not all(
        isinstance(r, list | tuple) and all(isinstance(t, str) for t in r) for r in rounds
    ):
        raise ConfigError(f"a prompt must be {shape}, got {prompt!r:.80}")
    if len(rounds[-1]) != 1 or any(len(r) != 2 for r in rounds[:-1]):
        raise ConfigError(
            f"a conversation must be [[user, bot], ..., [query]] (pairs, then the query alone): {shape}"
        )
    return [(r[0], r[1]) for r in rounds[:-1]], rounds[-1][0]


def prefix_positions(prefix_path: str | None, config: dict[str, Any]) -> int:
    """Position slots a prefix takes (gpt/opt number positions after their cache), else 0."""
    if not prefix_path:
        return 0
    from llm.model import family_of

    if family_of(config).name not in ("gpt", "opt"):
        return 0
    cfg_path = os.path.join(prefix_path, "prefix_config.json")
    return (
        int(read_json(cfg_path, "prefix_config.json").get("num_prefix_tokens", 0))
        if os.path.isfile(cfg_path)
        else 0
    )


def check_static_quant(path: str, quant_type: str | None, group_size: int = -1) -> None:
    """``--quant_type`` in static mode must describe the exported model (quantization happens at export)."""
    from llm.infer.quantized import check_request_dir
    from llm.quant.model import read_quantization_config

    config = read_json(os.path.join(path, "config.json"), "config.json")
    if quant_type is not None and read_quantization_config(config) is None:
        raise ConfigError(
            f"{path} was exported without quantization; --quant_type {quant_type} applies at export time: "
            f"export_model.py --model_name_or_path MODEL --quant_type {quant_type} --output_path DIR"
        )
    check_request_dir(path, quant_type, group_size)


def build_model(
    path: str,
    dtype: str,
    *,
    lora_path: str | None = None,
    prefix_path: str | None = None,
    quant: Any = None,
    merge: bool = True,
) -> Any:
    """The model ready for :func:`llm.infer.create_engine`: base (+ merged LoRA, or with ``merge=False`` the
    unmerged ``LoRAModel``) or a ``PrefixModel``; ``quant`` (a :class:`llm.infer.quantized.QuantRequest`)
    quantizes a float model after the LoRA merge. An adapter trained on a low-bit base runs on that base when it
    is not merged (a prefix never is)."""
    from llm.infer.adapters import load_checked_prefix, merge_lora
    from llm.infer.quantized import apply_request
    from llm.lowbit import adapter_base_spec, load_low_bit_model
    from llm.model import load_lora, load_model

    unmerged = prefix_path or (lora_path if not merge else None)
    spec = adapter_base_spec(unmerged) if unmerged else None
    # an unmerged adapter trained on a low-bit base runs on that base (the float one is not what it learned
    # against); a merged LoRA adapter goes into the float base quantized-dequantized the same way (llm.merge.lora)
    model = load_model(path, dtype=dtype) if spec is None else load_low_bit_model(path, spec, dtype=dtype)
    if lora_path and merge:
        model = merge_lora(model, lora_path)
    elif lora_path:
        model = load_lora(model, lora_path)
    if quant is not None:
        model = apply_request(model, quant)
    if prefix_path:
        model = load_checked_prefix(model, prefix_path)
    model.eval()
    return model


class DynamicModel(NamedTuple):
    """What a dynamic-mode run (predictor or export) loads from ``args``: see :func:`load_dynamic`."""

    tokenizer: Any
    model: Any
    src_length: int
    max_length: int
    dtype: str


def load_dynamic(args: PredictorArgument, path: str) -> DynamicModel:
    """The tokenizer, the model of :func:`build_model` (LoRA merged, or prefix-wrapped), the resolved
    ``src_length``/``max_length`` (a gpt/opt prefix takes position slots) and the dtype for ``args``."""
    from llm.infer.quantized import check_request
    from llm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(path, chat_template=args.chat_template)
    config = read_json(os.path.join(path, "config.json"), "config.json")
    reserved = prefix_positions(args.prefix_path, config)
    src_length, max_length = resolve_lengths(
        args.src_length, args.max_length, position_limit(config), reserved
    )
    dtype = adapter_dtype(args)
    quant = check_request(
        config, args.quant_type, args.quant_group_size, where=path
    )  # before any weights load
    if quant.stored is not None and args.lora_path:
        raise ConfigError(
            f"{path} is quantized ({quant.quant_type}): a LoRA adapter cannot be merged into low-bit weights; "
            f"pass the float base model and --quant_type {quant.quant_type} (quantized after the merge)"
        )
    model = build_model(
        path,
        dtype,
        lora_path=args.lora_path,
        prefix_path=args.prefix_path,
        quant=quant,
        merge=args.merge_lora,
    )
    if quant.stored is not None:
        from llm.infer.decoders import model_dtype

        loaded = model_dtype(model)  # llm.quant.io keeps a quantized model's float tensors in float32 on CPU
        if loaded != dtype:
            logger.warning("%s: the quantized model's float tensors are %s, not %s", path, loaded, dtype)
            dtype = loaded
    return DynamicModel(tokenizer, model, src_length, max_length, dtype)


# ------------------------------------------------------------------------------------------ CLI
def _rank() -> int:
    return int(os.environ.get("PADDLE_TRAINER_ID", os.environ.get("PADDLE_RANK_IN_NODE", "0")) or 0)


def _show(value: list[str]) -> Any:
    return value[0] if len(value) == 1 else value


def predict_file(predictor: Predictor, data_file: str | None, output_file: str) -> list[dict[str, Any]]:
    """Predict every line of ``data_file`` (or the default prompt ``batch_size`` times) and write JSONL."""
    from tqdm import tqdm

    from llm.data import encode_example, read_examples

    tok = predictor.tokenizer
    rows: list[dict[str, Any]] = []
    if data_file:
        examples = read_examples(data_file, require_tgt=False)
        prompts = [
            encode_example(ex, tok, tok.chat_template, predictor.src_length, predictor.max_length, True)[
                "input_ids"
            ]
            for ex in examples
        ]
        sources = [(_show(ex.src), _show(ex.tgt)) for ex in examples]
    else:
        prompts = [predictor.prompt_ids(DEFAULT_PROMPT)] * predictor.batch_size
        sources = [(DEFAULT_PROMPT, "")] * predictor.batch_size
    with tqdm(total=len(prompts), desc="predict", unit="example", file=sys.stderr) as bar:
        for start in range(0, len(prompts), predictor.batch_size):
            outs = predictor.generate_ids(prompts[start : start + predictor.batch_size])
            for (src, tgt), out in zip(sources[start : start + len(outs)], outs):
                text = tok.decode(out, skip_special_tokens=True)
                rows.append({"src": src, "tgt": tgt, "output": text})
                bar.write(
                    "***********Source**********\n"
                    f"{_text(src)}\n***********Target**********\n{_text(tgt)}\n"
                    f"***********Output**********\n{text}",
                    file=sys.stdout,
                )
            bar.update(len(outs))
    if _rank() == 0:
        write_jsonl(output_file, rows)
    return rows


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` as JSON lines (via a temp file renamed into place)."""
    with staged_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def benchmark(predictor: Predictor, warmup: int = 10, repeat: int = 100) -> dict[str, float]:
    """Throughput on ``batch_size`` pad-token prompts of ``src_length`` generating exactly ``max_length`` tokens."""
    import dataclasses

    tok = predictor.tokenizer
    batch = [[int(tok.pad_token_id)] * predictor.src_length] * predictor.batch_size
    config = dataclasses.replace(predictor.generation, eos_token_ids=())  # fixed decode length
    for _ in range(max(0, warmup)):
        predictor.engine.generate(batch, config)
    out_tokens = 0
    start = time.perf_counter()
    for _ in range(max(1, repeat)):
        out_tokens += sum(len(o) for o in predictor.engine.generate(batch, config))
    elapsed = (time.perf_counter() - start) / max(1, repeat)
    per_pass = out_tokens / max(1, repeat)
    ips, qps = per_pass / elapsed, predictor.batch_size / elapsed
    print(f"Avg Elapse time is: {elapsed:.4f} s, Output tokens is: {int(per_pass)}")
    print(
        f"Input length is: {predictor.src_length}, Output length is: {predictor.max_length}, "
        f"bs is: {predictor.batch_size}, IPS: {ips:.3f} tokens/s, QPS: {qps:.3f} requests/s"
    )
    return {"elapsed": elapsed, "output_tokens": per_pass, "ips": ips, "qps": qps}


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    """``python predictor.py --model_name_or_path DIR [--data_file F] ...``."""
    from llm.config.parser import parse_arguments

    args, model_args = parse_arguments((PredictorArgument, ModelArgument), argv)
    if model_args.data_file and not os.path.isfile(model_args.data_file):
        raise DataError("file not found", model_args.data_file)
    predictor = Predictor.from_args(args)
    if args.benchmark:
        benchmark(predictor, args.benchmark_warmup, args.benchmark_repeat)
        return
    predict_file(predictor, model_args.data_file, model_args.output_file)
