"""OpenAI-compatible API: request/response models (protocol.py) and the serving logic (serving.py)."""
