"""Continuous batching over the paged KV cache (nano-vllm style).

One engine thread owns the model and runs :meth:`Scheduler.step` in a loop. Two queues:
``waiting`` (admitted but not yet prefilled, FIFO) and ``running`` (have KV blocks). Each step:

1. apply commands that other threads queued (submit, cancel, session turns/close);
2. drop sequences whose deadline passed;
3. **decode** every running sequence that has a sampled token not yet in the cache, in one batched
   ``model.decode`` call (allocating a block when a sequence crosses a block boundary; when the
   pool is dry the newest running sequence is preempted: its blocks are freed and it is recomputed
   later from its tokens, so no sequence ever writes into another's blocks). A sequence that
   speculates (``speculate``: prompt-lookup drafts) feeds its last token and its drafts as
   consecutive rows of the same call (``model.decode_rows``) and gets its accepted drafts plus
   one token;
4. **prefill** within a token budget: first continue chunked prefills, then admit waiting
   sequences in FIFO order while the batch has room and blocks are free. The budget is small while
   other sequences are decoding (their streams keep flowing) and large when nothing is decoding.
   Only the first prefill of a step is cut to the budget; a later one that does not fit waits for
   the next step, so a short prompt never pays an extra decode step in the middle of its prefill.

Tokens leave through ``publish(items, quiet)`` with a list of ``(request, event)`` pairs, handed
over right before the next model call; a decode step is one ``(None, DecodeStep)`` item for its
whole batch, which :func:`iter_events` expands on the consumer's side; ``quiet`` says that at most
one sequence is decoding. The server turns each list into one hop into its event loop. The
scheduler knows nothing of gRPC.

Everything the engine thread does between two model calls delays every stream (and runs with
caches the step just flushed), so it does only what the next step needs: the sampled ids and the
finish decision, both by the sequence's ``engine.sampling.StreamPolicy`` (the same one the
single-stream ``engine.generate.Generation`` uses). Events carry token ids; the consumer makes the
text (``engine.sampling.StopChecker`` on its side). Only a request with stop strings is
detokenized here too, to know when to stop.

Sessions keep their :class:`Sequence` (tokens + blocks) between turns; a new turn prefills only
the tokens after the longest prefix it shares with what is already in the cache. Across requests
and sessions, automatic prefix caching (``SchedulerConfig.prefix_caching``, on by default) shares
full KV blocks read-only by reference count: a sequence about to prefill takes the cached blocks
its tokens continue into and starts at the first token not cached (``blocks``; the pool's LRU of
released cached blocks is ``engine.kv_cache.BlockAllocator``).

Owning the engine thread: ``scheduler.start()`` starts it, ``scheduler.stop()`` ends the loop
after its current step and joins the thread (or call ``scheduler.run()`` on a thread of your own;
``stop()`` then joins that one). To drive it by hand (tests, benches): ``apply_commands()`` then
``step()`` until ``idle()``.

Modules, each importing only those above it:

- ``config``: SchedulerConfig, the limits and switches
- ``events``: what the engine hands back (TokenEvent, DecodeStep, FinishEvent, ...), finish reasons
- ``sequence``: Request, and the Sequence that carries it (tokens, KV blocks, turn state)
- ``commands``: the typed commands other threads send (Submit, Cancel, ...) and their Inbox
- ``sessions``: Session and the store of open ones; ``blocks``: KV block ownership, whom to
  preempt; ``batch``: the decode batch's rows
- ``speculate``: speculative decoding by prompt lookup: the n-gram proposer, the acceptance
  rule (greedy and rejection sampling), when and how much to speculate
- ``verify``: the decode step's speculative part: plan drafts, verify them in the batch's model
  call, take the accepted tokens (a mixin of ``core``)
- ``core``: the engine thread's model work (decode, prefill, finishing, preemption)
- ``admission``: the estimated queue wait of a new request, refusing it beyond a bound
- ``scheduler``: Scheduler: the step's order, the loop and its thread, commands, the front
"""

from engine.scheduler.admission import Overloaded, WaitEstimate, WaitEstimator
from engine.scheduler.commands import (Cancel, CloseSession, Command, FinishAll, QueueFull,
                                       SchedulerClosed, Submit)
from engine.scheduler.config import SchedulerConfig
from engine.scheduler.core import ATTENTION_COST_FACTOR
from engine.scheduler.events import (FINISH_CANCELLED, FINISH_DEADLINE, FINISH_ERROR,
                                     FINISH_LENGTH, FINISH_SHUTDOWN, FINISH_STOP, DecodeStep,
                                     FinishEvent, SeqStats, SessionExpired, TokenEvent, iter_events)
from engine.scheduler.scheduler import Scheduler
from engine.scheduler.sequence import Request, Sequence, Session

__all__ = [
    "Scheduler", "SchedulerConfig", "Request", "Session", "Sequence",
    "TokenEvent", "DecodeStep", "iter_events", "FinishEvent", "SeqStats", "SessionExpired",
    "QueueFull", "Overloaded", "WaitEstimate", "WaitEstimator", "SchedulerClosed", "Command", "Submit", "Cancel", "CloseSession", "FinishAll",
    "FINISH_STOP", "FINISH_LENGTH", "FINISH_CANCELLED", "FINISH_DEADLINE", "FINISH_SHUTDOWN",
    "FINISH_ERROR", "ATTENTION_COST_FACTOR",
]
