"""``python -m llm.eval.ppl``: perplexity against independent references.

* one pass: a numpy log-softmax over the logits of the full sequence, and ``transformers`` (4.48.3) on the
  same weights exported to a Hugging Face directory (its ``labels`` loss);
* sliding windows: Hugging Face's strided loop (the perplexity guide) run with ``transformers``; the sum over
  independent chunks for ``stride == max_length``; a per-token reference (one forward per scored token over
  the context the method gives it) for a small stride;
* ``--data_file``: a reference built from the training features' labels (:func:`llm.data.encode_example`).

The model is a tiny random LLaMA with the demo tokenizer whose weights are re-drawn with std 0.2, so logits
are O(1) and the context visibly changes the result.
"""

from __future__ import annotations

import llm  # noqa: F401  (zlib fix: must be imported before paddle)

# isort: split
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

from llm.convert import export_paddle_to_hf
from llm.data import IGNORE_INDEX, encode_example, read_examples
from llm.eval import ppl
from llm.eval.ppl import data_perplexity, perplexity, sliding_windows
from llm.model import build_model, forward_logits, load_model, tiny_config
from llm.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo" / "model"
DEV = ROOT / "demo" / "data" / "dev.json"
WORDS = "spell: 342 three hundred forty two digits: seventy one 71 spell: 12 twelve digits: nine 9 "
TEXT = WORDS * 3  # ~75 tokens with BOS
TOL = 1e-5


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama (std 0.2 weights) with the demo's HF tokenizer files."""
    path = tmp_path_factory.mktemp("ppl-tiny")
    tok = load_tokenizer(str(DEMO))
    config = tiny_config(
        "llama",
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    with paddle.utils.unique_name.guard():
        model = build_model(config, seed=3)
    paddle.seed(5)
    with paddle.no_grad():
        for name, p in model.named_parameters():
            p.set_value(paddle.normal(1.0 if "norm" in name else 0.0, 0.2, p.shape))
    model.save_pretrained(str(path), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / name, path / name)
    return path


@pytest.fixture(scope="module")
def model(model_dir: Path):
    m = load_model(str(model_dir))
    m.eval()
    return m


@pytest.fixture(scope="module")
def tok(model_dir: Path):
    return load_tokenizer(str(model_dir))


@pytest.fixture(scope="module")
def ids(tok) -> list[int]:
    out = tok.encode(TEXT, add_special_tokens=True)
    assert out[0] == tok.bos_token_id and len(out) > 60
    return out


@pytest.fixture(scope="module")
def hf_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(
        export_paddle_to_hf(str(model_dir), str(tmp_path_factory.mktemp("ppl-hf") / "hf"), progress=False)
    )


@pytest.fixture(scope="module")
def hf_model(hf_dir: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()


# ------------------------------------------------------------------------------------------ references
def log_probs(model, seq: list[int]) -> np.ndarray:
    """numpy log-softmax (float64) over the paddle logits of ``seq`` in one forward."""
    with paddle.no_grad():
        logits = forward_logits(model, {"input_ids": np.array([seq])}).numpy()[0].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def full_nll(model, seq: list[int]) -> np.ndarray:
    """NLL of ``seq[1:]``, each token given every token before it."""
    lp = log_probs(model, seq)
    return -lp[np.arange(len(seq) - 1), seq[1:]]


def hf_strided(hf_model, seq: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """Summed NLL and token count by the loop of Hugging Face's perplexity guide (transformers' own loss)."""
    import torch

    encodings = torch.tensor([seq])
    seq_len = encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf_model(input_ids, labels=target_ids).loss
        # the tokens transformers' loss averages over (it shifts labels left); the guide's
        # ``(target_ids != -100).sum() - batch_size`` undercounts every window after the first by one
        valid = int((target_ids[:, 1:] != -100).sum())
        if valid > 0:
            nll_sum += float(loss) * valid
            n_tokens += valid
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum, n_tokens


# ------------------------------------------------------------------------------------------ text
def test_one_pass_matches_numpy_and_transformers(model, ids, hf_model) -> None:
    import torch

    result = perplexity(model, ids, max_length=128)
    assert result.sequences == 1 and result.tokens == len(ids) - 1
    np.testing.assert_allclose(result.token_nll, full_nll(model, ids), atol=TOL)
    with torch.no_grad():
        hf_loss = float(hf_model(torch.tensor([ids]), labels=torch.tensor([ids])).loss)
    assert result.mean_nll == pytest.approx(hf_loss, abs=TOL)
    assert result.perplexity == pytest.approx(np.exp(hf_loss), rel=TOL)


@pytest.mark.parametrize("max_length,stride", [(16, 5), (16, 16), (20, 1), (7, 6)])
def test_sliding_window_matches_hf_strided_loop(model, ids, hf_model, max_length: int, stride: int) -> None:
    result = perplexity(model, ids, max_length, stride, batch_size=3)
    ref_sum, ref_tokens = hf_strided(hf_model, ids, max_length, stride)
    assert result.tokens == ref_tokens
    assert result.nll_sum == pytest.approx(ref_sum, rel=TOL)


def test_stride_equal_max_length_is_the_sum_of_independent_chunks(model, ids) -> None:
    L = 16
    result = perplexity(model, ids, L, L)
    chunks = [ids[k : k + L] for k in range(0, len(ids), L)]
    ref = np.concatenate([full_nll(model, c) for c in chunks if len(c) > 1])
    assert result.sequences == sum(len(c) > 1 for c in chunks)
    assert result.tokens == len(ref) == len(ids) - len(chunks)
    np.testing.assert_allclose(result.token_nll, ref, atol=TOL)


def test_small_stride_matches_a_per_token_reference(model, ids) -> None:
    L, s = 12, 4
    result = perplexity(model, ids, L, s)
    ref = []
    for t in range(1, len(ids)):  # token t is scored by the first window reaching it, which starts at c
        c = 0 if t < L else ((t - L) // s + 1) * s
        assert 1 <= t - c <= L - 1
        ref.append(-log_probs(model, ids[c:t])[-1, ids[t]])  # context ids[c:t] predicts ids[t]
    assert result.tokens == len(ids) - 1
    np.testing.assert_allclose(result.token_nll, np.array(ref), atol=TOL)
    one_pass = perplexity(model, ids, 128)
    assert abs(result.mean_nll - one_pass.mean_nll) > 1e-3  # the truncated context matters here


def test_batches_and_windows(model, ids) -> None:
    single = perplexity(model, ids, 16, 5, batch_size=1)
    batched = perplexity(model, ids, 16, 5, batch_size=4)  # the last batch has a shorter, padded window
    np.testing.assert_allclose(batched.token_nll, single.token_nll, atol=TOL)
    windows = sliding_windows(len(ids), 16, 5)
    assert windows[0] == (0, 16, 1) and windows[1] == (5, 21, 16)
    assert sum(w.end - w.first_scored for w in windows) == len(ids) - 1
    assert len(sliding_windows(33, 16, 16)) == 2  # a last window of one token has nothing to score


# ------------------------------------------------------------------------------------------ data
@pytest.mark.parametrize("template", ["model", "none"])
def test_data_file_scores_only_target_tokens(model, model_dir, template: str) -> None:
    tok = load_tokenizer(str(model_dir), chat_template=None if template == "model" else "none")
    assert (tok.chat_template is not None) == (template == "model")
    examples = read_examples(str(DEV))[:10]
    assert any(len(ex.src) > 1 for ex in examples)  # multi-turn included
    ref_sum, ref_tokens, all_tokens = 0.0, 0, 0
    for ex in examples:
        feat = encode_example(ex, tok, tok.chat_template, 32, 64)
        labels = np.array(feat["labels"])
        keep = labels != IGNORE_INDEX
        lp = log_probs(model, feat["input_ids"])
        ref_sum -= float(lp[np.arange(len(labels))[keep], labels[keep]].sum())
        ref_tokens += int(keep.sum())
        all_tokens += len(labels)
    result = data_perplexity(model, tok, examples, 64, 32, batch_size=4)
    assert result.tokens == ref_tokens < all_tokens / 2
    assert result.sequences == len(examples) and result.skipped == 0
    assert result.nll_sum == pytest.approx(ref_sum, rel=TOL)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_subprocess_and_json(model, ids, model_dir, tmp_path) -> None:
    text, out = tmp_path / "text.txt", tmp_path / "ppl.json"
    text.write_text(TEXT, encoding="utf-8")
    argv = ["--model_name_or_path", str(model_dir), "--text_file", str(text), "--max_length", "16"]
    proc = subprocess.run(
        [sys.executable, "-m", "llm.eval.ppl", *argv, "--stride", "8", "--output_file", str(out)],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == [
        "model",
        "input",
        "windows",
        "tokens",
        "mean_nll",
        "perplexity",
    ]
    expected = perplexity(model, ids, 16, 8)
    assert lines[2].split() == ["windows", str(expected.sequences), "(max_length", "16,", "stride", "8)"]
    assert lines[3].split() == ["tokens", str(len(ids) - 1)]
    assert float(lines[-1].split()[1]) == pytest.approx(expected.perplexity, rel=1e-4)
    record = json.loads(out.read_text())
    assert record["mode"] == "text" and record["tokens"] == expected.tokens
    assert record["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)


def test_cli_on_hf_dir_data_file_and_bf16(model, ids, hf_dir, model_dir, tmp_path, capsys) -> None:
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    from_hf = ppl.main(["--model_name_or_path", str(hf_dir), "--text_file", str(text)])
    assert from_hf.perplexity == pytest.approx(perplexity(model, ids, 256).perplexity, rel=TOL)
    data = ppl.main(["--model_name_or_path", str(model_dir), "--data_file", str(DEV), "--max_length", "64"])
    assert data.tokens > 0 and np.isfinite(data.perplexity)
    bf16 = ppl.main(["--model_name_or_path", str(model_dir), "--text_file", str(text), "--dtype", "bfloat16"])
    assert bf16.perplexity == pytest.approx(from_hf.perplexity, rel=0.05)
    out = capsys.readouterr().out
    assert "targets only" in out and "(bfloat16)" in out


def test_quant_type_quantizes_a_float_model_and_reads_a_quantized_one(model_dir, tmp_path, capsys) -> None:
    from llm.quant.io import save_quantized
    from llm.quant.model import quantize_model

    text = tmp_path / "text.txt"
    text.write_text(WORDS, encoding="utf-8")
    argv = ["--text_file", str(text)]
    plain = ppl.main(["--model_name_or_path", str(model_dir), *argv])
    rtn = ppl.main(["--model_name_or_path", str(model_dir), *argv, "--quant_type", "weight_only_int4"])
    assert "(weight_only_int4, float32)" in capsys.readouterr().out
    model = load_model(str(model_dir))
    quantize_model(model, "weight_only_int4", -1, progress=False)
    ids = load_tokenizer(str(model_dir)).encode(WORDS, add_special_tokens=True)
    assert rtn.perplexity == pytest.approx(perplexity(model, ids, 256).perplexity, rel=TOL)
    assert rtn.perplexity != pytest.approx(plain.perplexity, rel=1e-6)  # the weights really changed
    saved = tmp_path / "int4"
    save_quantized(model, str(saved))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (model_dir / name).exists():
            (saved / name).write_bytes((model_dir / name).read_bytes())
    stored = ppl.main(["--model_name_or_path", str(saved), *argv, "--quant_type", "weight_only_int4"])
    assert stored.perplexity == pytest.approx(rtn.perplexity, rel=TOL)
    with pytest.raises(SystemExit) as exc:
        ppl.main(["--model_name_or_path", str(saved), *argv, "--quant_type", "weight_only_int8"])
    assert exc.value.code == 2 and "already quantized as weight_only_int4" in capsys.readouterr().err


def _errors(tmp: Path, model_dir: Path) -> list[tuple[list[str], str]]:
    text, empty, bad = tmp / "t.txt", tmp / "empty.txt", tmp / "bad.json"
    text.write_text(WORDS, encoding="utf-8")
    empty.write_text(" \n\n", encoding="utf-8")
    bad.write_text('{"src": "a", "tgt": "b"}\n{"src": "a"}\n', encoding="utf-8")
    m, t = ["--model_name_or_path", str(model_dir)], ["--text_file", str(text)]
    return [
        ([*m, "--text_file", str(tmp / "missing.txt")], "missing.txt: file not found"),
        ([*m, "--text_file", str(empty)], "the text is empty"),
        ([*m, *t, "--max_length", "1"], "max_length must be >= 2"),
        ([*m, *t, "--max_length", "8", "--stride", "9"], "stride (9) must not exceed max_length (8)"),
        ([*m, *t, "--stride", "0"], "stride must be >= 1"),
        ([*m, *t, "--stride", "300"], "stride (300) must not exceed max_length (256)"),
        ([*m, *t, "--strid", "4"], "unknown argument 'strid' on the command line (did you mean 'stride'?)"),
        ([*m, *t, "--max_length", "4096"], "exceeds the model's position limit (256 tokens)"),
        ([*m, *t, "--data_file", str(DEV)], "exactly one of --text_file"),
        (m, "exactly one of --text_file"),
        ([*t], "missing required argument 'model_name_or_path'"),
        (["--model_name_or_path", str(tmp / "nope"), *t], "model directory not found"),
        ([*m, "--data_file", str(DEV), "--stride", "4"], "--stride applies to --text_file only"),
        ([*m, "--data_file", str(bad)], "bad.json:2: missing field 'tgt'"),
        ([*m, *t, "--output_file", str(text)], "is the input file"),
        ([*m, *t, "--dtype", "float16"], "does not run on cpu"),
        ([*m, *t, "--quant_type", "int3"], "expects one of ['weight_only_int8'"),
        ([*m, *t, "--quant_type", "a8w8"], "a8w8 needs calibration"),
    ]


def test_errors_are_one_line_exit_2_before_any_weights(model_dir, tmp_path, monkeypatch, capsys) -> None:
    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(ppl, "load_eval_model", no_weights)
    for argv, message in _errors(tmp_path, model_dir):
        with pytest.raises(SystemExit) as exc:
            ppl.main(argv)
        captured = capsys.readouterr()
        assert exc.value.code == 2, argv
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, captured.err)
        assert message in lines[0], (argv, lines[0])
        assert captured.out == ""
