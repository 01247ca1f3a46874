"""A real OpenAI HTTP server (router.http) on loopback over a scripted flow and the real front
door: what the HTTP unit tests drive with the official `openai` client."""

from __future__ import annotations

from typing import Any

import openai

from pdserve.config import PdserveConfig
from pdserve.messages import ModelInfo
from pdserve.metrics import RouterMetrics
from router.auth import load_public_security
from router.front_door import FrontDoor
from router.http import HttpServer
from router.wait_queue import router_queue
from tests.factories.fake_flow import ScriptedFlow, router_tokenizer

MODEL = "tiny-chat"


class Api:
    """A running HTTP server over a scripted flow, and clients for it."""

    def __init__(
        self,
        server: HttpServer,
        port: int,
        flow: ScriptedFlow,
        door: FrontDoor,
        metrics: RouterMetrics,
    ) -> None:
        self.server = server
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.flow = flow
        self.door = door
        self.metrics = metrics

    def client(self, api_key: str = "unused") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0)


async def start_api(config: PdserveConfig, serving: bool = True, **flow_options: Any) -> Api:
    tokenizer = router_tokenizer()
    flow_options.setdefault("wait_queue", router_queue(config))
    flow = ScriptedFlow(tokenizer, **flow_options)
    metrics = RouterMetrics()
    door = FrontDoor(config, tokenizer, flow, metrics)  # type: ignore[arg-type]
    info = ModelInfo("tiny", "float32", "llama", 400, 256, [0], "", "fp")
    server = HttpServer(
        config, door, load_public_security(config.security), info, metrics,
        is_serving=lambda: serving, version="9.9.9",
    )
    port = await server.start("127.0.0.1", 0)
    return Api(server, port, flow, door, metrics)
