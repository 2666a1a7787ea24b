"""Desired properties: each one validated on its own, acknowledged, applied once."""

import json
from pathlib import PurePosixPath
from typing import Any

import pytest

from modules.settings import (
    DEFAULT_FORWARDED_PROPERTIES,
    SETTINGS,
    Ack,
    AlertRule,
    DesiredState,
    Settings,
    apply_setting,
)

# Settings where every field differs from its default, so a change is visible.
CONFIGURED = Settings(
    threshold=0.25,
    max_predictions=7,
    tags=frozenset({"red"}),
    alerts=(AlertRule("fire", frozenset({"red"}), 0.8),),
    allowed_paths=(PurePosixPath("/frames"),),
    allowed_hosts=frozenset({"camera"}),
    min_interval_s=30.0,
    only_on_change=True,
    forward_properties=("zone",),
    project="shelf",
    insecure_model_hosts=frozenset({"models.lan"}),
    allow_unverified_models=True,
    http_results=True,
)

VALID = [
    ("threshold", 0.5, "threshold", 0.5),
    ("threshold", 0, "threshold", 0.0),
    ("threshold", 1, "threshold", 1.0),
    ("maxPredictions", 3, "max_predictions", 3),
    ("maxPredictions", 5.0, "max_predictions", 5),
    ("maxPredictions", 1000, "max_predictions", 1000),
    ("tags", [" blue ", "green"], "tags", frozenset({"blue", "green"})),
    ("tags", [], "tags", frozenset()),
    (
        "alerts",
        [{"name": "smoke", "tags": ["grey"], "minProbability": 0.6}],
        "alerts",
        (AlertRule("smoke", frozenset({"grey"}), 0.6),),
    ),
    (
        "alerts",
        [{"minProbability": 0.9}, {"minProbability": 1}],
        "alerts",
        (AlertRule("alert1", frozenset(), 0.9), AlertRule("alert2", frozenset(), 1.0)),
    ),
    (
        "allowedPaths",
        ["/frames", "/mnt/shared/in"],
        "allowed_paths",
        (PurePosixPath("/frames"), PurePosixPath("/mnt/shared/in")),
    ),
    (
        "allowedHosts",
        ["Camera.Local", "10.0.0.7"],
        "allowed_hosts",
        frozenset({"camera.local", "10.0.0.7"}),
    ),
    ("minIntervalS", 2.5, "min_interval_s", 2.5),
    ("minIntervalS", 86400, "min_interval_s", 86400.0),
    ("onlyOnChange", False, "only_on_change", False),
    ("forwardProperties", ["zone", "line"], "forward_properties", ("zone", "line")),
    ("forwardProperties", [], "forward_properties", ()),
    ("project", "warehouse", "project", "warehouse"),
    ("project", "", "project", None),
    (
        "insecureModelHosts",
        ["Registry.LAN", "10.0.0.9"],
        "insecure_model_hosts",
        frozenset({"registry.lan", "10.0.0.9"}),
    ),
    ("allowUnverifiedModels", False, "allow_unverified_models", False),
    ("httpResults", False, "http_results", False),
]

