"""deployments/compose.yaml and deployments/Dockerfile, checked without Docker: what can break
silently when settings, commands or the declaration change (a renamed DCMFLOW_* variable is
ignored by pydantic-settings, a misspelt queue is polled by no one, a missing package in the
image only fails on a worker)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from dcmflow.cli import app
from dcmflow.settings import Settings
from deployments.loader import PREFECT_YAML, read_work_queues

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENTS = ROOT / "deployments"
COMPOSE = yaml.safe_load((DEPLOYMENTS / "compose.yaml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
DOCKERFILE = (DEPLOYMENTS / "Dockerfile").read_text()
_INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?::?-(?P<default>[^}]*))?\}")


def _interpolate(value: str) -> str:
    """What Compose makes of a value with no --env-file: each ``${VAR:-default}`` its default."""
    return _INTERPOLATION.sub(lambda m: m["default"] or "", value).replace("$$", "$")


def _ours(name: str) -> bool:
    """A service that runs the dcmflow image."""
    return "build" in SERVICES[name]


def _env(name: str) -> dict[str, str]:
    environment = SERVICES[name].get("environment") or {}
    assert isinstance(environment, dict), f"{name}: environment as a mapping, please"
    return environment


def settings_variables() -> set[str]:
    """Every environment variable :class:`Settings` reads, derived from its fields."""
    prefix = Settings.model_config.get("env_prefix", "")
    names = set()
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names.add(alias.upper() if isinstance(alias, str) else f"{prefix}{field_name}".upper())
    return names


@cache
def prefect_variables() -> set[str]:
    """Every PREFECT_* variable Prefect reads (its own list; prefect is pinned)."""
    from prefect.settings.legacy import _get_valid_setting_names
    from prefect.settings.models.root import Settings as PrefectSettings

    return set(_get_valid_setting_names(PrefectSettings))


def _invocations(name: str) -> Iterator[list[str]]:
    """The commands a service runs (argv lists), also those inside a ``sh -ec`` script."""
    service = SERVICES[name]
    command = service.get("command")
    if command is None:
        return
    entrypoint = service.get("entrypoint")
    if entrypoint and entrypoint[0].endswith("sh"):
        script = command[0].replace("\\\n", " ")
        for line in script.splitlines():
            for part in re.split(r"\|\||&&|\|", line):
                words = shlex.split(_interpolate(part))
                words = [w for w in words if not re.match(r"^\d?>", w) and w != "/dev/null"]
                if words and words[0] == "exec":
                    words = words[1:]
                if words:
                    yield words
    else:
        yield [_interpolate(str(word)) for word in command]


def _option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == flag]


def _workers() -> dict[str, list[str]]:
    """Service name -> argv of its `prefect worker start`."""
    found = {}
    for name in SERVICES:
        for argv in _invocations(name):
            if argv[:3] == ["prefect", "worker", "start"]:
                found[name] = argv
    return found


# --------------------------------------------------------------------------- settings


def test_settings_variables_are_derived_from_the_class() -> None:
    names = settings_variables()
    assert {"DCMFLOW_HOME", "DCMFLOW_DATABASE_URL", "DCMFLOW_S3_ENDPOINT", "DCMFLOW_WORK_POOL", "PREFECT_API_URL"} <= names


@pytest.mark.parametrize("name", [n for n in SERVICES if _ours(n)])
def test_every_dcmflow_variable_is_a_setting_and_its_value_validates(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _env(name)
    unknown = sorted(k for k in env if k.startswith("DCMFLOW_") and k not in settings_variables())
    assert not unknown, f"{name}: not settings of dcmflow.settings.Settings: {unknown}"
    for key, value in env.items():
        assert isinstance(value, str), f"{name}: {key} should be a quoted string, not {value!r}"
        if key.startswith("DCMFLOW_"):
            assert _interpolate(value).strip(), f"{name}: {key} is empty (empty is not unset)"
            monkeypatch.setenv(key, _interpolate(value))
    Settings()  # the values as Compose passes them are valid settings


def test_every_prefect_variable_is_a_prefect_setting() -> None:
    used = {k for n in SERVICES if _ours(n) for k in _env(n) if k.startswith("PREFECT_")}
    used |= set(re.findall(r"\b(PREFECT_\w+)=", DOCKERFILE))
    assert used and not used - prefect_variables(), sorted(used - prefect_variables())


def test_interpolated_dcmflow_names_and_image_defaults_are_settings() -> None:
    """``${DCMFLOW_...}`` knobs of the env file and the image's ENV name real settings too."""
    text = (DEPLOYMENTS / "compose.yaml").read_text()
    knobs = {m["name"] for m in _INTERPOLATION.finditer(text) if m["name"].startswith("DCMFLOW_")}
    knobs |= set(re.findall(r"\b(DCMFLOW_\w+)=", DOCKERFILE))
    assert knobs and not knobs - settings_variables(), sorted(knobs - settings_variables())


