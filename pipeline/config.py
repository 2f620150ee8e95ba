"""The YAML config, validated by pydantic. Every error names the field path and the offending value.

Strings may use ``${VAR}`` or ``${VAR:-default}``; secrets (camera passwords, Redis passwords)
come from the environment this way and never need to sit in the file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from pipeline.errors import UserError
from workers.redact import redact_text, redact_url
from workers.analytics_settings import analytics_errors
from workers.settings import CameraConfig, RedisConfig, Strict, TrackerConfig

__all__ = ["CameraConfig", "Config", "ConfigError", "RedisConfig", "TrackerConfig", "load_config", "parse_camera",
           "parse_config"]

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(UserError, ValueError):
    """A config that cannot be used; one line per problem, each naming the field path.
    (Still a ValueError, for callers that caught it as one before UserError existed.)"""


class RayConfig(Strict):
    address: str = Field("local", description="'local' starts Ray in-process; 'auto' or ray://host:10001 joins a cluster")
    num_cpus: int | None = Field(None, ge=1)
    object_store_mb: int = Field(512, ge=64)


class ModelConfig(Strict):
    checkpoint: str = Field("demo", description="'demo' (bundled) or a path to a .safetensors checkpoint")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    score_threshold: float | None = Field(None, gt=0, lt=1, description="override every head's threshold")
    compile: bool = Field(False, description="torch.compile the backbone and neck (slow start; mostly a GPU win)")

    def checkpoint_path(self) -> Path:
        if self.checkpoint == "demo":
            return Path(__file__).resolve().parent.parent / "models" / "checkpoints" / "demo.safetensors"
        return Path(self.checkpoint).expanduser()


class InferenceConfig(Strict):
    max_batch: int = Field(8, ge=1, le=256)
    max_wait_ms: float = Field(5.0, ge=0, le=1000)
    replicas: int = Field(1, ge=1, le=64)
    num_gpus: float | None = Field(None, ge=0, description="per replica; None: 1 when CUDA is visible, else 0")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads per replica (default: all cores)")
    max_pending: int | None = Field(None, ge=1, description="requests waiting per replica; beyond it the oldest of "
                                    "the camera holding the most is shed (default: 8 x max_batch)")
    max_pending_per_camera: int | None = Field(None, ge=1, description="requests of one camera waiting per replica "
                                               "(default: max(16, max_batch))")


class StatusConfig(Strict):
    interval_s: float = Field(1.0, gt=0)
    table: bool = True


class Config(Strict):
    redis: RedisConfig = RedisConfig()
    ray: RayConfig = RayConfig()
    model: ModelConfig = ModelConfig()
    inference: InferenceConfig = InferenceConfig()
    status: StatusConfig = StatusConfig()
    cameras: list[CameraConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_ids(self) -> "Config":
        seen: dict[str, int] = {}
        for i, cam in enumerate(self.cameras):
            if cam.id in seen:
                raise ValueError(f"cameras[{i}].id: duplicate camera id {cam.id!r} (also cameras[{seen[cam.id]}])")
            seen[cam.id] = i
        return self


def interpolate_env(value: Any, path: str = "", env: dict[str, str] | None = None) -> Any:
    """Replaces ${VAR} / ${VAR:-default} in every string of a parsed YAML tree."""
    env = os.environ if env is None else env
    if isinstance(value, dict):
        return {k: interpolate_env(v, f"{path}.{k}" if path else str(k), env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate_env(v, f"{path}[{i}]", env) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"{path}: environment variable ${{{name}}} is not set (use ${{{name}:-default}} for a default)")

    return _ENV.sub(sub, value)


def _urls_in(value: Any) -> list[str]:
    """Every URL-like string of a parsed YAML tree: the credentials an error message might echo."""
    if isinstance(value, dict):
        return [u for v in value.values() for u in _urls_in(v)]
    if isinstance(value, list):
        return [u for v in value for u in _urls_in(v)]
    return [value] if isinstance(value, str) and "://" in value else []


def _format_errors(err: ValidationError, urls: list[str]) -> str:
    lines = []
    for e in err.errors():
        loc = ""
        for part in e["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        value = e.get("input")
        shown = redact_url(value) if isinstance(value, str) else value
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling)"
        if isinstance(value, dict) or e["type"] == "missing":
            lines.append(f"{loc or 'config'}: {msg}")
        else:
            lines.append(f"{loc or 'config'}: {msg} (got {shown!r})")
    # a validator may echo a value, a list's repr may hold a URL: nothing of the input leaves unredacted
    return redact_text("\n".join(lines), urls)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """The parser's message with line and column but without its snippet of the file, which can show a
    password written there (a snippet cut short can even end inside it, past any redaction rule)."""
    for mark in (getattr(err, "context_mark", None), getattr(err, "problem_mark", None)):
        if mark is not None:
            mark.buffer = None
    return str(err)


def parse_config(data: Any, source: str = "config") -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    data = interpolate_env(data)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: invalid config:\n{_format_errors(e, _urls_in(data))}") from None


def parse_camera(data: Any, model_heads: dict[str, list[str]] | None = None, where: str = "camera") -> CameraConfig:
    """One camera's settings (a control API request, a live update): the same validation as in the YAML,
    zones and lines included, plus, given the model's heads, the heads and classes they name. Raises
    ConfigError with one line per problem, each naming the field path under ``where``
    (``camera.zones[1].polygon: edges 1-2 and 3-0 cross ...``)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    data = interpolate_env(data, where)
    try:
        cam = CameraConfig.model_validate(data)
    except ValidationError as e:
        out = []
        for ln in _format_errors(e, _urls_in(data)).splitlines():
            # A camera-level check names its field first ("config: zones[1].name: duplicate ..."): keep one path.
            ln = ln.removeprefix("config: ")
            out.append(f"{where}.{ln}" if re.match(r"^[A-Za-z_]\w*(\[\d+\])*[.:\[]", ln) else f"{where}: {ln}")
        raise ConfigError("\n".join(out)) from None
    if model_heads is not None:
        unknown = [h for h in (cam.heads or []) if h not in model_heads]
        problems = [f"heads: unknown heads {unknown} (the model has {list(model_heads)})"] if unknown else []
        problems += analytics_errors(cam.zones, cam.lines, cam.heads, model_heads)
        if problems:
            raise ConfigError("\n".join(f"{where}.{p}" for p in problems))
    return cam


def load_config(path: str | Path) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    return parse_config(data, str(path))
