"""The model registry: which models the server offers, under which names, and their lifecycle.

Read from a TOML file (``wafer serve --config registry.toml``) or the built-in default, which
serves smollm2-135m. Example::

    default = "smollm2-135m"          # model used when a request names none

    [server]                           # optional; command-line flags win
    port = 50051
    metrics_port = 9400
    session_idle_timeout_s = 300
    grace_s = 10
    engine_nice = 5                    # niceness of the compute threads
    engine_sched_idle = false          # compute threads under SCHED_IDLE instead (see README)
    realtime_streaming = false         # streaming threads under SCHED_RR (needs CAP_SYS_NICE)
    prefix_caching = true              # false: off for every model (wafer serve --no-prefix-caching)
    speculate = 0                      # default num_speculative_tokens (prompt lookup; 0 = off)
    numerics = "exact"                 # models that name none: "exact" | "fast" (wafer serve --numerics)

    [[models]]
    name = "smollm2-135m"
    path = "smollm2-135m"              # a known model name or a .gguf path
    aliases = ["smollm2", "default"]
    max_batch = 64                     # engine limits (optional)
    max_waiting = 256
    max_queue_ms = 2000                # refuse (RESOURCE_EXHAUSTED) a request whose estimated
                                       # queue wait exceeds this (optional; default: no bound)
    prefix_caching = true              # share cached KV of equal prompt prefixes (default true)
    numerics = "fast"                  # int8 activations for this model (default: [server]'s)
    emulate = "wse3:llama-3.1-8b"      # optional: stamp/pace tokens on a simulated wafer
    pace = "realtime"                  # or "none" (only stamp); default: wafer serve --pace

    [[models]]
    name = "smollm2-135m-2024"
    path = "smollm2-135m"
    status = "deprecated"              # still served; responses carry deprecation metadata
    sunset = "2027-06-30"              # after this date it is treated as retired
    successor = "smollm2-135m"

    [[models]]
    name = "gpt-2"
    status = "retired"                 # refused with FAILED_PRECONDITION naming the successor
    successor = "smollm2-135m"

Entries with the same ``path`` and engine settings share one loaded model.
"""

from __future__ import annotations

import datetime as _dt
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import NUMERICS
from engine.fetch import known_model
from engine.server.emulation import PACES

ACTIVE, DEPRECATED, RETIRED = "active", "deprecated", "retired"
STATUSES = (ACTIVE, DEPRECATED, RETIRED)
DEFAULT_MODEL = "smollm2-135m"
NAME_ECHO_CHARS = 64  # of a client's unknown model name quoted back in an error


class RegistryError(ValueError):
    """A malformed registry file."""


class UnknownModel(KeyError):
    def __init__(self, name: str, known: list[str]):
        super().__init__(name)
        self.name = name
        self.known = known

    def __str__(self) -> str:
        name = self.name if len(self.name) <= NAME_ECHO_CHARS else self.name[:NAME_ECHO_CHARS] + "..."
        return f"model={name!r} is not served here; known models: {', '.join(self.known)}"


class RetiredModel(Exception):
    def __init__(self, entry: "ModelEntry"):
        self.entry = entry

    def __str__(self) -> str:
        e = self.entry
        msg = f"model={e.name!r} is retired"
        if e.sunset:
            msg += f" (since {e.sunset})"
        if e.successor:
            msg += f"; use its successor {e.successor!r}"
        return msg


@dataclass
class ModelEntry:
    name: str
    path: str = ""                      # known model name or .gguf path; may be empty if retired
    aliases: tuple[str, ...] = ()
    status: str = ACTIVE
    sunset: str = ""                    # ISO date
    successor: str = ""
    emulate: str = ""                   # "wse3:llama-3.1-8b"
    pace: str = ""                      # "realtime" | "none"; "" = the server's --pace
    max_batch: int = 64
    max_waiting: int = 256
    kv_blocks: int | None = None
    block_size: int = 16
    prefill_chunk: int = 64
    numerics: str = ""                  # "exact" | "fast"; "" = the server's --numerics
    max_queue_ms: float | None = None   # admission by estimated queue wait; None = no bound
    prefix_caching: bool = True         # `wafer serve --no-prefix-caching` turns it off for all

    def engine_key(self) -> tuple:
        """Entries with equal keys share one loaded model and scheduler."""
        return (self.path, self.max_batch, self.max_waiting, self.kv_blocks, self.block_size,
                self.prefill_chunk, self.numerics, self.max_queue_ms, self.prefix_caching)

    def effective_status(self, today: _dt.date | None = None) -> str:
        if self.status == DEPRECATED and self.sunset:
            today = today or _dt.date.today()
            if _dt.date.fromisoformat(self.sunset) <= today:
                return RETIRED
        return self.status

    def deprecation_metadata(self) -> tuple[tuple[str, str], ...]:
        """Trailing metadata carried by every response of a deprecated model (one past its
        sunset is retired, and refused with ``retirement_metadata``)."""
        return self._lifecycle_metadata("wafer-deprecated") if self.effective_status() == DEPRECATED else ()

    def retirement_metadata(self) -> tuple[tuple[str, str], ...]:
        """Trailing metadata of the FAILED_PRECONDITION refusing a retired model."""
        return self._lifecycle_metadata("wafer-retired")

    def _lifecycle_metadata(self, flag: str) -> tuple[tuple[str, str], ...]:
        md = [(flag, "true")]
        if self.sunset:
            md.append(("wafer-sunset", self.sunset))
        if self.successor:
            md.append(("wafer-successor", self.successor))
        return tuple(md)


