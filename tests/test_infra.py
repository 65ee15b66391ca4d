"""The deployment template, checked statically (no Bicep compiler or Azure here; see docs/deploy.md, "Template
checks"), and the post-deploy hook run for real against stand-ins for `az` and `azd`."""

from __future__ import annotations

import ast
import fnmatch
import json
import logging
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from shared import connections
from shared.context import Settings

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
MAIN_BICEP = INFRA / "main.bicep"
DEPLOY_DOC = REPO / "docs" / "deploy.md"
HOOK_SH = INFRA / "hooks" / "postdeploy.sh"
HOOK_PS1 = INFRA / "hooks" / "postdeploy.ps1"

# Modules that never run in Azure (command line, local sandbox, sample data): their variables are not app settings.
LOCAL_ONLY = {"cli.py", "sandbox.py", "samplegen.py", "__main__.py"}
FORBIDDEN_ON_FLEX = {"FUNCTIONS_WORKER_RUNTIME", "FUNCTIONS_EXTENSION_VERSION", "WEBSITE_RUN_FROM_PACKAGE"}
_ENV_RECEIVER = re.compile(r"(^|\.|_)(environ|env)$")


# ------------------------------------------------------------------------------------------- what the code reads
def _module_constants(tree: ast.Module) -> dict[str, str]:
    return {t.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
            for t in node.targets if isinstance(t, ast.Name)}


