"""Packaging: module.json, the Dockerfiles and the deployment template hold together.

Nothing here needs a Docker engine. The template is checked against what the module
really reads and sends, against SchemaStore's schemas (copies beside the repository),
and expanded twice, by this file and by iotedgedev, into the manifests IoT Hub gets.
"""

import json
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from referencing import Registry, Resource

from modules.rollout import MODEL_PROPERTY
from modules.service import SOURCES_PROPERTY
from modules.settings import ACCEPTED, SETTINGS, AlertRule, Settings, apply_setting
from modules.sources import parse_sources
from modules.telemetry import ERRORS_OUTPUT, RESULTS_OUTPUT, Telemetry
from tests.conftest import require

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = Path(__file__).resolve().parents[2] / "shared/schemas"
TEMPLATE_SCHEMA = "azure-iot-edge-deployment-template-4.0.json"
MANIFEST_SCHEMA = "azure-iot-edge-deployment-2.0.json"

MODULE = "customvision"
PLATFORMS = ("amd64", "arm64v8")
BASE_IMAGES = {"amd64": "python", "arm64v8": "arm64v8/python"}
REGISTRY = {
    "CONTAINER_REGISTRY_SERVER": "registry.example.com",
    "CONTAINER_REGISTRY_USERNAME": "builder",
    "CONTAINER_REGISTRY_PASSWORD": "not-a-secret",
}
# iotedgedev splits createOptions into twin values of at most this many characters.
CREATE_OPTIONS_CHUNK_CHARS = 512
TOOL_TIMEOUT_S = 120

ROUTE = re.compile(
    r"FROM /messages/modules/(?P<module>[^/\s]+)/outputs/(?P<output>\S+)"
    r"(?: WHERE (?P<condition>.+))? INTO \$upstream"
)
CONDITION = re.compile(r"(?P<name>\w+) = '(?P<value>[^']*)'")
MODULEDIR = re.compile(r"\$\{MODULEDIR<(?P<folder>[^>]+)>(?:\.(?P<platform>\w+))?\}")
VARIABLE = re.compile(r"\$\{(?P<name>\w+)\}")
EXACT_PYTHON_TAG = re.compile(r"3\.12\.\d+-slim-bookworm")
PYTHON_ENV = ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1", "PIP_NO_CACHE_DIR=1")
HEALTHCHECK_OPTIONS = ("interval", "timeout", "start-period", "retries")

# The wheels pip may pick for the images: glibc 2.36 (bookworm), CPython 3.12.
WHEEL_PLATFORMS = {
    "amd64": ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"),
    "arm64v8": (
        "manylinux_2_28_aarch64",
        "manylinux_2_17_aarch64",
        "manylinux2014_aarch64",
    ),
}
WHEEL_ARCHITECTURES = {"amd64": "x86_64", "arm64v8": "aarch64"}
# azure-iot-device 2.x needs paho-mqtt 1.x, which PyPI has only as an sdist. It is pure
# Python, so the image builds it without a compiler; the test proves that too.
SDIST_ONLY_REQUIREMENTS = ("paho-mqtt<2",)

NOT_IN_IMAGE = (
    ".git/HEAD",
    ".venv/bin/python",
    ".ci/run",
    ".env",
    ".ruff_cache/CACHEDIR.TAG",
    ".pytest_cache/README.md",
    "tests/test_deployment.py",
    "bench/scoring.py",
    "scripts/test.sh",
    "model-store/exports/model.onnx",
    "config/deployment.amd64.json",
    "modules/__pycache__/settings.cpython-312.pyc",
    "README.md",
    "deployment.template.json",
    "Dockerfile.amd64",
)
IN_IMAGE = ("main.py", "requirements.txt", "modules/settings.py", "modules/demo/x")


def load_json(name: str) -> Any:
    """Return a JSON file of the repository, parsed."""
    return json.loads((ROOT / name).read_text(encoding="utf-8"))


def agent(document: dict[str, Any]) -> dict[str, Any]:
    """Return the edgeAgent's desired properties of a template or manifest."""
    return document["modulesContent"]["$edgeAgent"]["properties.desired"]


def routes(document: dict[str, Any]) -> dict[str, str]:
    """Return each route's query by name, in whichever form it is written."""
    hub = document["modulesContent"]["$edgeHub"]["properties.desired"]
    return {
        name: route if isinstance(route, str) else route["route"]
        for name, route in hub["routes"].items()
    }


