"""llama.cpp worker of ``bench_generation.py`` (run by a Python that has ``llama-cpp-python`` and ``gguf``).

Usage (``bench_generation.py --llama_cpp_python PYTHON`` runs it)::

    PYTHON benchmarks/llama_cpp_worker.py --npz weights.npz --weights fp32|int8|int4 --reps 2 --workdir DIR

Writes the benchmark's random LLaMA weights (the Hugging Face state dict saved by ``bench_generation.py``) as an
F32 GGUF file the way llama.cpp's ``convert_hf_to_gguf.py`` does (q / k rows permuted for its rotary layout, tied
embeddings: no ``output.weight``), quantizes it with llama.cpp's own ``llama_model_quantize`` to Q8_0 (``int8``)
or Q4_0 (``int4``, default settings: the tied output / embedding tensor gets llama.cpp's usual higher-precision
type), then times batch-1 greedy generation with the benchmark's prompts and prints one JSON line. The batch-16
measures are not taken (llama-cpp-python's ``Llama`` runs one sequence).
"""

from __future__ import annotations

import argparse
import ctypes
import json
from pathlib import Path

import numpy as np
from bench_generation import GEOMETRY, NEW, PREFILL_LEN, THREADS, _rss_mb, measure

FTYPES = {"fp32": None, "int8": "LLAMA_FTYPE_MOSTLY_Q8_0", "int4": "LLAMA_FTYPE_MOSTLY_Q4_0"}
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's rotate-half q / k rows -> llama.cpp's interleaved rotary pairs (as its converter does)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(npz: Path, path: Path) -> None:
    import gguf

    g = GEOMETRY
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(g["max_position_embeddings"])
    writer.add_embedding_length(g["hidden_size"])
    writer.add_block_count(g["num_hidden_layers"])
    writer.add_feed_forward_length(g["intermediate_size"])
    writer.add_head_count(g["num_attention_heads"])
    writer.add_head_count_kv(g["num_key_value_heads"])
    writer.add_rope_dimension_count(g["hidden_size"] // g["num_attention_heads"])
    writer.add_rope_freq_base(g["rope_theta"])
    writer.add_layer_norm_rms_eps(g["rms_norm_eps"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = g["vocab_size"]  # a placeholder SentencePiece vocabulary: the benchmark feeds token ids
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>".encode() for i in range(vocab)])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([2, 3, 3] + [1] * (vocab - 3))  # unknown, control (bos, eos), normal
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    state = dict(np.load(npz))
    writer.add_tensor("token_embd.weight", state.pop("model.embed_tokens.weight"))
    writer.add_tensor("output_norm.weight", state.pop("model.norm.weight"))
    for name, value in sorted(state.items()):
        parts = name.split(".")  # model.layers.{i}.{module}.{proj}.weight
        module = ".".join(parts[3:-1])
        if module == "self_attn.q_proj":
            value = permute(value, g["num_attention_heads"])
        elif module == "self_attn.k_proj":
            value = permute(value, g["num_key_value_heads"])
        writer.add_tensor(f"blk.{parts[2]}.{GGUF_NAMES[module]}.weight", np.ascontiguousarray(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize(src: Path, dst: Path, ftype: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.nthread = THREADS
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize to {ftype} failed")


def tensor_bytes(path: Path) -> int:
    """Bytes of every tensor: a decode step reads them all (the tied embedding is the output head)."""
    import gguf

    return int(sum(t.n_bytes for t in gguf.GGUFReader(str(path)).tensors))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--npz", type=Path, required=True)
    parser.add_argument("--weights", choices=list(FTYPES), required=True)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    import llama_cpp

    f32 = args.workdir / "model-f32.gguf"
    if not f32.exists():
        write_gguf(args.npz, f32)
    path = f32
    if FTYPES[args.weights]:
        path = args.workdir / f"model-{args.weights}.gguf"
        if not path.exists():
            quantize(f32, path, FTYPES[args.weights])
    rss_start = _rss_mb()
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=PREFILL_LEN + NEW + 64,
        n_batch=PREFILL_LEN,
        n_threads=THREADS,
        n_threads_batch=THREADS,
        verbose=False,
    )

    def gen(batch: list[list[int]], new: int) -> list[list[int]]:
        out = []
        for prompt in batch:
            llm.reset()  # no reuse of a previous prompt's cache
            tokens: list[int] = []
            for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
                tokens.append(int(token))
                if len(tokens) == new:
                    break
            out.append(tokens)
        return out

    result = measure(gen, args.reps, batched=False)
    result.update(
        runner=f"llama.cpp {llama_cpp.__version__} ({path.name})",
        kernels=f"ggml, {THREADS} threads",
        rss_mb=_rss_mb(),
        rss_start_mb=rss_start,
        step_bytes=tensor_bytes(path),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
