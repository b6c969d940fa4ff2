"""compose.yaml and the Dockerfile agree with the code: real commands, real settings.

Docker cannot run here, so these tests check what can go wrong without it: a service
that runs a command the CLI does not have, a ``SIJNODE_*`` variable that names no setting
(a typo is otherwise ignored), a volume that is not declared, a published port that the
settings do not listen on, and health checks that do not probe what they claim.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from sijnode import cli
from sijnode.settings import Settings, key_for_env_var, load_settings, unknown_env_vars
from tests.test_cli import command_tree, is_group

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
#: Services that run the sijnode image (built from this repository).
SIJNODE_SERVICES = sorted(name for name, svc in SERVICES.items() if "build" in svc)


# --------------------------------------------------------------------------------------
# Helpers: compose interpolation, environments, the Dockerfile
# --------------------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` gives the default, ``${VAR:?error}`` a stand-in
    secret (the variable is required from the operator); ``$$`` is a literal ``$``."""

    def sub(m: re.Match[str]) -> str:
        op, arg = m.group(2), m.group(3)
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            return f"stand-in-{m.group(1).lower()}"
        pytest.fail(f"${{{m.group(1)}}} has no default and is not marked required (:?)")

    return _INTERPOLATION.sub(sub, value.replace("$$", "\0")).replace("\0", "$")


