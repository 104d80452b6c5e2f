"""Serving LongCat models: `python -m lcjax.serve`, an OpenAI-compatible server.

- engine: `Engine` / `EngineConfig`, continuous batching over the paged MLA cache (kv_cache),
  with the jitted prefill / decode / MTP speculative steps in runner and sampling in sampling.
- async_engine: `AsyncEngine`, the engine on its own thread for the HTTP layer.
- api: `build_app` (FastAPI), with protocol (request schemas), responses (response bodies and
  SSE chunks), chat_template, metrics (Prometheus) and server (uvicorn, drain on Ctrl-C).
- heavy_thinking: N parallel reasoning traces, then a summary pass.
- cli, loading: the entry point's flags and model sources (training run, HF directory, random).

The names load lazily (PEP 562): importing one submodule (cli) does not import them all.
"""

from lcjax.lazy import lazy_getattr

_LAZY = {
    "Engine": "lcjax.serve.engine",
    "EngineConfig": "lcjax.serve.engine",
    "SamplingParams": "lcjax.serve.sampling",
    "RequestOutput": "lcjax.serve.outputs",
    "AsyncEngine": "lcjax.serve.async_engine",
    "build_app": "lcjax.serve.api",
}
__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = list(_LAZY)
