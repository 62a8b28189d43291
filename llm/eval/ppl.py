"""``python -m llm.eval.ppl``: the perplexity of a text file, or of the targets of src/tgt data.

* ``--text_file F``: the whole file is tokenized once, as is (with BOS if the tokenizer adds one), and scored
  by Hugging Face's strided method: windows of ``max_length`` tokens start every ``stride`` tokens; each scores
  only the tokens no earlier window scored, with the tokens before them in the window as context. A text that
  fits in ``max_length`` is one pass. The first token of the text, and the first token of a window that has no
  context in it (``stride == max_length``), are not scored, exactly as in Hugging Face's loop.
* ``--data_file F.json``: src/tgt JSON lines read by :func:`llm.data.read_examples` and encoded by
  :func:`llm.data.encode_example` with the chat template of training; only target tokens (labels != -100)
  are scored. Examples whose target is truncated away are skipped (and counted).

Perplexity is ``exp(mean NLL)`` over the scored tokens. ``--quant_type`` evaluates a quantized directory (the
type must match) or round-to-nearest quantizes a float one at load, as ``predictor.py --quant_type`` does. Every option and input is checked before
any weights load; a problem is one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

import llm  # noqa: F401  (zlib fix before paddle)
from llm.errors import ConfigError, DataError, ModelError, exit_on_user_error

IGNORE_INDEX = -100
DEFAULT_MAX_LENGTH = 1024
QUANT_TYPES = ["weight_only_int8", "weight_only_int4", "a8w8"]
DTYPES = ["float32", "float16", "bfloat16"]
Feature = dict[str, list[int]]


def _arg(help_text: str, default: Any = None, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help_text, **meta})


@dataclass
class PplArguments:
    """Command-line arguments of ``python -m llm.eval.ppl``."""

    model_name_or_path: str | None = _arg("Model directory (paddlenlp, Hugging Face or quantized).")
    text_file: str | None = _arg("Plain text file to score.")
    data_file: str | None = _arg("src/tgt JSON lines; only the target tokens are scored.")
    output_file: str | None = _arg("Also write the result as JSON here.")
    quant_type: str | None = _arg(
        "A quantized model's type, or weight-only RTN at load for a float model.", choices=QUANT_TYPES
    )
    dtype: str = _arg("Model dtype.", "float32", choices=DTYPES)
    max_length: int | None = _arg("Window length (data: tokens per example); default min(limit, 1024).")
    stride: int | None = _arg("Text: window step (default max_length // 2).")
    src_length: int | None = _arg("Data: max prompt tokens (default max_length // 2).")
    chat_template: str | None = _arg("Data: as in training (None: the model's, 'none': no template).")
    batch_size: int = _arg("Windows / examples per forward pass.", 1)

    def __post_init__(self) -> None:
        if not self.model_name_or_path:
            raise ConfigError(
                "missing required argument 'model_name_or_path' (pass --model_name_or_path DIR)"
            )
        if bool(self.text_file) == bool(self.data_file):
            raise ConfigError("pass exactly one of --text_file (plain text) or --data_file (src/tgt JSONL)")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(
                f"max_length must be >= 2 (a context token and a target), got {self.max_length}"
            )
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        given = {"src_length": self.src_length, "chat_template": self.chat_template, "stride": self.stride}
        for name in ("src_length", "chat_template") if self.text_file else ("stride",):
            if given[name] is not None:
                raise ConfigError(f"--{name} applies to --{'data' if self.text_file else 'text'}_file only")
        if self.stride is not None:
            check_stride(self.stride, self.max_length)
        if self.src_length is not None and self.src_length < 1:
            raise ConfigError(f"src_length must be >= 1, got {self.src_length}")
        if self.output_file:
            self._check_output(self.output_file)

    def _check_output(self, dst: str) -> None:
        """Refuse an output file that is a directory, an input, or inside the model directory."""
        out, model = os.path.realpath(dst), os.path.realpath(self.model_name_or_path or "")
        if os.path.isdir(dst):
            raise ConfigError(f"output_file '{dst}' is a directory; give a file path")
        if any(src and os.path.realpath(src) == out for src in (self.text_file, self.data_file)):
            raise ConfigError(f"output_file '{dst}' is the input file; writing it would destroy it")
        if out.startswith(model.rstrip(os.sep) + os.sep):
            raise ConfigError(f"output_file '{dst}' lies inside the model directory; choose another path")


def check_stride(stride: int, max_length: int | None) -> None:
    """Refuse a stride outside ``1..max_length`` (a larger one would leave tokens unscored)."""
    if stride < 1:
        raise ConfigError(f"stride must be >= 1, got {stride}")
    if max_length is not None and stride > max_length:
        raise ConfigError(
            f"stride ({stride}) must not exceed max_length ({max_length}): tokens between windows "
            "would never be scored"
        )


def half(max_length: int) -> int:
    """The default stride / src_length: half a window, as in Hugging Face's guide (1024 / 512)."""
    return max(1, max_length // 2)


# ------------------------------------------------------------------------------------------ scoring
@dataclass
class PplResult:
    """Scored tokens, their summed NLL (nats) and how; ``token_nll`` holds each scored token's NLL, in order."""

    tokens: int
    nll_sum: float
    sequences: int  # windows (text) or examples (data) that went through the model
    max_length: int
    stride: int | None = None
    skipped: int = 0  # data examples with no target token left after truncation
    token_nll: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    @classmethod
    def of(cls, nll: np.ndarray, sequences: int, max_length: int, **extra: Any) -> PplResult:
        return cls(len(nll), float(nll.sum()), sequences, max_length, token_nll=nll, **extra)

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll) if self.mean_nll < 700 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able summary (perplexity None if it overflows)."""
        names = ("tokens", "nll_sum", "mean_nll", "sequences", "skipped", "max_length", "stride")
        out = {name: getattr(self, name) for name in names}
        out["perplexity"] = self.perplexity if math.isfinite(self.perplexity) else None
        return out


class Window(NamedTuple):
    """Tokens ``[begin, end)`` go through the model; ``[first_scored, end)`` are scored."""

    begin: int
    end: int
    first_scored: int


def sliding_windows(num_tokens: int, max_length: int, stride: int) -> list[Window]:
    """Hugging Face's strided schedule; windows with nothing left to score are dropped."""
    check_stride(stride, max_length)
    out, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append(Window(begin, end, first))
        prev_end = end
        if end == num_tokens:
            break
    return out


