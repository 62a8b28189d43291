"""Command-line tools ported from PaddleNLP's ``llm/tools`` (``python -m llm.tools.<name>``)."""
