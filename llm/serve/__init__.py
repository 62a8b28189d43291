"""Serving: ``flask_server.py`` (PaddleNLP's ``/api/chat`` and an OpenAI-compatible API) over one generation loop."""
