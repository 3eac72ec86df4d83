"""Thread priorities: the engine and its compute threads below the threads that stream tokens.

The decode keeps every core busy; a woken event loop (or publisher) must not wait behind it for a
scheduler time slice before it sends a token that is already computed. Linux only where noted;
elsewhere the helpers log a warning and change nothing.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("wafer.server")


def lower_priority(nice: int) -> None:
    """Run this thread, and the Numba compute threads it starts (they inherit it), at a lower
    priority than the threads that stream tokens. The decode keeps both cores busy; without this
    a woken event loop can wait a scheduler time slice (measured: ITL spikes of 2-7 ms at p90 with
    one stream) before it sends a token that is already computed."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError as e:
        log.warning("could not set the engine's niceness to %d: %s", nice, e)


def idle_priority() -> None:
    """Run this thread, and the Numba compute threads it starts (they inherit it), under
    SCHED_IDLE: the kernel lets any other woken thread - ours that stream tokens, a client on the
    same machine - preempt them at once, where at a low niceness a woken thread can still wait up
    to a scheduler tick (the p99 spikes of the serving bench). No privilege needed. The decode
    then only gets the cores nothing else wants: for a machine that serves and little else."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        log.info("engine and its compute threads run under SCHED_IDLE")
    except (OSError, AttributeError) as e:  # AttributeError: not Linux
        log.warning("cannot run the engine under SCHED_IDLE (%s); it keeps normal priority", e)


def realtime_threads(tids) -> int:
    """Put threads under SCHED_RR at the lowest real-time priority, so a woken thread takes a core
    from the compute threads at once instead of after up to a scheduler tick (the p99 spikes of
    the serving bench). Threads they start later are normal again (SCHED_RESET_ON_FORK). Needs
    CAP_SYS_NICE or an RLIMIT_RTPRIO of at least 1; returns how many threads were changed."""
    policy = os.SCHED_RR | os.SCHED_RESET_ON_FORK
    done = 0
    for tid in tids:
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(1))
            done += 1
        except ProcessLookupError:  # the thread has ended
            continue
        except OSError as e:
            log.warning("cannot run the streaming threads under SCHED_RR (%s): it needs CAP_SYS_NICE "
                        "or an RLIMIT_RTPRIO of at least 1; they keep normal priority", e)
            break
    return done


def grpc_threads() -> list[int]:
    """gRPC's threads in this process: core's I/O pollers and timers (by the names core gives them)
    and grpc.aio's completion-queue poller, a Python thread running ``_poll_wrapper``."""
    out = [t.native_id for t in threading.enumerate() if "_poll_wrapper" in t.name]
    for tid in os.listdir("/proc/self/task"):
        try:
            name = open(f"/proc/self/task/{tid}/comm").read().strip()
        except OSError:
            continue
        if name.startswith(("event_engine", "grpc")):
            out.append(int(tid))
    return out
