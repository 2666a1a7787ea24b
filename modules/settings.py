"""Settings from the module twin: each desired property validated on its own.

A desired property is acknowledged the way IoT Plug and Play does it: the reported
property of the same name holds the value, a status code (`ac`), the desired
`$version` it answers (`av`) and a sentence (`ad`). An invalid value is answered with
400 and the previous value stays in force. The twin is replayed whole after every
reconnect; `DesiredState` remembers what was applied so a replay applies nothing.
"""

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from .errors import BadSettingError

MAX_PREDICTIONS_LIMIT = 1000
MAX_ALERT_RULES = 50
MAX_LIST_ITEMS = 100
MAX_INTERVAL_S = 86_400.0
DEFAULT_FORWARDED_PROPERTIES = ("source", "camera")

ACCEPTED = 200
IN_PROGRESS = 202
REJECTED = 400
FAILED = 500


@dataclass(frozen=True)
class AlertRule:
    """Fire when a kept prediction of one of `tags` reaches `min_probability`."""

    name: str
    tags: frozenset[str]
    min_probability: float

    def fires(self, tag: str, probability: float) -> bool:
        """Say whether a prediction triggers this rule."""
        in_scope = not self.tags or tag in self.tags
        return in_scope and probability >= self.min_probability


@dataclass(frozen=True)
class Settings:
    """Everything the twin can change without a restart."""

    threshold: float | None = None
    max_predictions: int | None = None
    tags: frozenset[str] = frozenset()
    alerts: tuple[AlertRule, ...] = ()
    allowed_paths: tuple[PurePosixPath, ...] = ()
    allowed_hosts: frozenset[str] = frozenset()
    min_interval_s: float = 0.0
    only_on_change: bool = False
    forward_properties: tuple[str, ...] = DEFAULT_FORWARDED_PROPERTIES
    project: str | None = None
    insecure_model_hosts: frozenset[str] = frozenset()
    allow_unverified_models: bool = False
    http_results: bool = False


@dataclass(frozen=True)
class Ack:
    """The reported answer to one desired property."""

    value: Any
    code: int
    version: int | None
    description: str

    def to_json(self) -> dict[str, Any]:
        """Return the acknowledgement in the IoT Plug and Play shape."""
        return {
            "value": self.value,
            "ac": self.code,
            "av": self.version,
            "ad": self.description,
        }