def desired() -> dict[str, Any]:
    """Return the module's own desired properties in the template."""
    content = load_json("deployment.template.json")["modulesContent"]
    return dict(content[MODULE]["properties.desired"])


def image_tag(platform: str) -> str:
    """Return the image iotedgedev names for a platform, registry expanded."""
    image = load_json("module.json")["image"]
    repository = _substitute(image["repository"], platform).lower()
    return f"{repository}:{image['tag']['version']}-{platform}"


def expand(template: dict[str, Any], platform: str) -> dict[str, Any]:
    """Expand a template into the manifest IoT Hub receives, as iotedgedev does."""
    manifest = _expand_strings(template, platform)
    manifest.pop("$schema-template", None)
    modules = agent(manifest)
    for module in [*modules["systemModules"].values(), *modules["modules"].values()]:
        _stringify_create_options(module["settings"])
    return manifest


def _expand_strings(value: Any, platform: str) -> Any:
    if isinstance(value, dict):
        return {key: _expand_strings(item, platform) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand_strings(item, platform) for item in value]
    if isinstance(value, str):
        return _substitute(value, platform)
    return value


def _substitute(text: str, platform: str) -> str:
    def module_image(match: re.Match[str]) -> str:
        assert match["folder"] == ".", "this repository is a single module"
        return image_tag(match["platform"] or platform)

    # An unknown variable raises KeyError: the .env of a build must define it.
    text = MODULEDIR.sub(module_image, text)
    return VARIABLE.sub(lambda match: REGISTRY[match["name"]], text)


def _stringify_create_options(settings: dict[str, Any]) -> None:
    options = settings.pop("createOptions", None)
    if options is None:
        return
    text = options if isinstance(options, str) else json.dumps(options, separators=",:")
    size = CREATE_OPTIONS_CHUNK_CHARS
    for index, start in enumerate(range(0, len(text), size)):
        key = "createOptions" if index == 0 else f"createOptions{index:02d}"
        settings[key] = text[start : start + size]


@pytest.fixture(scope="session")
def schemas() -> Registry:
    """Return SchemaStore's IoT Edge schemas, each under the URL it names itself by."""
    require(SCHEMAS.is_dir(), f"SchemaStore's IoT Edge schemas are not at {SCHEMAS}")
    resources = [
        Resource.from_contents(json.loads(path.read_text(encoding="utf-8")))
        for path in sorted(SCHEMAS.glob("*.json"))
    ]
    return Registry().with_resources((r.id(), r) for r in resources if r.id())