# a [[models]] entry: key -> the types its value may have, and the limits of the numbers (a
# max_batch of 0 reached the kernels and crashed the process; a string alias was split into letters)
ENTRY_KEYS: dict[str, tuple[type, ...]] = {
    "name": (str,), "path": (str,), "aliases": (list,), "status": (str,),
    "sunset": (str, _dt.date), "successor": (str,), "emulate": (str,), "pace": (str,),
    "max_batch": (int,), "max_waiting": (int,), "kv_blocks": (int,), "block_size": (int,),
    "prefill_chunk": (int,), "numerics": (str,), "max_queue_ms": (int, float), "prefix_caching": (bool,),
}
_NUMERICS = (lambda v: v in NUMERICS, " or ".join(f'"{n}"' for n in NUMERICS))
_PACE = (lambda v: v in PACES, " or ".join(f'"{p}"' for p in PACES))
ENTRY_LIMITS = {  # key -> (check, what it must be)
    "name": (lambda v: v.strip() != "", "a non-empty string"),
    "aliases": (lambda v: all(isinstance(a, str) and a.strip() for a in v), "a list of non-empty strings"),
    "status": (lambda v: v in STATUSES, f"one of {', '.join(STATUSES)}"),
    "pace": _PACE,
    "max_batch": (lambda v: 1 <= v <= 1024, "in [1, 1024]"),
    "max_waiting": (lambda v: v >= 0, ">= 0"),
    "kv_blocks": (lambda v: v >= 1, ">= 1"),
    "block_size": (lambda v: v >= 16 and v % 16 == 0, "a multiple of 16"),
    "prefill_chunk": (lambda v: v >= 1, ">= 1"),
    "numerics": _NUMERICS,
    "max_queue_ms": (lambda v: v > 0 and v < float("inf"), "> 0 (ms; leave it out for no bound)"),
}
_KINDS = {(str,): "a string", (int,): "an integer", (int, float): "a number", (bool,): "true or false",
          (list,): "a list", (str, _dt.date): "a date (2027-06-30)"}
# the [server] table: key -> the types its value may have (command-line flags win over these)
SERVER_KEYS: dict[str, tuple[type, ...]] = {
    "host": (str,), "port": (int,), "metrics_port": (int,), "grace_s": (int, float),
    "session_idle_timeout_s": (int, float), "emulate": (str,), "pace": (str,), "threads": (int,),
    "engine_nice": (int,), "engine_sched_idle": (bool,), "realtime_streaming": (bool,),
    "numerics": (str,),
    "prefix_caching": (bool,),
    "speculate": (int,),
}
SERVER_LIMITS = {  # key -> (check, what it must be)
    "port": (lambda v: 0 <= v <= 65535, "in [0, 65535] (0 = any free port)"),
    "metrics_port": (lambda v: -1 <= v <= 65535, "in [-1, 65535] (-1 = off, 0 = any free port)"),
    "grace_s": (lambda v: v >= 0, ">= 0"),
    "session_idle_timeout_s": (lambda v: v > 0, "> 0"),
    "threads": (lambda v: v >= 1, ">= 1"),
    "engine_nice": (lambda v: 0 <= v <= 19, "in [0, 19]"),
    "speculate": (lambda v: 0 <= v <= 16, "in [0, 16] (0 = off)"),
    "pace": _PACE,
    "numerics": _NUMERICS,
}
TOP_LEVEL_KEYS = ("default", "server", "models")


def _check_server_table(server: dict[str, Any]) -> dict[str, Any]:
    unknown = set(server) - set(SERVER_KEYS)
    if unknown:
        raise RegistryError(f"[server]: unknown keys {sorted(unknown)}; known: {', '.join(SERVER_KEYS)}")
    _check_values("[server]", server, SERVER_KEYS, SERVER_LIMITS)
    return dict(server)


