"""Python clients for `wafer serve` (sync and asyncio): stream tokens, then the final usage.
Depends on the generated protos alone (no engine, no server code).

    from engine.client import Token, WaferClient
    with WaferClient("127.0.0.1:50051") as c:
        for item in c.generate("What is the capital of France?", max_tokens=32, temperature=0):
            if isinstance(item, Token):
                print(item.text, end="", flush=True)
            else:                      # Completion: finish_reason, usage, emulation
                print("\\n", item.usage)

    async with AsyncWaferClient("127.0.0.1:50051") as c:
        async for item in c.generate(messages=[{"role": "user", "content": "Hi"}]):
            ...

Sessions keep the conversation's KV cache on the server between turns::

    with c.session() as s:
        text, done = s.say("My name is Ada.")
        text, done = s.say("What is my name?")    # done.usage["cached_tokens"] > 0

wire.py builds requests and reads responses; sync.py and aio.py hold the two clients.
"""

from engine.client.aio import AsyncSession, AsyncWaferClient
from engine.client.sync import SyncSession, WaferClient
from engine.client.wire import (CHANNEL_OPTIONS, Completion, SessionError, Token, belongs_to_abandoned,
                                chunk_tokens, final_completion, generate_request, sampling)

__all__ = [
    "AsyncSession", "AsyncWaferClient", "CHANNEL_OPTIONS", "Completion", "SessionError", "SyncSession",
    "Token", "WaferClient", "belongs_to_abandoned", "chunk_tokens", "final_completion",
    "generate_request", "sampling",
]