def service_environment(name: str) -> dict[str, str]:
    """A service's environment as the container sees it (image ENV, then compose's)."""
    raw = SERVICES[name].get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    env = dict(dockerfile_env()) if name in SIJNODE_SERVICES else {}
    env.update({k: interpolate(str(v)) for k, v in raw.items()})
    return env


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    out = []
    for line in lines:
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile(instruction: str) -> list[str]:
    return [rest for word, rest in dockerfile_instructions() if word == instruction]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in dockerfile("ENV"):
        for item in shlex.split(rest):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def settings_for(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Load the settings exactly as a process with this environment would."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return load_settings()


def resolve_command(argv: list[str]) -> tuple[str, ...]:
    """The CLI command that ``argv`` runs, parsed by the real app (options included)."""
    assert argv[0] == "sijnode", f"{argv} does not run sijnode"
    result = CliRunner().invoke(cli.app, [*argv[1:], "--help"], terminal_width=200)
    assert result.exit_code == 0, f"`{shlex.join(argv)}` does not parse:\n{result.output}"
    usage = re.search(r"Usage: sijnode((?: [a-z][\w-]*)*)", result.output)
    assert usage is not None, result.output
    path = tuple(usage.group(1).split())
    tree = command_tree()
    assert path in tree and not is_group(tree[path]), f"`{shlex.join(argv)}` is not a command"
    return path


def volume_mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) for each volume of a service (short or long syntax)."""
    mounts = []
    for item in service.get("volumes", []):
        if isinstance(item, str):
            parts = item.split(":")
            mounts.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
        else:
            mounts.append((item.get("source", ""), item["target"], bool(item.get("read_only"))))
    return mounts


def healthcheck_argv(test: list[str] | str) -> list[str]:
    if isinstance(test, str):
        return ["sh", "-c", test]
    if test[0] == "CMD":
        return list(test[1:])
    assert test[0] == "CMD-SHELL", test
    return ["sh", "-c", test[1]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------
# Services and commands
# --------------------------------------------------------------------------------------


def test_services() -> None:
    assert {"redis", "postgres", "node", "worker"} <= set(SERVICES)
    assert SERVICES["redis"]["image"].startswith("redis:7")
    assert SERVICES["postgres"]["image"].startswith("postgres:16")
    assert {"node", "worker"} <= set(SIJNODE_SERVICES)
    images = {SERVICES[name].get("image") for name in SIJNODE_SERVICES}
    assert len(images) == 1, f"the sijnode services build different images: {images}"


@pytest.mark.parametrize("name", SIJNODE_SERVICES)
def test_service_command_is_a_real_command(name: str) -> None:
    command = SERVICES[name]["command"]
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    path = resolve_command(argv)
    expected = {"node": ("serve",), "worker": ("worker",)}
    if name in expected:
        assert path == expected[name]


def test_dockerfile_cmd_is_a_real_command() -> None:
    (cmd,) = dockerfile("CMD")
    argv = json.loads(cmd)
    assert argv == ["sijnode", "serve"]
    assert resolve_command(argv) == ("serve",)


def test_worker_reads_the_queue_the_node_sends_to(monkeypatch: pytest.MonkeyPatch) -> None:
    from sijnode.workers.queue import pipeline_queue, worker_queues

    argv = list(SERVICES["worker"]["command"])
    names = argv[argv.index("--queues") + 1] if "--queues" in argv else ""
    node = settings_for(service_environment("node"), monkeypatch)
    worker = settings_for(service_environment("worker"), monkeypatch)
    assert node.broker.url and node.broker.url == worker.broker.url
    queues = worker_queues(worker, names)
    assert node.broker.queue in queues
    for pipeline in node.pipelines:  # each pipeline's jobs go to a queue the worker reads
        assert pipeline_queue(node, pipeline) in queues, pipeline


# --------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SIJNODE_SERVICES)
def test_environment_names_real_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = service_environment(name)
    sijnode_vars = [k for k in env if k.upper().startswith("SIJNODE_")]
    assert sijnode_vars
    for var in sijnode_vars:
        assert key_for_env_var(var) is not None, f"{name}: {var} names no setting"
    assert unknown_env_vars(env) == []
    settings = settings_for(env, monkeypatch)  # raises ConfigurationError if invalid
    assert settings.broker.url.startswith("redis://")
    assert settings.database.url.startswith("postgresql+psycopg://")
    assert settings.database.pseudonym_secret != "change-me"


def test_dockerfile_environment_names_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {k: v for k, v in dockerfile_env().items() if k.startswith("SIJNODE_")}
    for var in env:
        assert key_for_env_var(var) is not None, f"Dockerfile: {var} names no setting"
    settings = settings_for(env, monkeypatch)
    assert str(settings.storage.spool_dir).startswith(str(settings.data_dir))
    assert settings.metrics.bind_address == "0.0.0.0"  # reachable through the published port


def test_services_reach_the_database_and_broker_services(monkeypatch: pytest.MonkeyPatch) -> None:
    postgres = SERVICES["postgres"]["environment"]
    for name in SIJNODE_SERVICES:
        settings = settings_for(service_environment(name), monkeypatch)
        url = make_url(settings.database.url)
        assert url.host == "postgres" and url.port in (None, 5432)
        assert url.username == postgres["POSTGRES_USER"]
        assert url.database == postgres["POSTGRES_DB"]
        assert url.password == interpolate(postgres["POSTGRES_PASSWORD"])
        assert re.match(r"^redis://redis(:6379)?/\d+$", settings.broker.url)


def test_node_publishes_the_ports_it_listens_on(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_for(service_environment("node"), monkeypatch)
    published = {}
    for item in SERVICES["node"]["ports"]:
        host, _, container = str(item).rpartition(":")
        published[int(container)] = host
    assert settings.node.port in published
    assert settings.metrics.port in published
    assert settings.node.bind_address == "0.0.0.0"
    assert settings.metrics.bind_address == "0.0.0.0"
    assert (settings.node.port, settings.metrics.port) == (11112, 9108)


# --------------------------------------------------------------------------------------
# Volumes
# --------------------------------------------------------------------------------------


def test_volumes_are_declared() -> None:
    declared = set(COMPOSE.get("volumes") or {})
    assert {"spool", "models", "pgdata"} <= declared
    used = set()
    for name, service in SERVICES.items():
        for source, _target, _ro in volume_mounts(service):
            if source and not source.startswith((".", "/", "~")):
                assert source in declared, f"{name} mounts undeclared volume {source!r}"
                used.add(source)
    assert declared == used, f"declared but unused: {declared - used}"
    assert ("pgdata", "/var/lib/postgresql/data", False) in volume_mounts(SERVICES["postgres"])
    assert ("redisdata", "/data", False) in volume_mounts(SERVICES["redis"])


def _duration_seconds(value: str) -> float:
    """A compose duration (``1m30s``, ``60s``, ``500ms``) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"bad duration {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def test_node_gets_the_time_to_stop_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Docker kills after stop_grace_period: it must cover the node's own grace period
    and the answer to the instance in flight (node.stop_grace_seconds, dimse_timeout)."""
    settings = settings_for(service_environment("node"), monkeypatch)
    grace = _duration_seconds(SERVICES["node"]["stop_grace_period"])
    needed = settings.node.stop_grace_seconds + max(10.0, settings.node.dimse_timeout)
    assert grace >= needed + 5, f"stop_grace_period {grace} s < {needed} s + margin"
    assert SERVICES["node"].get("stop_signal", "SIGTERM") == "SIGTERM"
    assert "STOPSIGNAL" not in {word for word, _ in dockerfile_instructions()}


def _redis_argv() -> list[str]:
    command = SERVICES["redis"]["command"]
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    assert argv[0] == "redis-server", argv
    return argv


def test_redis_is_persistent() -> None:
    argv = _redis_argv()
    options = dict(zip(argv[1::2], argv[2::2], strict=True))
    assert options.get("--appendonly") == "yes", "Redis must keep queued jobs across restarts"
    assert options.get("--appendfsync") in ("everysec", "always")


def test_redis_command_keeps_a_queued_message_through_a_kill(tmp_path: Path) -> None:
    """The compose command itself, run with a real redis-server: a message pushed more
    than a second before ``kill -9`` is there after the restart (AOF, everysec)."""
    import redis

    from tests.conftest import require_tool

    port = free_port()
    argv = [require_tool("redis-server"), *_redis_argv()[1:]]
    argv += ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)]

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis(port=port, socket_connect_timeout=1)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                assert proc.poll() is None, "redis-server exited"
                time.sleep(0.05)
        client.close()
        return proc

    proc = start()
    try:
        client = redis.Redis(port=port)
        client.lpush("sijnode.jobs", b'{"job_id": 1}')
        client.close()
        time.sleep(2.5)  # appendfsync everysec
    finally:
        proc.kill()
        proc.wait(10)
    proc = start()
    try:
        client = redis.Redis(port=port)
        assert client.lrange("sijnode.jobs", 0, -1) == [b'{"job_id": 1}']
        client.close()
    finally:
        proc.kill()
        proc.wait(10)


def test_node_and_worker_share_the_spool_and_models(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("node", "worker"):
        settings = settings_for(service_environment(name), monkeypatch)
        mounts = {target: (source, ro) for source, target, ro in volume_mounts(SERVICES[name])}
        spool = str(settings.storage.spool_dir)
        assert mounts.get(spool) == ("spool", False), f"{name}: spool not at {spool}"
        assert ("models", True) in mounts.values(), f"{name}: no read-only models volume"
        for sub in ("results", "outputs"):  # the worker writes, the node's deliveries read
            target = str(settings.data_dir / sub)
            assert mounts.get(target) == (sub, False), f"{name}: {sub} not at {target}"
        models_dir = next(t for t, (s, _) in mounts.items() if s == "models")
        for pipeline_name, pipeline in settings.pipelines.items():
            for model in (pipeline.model, pipeline.localizer):
                if model is not None and "/" in model:
                    assert model.startswith(f"{models_dir}/"), pipeline_name


# --------------------------------------------------------------------------------------
# GPU and health checks
# --------------------------------------------------------------------------------------


def test_worker_reserves_an_nvidia_gpu() -> None:
    devices = SERVICES["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices
    ), devices


def test_health_checks() -> None:
    for name, service in SERVICES.items():
        waits = [
            cond["condition"]
            for other in SERVICES.values()
            for dep, cond in (other.get("depends_on") or {}).items()
            if dep == name
        ]
        if service.get("restart") == "no":
            assert waits and set(waits) == {"service_completed_successfully"}, name
            continue
        check = service.get("healthcheck")
        assert check and not check.get("disable") and check.get("test"), f"{name}: no health check"
    for name, service in SERVICES.items():
        for dep, cond in (service.get("depends_on") or {}).items():
            if cond["condition"] == "service_healthy":
                assert SERVICES[dep].get("healthcheck"), f"{name} waits for {dep}'s health"
    assert {"postgres", "redis", "migrate"} <= set(SERVICES["node"]["depends_on"])
    assert "pg_isready" in SERVICES["postgres"]["healthcheck"]["test"]
    assert "redis-cli" in SERVICES["redis"]["healthcheck"]["test"]


def _probe(argv: list[str], env: dict[str, str]) -> int:
    argv = [sys.executable if a == "python" else a for a in argv]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SIJNODE_")}
    return subprocess.run(argv, env={**clean, **env}, timeout=30, check=False).returncode


@pytest.mark.parametrize("where", ["compose", "Dockerfile"])
def test_node_health_check_probes_the_dicom_port(where: str) -> None:
    """The probe passes while the DICOM port accepts connections, and fails when not."""
    if where == "compose":
        argv = healthcheck_argv(SERVICES["node"]["healthcheck"]["test"])
    else:
        (check,) = dockerfile("HEALTHCHECK")
        argv = json.loads(check[check.index("CMD ") + 4 :])
    port = free_port()
    env = {**service_environment("node"), "SIJNODE_NODE__PORT": str(port)}
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        assert _probe(argv, env) == 0
    assert _probe(argv, env) != 0


def test_worker_health_check_pings_its_own_celery_node() -> None:
    (kind, command) = SERVICES["worker"]["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    shell = interpolate(command)
    assert re.search(r"celery --broker \"\$SIJNODE_BROKER__URL\" inspect ping", shell)
    assert '--destination "celery@$HOSTNAME"' in shell


# --------------------------------------------------------------------------------------
# The Dockerfile
# --------------------------------------------------------------------------------------


def _ignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context (last match wins)."""
    ignored = False
    for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(
            fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", ""))
            for p in prefixes
        ):
            ignored = not negate
    return ignored