INVALID = [
    ("threshold", "0.5", "threshold must be a number, not str"),
    ("threshold", True, "threshold must be a number, not bool"),
    ("threshold", 1.5, "threshold must be between 0 and 1"),
    ("threshold", -0.01, "threshold must be between 0 and 1"),
    ("threshold", float("nan"), "threshold must be between 0 and 1"),
    ("threshold", float("inf"), "threshold must be between 0 and 1"),
    # Python's json reads 1e400 as inf and a 400-digit literal as an exact int.
    ("threshold", json.loads("1e400"), "threshold must be between 0 and 1"),
    ("threshold", json.loads("1" + "0" * 400), "threshold must be between 0 and 1"),
    ("threshold", [0.5], "threshold must be a number, not list"),
    ("maxPredictions", 0, "maxPredictions must be between 1 and 1000"),
    ("maxPredictions", 1001, "maxPredictions must be between 1 and 1000"),
    ("maxPredictions", 2.5, "maxPredictions must be a whole number, not 2.5"),
    ("maxPredictions", True, "maxPredictions must be a whole number, not True"),
    ("maxPredictions", "3", "maxPredictions must be a whole number, not '3'"),
    ("maxPredictions", float("inf"), "maxPredictions must be a whole number"),
    ("tags", "red", "tags must be a list of strings, not str"),
    ("tags", ["red", 3], "tags must hold only non-empty strings"),
    ("tags", ["red", "  "], "tags must hold only non-empty strings"),
    ("tags", [f"tag{n}" for n in range(101)], "tags holds more than 100 items"),
    ("alerts", {"minProbability": 0.5}, "alerts must be a list of at most 50 rules"),
    (
        "alerts",
        [{"minProbability": 0.5}] * 51,
        "alerts must be a list of at most 50 rules",
    ),
    ("alerts", ["smoke"], "alerts[0] must be an object"),
    (
        "alerts",
        [{"minProbability": 0.5}, {"minProbability": 0.5, "colour": "red"}],
        "alerts[1] has unknown keys: colour",
    ),
    ("alerts", [{"tags": ["red"]}], "alerts[0].minProbability must be a number"),
    (
        "alerts",
        [{"minProbability": 1.2}],
        "alerts[0].minProbability must be between 0 and 1",
    ),
    (
        "alerts",
        [{"minProbability": 0.5, "name": ""}],
        "alerts[0].name must be a non-empty string",
    ),
    (
        "alerts",
        [{"minProbability": 0.5, "tags": "red"}],
        "alerts[0].tags must be a list of strings",
    ),
    ("allowedPaths", ["frames"], "allowedPaths must be absolute folders: frames"),
    (
        "allowedPaths",
        ["/frames/../etc"],
        "allowedPaths must be absolute folders: /frames/../etc",
    ),
    ("allowedPaths", "/frames", "allowedPaths must be a list of strings"),
    (
        "allowedHosts",
        ["camera/snapshot"],
        "allowedHosts must hold host names only: 'camera/snapshot'",
    ),
    (
        "allowedHosts",
        ["user@camera"],
        "allowedHosts must hold host names only: 'user@camera'",
    ),
    (
        "allowedHosts",
        ["camera.local:8080"],
        "allowedHosts must hold host names without a port: 'camera.local:8080'",
    ),
    ("minIntervalS", -1, "minIntervalS must be between 0 and 86400"),
    ("minIntervalS", 86400.5, "minIntervalS must be between 0 and 86400"),
    ("minIntervalS", False, "minIntervalS must be a number, not bool"),
    ("onlyOnChange", "true", "onlyOnChange must be true or false, not 'true'"),
    ("onlyOnChange", 1, "onlyOnChange must be true or false, not 1"),
    ("forwardProperties", "camera", "forwardProperties must be a list of strings"),
    ("project", 7, "project must be a string, not int"),
    (
        "insecureModelHosts",
        ["models.lan/v1"],
        "insecureModelHosts must hold host names only: 'models.lan/v1'",
    ),
    ("insecureModelHosts", "models.lan", "insecureModelHosts must be a list"),
    (
        "allowUnverifiedModels",
        "yes",
        "allowUnverifiedModels must be true or false, not 'yes'",
    ),
    ("httpResults", 1, "httpResults must be true or false, not 1"),
]


def test_every_desired_property_has_valid_cases() -> None:
    assert {name for name, *_ in VALID} == set(SETTINGS)
    assert {name for name, *_ in INVALID} == set(SETTINGS)


@pytest.mark.parametrize(
    ("name", "value", "field", "expected"),
    VALID,
    ids=[f"{name}-{index}" for index, (name, *_) in enumerate(VALID)],
)
def test_valid_value_is_applied(
    name: str, value: Any, field: str, expected: Any
) -> None:
    updated, ack = apply_setting(CONFIGURED, name, value, 4)

    assert getattr(CONFIGURED, field) != expected
    assert getattr(updated, field) == expected
    assert ack == Ack(value, 200, 4, "applied")


@pytest.mark.parametrize(
    "name", ["onlyOnChange", "allowUnverifiedModels", "httpResults"]
)
def test_flag_can_be_switched_on(name: str) -> None:
    updated, ack = apply_setting(Settings(), name, True, 2)

    assert getattr(updated, SETTINGS[name][0]) is True
    assert ack.code == 200


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_null_restores_the_default(name: str) -> None:
    field = SETTINGS[name][0]
    assert getattr(CONFIGURED, field) != getattr(Settings(), field)

    updated, ack = apply_setting(CONFIGURED, name, None, 9)

    assert getattr(updated, field) == getattr(Settings(), field)
    assert ack == Ack(None, 200, 9, "default restored")


