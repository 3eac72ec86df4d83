"""The model registry: TOML parsing, names and aliases, lifecycle, errors that say what is wrong."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import pytest

from engine.server.registry import Registry, RegistryError, RetiredModel, UnknownModel

TOML = """
default = "small"

[server]
port = 50099
metrics_port = -1

[[models]]
name = "small"
path = "smollm2-135m"
aliases = ["smollm2", "default"]
max_batch = 32
emulate = "wse3:llama-3.1-8b"

[[models]]
name = "small-2024"
path = "smollm2-135m"
status = "deprecated"
sunset = 2099-06-30
successor = "small"

[[models]]
name = "small-2023"
path = "smollm2-135m"
status = "deprecated"
sunset = 2001-01-01
successor = "small"

[[models]]
name = "ancient"
status = "retired"
successor = "small"
"""


@pytest.fixture
def registry(tmp_path):
    f = tmp_path / "registry.toml"
    f.write_text(TOML)
    return Registry.from_toml(f)


def test_toml_registry(registry):
    assert registry.default == "small" and registry.server == {"port": 50099, "metrics_port": -1}
    assert registry.lookup("").name == "small"
    assert registry.lookup("smollm2").name == "small"
    assert registry.lookup("small").max_batch == 32 and registry.lookup("small").emulate == "wse3:llama-3.1-8b"
    assert [e.name for e in registry.served()] == ["small", "small-2024"]


def test_lifecycle(registry):
    old = registry.resolve("small-2024")  # deprecated: still served
    assert old.sunset == "2099-06-30"
    assert dict(old.deprecation_metadata()) == {
        "wafer-deprecated": "true", "wafer-sunset": "2099-06-30", "wafer-successor": "small"}
    assert registry.resolve("small").deprecation_metadata() == ()
    with pytest.raises(RetiredModel, match="use its successor 'small'"):
        registry.resolve("ancient")
    with pytest.raises(RetiredModel, match="since 2001-01-01"):  # past its sunset date
        registry.resolve("small-2023")
    assert registry.lookup("small-2024").effective_status(dt.date(2100, 1, 1)) == "retired"
    # past its sunset a deprecated model is retired: no "deprecated" metadata, the retired one
    assert registry.lookup("small-2023").deprecation_metadata() == ()
    assert dict(registry.lookup("small-2023").retirement_metadata()) == {
        "wafer-retired": "true", "wafer-sunset": "2001-01-01", "wafer-successor": "small"}


def test_unknown_model_lists_known(registry):
    with pytest.raises(UnknownModel) as e:
        registry.resolve("gpt-17")
    assert "gpt-17" in str(e.value) and "small" in str(e.value)


@pytest.mark.parametrize("data, needle", [
    ({"models": []}, "no models"),
    ({"models": [{"path": "x"}]}, "missing name"),
    ({"models": [{"name": "a", "path": "x", "colour": "red"}]}, "unknown keys ['colour']"),
    ({"models": [{"name": "a", "path": "x", "status": "sleepy"}]}, "status='sleepy'"),
    ({"models": [{"name": "a"}]}, "needs a path"),
    ({"models": [{"name": "a", "path": "x"}, {"name": "b", "path": "y", "aliases": ["a"]}]}, "'a' is used by two"),
    ({"models": [{"name": "a", "path": "x", "successor": "zz"}]}, "successor 'zz'"),
    ({"models": [{"name": "a", "path": "x", "status": "deprecated", "sunset": "soon"}]}, "not an ISO date"),
    ({"default": "b", "models": [{"name": "a", "path": "x"}]}, "default='b'"),
    ({"server": {"prot": 5}, "models": [{"name": "a", "path": "x"}]}, "[server]: unknown keys ['prot']"),
    ({"server": {"port": "5"}, "models": [{"name": "a", "path": "x"}]}, "port='5' must be an integer"),
    ({"server": {"port": True}, "models": [{"name": "a", "path": "x"}]}, "port=True must be an integer"),
    ({"server": {"engine_sched_idle": 1}, "models": [{"name": "a", "path": "x"}]}, "engine_sched_idle=1 must be true or false"),
    ({"server": {"grace_s": -5}, "models": [{"name": "a", "path": "x"}]}, "grace_s=-5 must be >= 0"),
    ({"server": {"pace": "fast"}, "models": [{"name": "a", "path": "x"}]}, 'pace=\'fast\' must be "realtime" or "none"'),
    ({"server": {"port": 70000}, "models": [{"name": "a", "path": "x"}]}, "port=70000 must be in [0, 65535]"),
    ({"servr": {"port": 1}, "models": [{"name": "a", "path": "x"}]}, "unknown keys ['servr'] at the top level"),
    ({"server": {"prot": 1}}, "[server]: unknown keys ['prot']"),  # reported before "no models"
    # a model entry's values: types and limits (max_batch=0 crashed the server in its kernels)
    ({"models": [{"name": "a", "path": "x", "max_batch": 0}]}, "max_batch=0 must be in [1, 1024]"),
    ({"models": [{"name": "a", "path": "x", "max_batch": "8"}]}, "max_batch='8' must be an integer"),
    ({"models": [{"name": "a", "path": "x", "max_waiting": -1}]}, "max_waiting=-1 must be >= 0"),
    ({"models": [{"name": "a", "path": "x", "prefill_chunk": 0}]}, "prefill_chunk=0 must be >= 1"),
    ({"models": [{"name": "a", "path": "x", "block_size": 24}]}, "block_size=24 must be a multiple of 16"),
    ({"models": [{"name": "a", "path": "x", "pace": "fast"}]}, "pace='fast' must be"),
    ({"models": [{"name": "a", "path": "x", "numerics": "turbo"}]}, 'numerics=\'turbo\' must be "exact" or "fast"'),
    ({"server": {"numerics": "int4"}, "models": [{"name": "a", "path": "x"}]}, "numerics='int4' must be"),
    ({"models": [{"name": 5, "path": "x"}]}, "models[0]: name=5 must be a string"),
    ({"models": [{"name": " ", "path": "x"}]}, "name=' ' must be a non-empty string"),
    ({"models": [{"name": "a", "path": "x", "aliases": "sm"}]}, "aliases='sm' must be a list"),
    ({"models": [{"name": "a", "path": "x", "status": "deprecated", "sunset": 20270630}]},
     "sunset=20270630 must be a date"),
    ({"models": 3}, "models must be an array of tables"),
    ({"default": 5, "models": [{"name": "a", "path": "x"}]}, "default=5 must be a string"),
    ({"models": [{"name": "a", "path": "x"}, {"name": "b", "status": "retired", "successor": "b"}]},
     "successor 'b' is the model itself"),
])
def test_bad_registries(data, needle):
    with pytest.raises(RegistryError) as e:
        Registry.from_dict(data)
    assert needle in str(e.value)


def test_server_table_takes_numbers_for_seconds(registry):
    r = Registry.from_dict({"server": {"grace_s": 2, "session_idle_timeout_s": 0.5},
                            "models": [{"name": "a", "path": "x"}]})
    assert r.server == {"grace_s": 2, "session_idle_timeout_s": 0.5}


def test_builtin_default():
    r = Registry.builtin()
    assert r.lookup("").name == "smollm2-135m" and r.lookup("smollm2").path == "smollm2-135m"


def test_serve_refuses_a_registry_with_nothing_to_serve(tmp_path):
    """Only retired models (or deprecated ones past their sunset): an error, not a server that
    says it is ready and serves nothing (a subprocess: that server would never return)."""
    f = tmp_path / "registry.toml"
    f.write_text('[[models]]\nname = "old"\npath = "x"\nstatus = "deprecated"\nsunset = 2001-01-01\n'
                 '[[models]]\nname = "older"\nstatus = "retired"\nsuccessor = "old"\n')
    out = subprocess.run([sys.executable, "-m", "engine.cli", "serve", "--config", str(f), "--port", "0",
                          "--metrics-port", "-1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "every model in the registry is retired" in out.stderr and "old, older" in out.stderr


def test_a_retired_default_is_named_at_start():
    r = Registry.from_dict({"default": "old", "models": [
        {"name": "old", "path": "x", "status": "deprecated", "sunset": "2001-01-01", "successor": "new"},
        {"name": "new", "path": "y"}]})
    assert r.default_warning() == ("the default model is retired: requests that name no model are "
                                   "refused (model='old' is retired (since 2001-01-01); use its "
                                   "successor 'new'); set default = <a served model> in the registry")
    served = Registry.from_dict({"default": "new", "models": [
        {"name": "old", "status": "retired"}, {"name": "new", "path": "y"}]})
    assert served.default_warning() is None


def test_serve_names_a_malformed_value(tmp_path, capsys):
    from engine.cli.main import main

    f = tmp_path / "registry.toml"
    f.write_text('[[models]]\nname = "a"\npath = "x"\nmax_batch = 0\n')
    assert main(["serve", "--config", str(f), "--port", "0", "--metrics-port", "-1"]) == 2
    assert "max_batch=0 must be in [1, 1024]" in capsys.readouterr().err


def test_serve_model_flag_keeps_a_known_models_aliases():
    """`wafer serve --model smollm2-135m` answers to the alias the README's examples use."""
    from engine.cli.serve import builtin_entry

    assert builtin_entry("smollm2-135m").aliases == ("smollm2-135m-instruct", "smollm2")
    assert builtin_entry("smollm2").name == "smollm2-135m"
    assert builtin_entry("smollm2-135m-instruct").name == "smollm2-135m"  # as `wafer models pull`
    assert builtin_entry("/models/other.gguf") is None