def test_every_dcmflow_process_talks_to_the_same_records_objects_and_server() -> None:
    api_port = _option(next(_invocations("prefect-server")), "--port")[0]
    shared = ("DCMFLOW_DATABASE_URL", "DCMFLOW_S3_ENDPOINT", "DCMFLOW_S3_BUCKET", "DCMFLOW_WORK_POOL", "PREFECT_API_URL")
    envs = {n: _env(n) for n in SERVICES if _ours(n) and n != "prefect-server"}
    for key in shared:
        values = {n: env.get(key) for n, env in envs.items()}
        assert len(set(values.values())) == 1 and None not in values.values(), (key, values)
    env = next(iter(envs.values()))
    assert env["PREFECT_API_URL"] == f"http://prefect-server:{api_port}/api"
    host = re.search(r"@([\w-]+):", env["DCMFLOW_DATABASE_URL"])
    assert host and host[1] in SERVICES and env["DCMFLOW_S3_ENDPOINT"].split(":")[0] in SERVICES
    prefect_db = _env("prefect-server")["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://") and prefect_db.rsplit("/", 1)[1] == "prefect"
    assert env["DCMFLOW_DATABASE_URL"].rsplit("/", 1)[1] == _env("postgres")["POSTGRES_DB"] == "dcmflow"
    assert "CREATE DATABASE prefect;" in (DEPLOYMENTS / "postgres-init.sql").read_text()


def test_analytics_are_off_everywhere() -> None:
    assert re.search(r"PREFECT_SERVER_ANALYTICS_ENABLED=false", DOCKERFILE) and re.search(r"DO_NOT_TRACK=1", DOCKERFILE)
    for name in (n for n in SERVICES if _ours(n)):
        assert _env(name).get("PREFECT_SERVER_ANALYTICS_ENABLED") == "false", name
        assert _env(name).get("DO_NOT_TRACK") == "1", name


# --------------------------------------------------------------------------- pool and queues


def _declared_pools() -> set[str]:
    document = yaml.safe_load(PREFECT_YAML.read_text())
    return {str((entry.get("work_pool") or {}).get("name")) for entry in document["deployments"]}


def test_the_pool_is_the_declared_one() -> None:
    (pool,) = _declared_pools()
    receivers = [n for n in SERVICES if _ours(n) and ["dcmflow", "up"] in _invocations(n)]
    assert receivers, "no `dcmflow up` receiver"
    for name in receivers:
        assert _env(name)["DCMFLOW_WORK_POOL"] == pool, name  # registers, runs no flows itself
    workers = _workers()
    assert workers and all(_option(argv, "--pool") == [pool] for argv in workers.values()), workers
    assert all(_option(argv, "--type") == ["process"] for argv in workers.values())


def test_workers_poll_the_declared_queues_or_a_channel_queue() -> None:
    dispatch = pytest.importorskip("tasks.dispatch")
    declared = set(read_work_queues())
    assert declared
    plain, channel = [], []
    for name, argv in _workers().items():
        queues = set(_option(argv, "--work-queue"))
        # without --work-queue a worker polls every queue of the pool, channel queues included
        assert queues, f"{name}: list its queues"
        assert _option(argv, "--limit"), f"{name}: without --limit a worker starts all it fetched at once"
        if queues == declared:
            plain.append(name)
        else:
            assert queues == {dispatch.channel_queue("gpu")}, f"{name}: {queues} are neither {declared} nor a channel's"
            channel.append(name)
            # a worker polling a missing queue gets nothing, silently: the service creates it first
            creates = [a for a in _invocations(name) if a[:3] == ["prefect", "work-queue", "create"]]
            assert [a[3] for a in creates] == sorted(queues) and all(_option(a, "--pool") == _option(argv, "--pool") for a in creates)
    assert plain and channel


def test_workers_poll_fast() -> None:
    for name in _workers():
        assert float(_env(name)["PREFECT_WORKER_QUERY_SECONDS"]) <= 2, name  # Prefect's default: 10 s


# --------------------------------------------------------------------------- commands


def _command_options(argv: list[str]) -> set[str]:
    """The options of the ``dcmflow`` (sub)command that ``argv`` names (``["db", "upgrade"]``)."""
    command: Any = typer.main.get_command(app)
    for word in argv:
        if word.startswith("-"):
            break
        commands = getattr(command, "commands", None)
        assert commands is not None and word in commands, f"`dcmflow {' '.join(argv)}`: no command {word!r}"
        command = commands[word]
    return {"--help", *(opt for param in command.params for opt in param.opts)}