def test_dockerfile() -> None:
    (base,) = dockerfile("FROM")
    assert base == "python:3.11-slim"
    runs = " ".join(dockerfile("RUN"))
    assert "pip install -c constraints.txt ." in runs
    assert "dcmtk" not in runs.lower()  # not needed at run time
    (user,) = dockerfile("USER")
    assert user not in ("root", "0")
    assert re.search(rf"useradd [^&]*\b{re.escape(user)}\b", runs), f"USER {user} is not created"
    assert set(dockerfile("EXPOSE")[0].split()) == {"11112", "9108"}
    defaults = Settings()
    assert {str(defaults.node.port), str(defaults.metrics.port)} == {"11112", "9108"}
    assert dockerfile("HEALTHCHECK")


def test_dockerfile_copies_what_the_build_context_has() -> None:
    copied = []
    for rest in dockerfile("COPY"):
        *sources, _target = [a for a in rest.split() if not a.startswith("--")]
        copied += sources
    assert {"pyproject.toml", "constraints.txt", "sijnode"} <= set(copied)
    for source in copied:
        matches = list(ROOT.glob(source))
        if "*" not in source:
            assert matches, f"COPY {source}: no such file"
        for match in matches:
            rel = match.relative_to(ROOT).as_posix()
            assert not _ignored(rel), f"COPY {rel}: excluded by .dockerignore"
    for kept_out in (".venv", ".git", "tests", "var", "sijnode/__pycache__", ".env"):
        assert _ignored(kept_out), f"{kept_out} would be sent to the build"