def schema_errors(registry: Registry, name: str, document: Any) -> list[str]:
    """Return what the named schema finds wrong with a document, one line each."""
    schema = json.loads((SCHEMAS / name).read_text(encoding="utf-8"))
    validator_class = jsonschema.validators.validator_for(schema)
    validator = validator_class(schema, registry=registry)
    return [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def test_module_json_describes_the_image_for_iotedgedev() -> None:
    module = load_json("module.json")

    image = module["image"]
    assert module["$schema-version"] == "0.0.1"
    assert module["description"]
    assert module["language"] == "python"
    assert image["repository"] == "${CONTAINER_REGISTRY_SERVER}/customvision-scorer"
    assert image["tag"]["version"] == "0.1.0"
    assert image["tag"]["platforms"] == {p: f"./Dockerfile.{p}" for p in PLATFORMS}
    assert (image["buildOptions"], image["contextPath"]) == ([], "./")
    for dockerfile in image["tag"]["platforms"].values():
        assert (ROOT / dockerfile).is_file(), dockerfile


def test_template_deploys_this_module_image() -> None:
    template = load_json("deployment.template.json")

    desired_agent = agent(template)
    module = desired_agent["modules"][MODULE]
    assert template["$schema-template"] == "4.0.0"
    assert list(desired_agent["modules"]) == [MODULE]
    assert module["settings"]["image"] == "${MODULEDIR<.>}"
    assert (module["status"], module["restartPolicy"]) == ("running", "always")
    credentials = desired_agent["runtime"]["settings"]["registryCredentials"]
    assert [c["address"] for c in credentials.values()] == [
        "${CONTAINER_REGISTRY_SERVER}"
    ]


def test_routes_carry_outputs_the_module_has() -> None:
    queries = routes(load_json("deployment.template.json"))

    parsed = [ROUTE.fullmatch(query) for query in queries.values()]
    assert all(parsed), f"routes not of the expected form: {queries}"
    assert {m["module"] for m in parsed if m} == {MODULE}
    assert {m["output"] for m in parsed if m} <= {RESULTS_OUTPUT, ERRORS_OUTPUT}
    unconditional = {m["output"] for m in parsed if m and not m["condition"]}
    assert unconditional == {ERRORS_OUTPUT}


@pytest.mark.parametrize("probability", [0.9, 0.1], ids=["alert", "quiet"])
def test_every_result_takes_exactly_one_route(probability: float) -> None:
    conditions = [
        match["condition"]
        for query in routes(load_json("deployment.template.json")).values()
        if (match := ROUTE.fullmatch(query)) and match["output"] == RESULTS_OUTPUT
    ]
    rule = AlertRule("person", frozenset({"person"}), 0.5)
    settings = Settings(alerts=(rule,))
    document = {
        "id": str(uuid.uuid4()),
        "predictions": [{"tagId": 0, "tagName": "person", "probability": probability}],
        "model": {"sha256": "0" * 64, "version": None},
    }

    message = Telemetry().result(document, settings, source="cam", correlation_id=None)

    assert message is not None and message.output == RESULTS_OUTPUT
    matching = []
    for condition in conditions:
        match = CONDITION.fullmatch(condition)
        assert match, f"unexpected route condition: {condition}"
        matching.append(message.properties.get(match["name"]) == match["value"])
    assert matching.count(True) == 1, (conditions, message.properties)


def test_desired_properties_are_ones_the_module_reads() -> None:
    names = set(desired())

    readable = set(SETTINGS) | {MODEL_PROPERTY, SOURCES_PROPERTY}
    assert names <= readable, f"not read by the module: {names - readable}"
    # A fleet-wide template names no model: it serves nothing until one is rolled out.
    assert MODEL_PROPERTY not in names
    assert desired()[SOURCES_PROPERTY] == {}


@pytest.mark.parametrize(
    ("name", "value"),
    sorted((k, v) for k, v in desired().items() if k != SOURCES_PROPERTY),
)
def test_default_desired_value_is_accepted(name: str, value: Any) -> None:
    _, ack = apply_setting(Settings(), name, value, 1)

    assert ack.code == ACCEPTED, ack.description


def test_default_sources_parse() -> None:
    assert parse_sources(desired()[SOURCES_PROPERTY]) == {}


def test_module_mounts_and_env_match_the_image() -> None:
    module = agent(load_json("deployment.template.json"))["modules"][MODULE]
    host_config = module["settings"]["createOptions"]["HostConfig"]
    env = {name: item["value"] for name, item in module["env"].items()}
    dockerfile = instructions(ROOT / "Dockerfile.amd64")

    mounts = {bind.split(":")[1]: bind.split(":")[2:] for bind in host_config["Binds"]}
    image_env = [args for keyword, args in dockerfile if keyword == "ENV"]
    assert f"MODEL_STORE={env['MODEL_STORE']}" in image_env
    assert mounts[env["MODEL_STORE"]] == [], "the model store must be writable"
    assert set(desired()["allowedPaths"]) <= set(mounts)
    assert list(host_config["PortBindings"]) == ["8080/tcp"]
    code = "\n".join(
        p.read_text() for p in [ROOT / "main.py", *ROOT.glob("modules/*.py")]
    )
    for name in env:
        assert f'"{name}"' in code, f"{name} is not read by the module"


def test_template_validates_against_its_schema(schemas: Registry) -> None:
    template = load_json("deployment.template.json")

    assert schema_errors(schemas, TEMPLATE_SCHEMA, template) == []


@pytest.mark.parametrize("platform", PLATFORMS)
def test_expanded_manifest_validates(schemas: Registry, platform: str) -> None:
    manifest = expand(load_json("deployment.template.json"), platform)

    module = agent(manifest)["modules"][MODULE]
    assert schema_errors(schemas, MANIFEST_SCHEMA, manifest) == []
    assert module["settings"]["image"] == (
        f"registry.example.com/customvision-scorer:0.1.0-{platform}"
    )
    assert "${" not in json.dumps(manifest)


def test_schemas_reject_what_iot_hub_would(schemas: Registry) -> None:
    template = load_json("deployment.template.json")
    agent(template)["modules"][MODULE]["restartPolicy"] = "sometimes"
    manifest = load_json("deployment.template.json")
    manifest.pop("$schema-template")

    template_errors = schema_errors(schemas, TEMPLATE_SCHEMA, template)
    manifest_errors = schema_errors(schemas, MANIFEST_SCHEMA, manifest)

    # The first comes through a reference to the edgeAgent schema, the second is
    # createOptions left an object where IoT Hub takes a string.
    assert any("sometimes" in error for error in template_errors)
    assert any("createOptions" in error for error in manifest_errors)


@pytest.fixture(scope="session")
def iotedgedev_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a copy of the solution with a .env, as iotedgedev expects to find it."""
    require(
        tool("iotedgedev").is_file(),
        "iotedgedev is not installed (pip install -r requirements-dev.txt)",
    )
    project = tmp_path_factory.mktemp("solution")
    for name in ["module.json", "deployment.template.json", *dockerfile_names()]:
        (project / name).write_bytes((ROOT / name).read_bytes())
    (project / ".env").write_text("".join(f"{k}={v}\n" for k, v in REGISTRY.items()))
    return project


@pytest.fixture(scope="session")
def iotedgedev_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Return an environment that keeps iotedgedev offline and its telemetry off."""
    home = tmp_path_factory.mktemp("home")
    (home / ".iotedgedev").mkdir()
    (home / ".iotedgedev/setting.ini").write_text(
        "[DEFAULT]\nfirsttime = no\ncollect_telemetry = no\n"
    )
    # iotedgedev fetches SchemaStore's schemas itself; a closed local port as proxy
    # makes it skip that, and the tests validate its output with the local copies.
    proxy = f"http://127.0.0.1:{closed_port()}"
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "LC_ALL": "C.UTF-8",
        "http_proxy": proxy,
        "https_proxy": proxy,
    }