def window_feature(ids: Sequence[int], window: Window) -> Feature:
    """A window as a shifted training feature: ``labels[i]`` is the target of ``input_ids[i]``."""
    begin, end, first = window
    labels = [IGNORE_INDEX] * (first - begin - 1) + list(ids[first:end])
    return {"input_ids": list(ids[begin : end - 1]), "labels": labels}


def _collate(batch: list[Feature], pad_token_id: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Right-padded ``input_ids`` (+ ``attention_mask`` if a row is padded) and the labels."""
    longest = max(len(f["input_ids"]) for f in batch)
    ids = np.full((len(batch), longest), pad_token_id, dtype=np.int64)
    labels = np.full((len(batch), longest), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(batch), longest), dtype=np.int64)
    for row, feat in enumerate(batch):
        n = len(feat["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = feat["input_ids"], feat["labels"], 1
    return ({"input_ids": ids} if mask.all() else {"input_ids": ids, "attention_mask": mask}), labels


def _token_nll(logits: Any, labels: np.ndarray) -> np.ndarray:
    """Cross-entropy (float32 log-softmax) at each position whose label is not -100, row-major order."""
    import paddle
    import paddle.nn.functional as F

    flat = labels.reshape(-1)
    where = np.flatnonzero(flat != IGNORE_INDEX)
    if not where.size:
        return np.zeros(0)
    rows = paddle.gather(logits.reshape([-1, logits.shape[-1]]), paddle.to_tensor(where, dtype="int64"))
    target = paddle.to_tensor(flat[where], dtype="int64").reshape([-1, 1])
    nll = F.cross_entropy(rows.astype("float32"), target, reduction="none")
    return nll.numpy().reshape(-1).astype(np.float64)


def score_features(
    model: Any,
    features: Sequence[Feature],
    *,
    batch_size: int = 1,
    pad_token_id: int = 0,
    progress: bool = False,
    unit: str = "window",
) -> np.ndarray:
    """NLL of every label != -100 of shifted training features, in order, ``batch_size`` rows per forward."""
    import paddle
    from tqdm import tqdm

    from llm.model import forward_logits

    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    top = max((max(f["input_ids"] + f["labels"], default=0) for f in features), default=0)
    if isinstance(vocab, int) and top >= vocab:
        raise ModelError(f"token id {top} is outside the model's vocabulary ({vocab} ids); wrong tokenizer?")
    model.eval()
    out: list[np.ndarray] = [np.zeros(0)]
    with tqdm(total=len(features), desc="ppl", unit=unit, file=sys.stderr, disable=not progress) as bar:
        for start in range(0, len(features), batch_size):
            batch = list(features[start : start + batch_size])
            inputs, labels = _collate(batch, pad_token_id)
            with paddle.no_grad():
                out.append(_token_nll(forward_logits(model, inputs), labels))
            bar.update(len(batch))
    return np.concatenate(out)


def perplexity(
    model: Any,
    ids: Sequence[int],
    max_length: int,
    stride: int | None = None,
    *,
    batch_size: int = 1,
    pad_token_id: int = 0,
    progress: bool = False,
) -> PplResult:
    """Perplexity of the token ids ``ids`` by sliding windows (``stride`` default ``max_length // 2``)."""
    if max_length < 2:
        raise ConfigError(f"max_length must be >= 2, got {max_length}")
    if len(ids) < 2:
        raise DataError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    stride = half(max_length) if stride is None else stride
    ids = [int(i) for i in ids]
    windows = sliding_windows(len(ids), max_length, stride)
    feats = [window_feature(ids, w) for w in windows]
    nll = score_features(model, feats, batch_size=batch_size, pad_token_id=pad_token_id, progress=progress)
    return PplResult.of(nll, len(windows), max_length, stride=stride)


def data_features(
    tokenizer: Any, examples: Sequence[Any], max_length: int, src_length: int
) -> tuple[list[Feature], int]:
    """Training features of ``examples`` (with ``tokenizer.chat_template``) and how many had no target left."""
    from llm.data import encode_example, has_supervision

    template = tokenizer.chat_template
    feats = [encode_example(ex, tokenizer, template, src_length, max_length) for ex in examples]
    kept = [f for f in feats if has_supervision(f)]
    if not kept:
        path = examples[0].path if examples else None
        raise DataError("no target tokens left in any example (check --src_length/--max_length)", path)
    return kept, len(feats) - len(kept)


def data_perplexity(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    max_length: int,
    src_length: int | None = None,
    *,
    batch_size: int = 1,
    progress: bool = False,
) -> PplResult:
    """Perplexity over the target tokens of src/tgt ``examples``, encoded exactly as in training."""
    src_length = half(max_length) if src_length is None else src_length
    feats, skipped = data_features(tokenizer, examples, max_length, src_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nll = score_features(
        model, feats, batch_size=batch_size, pad_token_id=pad, progress=progress, unit="example"
    )
    return PplResult.of(nll, len(feats), max_length, skipped=skipped)


# ------------------------------------------------------------------------------------------ loading
def read_text(path: str) -> str:
    """The UTF-8 text of ``path``; a missing, unreadable or blank file raises :class:`DataError`."""
    if not os.path.isfile(path):
        raise DataError("file not found", path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise DataError(f"not UTF-8 text ({err.reason} at byte {err.start})", path) from None
    except OSError as err:
        raise DataError(f"cannot read file ({err.strerror})", path) from None
    if not text.strip():
        raise DataError("the text is empty", path)
    return text


def model_config(path: str) -> dict[str, Any]:
    """``config.json`` of a complete model directory, else a one-line :class:`ModelError`."""
    from llm.fileio import read_json
    from llm.outputs import require_complete, unfinished_training_hint

    if not os.path.isdir(path):
        raise ModelError(f"model directory not found: '{path}'")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"{path}: no config.json (not a model directory){unfinished_training_hint(path)}")
    require_complete(path)
    return read_json(os.path.join(path, "config.json"), "config.json")


def load_eval_model(path: str, dtype: str, quant_type: str | None = None) -> Any:
    """The model in eval mode: through :func:`llm.infer.quantized.load_quantized_for_eval` when ``quant_type``
    is given (a quantized directory as it is, a float one round-to-nearest quantized), else
    :func:`llm.model.load_model`.

    A float bfloat16 model on the CPU (no bfloat16 kernels there) keeps its bf16-rounded weights but is
    computed in float32, as the toolkit's decode kernels do.
    """
    from llm.model.loading import is_cpu_half, load_model

    if quant_type:
        from llm.infer.quantized import load_quantized_for_eval

        model = load_quantized_for_eval(path, quant_type, dtype)
    else:
        model = load_model(path, dtype=dtype)
        if is_cpu_half(dtype):
            model.to(dtype="float32")
    model.eval()
    return model


# ------------------------------------------------------------------------------------------ CLI
def format_result(result: PplResult, rows: Sequence[tuple[str, str]]) -> str:
    """The summary table: ``rows`` (label, value), then tokens, mean_nll and perplexity."""
    rows = [
        *rows,
        ("tokens", str(result.tokens)),
        ("mean_nll", f"{result.mean_nll:.6f}"),
        ("perplexity", f"{result.perplexity:.4f}"),
    ]
    width = max(len(label) for label, _ in rows) + 2
    return "\n".join(f"{label:<{width}}{value}" for label, value in rows)


def run(args: PplArguments) -> tuple[PplResult, list[tuple[str, str]], dict[str, Any]]:
    """Check every input, then load and score: the result, the table rows and the JSON record."""
    from llm.data import read_examples
    from llm.infer.arguments import position_limit
    from llm.model.loading import check_device_dtype
    from llm.tokenizer import load_tokenizer

    path = str(args.model_name_or_path)
    text = read_text(args.text_file) if args.text_file else None
    examples = read_examples(args.data_file) if args.data_file else []
    limit = position_limit(model_config(path))
    max_length = args.max_length if args.max_length is not None else min(limit, DEFAULT_MAX_LENGTH)
    if max_length > limit:
        raise ConfigError(f"max_length ({max_length}) exceeds the model's position limit ({limit} tokens)")
    check_device_dtype(args.dtype)
    if args.quant_type:
        from llm.infer.quantized import check_request_dir

        check_request_dir(path, args.quant_type)  # a mismatch or a8w8 on a float model: before any weights
    tokenizer = load_tokenizer(path, chat_template=args.chat_template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    kind = f"{args.quant_type}, {args.dtype}" if args.quant_type else args.dtype
    rows = [("model", f"{path} ({kind})")]
    record: dict[str, Any] = dict(model_name_or_path=path, quant_type=args.quant_type, dtype=args.dtype)
    if text is not None:
        stride = half(max_length) if args.stride is None else args.stride
        check_stride(stride, max_length)
        ids = tokenizer.encode(text, add_special_tokens=True)
        if len(ids) < 2:
            raise DataError(f"the text has {len(ids)} token(s); perplexity needs at least 2", args.text_file)
        model = load_eval_model(path, args.dtype, args.quant_type)
        result = perplexity(
            model, ids, max_length, stride, batch_size=args.batch_size, pad_token_id=pad, progress=True
        )
        record.update(mode="text", input=args.text_file, num_tokens=len(ids), batch_size=args.batch_size)
        rows.append(("input", f"{args.text_file} (text, {len(ids)} tokens)"))
        rows.append(("windows", f"{result.sequences} (max_length {max_length}, stride {stride})"))
    else:
        src_length = half(max_length) if args.src_length is None else args.src_length
        if src_length >= max_length:
            raise ConfigError(f"src_length ({src_length}) must be smaller than max_length ({max_length})")
        feats, skipped = data_features(tokenizer, examples, max_length, src_length)  # before the weights
        model = load_eval_model(path, args.dtype, args.quant_type)
        nll = score_features(
            model, feats, batch_size=args.batch_size, pad_token_id=pad, progress=True, unit="example"
        )
        result = PplResult.of(nll, len(feats), max_length, skipped=skipped)
        template = "chat template" if tokenizer.chat_template is not None else "no chat template"
        record.update(mode="data", input=args.data_file, examples=len(examples), src_length=src_length)
        record["batch_size"] = args.batch_size
        rows.append(
            ("input", f"{args.data_file} ({len(examples)} examples, {template}, src_length {src_length})")
        )
        rows.append(
            ("examples", f"{len(feats)} scored, {skipped} skipped (max_length {max_length}, targets only)")
        )
    record.update(result.to_dict())
    return result, rows, record


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> PplResult:
    """``python -m llm.eval.ppl --model_name_or_path DIR (--text_file F | --data_file F.json) ...``."""
    from llm.config.parser import parse_arguments
    from llm.fileio import write_json

    (args,) = parse_arguments(PplArguments, None if argv is None else list(argv))
    result, rows, record = run(args)
    print(format_result(result, rows), flush=True)
    if args.output_file:
        write_json(args.output_file, record)
    return result


if __name__ == "__main__":
    main()