def _number(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadSettingError(f"{name} must be a number, not {_kind(value)}")
    # Compared without converting to float: JSON may hold an int too large for
    # one, and NaN fails any comparison.
    if not low <= value <= high:
        raise BadSettingError(f"{name} must be between {low:g} and {high:g}")
    return float(value)


def _strings(value: Any, name: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise BadSettingError(f"{name} must be a list of strings, not {_kind(value)}")
    if len(value) > MAX_LIST_ITEMS:
        raise BadSettingError(f"{name} holds more than {MAX_LIST_ITEMS} items")
    if not all(isinstance(item, str) and item.strip() for item in value):
        raise BadSettingError(f"{name} must hold only non-empty strings")
    return tuple(item.strip() for item in value)


def _threshold(value: Any) -> float | None:
    return None if value is None else _number(value, "threshold", 0.0, 1.0)


def _max_predictions(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadSettingError(f"maxPredictions must be a whole number, not {value!r}")
    if not 1 <= value <= MAX_PREDICTIONS_LIMIT:
        raise BadSettingError(
            f"maxPredictions must be between 1 and {MAX_PREDICTIONS_LIMIT}"
        )
    return value


def _tags(value: Any) -> frozenset[str]:
    return frozenset() if value is None else frozenset(_strings(value, "tags"))


def _alerts(value: Any) -> tuple[AlertRule, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_ALERT_RULES:
        raise BadSettingError(
            f"alerts must be a list of at most {MAX_ALERT_RULES} rules"
        )
    return tuple(_alert(rule, index) for index, rule in enumerate(value))


def _alert(rule: Any, index: int) -> AlertRule:
    if not isinstance(rule, dict):
        raise BadSettingError(f"alerts[{index}] must be an object")
    unknown = set(rule) - {"name", "tags", "minProbability"}
    if unknown:
        raise BadSettingError(
            f"alerts[{index}] has unknown keys: {', '.join(sorted(unknown))}"
        )
    name = rule.get("name", f"alert{index + 1}")
    if not isinstance(name, str) or not name:
        raise BadSettingError(f"alerts[{index}].name must be a non-empty string")
    tags = _strings(rule.get("tags", []), f"alerts[{index}].tags")
    floor = _number(
        rule.get("minProbability"), f"alerts[{index}].minProbability", 0.0, 1.0
    )
    return AlertRule(name, frozenset(tags), floor)


def _allowed_paths(value: Any) -> tuple[PurePosixPath, ...]:
    if value is None:
        return ()
    paths = tuple(PurePosixPath(item) for item in _strings(value, "allowedPaths"))
    for path in paths:
        if not path.is_absolute() or ".." in path.parts:
            raise BadSettingError(f"allowedPaths must be absolute folders: {path}")
    return paths


def _host_names(hosts: tuple[str, ...], name: str) -> frozenset[str]:
    for host in hosts:
        if any(char in host for char in "/@?# "):
            raise BadSettingError(f"{name} must hold host names only: {host!r}")
        if host.count(":") == 1:  # IPv6 literals hold several
            raise BadSettingError(
                f"{name} must hold host names without a port: {host!r}"
            )
    return frozenset(host.lower() for host in hosts)


def _flag(value: Any, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadSettingError(f"{name} must be true or false, not {value!r}")
    return value


def _allowed_hosts(value: Any) -> frozenset[str]:
    if value is None:
        return frozenset()
    return _host_names(_strings(value, "allowedHosts"), "allowedHosts")


def _min_interval(value: Any) -> float:
    return 0.0 if value is None else _number(value, "minIntervalS", 0.0, MAX_INTERVAL_S)


def _only_on_change(value: Any) -> bool:
    return _flag(value, "onlyOnChange")


def _insecure_model_hosts(value: Any) -> frozenset[str]:
    if value is None:
        return frozenset()
    return _host_names(_strings(value, "insecureModelHosts"), "insecureModelHosts")


def _allow_unverified_models(value: Any) -> bool:
    return _flag(value, "allowUnverifiedModels")


def _http_results(value: Any) -> bool:
    return _flag(value, "httpResults")


def _forward_properties(value: Any) -> tuple[str, ...]:
    if value is None:
        return DEFAULT_FORWARDED_PROPERTIES
    return _strings(value, "forwardProperties")


def _project(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value or None
    raise BadSettingError(f"project must be a string, not {_kind(value)}")


# Desired property name -> (Settings field, parser). A null value restores the default.
SETTINGS: Mapping[str, tuple[str, Callable[[Any], Any]]] = {
    "threshold": ("threshold", _threshold),
    "maxPredictions": ("max_predictions", _max_predictions),
    "tags": ("tags", _tags),
    "alerts": ("alerts", _alerts),
    "allowedPaths": ("allowed_paths", _allowed_paths),
    "allowedHosts": ("allowed_hosts", _allowed_hosts),
    "minIntervalS": ("min_interval_s", _min_interval),
    "onlyOnChange": ("only_on_change", _only_on_change),
    "forwardProperties": ("forward_properties", _forward_properties),
    "project": ("project", _project),
    "insecureModelHosts": ("insecure_model_hosts", _insecure_model_hosts),
    "allowUnverifiedModels": ("allow_unverified_models", _allow_unverified_models),
    "httpResults": ("http_results", _http_results),
}


def apply_setting(
    settings: Settings, name: str, value: Any, version: int | None
) -> tuple[Settings, Ack]:
    """Apply one desired property; return the new settings and its acknowledgement."""
    if name not in SETTINGS:
        return settings, Ack(
            value, REJECTED, version, f"{name} is not a setting of this module"
        )
    field, parse = SETTINGS[name]
    try:
        parsed = parse(value)
    except BadSettingError as error:
        return settings, Ack(
            value, REJECTED, version, f"{error}; the previous value stays"
        )
    updated = dataclasses.replace(settings, **{field: parsed})
    described = "applied" if value is not None else "default restored"
    return updated, Ack(value, ACCEPTED, version, described)


class DesiredState:
    """Remember which desired version and values were applied, so replays do nothing."""

    def __init__(self) -> None:
        self.version: int | None = None
        self._applied: dict[str, Any] = {}

    def changes(
        self, document: Mapping[str, Any], *, full: bool
    ) -> tuple[int | None, dict[str, Any]]:
        """Return the version and the properties that differ from what was applied.

        A full document (the twin read on connect) also removes properties it no
        longer holds. A patch is a JSON merge patch, as IoT Hub sends it: objects in
        it update the properties' objects key by key, null removes.
        """
        version = document.get("$version")
        version = version if isinstance(version, int) else None
        if self._seen(version, full):
            return version, {}
        entries = {k: v for k, v in document.items() if not k.startswith("$")}
        if full:
            entries.update(dict.fromkeys(self._applied.keys() - entries.keys()))
        else:
            entries = {
                k: merge_patch(self._applied.get(k), v) for k, v in entries.items()
            }
        changed = {
            name: value for name, value in entries.items() if self._differs(name, value)
        }
        for name, value in changed.items():
            if value is None:
                self._applied.pop(name, None)
            else:
                self._applied[name] = value
        if version is not None:
            self.version = version
        return version, changed

    def _seen(self, version: int | None, full: bool) -> bool:
        if version is None or self.version is None:
            return False
        # The SDK replays the whole desired section as a patch after a reconnect,
        # so a full read of the same version may still correct what that merged.
        return version < self.version or (version == self.version and not full)

    def _differs(self, name: str, value: Any) -> bool:
        if name not in self._applied:
            return value is not None
        return bool(self._applied[name] != value)


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply a JSON merge patch (RFC 7386) to a value, returning a new value."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__
