"""One `phi3lora serve` per test module: the small tiny model with two adapters, in a uvicorn thread on a free
127.0.0.1 port, stopped (bounded) when the module ends."""
import contextlib
import threading
import time
import urllib.request

import torch

from helpers import free_port, small_tiny, small_tiny_dir
from phi3lora import lora


def make_adapter(path, seed=0, targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), **lora_kw):
    """An adapter for the small tiny model with random, non-zero lora_B (as tests/test_chat.py makes them; an
    Embedding's lora_A too)."""
    model = small_tiny(seed=0)
    config = lora.LoraConfig(r=lora_kw.pop("r", 4), lora_alpha=8, target_modules=list(targets), **lora_kw)
    lora.inject(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "embed_tokens.lora_A" in name:  # an Embedding's A starts at zero too
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    lora.save_adapter(model, path, config)
    return path


@contextlib.contextmanager
def running_server(adapters: list[tuple[str, str]], max_batch=16, max_queue=64, timeout=30.0):
    """Yields (base_url, engine) of a server for small_tiny_dir() named "base" with adapters [(name, dir)]."""
    import uvicorn

    from phi3lora.cli import serve

    argv = ["--model", small_tiny_dir(), "--name", "base", "--device", "cpu", "--max-batch", str(max_batch),
            "--max-queue", str(max_queue)] + [f"--adapter={n}={d}" for n, d in adapters]
    engine, app = serve.build(serve.parse_args(argv))
    engine.start()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline or not thread.is_alive():
                    raise RuntimeError("the test server did not start")
                time.sleep(0.05)
        yield url, engine
    finally:
        server.should_exit = True
        thread.join(timeout)
        engine.close(timeout)
