"""Serving a causal LM the way LLM clients expect: the OpenAI API over HTTP.

    lmforge/serve/engine.py      concurrent requests batched on the accelerator (transformers'
                                 continuous batching), a seeded lane that reproduces, cancellation
    lmforge/serve/openai_api.py  the API's request bodies, validated, and its response, chunk and error shapes
    lmforge/serve/app.py         the HTTP server: routes, streaming, caps, API key, metrics
    lmforge/serve/models.py      what is served: a registered version (its lineage) or a folder

The top layer of the library: it may import every layer below (tests/test_layers.py); nothing
below imports it. FastAPI, uvicorn and prometheus_client are imported here only.
"""
