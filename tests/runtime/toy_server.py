"""A real uvicorn server over the toy model, on a free loopback port, in a thread of the
test process; with the official `openai` client and helpers to read its metrics."""
import re
import socket
import threading
import time

import httpx
import openai
import uvicorn

from kiln.runtime.engine import AsyncEngine, EngineConfig, LLMEngine
from kiln.runtime.engine_process import EngineProcess
from kiln.runtime.server import create_app
from toy import ToyRunner, reference, toy_engine, toy_tokenizer, word_tokens

MODEL = "toy"


class Server:
    def __init__(self, api_key=None, num_blocks=128, limits=None, docs=False, engine_process=False,
                 step_delay=0.0, **cfg):
        """engine_process: the engine in a process of its own (no `runner` here then);
        step_delay: seconds each model step takes."""
        self.tok = toy_tokenizer() if not hasattr(Server, "_tok") else Server._tok
        Server._tok = self.tok
        if engine_process:
            self.runner = None
            self.engine = EngineProcess(toy_engine, num_blocks, 4, 128, cfg, step_delay)
            self.allowed = self.engine.info["allowed"]
        else:
            self.runner = ToyRunner(len(self.tok), word_tokens(self.tok), num_blocks=num_blocks,
                                    block_size=4, max_model_len=128)
            self.runner.delay = step_delay
            self.engine = AsyncEngine(LLMEngine(self.runner, self.tok, EngineConfig(**cfg)))
            self.allowed = self.runner.allowed
        app = create_app(self.engine, MODEL, api_key=api_key, limits=limits, docs=docs)
        # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY on accepted connections only for
        # sockets whose proto says TCP (as uvicorn's own bind does); socket.socket() has proto
        # 0, and Nagle plus delayed ACKs then cost every response 40 ms.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key or "none", max_retries=0)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)   # (its lifespan stops an engine process: up to 2 x 5 s on a loaded machine)
        assert not self.thread.is_alive(), "the server did not shut down in 30 s"

    def expected(self, prompt_ids, n):
        ids = reference(prompt_ids, n, self.allowed)
        return ids, self.tok.decode(ids)

    def chat_ids(self, messages):
        text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tok.encode(text, add_special_tokens=False)

    def metric(self, name):
        text = httpx.get(self.url + "/metrics").text
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def wait_metric(self, name, value, timeout=5.0):
        deadline = time.monotonic() + timeout
        while self.metric(name) != value:
            assert time.monotonic() < deadline, f"{name} stayed at {self.metric(name)}, wanted {value}"
            time.sleep(0.05)
