"""One real server for the API tests: the tiny model (random init, byte tokenizer) behind the
real Engine, AsyncEngine and uvicorn on a free localhost port, built once per session.

Capacity is kept small (2 sequences, 16-token prefill chunks) so the whole
session compiles only a handful of step shapes: XLA:CPU compiles dominate these tests.
"""

import dataclasses

import pytest

MAX_MODEL_LEN = 512


@dataclasses.dataclass
class Served:
    url: str  # http://127.0.0.1:PORT
    base_url: str  # .../v1, for the openai client
    model: str
    engine: object  # the synchronous Engine (read stats only through async_engine)
    async_engine: object
    tokenizer: object
    server: object

    def client(self, **kwargs):
        import openai
        return openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, **kwargs)

    def async_client(self, **kwargs):
        import openai
        return openai.AsyncOpenAI(base_url=self.base_url, api_key="unused", max_retries=0, **kwargs)


@pytest.fixture(scope="session")
def tiny_model():
    """(Config, variables, ByteTokenizer): the tiny preset, randomly initialised once per session."""
    from lcjax.config_io import load_config, resolve_config_path
    from lcjax.serve.loading import random_model

    return random_model(load_config(resolve_config_path("tiny")), seed=0)


@pytest.fixture(scope="session")
def served(tiny_model):
    from lcjax.serve.api import build_app
    from lcjax.serve.async_engine import AsyncEngine
    from lcjax.serve.engine import Engine, EngineConfig
    from lcjax.serve.metrics import ServingMetrics
    from lcjax.serve.server import Server

    config, variables, tokenizer = tiny_model
    engine = Engine(config, variables, tokenizer,
                    EngineConfig(max_num_seqs=2, max_model_len=MAX_MODEL_LEN, page_size=16, prefill_chunk=16))
    name = "tiny-test"
    async_engine = AsyncEngine(engine, ServingMetrics(name))
    app = build_app(async_engine, tokenizer, name, max_model_len=MAX_MODEL_LEN)
    server = Server(app, "127.0.0.1", 0, async_engine=async_engine, model_name=name, drain_timeout=5.0).start()
    yield Served(server.url, server.url + "/v1", name, engine, async_engine, tokenizer, server)
    server.stop()