def test_dcmflow_commands_are_real() -> None:
    runner = CliRunner()
    seen = 0
    for name in SERVICES:
        for argv in _invocations(name):
            if argv[0] != "dcmflow":
                continue
            seen += 1
            result = runner.invoke(app, [*argv[1:], "--help"])
            assert result.exit_code == 0, f"{name}: `{shlex.join(argv)} --help`: {result.output}"
            options = _command_options(argv[1:])
            assert not {w for w in argv[1:] if w.startswith("-")} - options, f"{name}: {argv}"
    for name, service in SERVICES.items():  # the healthcheck commands too
        test = (service.get("healthcheck") or {}).get("test") or []
        if test[1:2] == ["dcmflow"]:
            seen += 1
            assert runner.invoke(app, [*test[2:], "--help"]).exit_code == 0, name
    assert seen >= 3


@cache
def _prefect_help(words: tuple[str, ...]) -> str:
    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PATH": "/usr/bin:/bin", "HOME": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "prefect", *words, "--help"], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, f"`prefect {' '.join(words)}`: {done.stderr or done.stdout}"
    return done.stdout


def test_prefect_commands_and_options_are_real() -> None:
    seen = 0
    for name in SERVICES:
        for argv in _invocations(name):
            if argv[0] != "prefect":
                continue
            seen += 1
            words = tuple(w for w in argv[1:3])
            text = _prefect_help(words)
            for flag in (w for w in argv[3:] if w.startswith("--")):
                assert re.search(rf"(^|\s){re.escape(flag)}(\s|$)", text, re.M), f"{name}: `prefect {' '.join(words)}` has no {flag}"
    assert seen >= 4


# --------------------------------------------------------------------------- wiring


def test_depends_on_names_services_with_what_the_condition_needs() -> None:
    for name, service in SERVICES.items():
        for target, spec in (service.get("depends_on") or {}).items():
            assert target in SERVICES, f"{name} depends on unknown {target}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in SERVICES[target], f"{name}: {target} has no healthcheck"
            elif condition == "service_completed_successfully":
                assert SERVICES[target].get("restart") == "no", f"{name}: {target} is not a one-shot"
            else:
                assert condition == "service_started"
            # a service that is always started must not wait for one that only a profile starts
            if not service.get("profiles"):
                assert not SERVICES[target].get("profiles"), f"{name} waits for {target}, started only by a profile"


def test_long_running_services_have_healthchecks_and_restart() -> None:
    for name, service in SERVICES.items():
        if service.get("restart") == "no" or "tools" in (service.get("profiles") or []):
            continue
        assert service.get("restart") == "unless-stopped", name
        assert service.get("healthcheck", {}).get("test"), name


def test_volumes_and_mounts_exist_and_no_two_receivers_share_a_spool() -> None:
    declared = set(COMPOSE["volumes"])
    used: dict[str, list[str]] = {}
    for name, service in SERVICES.items():
        for mount in service.get("volumes") or []:
            source, target = mount.split(":")[:2]
            if source.startswith("."):
                assert (DEPLOYMENTS / source).exists(), f"{name}: {source} is missing"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                used.setdefault(source, []).append(name)
                if target == "/var/lib/dcmflow" and any(["dcmflow", "up"] == a for a in _invocations(name)):
                    assert "/var/lib/dcmflow/run" in service.get("tmpfs", []), f"{name}: run/up.json outlives the container"
    receivers = [n for n in SERVICES if ["dcmflow", "up"] in _invocations(n)]
    homes = [v for n in receivers for v in (SERVICES[n].get("volumes") or []) if v.endswith(":/var/lib/dcmflow")]
    assert len(homes) == len(set(homes)) == len(receivers), homes
    assert declared == set(used), f"declared but unused: {declared - set(used)}"


def test_the_image_builds_from_this_repository() -> None:
    for name in (n for n in SERVICES if _ours(n)):
        build = SERVICES[name]["build"]
        context = (DEPLOYMENTS / build["context"]).resolve()
        assert context == ROOT and (context / build["dockerfile"]).read_text() == DOCKERFILE
    assert re.search(r"^FROM python:3\.11-slim$", DOCKERFILE, re.M)
    assert re.search(r"pip install -c \S*constraints\.txt ", DOCKERFILE)
    copied = {Path(src).name for line in re.findall(r"^COPY (.+)$", DOCKERFILE, re.M) for src in line.split()[:-1]}
    for src in copied:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    missing = packages - copied
    assert not missing, f"packages pyproject installs that the image does not copy: {missing}"
    assert {"pyproject.toml", project["project"]["readme"], "constraints.txt"} <= copied
