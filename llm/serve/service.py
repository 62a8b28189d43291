"""What the HTTP layer asks of the model: prompt ids, decoding settings, and text runs over the scheduler.

* **Prompts** use the predictor's code path: a conversation ``[[u1, b1], ..., [query]]`` goes through
  :meth:`Predictor.prompt_ids` (the chat template of training; left-truncated to the given ``src_length``);
  a raw completion prompt is tokenized with special tokens.
* **Decoding** (:func:`decoding`): a request's ``top_k``/``top_p``/``temperature`` choose greedy search or
  sampling. Omitted fields take the server's :class:`Sampling` defaults.
* **Runs** (:class:`TextRun`): the new token ids of a scheduler :class:`Handle`, decoded into UTF-8-safe text
  pieces, cut before the first stop string (the handle is then cancelled).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from llm.infer.arguments import SAMPLING_DEFAULTS, read_generation_defaults
from llm.infer.sampling import GenerationConfig
from llm.infer.streaming import IncrementalDecoder
from llm.serve.scheduler import Handle, Scheduler

logger = logging.getLogger(__name__)

UNLIMITED = 1 << 30  # src_length used to measure a prompt without truncating it


@dataclass(frozen=True)
class Sampling:
    """Request-level decode settings (before :func:`decoding` maps them to a strategy)."""

    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    repetition_penalty: float = 1.0


def decoding(s: Sampling) -> dict[str, Any]:
    """GenerationConfig fields for ``s``.

    Greedy search when ``top_k == 1``, ``temperature == 0`` or ``top_p == 0``, or when all three are neutral
    (``top_k 0, top_p 1, temperature 1``: the defaults). Otherwise sampling as in PaddleNLP: ``/ temperature``,
    then top-k (0 = no cut), then top-p. The repetition penalty applies to both.
    """
    greedy = (
        s.top_k == 1
        or s.temperature == 0
        or s.top_p == 0
        or (s.top_k == 0 and s.top_p >= 1.0 and s.temperature == 1.0)
    )
    if greedy:
        return {
            "decode_strategy": "greedy_search",
            "top_k": 0,
            "top_p": 1.0,
            "temperature": 1.0,
            "repetition_penalty": s.repetition_penalty,
        }
    return {
        "decode_strategy": "sampling",
        "top_k": s.top_k,
        "top_p": s.top_p,
        "temperature": s.temperature,
        "repetition_penalty": s.repetition_penalty,
    }


def server_sampling(args: Any, model_dir: str) -> Sampling:
    """The defaults for fields a request omits: the predictor flag, else ``generation_config.json``, else
    greedy (0/1/1/1). ``--decode_strategy sampling`` fills unset values with PaddleNLP's (0/0.7/0.95);
    ``greedy_search`` (flag or ``do_sample: false``) keeps top_k/top_p/temperature neutral."""
    from_file = read_generation_defaults(model_dir)
    strategy = args.decode_strategy or from_file.get("decode_strategy")
    neutral = dataclasses.asdict(Sampling())
    values: dict[str, Any] = {}
    for key, default in neutral.items():
        flag = getattr(args, key)
        if flag is not None:
            values[key] = flag
        elif strategy == "greedy_search" and key != "repetition_penalty":
            values[key] = default
        elif key in from_file:
            values[key] = from_file[key]
        elif strategy == "sampling":
            values[key] = SAMPLING_DEFAULTS[key]
        else:
            values[key] = default
    return Sampling(
        top_k=int(values["top_k"]),
        top_p=float(values["top_p"]),
        temperature=float(values["temperature"]),
        repetition_penalty=float(values["repetition_penalty"]),
    )


# ------------------------------------------------------------------------------------------ stop strings
def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest occurrence of any stop string in ``text``, else None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string (not yet safe to send)."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class TextRun:
    """The generated text of one request, piece by piece; see the module docstring.

    After the iteration, :attr:`finish_reason` is ``"stop"`` (a stop id or a stop string), ``"length"``,
    ``"cancelled"`` (shutdown, or :meth:`close` before the end) or ``"error"`` (:attr:`error` says why).
    """

    def __init__(self, handle: Handle, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        self.handle = handle
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.completion_tokens = 0
        self.text = ""

    @property
    def prompt_tokens(self) -> int:
        return self.handle.prompt_tokens

    def __iter__(self) -> Iterator[str]:
        decoder = IncrementalDecoder(self.tokenizer, skip_special_tokens=True)
        pending = ""
        try:
            for token in self.handle:
                self.completion_tokens += 1
                pending += decoder.push(token)
                cut = find_stop(pending, self.stops)
                if cut is not None:
                    yield from self._emit(pending[:cut])
                    self.finish_reason = "stop"
                    self.handle.cancel()
                    return
                safe = len(pending) - held_back(pending, self.stops)
                yield from self._emit(pending[:safe])
                pending = pending[safe:]
        except RuntimeError as err:  # the handle finished with "error"
            self.finish_reason, self.error = "error", str(err)
            return
        finally:
            if self.finish_reason is None and self.handle.finish_reason is None:
                self.handle.cancel()  # the consumer stopped early (client gone)
                self.finish_reason = "cancelled"
        pending += decoder.flush()
        cut = find_stop(pending, self.stops)
        yield from self._emit(pending if cut is None else pending[:cut])
        self.finish_reason = "stop" if cut is not None else self.handle.finish_reason

    def _emit(self, piece: str) -> Iterator[str]:
        if piece:
            self.text += piece
            yield piece

    def collect(self) -> str:
        """Run to the end; the whole text."""
        for _ in self:
            pass
        return self.text


# ------------------------------------------------------------------------------------------ the service
class Service:
    """The predictor (tokenizer, template, lengths) and the scheduler behind the HTTP routes."""

    def __init__(
        self, predictor: Any, scheduler: Scheduler, *, model_name: str, defaults: Sampling, seed: int | None
    ) -> None:
        self.predictor = predictor
        self.scheduler = scheduler
        self.model_name = model_name
        self.defaults = defaults
        self.seed = seed

    @classmethod
    def create(cls, predictor: Any, args: Any, server: Any) -> Service:
        """Start a scheduler over ``predictor.engine`` with the server's batch and queue bounds."""
        scheduler = Scheduler(
            predictor.engine, max_batch_size=server.max_batch_size, max_queue=server.max_queue
        ).start()
        name = server.served_model_name or os.path.basename(os.path.normpath(args.model_name_or_path))
        defaults = server_sampling(args, args.model_name_or_path)
        return cls(predictor, scheduler, model_name=name, defaults=defaults, seed=args.seed)

    @property
    def tokenizer(self) -> Any:
        return self.predictor.tokenizer

    @property
    def src_length(self) -> int:
        """Longest prompt (tokens) the server takes."""
        return int(self.predictor.src_length)

    @property
    def max_length(self) -> int:
        """Most new tokens per request."""
        return int(self.predictor.max_length)

    @property
    def has_template(self) -> bool:
        return self.tokenizer.chat_template is not None

    def conversation_ids(
        self, prompt: str | list[list[str]], src_length: int, context: dict[str, Any] | None = None
    ) -> list[int]:
        """:meth:`Predictor.prompt_ids` of ``[[u1, b1], ..., [query]]`` (or a string) within ``src_length``."""
        view = copy.copy(self.predictor)  # shallow: only the truncation length differs
        view.src_length = int(src_length)
        return view.prompt_ids(prompt, context)

    def text_ids(self, text: str) -> list[int]:
        """A raw prompt with the tokenizer's special tokens (BOS), untruncated."""
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def config(self, sampling: Sampling, max_new_tokens: int, seed: int | None = None) -> GenerationConfig:
        """The GenerationConfig of one request (stop ids and padding from the predictor's)."""
        base = self.predictor.generation
        return GenerationConfig(
            max_new_tokens=int(max_new_tokens),
            eos_token_ids=tuple(base.eos_token_ids),
            pad_token_id=int(base.pad_token_id),
            seed=self.seed if seed is None else int(seed),
            **decoding(sampling),
        ).validate()

    def start(self, prompt_ids: list[int], config: GenerationConfig, stops: Sequence[str] = ()) -> TextRun:
        """Submit to the scheduler (raises ``QueueFull``/``SchedulerStopped``/``ConfigError``)."""
        return TextRun(self.scheduler.submit(prompt_ids, config), self.tokenizer, stops)

    def shutdown(self) -> None:
        """Stop the scheduler: waiting and running requests end as ``cancelled``."""
        self.scheduler.shutdown()