@pytest.mark.parametrize("platform", PLATFORMS)
def test_iotedgedev_genconfig_expands_the_template(
    schemas: Registry,
    iotedgedev_project: Path,
    iotedgedev_env: dict[str, str],
    platform: str,
) -> None:
    command = [str(tool("iotedgedev")), "solution", "genconfig"]
    command += ["--file", "deployment.template.json", "--platform", platform]

    done = subprocess.run(
        command,
        cwd=iotedgedev_project,
        env=iotedgedev_env,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
        check=False,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    generated = json.loads(
        (iotedgedev_project / f"config/deployment.{platform}.json").read_text()
    )
    image = agent(generated)["modules"][MODULE]["settings"]["image"]
    assert image == f"registry.example.com/customvision-scorer:0.1.0-{platform}"
    assert schema_errors(schemas, MANIFEST_SCHEMA, generated) == []
    assert generated == expand(load_json("deployment.template.json"), platform)


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = tool("hadolint")
    require(
        hadolint.is_file(),
        "hadolint is not installed (pip install -r requirements-dev.txt)",
    )

    done = subprocess.run(
        [str(hadolint), "--no-color", *dockerfile_names()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
        check=False,
    )

    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("platform", PLATFORMS)
def test_dockerfile_builds_the_module_image(platform: str) -> None:
    steps = instructions(ROOT / f"Dockerfile.{platform}")
    keywords = [keyword for keyword, _ in steps]
    arguments = {
        keyword: [args for k, args in steps if k == keyword] for keyword in keywords
    }

    image, _, tag = arguments["FROM"][0].partition(":")
    assert (image, keywords.count("FROM")) == (BASE_IMAGES[platform], 1)
    assert EXACT_PYTHON_TAG.fullmatch(tag), f"pin an exact version, not {tag!r}"
    sources = {args.split()[0] for args in arguments["COPY"]}
    assert sources == {"requirements.txt", "main.py", "modules/"}
    assert arguments["RUN"][0] == "pip install --no-cache-dir -r requirements.txt"
    assert arguments["EXPOSE"] == ["8080"] and arguments["VOLUME"] == ['["/models"]']
    user = arguments["USER"][-1]
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), "run as a numeric, non-root user"
    assert keywords.index("USER") < keywords.index("CMD") == len(keywords) - 1
    healthcheck = arguments["HEALTHCHECK"][0]
    assert "urllib.request" in healthcheck and "127.0.0.1:%s/healthz" in healthcheck
    assert all(f"--{option}=" in healthcheck for option in HEALTHCHECK_OPTIONS)
    assert set(PYTHON_ENV) <= set(arguments["ENV"][0].split())
    assert arguments["CMD"] == ['["python", "main.py"]']


def test_dockerfiles_differ_only_in_their_base_image() -> None:
    amd64, arm64v8 = (instructions(ROOT / f"Dockerfile.{p}") for p in PLATFORMS)

    assert amd64[0][0] == arm64v8[0][0] == "FROM"
    assert amd64[0][1].split(":")[1] == arm64v8[0][1].split(":")[1]
    assert amd64[1:] == arm64v8[1:]


def test_dockerignore_keeps_only_the_module_code() -> None:
    rules = dockerignore_rules(ROOT / ".dockerignore")

    assert [path for path in NOT_IN_IMAGE if not ignored(rules, path)] == []
    assert [path for path in IN_IMAGE if ignored(rules, path)] == []


@pytest.fixture(scope="session")
def pure_wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the sdist-only requirements into wheels, proving them pure Python."""
    require_pypi()
    folder = tmp_path_factory.mktemp("pure-wheels")
    pip(
        "wheel",
        "--no-deps",
        "--no-binary=:all:",
        f"--wheel-dir={folder}",
        *SDIST_ONLY_REQUIREMENTS,
    )
    wheels = [path.name for path in folder.glob("*.whl")]
    assert len(wheels) == len(SDIST_ONLY_REQUIREMENTS), wheels
    assert all(name.endswith("-none-any.whl") for name in wheels), wheels
    return folder


@pytest.mark.parametrize("platform", PLATFORMS)
def test_runtime_requirements_install_from_wheels(
    pure_wheels: Path, tmp_path: Path, platform: str
) -> None:
    target = [f"--platform={tag}" for tag in WHEEL_PLATFORMS[platform]]
    target += ["--python-version=3.12", "--implementation=cp", "--abi=cp312"]

    pip(
        "download",
        "--only-binary=:all:",
        *target,
        f"--find-links={pure_wheels}",
        f"--requirement={ROOT / 'requirements.txt'}",
        f"--dest={tmp_path}",
    )

    files = [path.name for path in tmp_path.iterdir()]
    assert all(name.endswith(".whl") for name in files), files
    runtime = [name for name in files if name.startswith("onnxruntime-")]
    assert len(runtime) == 1 and "-cp312-" in runtime[0]
    assert WHEEL_ARCHITECTURES[platform] in runtime[0]


def tool(name: str) -> Path:
    """Return the path of a command installed in the test environment's venv."""
    return Path(sys.executable).parent / name


def dockerfile_names() -> list[str]:
    """Return the Dockerfiles of module.json, relative to the repository."""
    platforms = load_json("module.json")["image"]["tag"]["platforms"]
    return [str(Path(path)) for path in platforms.values()]


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """Return a Dockerfile's instructions as (keyword, arguments), lines joined."""
    lines = [
        line
        for line in dockerfile.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    joined = re.sub(r"\\\n\s*", "", "\n".join(lines))
    steps = [line.strip().split(maxsplit=1) for line in joined.splitlines()]
    return [(keyword.upper(), args) for keyword, args in steps]


def dockerignore_rules(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """Return .dockerignore's patterns in order, each as (is an exception, regex)."""
    rules = []
    for line in path.read_text(encoding="utf-8").splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        exception = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        rules.append((exception, re.compile(_glob_regex(pattern))))
    return rules


def ignored(rules: list[tuple[bool, re.Pattern[str]]], path: str) -> bool:
    """Say whether Docker leaves a path out of the context; the last match wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: end + 1]) for end in range(len(parts))]
    left_out = False
    for exception, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            left_out = not exception
    return left_out


def _glob_regex(pattern: str) -> str:
    # Docker's syntax: Go's filepath.Match plus "**" for any number of folders.
    tokens = re.split(r"(\*\*/|\*\*|\*|\?|\[[^\]]*\])", pattern)
    wildcards = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    return "".join(
        wildcards.get(token)
        or (token.replace("[!", "[^") if token.startswith("[") else re.escape(token))
        for token in tokens
    )


def closed_port() -> int:
    """Return a loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def require_pypi() -> None:
    """Skip, or fail under CI, when PyPI cannot be reached."""
    try:
        with urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=15):
            reachable, reason = True, ""
    except (urllib.error.URLError, OSError) as error:
        reachable, reason = False, str(error)
    require(reachable, f"PyPI is not reachable: {reason}")


def pip(*arguments: str) -> None:
    """Run pip of the test environment quietly; fail with its output if it fails."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--quiet",
            "--disable-pip-version-check",
            *arguments,
        ],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S * 3,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
