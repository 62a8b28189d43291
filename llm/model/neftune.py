"""NEFTune: uniform noise on the input-embedding output during training (spec §3.1, §3.9).

The noise is drawn from U(-m, m) with ``m = alpha / sqrt(seq_len * hidden)`` (the NEFTune paper's
scaling; PaddleNLP 2.8's hook divides by ``sqrt(d0 * d1)`` of the output, i.e. batch * seq). It is only
added while the embedding layer is in training mode and is removed with ``handle.remove()``.
"""

from __future__ import annotations

import math
from typing import Any

import paddle

from llm.errors import ConfigError
from llm.model.families import family_of, unwrap_model


class NEFTuneHandle:
    """Returned by :func:`enable_neftune`; ``remove()`` detaches the hook (safe to call twice)."""

    def __init__(self, hook: Any, layer: paddle.nn.Layer, noise_alpha: float) -> None:
        self._hook = hook
        self.layer = layer
        self.noise_alpha = noise_alpha

    def remove(self) -> None:
        """Stop adding noise."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @property
    def active(self) -> bool:
        """Whether the hook is still attached."""
        return self._hook is not None


def neftune_magnitude(noise_alpha: float, seq_len: int, hidden: int) -> float:
    """``alpha / sqrt(seq_len * hidden)``."""
    return float(noise_alpha) / math.sqrt(max(1, int(seq_len) * int(hidden)))


def enable_neftune(model: paddle.nn.Layer, noise_alpha: float) -> NEFTuneHandle:
    """Add NEFTune noise to ``model``'s input embeddings in training mode; returns a handle with ``.remove()``."""
    if noise_alpha is None or float(noise_alpha) <= 0:
        raise ConfigError(f"neftune_noise_alpha must be > 0, got {noise_alpha}")
    family_of(model)  # refuses unknown families early
    base = unwrap_model(model)
    embeddings = base.get_input_embeddings()
    if embeddings is None:
        raise ConfigError(f"{type(base).__name__} exposes no input embeddings; NEFTune cannot be applied")
    alpha = float(noise_alpha)

    def hook(layer: paddle.nn.Layer, inputs: Any, output: paddle.Tensor) -> paddle.Tensor:
        if not layer.training:
            return output
        mag = neftune_magnitude(alpha, output.shape[-2], output.shape[-1])
        noise = paddle.uniform(output.shape, dtype=output.dtype, min=-mag, max=mag)
        return output + noise

    return NEFTuneHandle(embeddings.register_forward_post_hook(hook), embeddings, alpha)
