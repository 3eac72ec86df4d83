"""Helpers for the scheduler's tests: a scheduler over a tiny synthetic model (no gRPC), driven
step by step through its public API (``apply_commands`` + ``step`` until ``idle``), and the
events it published per request."""

from __future__ import annotations

from engine.model import Model
from engine.sampling import SamplingParams
from engine.scheduler import FinishEvent, Scheduler, SchedulerConfig, TokenEvent, iter_events

_shared = {}


def make(path, kv_blocks=None, clock=None, **cfg):
    """A scheduler over a fresh model with ``kv_blocks``, or over the process's shared model."""
    if kv_blocks is None:
        if path not in _shared:
            _shared[path] = Model.load(path, max_batch=16, block_size=16)
        model = _shared[path]
        assert model.kv.allocator.num_used == 0
        model.kv.allocator.clear_cache()  # no prefix cached by an earlier test
    else:
        model = Model.load(path, max_batch=16, kv_blocks=kv_blocks, block_size=16)
    events = []
    extra = {} if clock is None else {"clock": clock}
    sched = Scheduler(model, SchedulerConfig(max_batch=16, **cfg),
                      publish=lambda items, quiet: events.extend(iter_events(items)), **extra)
    return sched, events


def greedy(n):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def run(sched, max_steps=5000):
    for _ in range(max_steps):
        sched.apply_commands()
        if sched.idle():
            return
        sched.step()
    raise AssertionError("scheduler did not finish")


def outputs(events, reqs):
    out = {id(r): [] for r in reqs}
    finals = {}
    for req, ev in events:
        if id(req) not in out:
            continue
        if isinstance(ev, TokenEvent):
            out[id(req)].append(ev.token_id)
        elif isinstance(ev, FinishEvent):
            finals[id(req)] = ev
    return [out[id(r)] for r in reqs], [finals[id(r)] for r in reqs]
