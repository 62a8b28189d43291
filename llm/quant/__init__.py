"""Quantization: low-bit storage, RTN / GPTQ weight-only and A8W8 (Shift, SmoothQuant) post-training flows."""