def test_null_forward_properties_restores_source_and_camera() -> None:
    updated, _ = apply_setting(CONFIGURED, "forwardProperties", None, 1)

    assert (
        updated.forward_properties
        == DEFAULT_FORWARDED_PROPERTIES
        == (
            "source",
            "camera",
        )
    )


@pytest.mark.parametrize(
    ("name", "value", "description"),
    INVALID,
    ids=[f"{name}-{index}" for index, (name, *_) in enumerate(INVALID)],
)
def test_invalid_value_is_refused_and_changes_nothing(
    name: str, value: Any, description: str
) -> None:
    updated, ack = apply_setting(CONFIGURED, name, value, 5)

    assert updated is CONFIGURED
    assert updated == CONFIGURED
    assert ack.code == 400
    assert ack.version == 5
    assert ack.value is value
    assert ack.description.startswith(description)
    assert ack.description.endswith("; the previous value stays")


def test_unknown_property_is_refused() -> None:
    updated, ack = apply_setting(CONFIGURED, "thresold", 0.5, 3)

    assert updated is CONFIGURED
    assert ack == Ack(0.5, 400, 3, "thresold is not a setting of this module")


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        CONFIGURED.threshold = 0.9  # type: ignore[misc]


def test_ack_json_has_the_plug_and_play_shape() -> None:
    ack = Ack({"a": 1}, 400, 12, "threshold must be a number")

    assert ack.to_json() == {
        "value": {"a": 1},
        "ac": 400,
        "av": 12,
        "ad": "threshold must be a number",
    }
    assert json.loads(json.dumps(ack.to_json())) == ack.to_json()


def test_alert_rule_fires_for_its_tags_at_its_floor() -> None:
    scoped = AlertRule("fire", frozenset({"red", "orange"}), 0.7)
    anything = AlertRule("any", frozenset(), 0.7)

    assert scoped.fires("red", 0.7)
    assert not scoped.fires("red", 0.69)
    assert not scoped.fires("blue", 0.99)
    assert anything.fires("blue", 0.99)


def test_first_full_document_applies_everything() -> None:
    state = DesiredState()

    version, changes = state.changes(
        {"$version": 3, "threshold": 0.5, "tags": ["red"]}, full=True
    )

    assert version == 3
    assert changes == {"threshold": 0.5, "tags": ["red"]}
    assert state.version == 3


@pytest.mark.parametrize("full", [True, False], ids=["full", "patch"])
def test_replay_of_the_same_version_applies_nothing(full: bool) -> None:
    state = DesiredState()
    state.changes({"$version": 3, "threshold": 0.5, "tags": ["red"]}, full=True)

    version, changes = state.changes(
        {"$version": 3, "threshold": 0.5, "tags": ["red"]}, full=full
    )

    assert (version, changes) == (3, {})
    assert state.version == 3


def test_a_patch_of_a_version_already_applied_is_ignored() -> None:
    state = DesiredState()
    state.changes({"$version": 3, "threshold": 0.5}, full=True)

    assert state.changes({"$version": 3, "threshold": 0.9}, full=False) == (3, {})


@pytest.mark.parametrize("full", [True, False], ids=["full", "patch"])
def test_older_version_applies_nothing(full: bool) -> None:
    state = DesiredState()
    state.changes({"$version": 5, "threshold": 0.5}, full=True)

    version, changes = state.changes({"$version": 4, "threshold": 0.2}, full=full)

    assert (version, changes) == (4, {})
    assert state.version == 5


def test_patch_applies_only_its_keys() -> None:
    state = DesiredState()
    state.changes({"$version": 1, "threshold": 0.5, "tags": ["red"]}, full=True)

    version, changes = state.changes({"$version": 2, "maxPredictions": 3}, full=False)

    assert (version, changes) == (2, {"maxPredictions": 3})


def test_null_in_a_patch_removes_the_property() -> None:
    state = DesiredState()
    state.changes({"$version": 1, "threshold": 0.5, "tags": ["red"]}, full=True)

    _, removed = state.changes({"$version": 2, "threshold": None}, full=False)
    _, again = state.changes({"$version": 3, "threshold": 0.5}, full=False)

    assert removed == {"threshold": None}
    assert again == {"threshold": 0.5}