def _check_values(where: str, table: dict[str, Any], keys: dict, limits: dict) -> None:
    """Each value of the (known) keys of a table has its type and is within its limits."""
    for key, value in table.items():
        types = keys[key]
        if isinstance(value, bool) != (bool in types) or not isinstance(value, types):
            raise RegistryError(f"{where}: {key}={value!r} must be {_KINDS[types]}")
        check = limits.get(key)
        if check is not None and not check[0](value):
            raise RegistryError(f"{where}: {key}={value!r} must be {check[1]}")


@dataclass
class Registry:
    entries: list[ModelEntry]
    default: str = ""               # "" = the first entry
    server: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.default and self.entries:
            self.default = self.entries[0].name
        self._by_name: dict[str, ModelEntry] = {}
        for e in self.entries:
            if e.status not in STATUSES:
                raise RegistryError(f"model {e.name!r}: status={e.status!r}; expected one of {STATUSES}")
            if e.status != RETIRED and not e.path:
                raise RegistryError(f"model {e.name!r}: a {e.status} model needs a path")
            if e.sunset:
                try:
                    _dt.date.fromisoformat(e.sunset)
                except ValueError:
                    raise RegistryError(f"model {e.name!r}: sunset={e.sunset!r} is not an ISO date") from None
            for n in (e.name, *e.aliases):
                if n in self._by_name:
                    raise RegistryError(f"name {n!r} is used by two models")
                self._by_name[n] = e
        for e in self.entries:
            if e.successor and e.successor not in self._by_name:
                raise RegistryError(f"model {e.name!r}: successor {e.successor!r} is not in the registry")
            if e.successor and self._by_name[e.successor] is e:
                raise RegistryError(f"model {e.name!r}: successor {e.successor!r} is the model itself")
        if self.entries and self.default not in self._by_name:
            raise RegistryError(f"default={self.default!r} is not in the registry")

    # ------------------------------------------------------------------ construction

    @classmethod
    def builtin(cls) -> "Registry":
        aliases = known_model(DEFAULT_MODEL).aliases  # the names `wafer models pull` knows it by
        return cls([ModelEntry(name=DEFAULT_MODEL, path=DEFAULT_MODEL, aliases=aliases)])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Registry":
        unknown = set(data) - set(TOP_LEVEL_KEYS)
        if unknown:
            raise RegistryError(f"unknown keys {sorted(unknown)} at the top level; known: "
                                f"{', '.join(TOP_LEVEL_KEYS)}")
        server = _check_server_table(data.get("server", {}))
        entries = []
        models = data.get("models", [])
        if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
            raise RegistryError("models must be an array of tables ([[models]] sections)")
        if not isinstance(data.get("default", ""), str):
            raise RegistryError(f"default={data['default']!r} must be a string (a model's name)")
        for i, raw in enumerate(models):
            unknown = set(raw) - set(ENTRY_KEYS)
            if unknown:
                raise RegistryError(f"models[{i}]: unknown keys {sorted(unknown)}; known: {', '.join(ENTRY_KEYS)}")
            if "name" not in raw:
                raise RegistryError(f"models[{i}]: missing name")
            _check_values(f"models[{i}] ({raw['name']!r})" if isinstance(raw["name"], str) else f"models[{i}]",
                          raw, ENTRY_KEYS, ENTRY_LIMITS)
            raw = dict(raw)
            raw["aliases"] = tuple(raw.get("aliases", ()))
            if isinstance(raw.get("sunset"), _dt.date):  # TOML dates parse as date objects
                raw["sunset"] = raw["sunset"].isoformat()
            entries.append(ModelEntry(**raw))
        if not entries:
            raise RegistryError("the registry lists no models")
        default = data.get("default", entries[0].name)
        return cls(entries, default, server)

    @classmethod
    def from_toml(cls, path: str | Path) -> "Registry":
        with open(path, "rb") as f:
            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise RegistryError(f"{path}: {e}") from None
        return cls.from_dict(data)

    # ------------------------------------------------------------------ lookup

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def lookup(self, name: str) -> ModelEntry:
        """The entry for a name or alias ('' = default); UnknownModel if none. Retired included."""
        e = self._by_name.get(name or self.default)
        if e is None:
            raise UnknownModel(name, self.names())
        return e

    def resolve(self, name: str) -> ModelEntry:
        """Like lookup, but a retired model (or a deprecated one past its sunset) raises RetiredModel."""
        e = self.lookup(name)
        if e.effective_status() == RETIRED:
            raise RetiredModel(e)
        return e

    def served(self) -> list[ModelEntry]:
        return [e for e in self.entries if e.effective_status() != RETIRED]

    def default_warning(self) -> str | None:
        """Why requests naming no model will be refused, if the default is retired (an operator
        may have meant its successor); None if the default is served."""
        e = self.lookup("")
        if e.effective_status() != RETIRED:
            return None
        return (f"the default model is retired: requests that name no model are refused "
                f"({RetiredModel(e)}); set default = <a served model> in the registry")