def _setting_name(arg: ast.expr, constants: dict[str, str], connections: set[str]) -> set[str]:
    """Literal names, module constants, and f"{name}__suffix" (expanded for every storage connection)."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return {arg.value}
    if isinstance(arg, ast.Name) and arg.id in constants:
        return {constants[arg.id]}
    if isinstance(arg, ast.JoinedStr) and len(arg.values) == 2 and isinstance(arg.values[0], ast.FormattedValue):
        tail = arg.values[1]
        if isinstance(tail, ast.Constant) and str(tail.value).startswith("__"):
            return {f"{c}{tail.value}" for c in connections}
    return set()


def _env_reads(path: Path, connections: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    constants = _module_constants(tree)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.func, ast.Attribute):
            receiver = ast.unparse(node.func.value)
            if (node.func.attr == "get" and _ENV_RECEIVER.search(receiver)) or ast.unparse(node.func) == "os.getenv":
                names |= _setting_name(node.args[0], constants, connections)
        elif (isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load)
              and _ENV_RECEIVER.search(ast.unparse(node.value))):
            names |= _setting_name(node.slice, constants, connections)
    # A local dict that happens to be called `env` (code generation in contacts.py) is not the environment: keep
    # names shaped like settings (UPPER_CASE, Connection__property, or a connection name).
    return {n for n in names if n.isupper() or "__" in n or n in connections}


def _function_app() -> ast.Module:
    return ast.parse((REPO / "function_app.py").read_text(encoding="utf-8"))


def _decorators(tree: ast.Module) -> Iterator[tuple[str, ast.Call]]:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call):
                    yield node.name, dec


def storage_connections() -> set[str]:
    """Connection names of the bindings, plus those the app opens itself (blob_service_from_settings("X", ...))."""
    found = {kw.value.value for _, dec in _decorators(_function_app()) for kw in dec.keywords
             if kw.arg == "connection" and isinstance(kw.value, ast.Constant)}
    for path in (REPO / "shared").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "blob_service_from_settings" and node.args
                    and isinstance(node.args[0], ast.Constant)):
                found.add(node.args[0].value)
    return found


def binding_placeholders() -> set[str]:
    """%SETTING% placeholders in trigger and binding arguments."""
    found: set[str] = set()
    for _, dec in _decorators(_function_app()):
        for kw in dec.keywords:
            if isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
                found |= set(re.findall(r"%([A-Za-z0-9_]+)%", kw.value.value))
    return found


def settings_read_by_code() -> set[str]:
    connections = storage_connections()
    names = set(connections) | binding_placeholders()
    for path in [REPO / "function_app.py", *sorted((REPO / "shared").glob("*.py"))]:
        if path.name not in LOCAL_ONLY:
            names |= _env_reads(path, connections)
    return names


# ------------------------------------------------------------------------------------------- what the template sets
def _block(text: str, opener: str) -> str:
    """The text of the `{ ... }` that follows `opener`, braces counted outside strings and comments."""
    start = text.index(opener) + len(opener) - 1
    assert text[start] == "{", f"{opener!r} does not open a block"
    depth = 0
    for i, ch in _code_chars(text, start):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return text[start + 1 : i]
    raise AssertionError(f"{opener!r}: unclosed block")


def _code_chars(text: str, start: int = 0) -> Iterator[tuple[int, str]]:
    """(index, char) of the characters outside strings ('...', '''...''') and comments (//, /* */)."""
    i, n = start, len(text)
    while i < n:
        if text.startswith("'''", i):
            end = text.find("'''", i + 3)
            i = n if end < 0 else end + 3
        elif text[i] == "'":
            i += 1
            while i < n and text[i] != "'":
                i += 2 if text[i] == "\\" else 1
            i += 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
        else:
            yield i, text[i]
            i += 1


def template_app_settings() -> dict[str, str]:
    """`var appSettings = { ... }` of main.bicep: setting name -> the Bicep expression of its value."""
    block = _block(MAIN_BICEP.read_text(encoding="utf-8"), "var appSettings = {")
    settings: dict[str, str] = {}
    for line in block.splitlines():
        m = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(.+?)\s*(//.*)?$", line)
        if m:
            assert m.group(1) not in settings, f"{m.group(1)} set twice"
            settings[m.group(1)] = m.group(2)
    return settings


def bicep_param(name: str) -> tuple[str, dict[str, str]]:
    """The default of `param <name>` in main.bicep and its decorators (@minValue(60) -> {"minValue": "60"})."""
    lines = MAIN_BICEP.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        m = re.match(rf"param {name} \w+ = (.+)$", line)
        if m:
            decorators: dict[str, str] = {}
            j = i - 1
            while j >= 0 and lines[j].startswith("@"):
                d = re.match(r"@(\w+)\((.*)\)$", lines[j])
                if d:
                    decorators[d.group(1)] = d.group(2)
                j -= 1
            return m.group(1).strip(), decorators
    raise AssertionError(f"main.bicep has no param {name} with a default")


def bicep_string(expression: str) -> str:
    m = re.fullmatch(r"'([^']*)'", expression)
    assert m, f"{expression!r} is not a string literal"
    return m.group(1)


def documented_optional_settings() -> set[str]:
    text = DEPLOY_DOC.read_text(encoding="utf-8")
    section = text.split("### Optional settings", 1)[1]
    section = re.split(r"\n#{2,3} ", section, maxsplit=1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        m = re.match(r"\|\s*([^|]+?)\s*\|", line)
        if m:
            names |= set(re.findall(r"`([A-Za-z0-9_]+)`", m.group(1)))
    return names


def seconds(timespan: str) -> int:
    """host.json's functionTimeout: [d.]hh:mm:ss."""
    m = re.fullmatch(r"(?:(\d+)\.)?(\d{1,2}):(\d{2}):(\d{2})", timespan)
    assert m, f"functionTimeout {timespan!r} is not [d.]hh:mm:ss (an unbounded -1 leaves no deadline to derive)"
    days, h, mi, s = (int(g or 0) for g in m.groups())
    return ((days * 24 + h) * 60 + mi) * 60 + s


# ------------------------------------------------------------------------------------------------------ settings
def test_the_scanner_finds_the_settings_the_app_is_known_to_read() -> None:
    """Guards the scanner itself: if it found nothing, the coverage test below would pass vacuously."""
    read = settings_read_by_code()
    assert {"EXPORTS_CONTAINER", "STATE_CONTAINER", "DESTINATIONS_CONFIG", "RUN_DEADLINE_SECONDS", "KEY_VAULT_URL",
            "AZURE_CLIENT_ID", "KEY_VAULT_SECRET_TTL_SECONDS", "SENDGRID_API_URL", "REFRESH_SCHEDULE",
            "ExportsStorage", "ExportsStorage__blobServiceUri", "ExportsStorage__clientId"} <= read


def test_every_setting_the_code_reads_is_set_by_the_template_or_documented_optional() -> None:
    set_by_template = set(template_app_settings())
    optional = documented_optional_settings()
    missing = sorted(settings_read_by_code() - set_by_template - optional)
    assert not missing, (f"read by the code but neither set in infra/main.bicep (var appSettings) nor listed under "
                         f"'Optional settings' in docs/deploy.md: {missing}")
    both = sorted(set_by_template & optional)
    assert not both, f"set by the template yet documented as optional: {both}"


def test_storage_connections_are_identity_based_for_blobs_and_queues() -> None:
    settings = template_app_settings()
    for connection in storage_connections() | {"AzureWebJobsStorage"}:
        assert bicep_string(settings[f"{connection}__credential"]) == "managedidentity"
        assert f"{connection}__clientId" in settings, connection
        assert f"{connection}__blobServiceUri" in settings, connection
        assert f"{connection}__queueServiceUri" in settings, connection  # queue trigger/output, poison queues
        assert connection not in settings, f"{connection}: a connection string next to the identity settings"
    assert settings["AzureWebJobsStorage__tableServiceUri"] == "storage.outputs.tableEndpoint"  # diagnostic events


def test_the_template_sets_a_connection_the_app_accepts_at_start_up() -> None:
    """The app refuses storage settings the blob binding or the host cannot use (shared/connections.py): the ones
    the template sets must pass that check (expressions replaced by plausible values)."""
    values = {"storage.outputs.blobEndpoint": "https://st.blob.core.windows.net/",
              "storage.outputs.queueEndpoint": "https://st.queue.core.windows.net/",
              "storage.outputs.tableEndpoint": "https://st.table.core.windows.net/",
              "identity.outputs.clientId": "00000000-0000-0000-0000-000000000000"}
    env = {k: values.get(v) or bicep_string(v) for k, v in template_app_settings().items()
           if k.startswith(("ExportsStorage", "AzureWebJobsStorage"))}
    assert connections.problem("ExportsStorage", env) is None
    assert connections.binding_problem("AzureWebJobsStorage", env) is None


def test_roles_for_the_host_tables_and_event_grid_dead_letters() -> None:
    rbac = (INFRA / "app" / "rbac.bicep").read_text(encoding="utf-8")
    assert "storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'" in rbac
    table = _block(rbac, "resource appTableContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {")
    assert "roles.storageTableDataContributor" in table and "principalId: identityPrincipalId" in table
    dead = _block(rbac, "resource eventGridDeadLetterWriter 'Microsoft.Authorization/roleAssignments@2022-04-01' = {")
    assert "scope: storage::blobServices::deadLetterContainer" in dead and "principalId: eventGridPrincipalId" in dead
    assert "roles.storageBlobDataContributor" in dead  # that container only, for the topic's own identity
    topic = (INFRA / "core" / "eventgrid.bicep").read_text(encoding="utf-8")
    assert "type: 'SystemAssigned'" in _block(topic, "identity: {")
    main = MAIN_BICEP.read_text(encoding="utf-8")
    assert "eventGridPrincipalId: exportsTopic.outputs.principalId" in main
    for output in ("EXPORTS_SYSTEM_TOPIC_ID", "AZURE_STORAGE_ACCOUNT_ID", "EVENTGRID_DEADLETTER_CONTAINER_NAME"):
        assert re.search(rf"^output {output} string = ", main, flags=re.M), f"the hook reads {output}"
        assert f'{output}="' in AZD_STUB  # and the hook's test hands it over as azd would


def test_template_settings_fit_the_app_and_flex_consumption() -> None:
    settings = template_app_settings()
    assert not FORBIDDEN_ON_FLEX & set(settings), "Flex Consumption takes the runtime from functionAppConfig"
    assert bicep_string(settings["DESTINATIONS_CONFIG"]) == "blob:destinations.json"
    assert bicep_string(settings["AZURE_TOKEN_CREDENTIALS"]) == "prod"
    assert settings["AZURE_CLIENT_ID"] == settings["ExportsStorage__clientId"] == "identity.outputs.clientId"
    # The container and queue names the app gets are the ones the storage module creates.
    for setting, param in (("EXPORTS_CONTAINER", "exportsContainerName"), ("STATE_CONTAINER", "stateContainerName"),
                           ("RUNS_QUEUE", "runsQueueName")):
        assert settings[setting] == param
    assert bicep_string(bicep_param("exportsContainerName")[0]) == Settings.from_env({}).exports_container
    assert bicep_string(bicep_param("stateContainerName")[0]) == Settings.from_env({}).state_container
    main = MAIN_BICEP.read_text(encoding="utf-8")
    assert ("containerNames: [deploymentContainerName, exportsContainerName, stateContainerName, "
            "deadLetterContainerName]") in main
    assert "queueNames: [runsQueueName]" in main


def test_run_deadline_ends_before_the_function_timeout() -> None:
    timeout = seconds(json.loads((REPO / "host.json").read_text(encoding="utf-8"))["functionTimeout"])
    default, decorators = bicep_param("runDeadlineSeconds")
    assert template_app_settings()["RUN_DEADLINE_SECONDS"] == "string(runDeadlineSeconds)"
    margin = 60  # the final checkpoint and report need time after the deadline
    assert int(default) <= timeout - margin, f"RUN_DEADLINE_SECONDS {default} vs functionTimeout {timeout} s"
    assert int(decorators["maxValue"]) <= timeout - margin, "an override could reach the host's timeout"
    local = json.loads((REPO / "local.settings.sample.json").read_text(encoding="utf-8"))["Values"]
    assert float(local["RUN_DEADLINE_SECONDS"]) <= timeout - margin
    assert Settings.from_env({}).run_deadline_seconds <= timeout - margin  # the app's own default


# ---------------------------------------------------------------------------------------------- Bicep files
def _bicep_files() -> list[Path]:
    files = sorted(INFRA.rglob("*.bicep"))
    assert MAIN_BICEP in files
    return files


def test_bicep_files_are_self_contained_and_balanced() -> None:
    for path in _bicep_files():
        text = path.read_text(encoding="utf-8")
        stack: list[str] = []
        pairs = {"}": "{", "]": "[", ")": "("}
        for i, ch in _code_chars(text):
            if ch in "{[(":
                stack.append(ch)
            elif ch in pairs:
                assert stack and stack[-1] == pairs[ch], f"{path.name}: unbalanced {ch!r} at offset {i}"
                stack.pop()
        assert not stack, f"{path.name}: unclosed {stack}"
        for ref in re.findall(r"^module \w+ '([^']+)'", text, flags=re.M):
            assert not re.match(r"(br|ts)[:/]", ref), f"{path.name}: registry module {ref} (needs a download)"
            assert (path.parent / ref).is_file(), f"{path.name}: module {ref} does not exist"
        for rtype in re.findall(r"^\s*resource \w+ '([^']+)'", text, flags=re.M):
            if "/" in rtype:  # nested child resources ('config', 'containers') take the parent's version
                assert re.fullmatch(r"[A-Za-z.]+/[A-Za-z/]+@\d{4}-\d{2}-\d{2}", rtype), f"{path.name}: {rtype}"


def test_templates_hold_no_secret() -> None:
    for path in [*INFRA.rglob("*"), REPO / "azure.yaml"]:
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            assert not re.search(r"SG\.[A-Za-z0-9_-]{8,}\.", text), path
            assert "AccountKey=" not in text and "listKeys(" not in text, path
            assert "vaults/secrets" not in text, f"{path}: the API key is put in by the admin, never the template"


def test_flex_consumption_python_311_with_the_users_identity() -> None:
    flex = (INFRA / "core" / "flex-function.bicep").read_text(encoding="utf-8")
    assert "name: 'FC1'" in flex and "tier: 'FlexConsumption'" in flex and "reserved: true" in flex
    assert "kind: 'functionapp,linux'" in flex and "name: 'python'" in flex
    assert "type: 'UserAssignedIdentity'" in flex and "userAssignedIdentityResourceId: identityId" in flex
    assert "runtimeVersion: '3.11'" in MAIN_BICEP.read_text(encoding="utf-8")
    storage = (INFRA / "core" / "storage.bicep").read_text(encoding="utf-8")
    assert "allowSharedKeyAccess: false" in storage and "allowBlobPublicAccess: false" in storage
    assert "enableRbacAuthorization: true" in (INFRA / "core" / "keyvault.bicep").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------ azure.yaml
def _azure_yaml() -> str:
    return (REPO / "azure.yaml").read_text(encoding="utf-8")


def test_azure_yaml_names_hooks_that_exist() -> None:
    text = _azure_yaml()
    hooks = text.split("\nhooks:\n", 1)[1]
    assert re.search(r"^  postdeploy:\n", hooks, flags=re.M), "the Event Grid subscription needs the deployed app"
    runs = dict(re.findall(r"^ {4}(windows|posix):\n(?: {6}.*\n)*? {6}run: (\S+)", hooks, flags=re.M))
    assert set(runs) == {"windows", "posix"}
    assert (REPO / runs["posix"]).resolve() == HOOK_SH and (REPO / runs["windows"]).resolve() == HOOK_PS1
    assert HOOK_SH.is_file() and HOOK_PS1.is_file()


def test_azure_yaml_service_is_the_tagged_python_function_app() -> None:
    services = re.search(r"^services:\n {2}(\w+):\n((?: {4}.*\n)+)", _azure_yaml(), flags=re.M)
    assert services, "azure.yaml has no service"
    name, body = services.group(1), dict(re.findall(r"^ {4}(\w+): (\S+)", services.group(2), flags=re.M))
    assert body == {"project": ".", "language": "python", "host": "function"}
    assert f"var serviceName = '{name}'" in MAIN_BICEP.read_text(encoding="utf-8"), "azd finds the app by this tag"
    assert (REPO / body["project"] / "function_app.py").is_file()
    assert re.search(r"^infra:\n  provider: bicep\n  path: infra\n  module: main\n", _azure_yaml(), flags=re.M)


# ---------------------------------------------------------------------------------------- the post-deploy hook
def _blob_trigger_function() -> str:
    (name,) = {n for n, dec in _decorators(_function_app()) if ast.unparse(dec.func).endswith(".blob_trigger")}
    return name


def test_both_hooks_call_the_blob_trigger_function() -> None:
    name = _blob_trigger_function()
    assert f'function_name="{name}"' in HOOK_SH.read_text(encoding="utf-8")
    ps1 = HOOK_PS1.read_text(encoding="utf-8")
    assert f"$functionName = '{name}'" in ps1
    for needle in ("'Microsoft.Storage.BlobCreated'", "systemKeys.blobs_extension", "/blobs/\"",
                   "endpointType = 'WebHook'", "runtime/webhooks/blobs?functionName=Host.Functions.",
                   "maxDeliveryAttempts = $maxDeliveryAttempts", "$maxDeliveryAttempts = 30",
                   "eventTimeToLiveInMinutes = $eventTtlMinutes", "$eventTtlMinutes = 1440",
                   "deadLetterWithResourceIdentity", "type = 'SystemAssigned'", "endpointType = 'StorageBlob'",
                   "blobContainerName = $env:EVENTGRID_DEADLETTER_CONTAINER_NAME",
                   "resourceId = $env:AZURE_STORAGE_ACCOUNT_ID", "--body \"@$($bodyFile.FullName)\"",
                   "Remove-Item -Force $bodyFile.FullName", "properties.provisioningState", "api-version=$apiVersion",
                   "$apiVersion = '2022-06-15'"):
        assert needle in ps1, needle
    assert "advancedFilters" not in ps1 and "--endpoint" not in ps1  # no API filter; the key never in argv


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!{sys.executable}\n{body}", encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


AZ_STUB = """
import json, os, sys
args = sys.argv[1:]
entry = {"args": args}
if args[:2] == ["rest", "--method"] and "--body" in args:
    path = args[args.index("--body") + 1][1:]
    entry |= {"body_file": path, "body": json.load(open(path)), "mode": oct(os.stat(path).st_mode & 0o777)}
with open(os.environ["AZ_LOG"], "a") as log:
    log.write(json.dumps(entry) + "\\n")
def count(name):
    state = os.environ["AZ_STATE"] + "." + name
    calls = int(open(state).read()) + 1 if os.path.exists(state) else 1
    open(state, "w").write(str(calls))
    return calls
if args[:3] == ["functionapp", "keys", "list"]:
    if os.environ.get("AZ_KEY") and count("keys") > int(os.environ["AZ_KEY_AFTER"]):
        print(os.environ["AZ_KEY"])
if args[:3] == ["rest", "--method", "get"]:
    states = os.environ["AZ_SUB_STATES"].split(",")
    print(states[min(count("get"), len(states)) - 1])
"""

TOPIC_ID = ("/subscriptions/0000/resourceGroups/rg-prod/providers/Microsoft.EventGrid/systemTopics/evgt-abc123")
STORAGE_ID = "/subscriptions/0000/resourceGroups/rg-prod/providers/Microsoft.Storage/storageAccounts/stabc123"
AZD_STUB = f"""
import sys
assert sys.argv[1:] == ["env", "get-values"], sys.argv
print('AZURE_FUNCTION_APP_NAME="func-abc123"')
print('AZURE_FUNCTION_APP_HOSTNAME="func-abc123.azurewebsites.net"')
print('AZURE_RESOURCE_GROUP="rg-prod"')
print('EXPORTS_CONTAINER_NAME="exports"')
print('EXPORTS_SYSTEM_TOPIC_NAME="evgt-abc123"')
print('EXPORTS_SYSTEM_TOPIC_ID="{TOPIC_ID}"')
print('AZURE_STORAGE_ACCOUNT_ID="{STORAGE_ID}"')
print('EVENTGRID_DEADLETTER_CONTAINER_NAME="eventgrid-deadletter"')
"""


def _run_hook(tmp_path: Path, key: str, key_after: int, attempts: int, states: str = "Creating,Succeeded"
              ) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "az", AZ_STUB)
    _stub(bin_dir, "azd", AZD_STUB)
    log = tmp_path / "az.log"
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", "AZ_LOG": str(log),
           "AZ_STATE": str(tmp_path / "az.state"), "AZ_KEY": key, "AZ_KEY_AFTER": str(key_after),
           "AZ_SUB_STATES": states, "BLOBS_KEY_RETRY_SECONDS": "0", "BLOBS_KEY_ATTEMPTS": str(attempts)}
    done = subprocess.run(["sh", str(HOOK_SH)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return done, calls


def _option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_hook_waits_for_the_key_then_subscribes_the_trigger(tmp_path: Path) -> None:
    key = "fake-blobs-extension-key-0123456789=="
    done, calls = _run_hook(tmp_path, key, key_after=2, attempts=5)
    assert done.returncode == 0, done.stderr
    assert key not in done.stdout + done.stderr
    assert not any(key in arg for c in calls for arg in c["args"]), "the key was on a command line"
    key_calls = [c["args"] for c in calls if c["args"][:3] == ["functionapp", "keys", "list"]]
    assert len(key_calls) == 3  # two empty answers (host still starting), then the key
    assert _option(key_calls[0], "--name") == "func-abc123" and _option(key_calls[0], "--resource-group") == "rg-prod"
    (put,) = [c for c in calls if c["args"][:3] == ["rest", "--method", "put"]]
    assert _option(put["args"], "--url") == f"{TOPIC_ID}/eventSubscriptions/exports-blob-created?api-version=2022-06-15"
    assert put["mode"] == "0o600" and not Path(put["body_file"]).exists()  # private, and gone afterwards
    sub = put["body"]["properties"]
    assert sub["destination"] == {"endpointType": "WebHook", "properties": {
        "endpointUrl": ("https://func-abc123.azurewebsites.net/runtime/webhooks/blobs"
                        f"?functionName=Host.Functions.{_blob_trigger_function()}&code={key}"),
        "maxEventsPerBatch": 1, "preferredBatchSizeInKilobytes": 64}}
    # Every BlobCreated under the container: no API filter, so ADLS Gen2's CreateFile and FlushWithClose both arrive
    assert sub["filter"] == {"includedEventTypes": ["Microsoft.Storage.BlobCreated"],
                             "subjectBeginsWith": "/blobServices/default/containers/exports/blobs/"}
    assert sub["retryPolicy"] == {"maxDeliveryAttempts": 30, "eventTimeToLiveInMinutes": 1440}
    assert sub["deadLetterWithResourceIdentity"] == {
        "identity": {"type": "SystemAssigned"},
        "deadLetterDestination": {"endpointType": "StorageBlob", "properties": {
            "resourceId": STORAGE_ID, "blobContainerName": "eventgrid-deadletter"}}}
    gets = [c for c in calls if c["args"][:3] == ["rest", "--method", "get"]]
    assert len(gets) == 2  # waited while Event Grid validated the webhook
    assert "dead-lettered into 'eventgrid-deadletter'" in done.stdout


def test_hook_fails_when_event_grid_cannot_validate_the_webhook(tmp_path: Path) -> None:
    done, _ = _run_hook(tmp_path, "k", key_after=0, attempts=3, states="Creating,Failed")
    assert done.returncode != 0 and "could not validate the webhook" in done.stderr
    assert "postdeploy.sh" in done.stderr


def test_hook_refuses_values_that_would_break_its_json(tmp_path: Path) -> None:
    done, calls = _run_hook(tmp_path, 'k"},"x":{"', key_after=0, attempts=2)
    assert done.returncode != 0 and "holds a character it cannot have" in done.stderr
    assert not any(c["args"][:1] == ["rest"] for c in calls)


def test_hook_fails_without_subscribing_when_the_key_never_appears(tmp_path: Path) -> None:
    done, calls = _run_hook(tmp_path, key="", key_after=0, attempts=2)
    assert done.returncode != 0
    assert "blobs_extension" in done.stderr and "postdeploy.sh" in done.stderr  # says what to check and rerun
    assert [c["args"][:3] for c in calls] == [["functionapp", "keys", "list"]] * 2
    assert not any(c["args"][:1] == ["rest"] for c in calls)


@pytest.mark.parametrize("missing", ["az", "azd"])
def test_hook_names_a_missing_tool(tmp_path: Path, missing: str) -> None:
    if any((Path(d) / missing).exists() for d in ("/usr/bin", "/bin")):
        pytest.skip(f"{missing} is installed on this machine")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in {"az", "azd"} - {missing}:
        _stub(bin_dir, tool, "")
    done = subprocess.run(["sh", str(HOOK_SH)], cwd=REPO, env={"PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode != 0 and f"'{missing}' is not installed" in done.stderr


# ------------------------------------------------------------------------------------- what `azd deploy` uploads
FUNCIGNORE = REPO / ".funcignore"
# Left in a developer's or CI's checkout by the tools this repository uses: none of it may reach the package.
LOCAL_LEFTOVERS = [".venv/bin/python", ".venv-debian-py311/bin/python", ".pytest_cache/v/x", ".ruff_cache/x",
                   ".azure/prod/.env", ".azurite/__azurite_db_blob__.json", "__azurite_db_blob__.json",
                   "__blobstorage__/x", "node_modules/.bin/azurite", "local.settings.json", ".state/runs/x.json",
                   ".demo/export/model.json", ".bench/x", "shared/__pycache__/app.cpython-311.pyc",
                   "shared/x.pyc", "azurite-debug.log.md"]


def funcignore_patterns() -> list[str]:
    raw = FUNCIGNORE.read_bytes()
    assert not raw.startswith(b"\xef\xbb\xbf"), "azd before 1.23.13 misreads the first pattern after a BOM"
    patterns = [line for line in raw.decode("utf-8").splitlines() if line.strip() and not line.startswith("#")]
    for p in patterns:
        # the subset every azd since 1.18.0 and Core Tools read alike: a name or glob matched at any depth
        assert p == p.strip() and not p.startswith("!") and "/" not in p and "\\" not in p, p
    return patterns


def packaged(paths: list[str], patterns: list[str]) -> set[str]:
    """The paths azd's zip keeps: a path is left out when any of its parts matches a pattern (gitignore semantics of
    a slash-free pattern); azd itself always leaves out .azure/, the ignore file and local.settings.json."""
    kept = set()
    for path in paths:
        parts = path.split("/")
        if any(fnmatch.fnmatchcase(part, p) for part in parts for p in patterns):
            continue
        if ".azure" in parts[:-1] or path in (".funcignore", "local.settings.json"):
            continue
        kept.add(path)
    return kept


def test_the_package_holds_the_app_and_nothing_else() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    paths = [p for p in tracked.splitlines() if p] + LOCAL_LEFTOVERS
    shared_files = {p for p in paths if p.startswith("shared/") and p.endswith(".py") and "__pycache__" not in p}
    expected = {"function_app.py", "host.json", "requirements.txt", "constraints.txt"} | shared_files
    assert packaged(paths, funcignore_patterns()) == expected


def test_azure_yaml_requires_an_azd_that_reads_funcignore() -> None:
    m = re.search(r'^requiredVersions:\n  azd: ">= (\d+)\.(\d+)\.(\d+)"$', _azure_yaml(), flags=re.M)
    assert m, "azure.yaml must state the minimum azd version"
    assert tuple(int(g) for g in m.groups()) >= (1, 18, 0)  # Azure/azure-dev#5383, released in 1.18.0


# ------------------------------------------------------------------------------------------------------ alerts
ALERTS_BICEP = INFRA / "app" / "alerts.bicep"
OPERATIONS_DOC = REPO / "docs" / "operations.md"


def _kql_files() -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted((INFRA / "app" / "alerts").glob("*.kql"))}


def _kusto_blocks(text: str) -> list[str]:
    return [b.strip() + "\n" for b in re.findall(r"```kusto\n(.*?)```", text, flags=re.S)]


def test_every_alert_rule_loads_a_query_that_the_operations_doc_shows_verbatim() -> None:
    alerts = ALERTS_BICEP.read_text(encoding="utf-8")
    loaded = set(re.findall(r"loadTextContent\('alerts/([a-z-]+\.kql)'\)", alerts))
    assert loaded == set(_kql_files()) == {"runs.kql", "failed-runs.kql", "rejections.kql", "stale-destinations.kql",
                                           "poison-messages.kql"}
    shown = _kusto_blocks(OPERATIONS_DOC.read_text(encoding="utf-8"))
    for name, text in _kql_files().items():
        assert text in shown, f"docs/operations.md does not show infra/app/alerts/{name} as it is"
    for block in shown:  # every other query of the doc reads the tables the base block defines
        assert block in _kql_files().values() or block.startswith("ConnectorRuns\n"), block[:60]


def test_the_queries_read_what_the_run_records_hold(caplog: pytest.LogCaptureFixture) -> None:
    from shared import runlog

    record = {"run_id": "20250101T120000Z-0a1b2c3d", "destination": "vip", "trigger": "timer", "status": "completed",
              "started_at": "2025-01-01T12:00:00Z", "finished_at": "2025-01-01T12:00:09Z",
              "counts": {"read": 10, "valid": 9, "sent": 9, "rejected_total": 1, "not_applied": 0}}
    with caplog.at_level(logging.INFO, logger="shared.runlog"):
        runlog.finished(record)
        runlog.destinations_seen(["vip"], ["old"], ["#2"])
    messages = [r.getMessage() for r in caplog.records if r.name == "shared.runlog"]
    base = _kql_files()["runs.kql"]
    for event, alias in ((runlog.RUN_FINISHED, "r"), (runlog.DESTINATIONS_SEEN, "d")):
        (message,) = [m for m in messages if m.startswith(f"{event} ")]
        assert f'message startswith "{event} {{"' in base and f'strlen("{event} ")' in base
        fields = orjson.loads(message[len(event) + 1:])  # what parse_json(substring(...)) gets
        read = set(re.findall(rf"\b{alias}\.([a-z_]+)", base))
        assert read and read <= set(fields), f"{event}: the query reads {sorted(read - set(fields))}, never written"


def test_alert_rules_measure_and_split_by_columns_their_queries_return() -> None:
    alerts = ALERTS_BICEP.read_text(encoding="utf-8")
    rules = alerts[alerts.index("var rules = ["):]
    files = _kql_files()
    for name, measure, dims in (("rejections.kql", "rejected_percent", ["destination"]),
                                ("stale-destinations.kql", "hours_since_success", ["destination"]),
                                ("failed-runs.kql", None, ["destination", "status"]),
                                ("poison-messages.kql", None, ["queue"])):
        last = files[name].strip().splitlines()[-1]
        assert last.startswith("| project "), name
        columns = {c.strip().split(" = ")[0] for c in last[len("| project "):].split(",")}
        assert "timestamp" in columns and set(dims) <= columns, name
        if measure:
            assert measure in columns and f"metricMeasureColumn: '{measure}'" in rules, name
    assert "threshold: rejectedPercentThreshold" in alerts and "threshold: staleAfterHours" in alerts
    assert "overrideQueryTimeRange: 'P2D'" in alerts  # the stale rule looks back as far as Azure allows
    assert "metricName: 'DeadLetteredCount'" in alerts and "scopes: [systemTopicId]" in alerts
    assert alerts.count("autoMitigate: true") == 2  # the log rules (one resource loop) and the metric rule
    for text in files.values():
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("//"))
        assert code.count("(") == code.count(")") and code.count('"') % 2 == 0


def test_the_poison_query_matches_the_hosts_own_log_line() -> None:
    query = _kql_files()["poison-messages.kql"]
    prefix = re.search(r'message startswith "([^"]+)"', query).group(1)
    contains = re.search(r'message contains "([^"]+)"', query).group(1)
    pattern = re.search(r'extract\(@"([^"]+)", 1, message\)', query).group(1)
    runs_queue = bicep_string(bicep_param("runsQueueName")[0])
    # Microsoft.Azure.WebJobs.Extensions.Storage QueueProcessor.CopyMessageToPoisonQueueAsync's message
    for queue in ("webjobs-blobtrigger-poison", f"{runs_queue}-poison"):
        line = f"Message has reached MaxDequeueCount of 5. Moving message to queue '{queue}'."
        assert line.startswith(prefix) and contains in line and re.search(pattern, line).group(1) == queue
    assert contains not in f"Moving message to queue '{runs_queue}'."  # the runs queue itself is not poison


def test_the_alerts_are_wired_into_the_deployment() -> None:
    main = MAIN_BICEP.read_text(encoding="utf-8")
    module = _block(main, "module alerts 'app/alerts.bicep' = {")
    for line in ("applicationInsightsId: monitoring.outputs.applicationInsightsId",
                 "systemTopicId: exportsTopic.outputs.id", "alertEmail: alertEmail",
                 "rejectedPercentThreshold: alertRejectedPercent", "staleAfterHours: alertStaleAfterHours"):
        assert line in module
    assert bicep_param("alertEmail")[0] == "''"
    assert bicep_param("alertStaleAfterHours")[1]["maxValue"] == "48"  # an Azure log alert looks back 2 days at most
    params = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))["parameters"]
    assert params["alertEmail"] == {"value": "${ALERT_EMAIL}"}
    alerts = ALERTS_BICEP.read_text(encoding="utf-8")
    group = _block(alerts, "'Microsoft.Insights/actionGroups@2023-01-01' = if (!empty(alertEmail)) {")
    assert "emailAddress: alertEmail" in group and len(re.search(r"groupShortName: '([^']+)'", group).group(1)) <= 12
    assert "actionGroups: actionGroupIds" in alerts and "actionGroupId: id" in alerts