def test_null_for_a_property_never_applied_is_not_reported() -> None:
    state = DesiredState()

    _, changes = state.changes({"$version": 1, "threshold": None}, full=False)

    assert changes == {}


def test_full_document_without_a_key_reports_it_removed() -> None:
    state = DesiredState()
    state.changes({"$version": 1, "threshold": 0.5, "tags": ["red"]}, full=True)

    _, changes = state.changes({"$version": 2, "threshold": 0.5}, full=True)
    _, later = state.changes({"$version": 3, "threshold": 0.5}, full=True)

    assert changes == {"tags": None}
    assert later == {}


def test_unchanged_values_in_a_newer_full_document_are_not_reported() -> None:
    state = DesiredState()
    state.changes(
        {"$version": 1, "threshold": 0.5, "alerts": [{"minProbability": 0.9}]},
        full=True,
    )

    _, changes = state.changes(
        {
            "$version": 7,
            "threshold": 0.5,
            "alerts": [{"minProbability": 0.9}],
            "maxPredictions": 2,
        },
        full=True,
    )

    assert changes == {"maxPredictions": 2}
    assert state.version == 7


def test_a_patch_after_a_full_document_keeps_what_it_does_not_name() -> None:
    state = DesiredState()
    state.changes({"$version": 1, "threshold": 0.5, "tags": ["red"]}, full=True)
    state.changes({"$version": 2, "tags": ["blue"]}, full=False)

    _, changes = state.changes(
        {"$version": 3, "threshold": 0.5, "tags": ["blue"]}, full=True
    )

    assert changes == {}


def test_documents_without_a_version_still_apply() -> None:
    state = DesiredState()

    first = state.changes({"threshold": 0.5, "tags": ["red"]}, full=True)
    same = state.changes({"threshold": 0.5, "tags": ["red"]}, full=True)
    patch = state.changes({"threshold": 0.6}, full=False)
    full = state.changes({"threshold": 0.6}, full=True)

    assert first == (None, {"threshold": 0.5, "tags": ["red"]})
    assert same == (None, {})
    assert patch == (None, {"threshold": 0.6})
    assert full == (None, {"tags": None})
    assert state.version is None


def test_metadata_keys_are_not_settings() -> None:
    state = DesiredState()

    _, changes = state.changes(
        {"$version": 1, "$metadata": {"$lastUpdated": "now"}, "threshold": 0.5},
        full=True,
    )

    assert changes == {"threshold": 0.5}


def test_a_patch_updates_object_properties_key_by_key() -> None:
    state = DesiredState()
    model = {"url": "https://models/a.zip?sig=1", "sha256": "a" * 64, "version": "7"}
    sources = {"door": {"url": "http://door/s.jpg"}, "yard": {"url": "http://yard/s"}}
    state.changes({"model": model, "sources": sources, "$version": 1}, full=True)

    _, refreshed = state.changes(
        {"model": {"url": "https://models/a.zip?sig=2"}, "$version": 2}, full=False
    )
    _, removed = state.changes({"sources": {"door": None}, "$version": 3}, full=False)

    assert refreshed == {"model": {**model, "url": "https://models/a.zip?sig=2"}}
    assert removed == {"sources": {"yard": {"url": "http://yard/s"}}}


def test_a_patch_replaces_lists_whole() -> None:
    state = DesiredState()
    state.changes({"tags": ["red", "blue"], "$version": 1}, full=True)

    _, changed = state.changes({"tags": ["green"], "$version": 2}, full=False)

    assert changed == {"tags": ["green"]}


def test_a_full_read_corrects_a_replay_that_came_as_a_patch() -> None:
    state = DesiredState()
    two = {"door": {"url": "http://door/s.jpg"}, "yard": {"url": "http://yard/s"}}
    state.changes({"sources": two, "$version": 4}, full=True)
    # Offline, the door camera was removed. On reconnect the SDK hands the whole
    # desired section to the patch handler, where merging cannot remove anything.
    replayed = {"sources": {"yard": {"url": "http://yard/s"}}, "$version": 5}

    _, merged = state.changes(replayed, full=False)
    _, corrected = state.changes(replayed, full=True)
    _, again = state.changes(replayed, full=True)

    assert merged == {}
    assert corrected == {"sources": {"yard": {"url": "http://yard/s"}}}
    assert again == {}
