"""Backends the frontend language runs programs on: RuntimeEndpoint / Runtime (SGLang's native API over
HTTP) and OpenAI (any OpenAI-compatible endpoint)."""
