"""The `tinker` namespace distribution (compat/tinker): installed with pip into a
temporary folder, a Tinker-style loop written against `import tinker` runs on a gradwire
server and gets exactly what gradwire's own SDK gets on the same seeds; the public
client signatures match Tinker 0.38's (tests/tinker_0_38_signatures.json)."""
from __future__ import annotations

import importlib.util
import inspect
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import gradwire
import tinker_loop

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIGNATURES = pathlib.Path(__file__).resolve().parent / "tinker_0_38_signatures.json"


@pytest.fixture(scope="module")
def compat_site(tmp_path_factory) -> pathlib.Path:
    """gradwire-tinker installed by pip (no dependencies, no network) into a fresh folder."""
    source = tmp_path_factory.mktemp("compat-src") / "tinker"
    shutil.copytree(ROOT / "compat" / "tinker", source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    site = tmp_path_factory.mktemp("compat-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(source)], check=True)
    return site


def run_with_tinker(site: pathlib.Path, code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter that finds `tinker` only in `site`."""
    path = os.pathsep.join([str(site), str(ROOT / "tests"), *sys.path])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", **env})


LOOP = """
import json, tinker, tinker.types.tensor_data, tinker.lib.public_interfaces
from tinker.types import LossFnType
assert tinker.types.tensor_data.TensorData is tinker.TensorData
assert tinker.lib.public_interfaces.APIFuture is tinker.APIFuture and tinker.StopReason
import tinker_loop
print(json.dumps(tinker_loop.run(tinker, tinker.ServiceClient(progress=False))))
"""


def test_a_tinker_loop_gets_what_gradwire_gets(compat_site, server, service):
    ran = run_with_tinker(compat_site, LOOP, {"TINKER_BASE_URL": f"http://{server.address}"})
    assert ran.returncode == 0, ran.stderr
    via_tinker = json.loads(ran.stdout.strip().splitlines()[-1])
    via_gradwire = tinker_loop.run(gradwire, service)
    assert via_tinker["state_expires"] == [True]
    for key in ("ids_importance_sampling", "ids_gspo"):
        assert all(via_tinker[key]) and set(via_tinker[key]).isdisjoint(via_gradwire.pop(key))
        via_tinker.pop(key)
    assert via_tinker.keys() == via_gradwire.keys()
    for key, value in via_gradwire.items():
        assert via_tinker[key] == pytest.approx(value, rel=1e-6, abs=1e-6) if isinstance(value, float) \
            else via_tinker[key] == value, key


def test_tinker_is_only_there_when_installed_and_never_beside_the_real_one(compat_site):
    assert importlib.util.find_spec("tinker") is None  # gradwire itself provides no `tinker`
    assert not any((ROOT / folder / "tinker").exists() for folder in ("sdk", "service"))
    fake = compat_site.parent / "with-real-tinker"
    shutil.copytree(compat_site, fake)
    (fake / "tinker-0.38.0.dist-info").mkdir()
    (fake / "tinker-0.38.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: tinker\nVersion: 0.38.0\n")
    ran = run_with_tinker(fake, "import warnings; warnings.simplefilter('error'); import tinker", {})
    assert ran.returncode != 0 and "uninstall one of them" in ran.stderr


def test_tinker_environment_variables_configure_the_client(compat_site):
    ran = run_with_tinker(compat_site, "import tinker; c = tinker.ServiceClient(); print(c.base_url)",
                          {"TINKER_BASE_URL": "http://example.invalid:1234", "TINKER_API_KEY": "k"})
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "example.invalid:1234"


# ---- signatures ------------------------------------------------------------------------------------

def _public_methods(cls) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(member) for name, member in inspect.getmembers(cls, inspect.isfunction)
            if not name.startswith("_")}


def test_client_signatures_match_tinker_0_38():
    """Each method of Tinker 0.38's clients exists on gradwire's with the same parameter
    names in the same order (gradwire may add parameters only after them, with defaults
    or keyword-only), and is a coroutine function exactly when Tinker's is (_async)."""
    expected = json.loads(SIGNATURES.read_text())
    classes = {"ServiceClient": gradwire.ServiceClient, "TrainingClient": gradwire.TrainingClient,
               "SamplingClient": gradwire.SamplingClient, "RestClient": gradwire.RestClient,
               "APIFuture": gradwire.APIFuture}
    problems = []
    for class_name, methods in expected["classes"].items():
        actual = _public_methods(classes[class_name])
        actual["__init__"] = inspect.signature(classes[class_name].__init__)
        for method, parameters in methods.items():
            if method not in actual:
                problems.append(f"{class_name}.{method} is missing")
                continue
            names = [p for p in actual[method].parameters if p != "self"]
            params = [actual[method].parameters[p] for p in names]
            head = [p for p in names if actual[method].parameters[p].kind not in
                    (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)][:len(parameters)]
            if head != parameters:
                problems.append(f"{class_name}.{method}{tuple(names)}: Tinker has {tuple(parameters)}")
            extra = [p for p in params[len(parameters):] if p.kind not in
                     (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
            if any(p.default is inspect.Parameter.empty and p.kind != inspect.Parameter.KEYWORD_ONLY
                   for p in extra):
                problems.append(f"{class_name}.{method}: added parameters need defaults")
            is_async = inspect.iscoroutinefunction(getattr(classes[class_name], method))
            if method != "__init__" and is_async != method.endswith("_async"):
                problems.append(f"{class_name}.{method}: async is {is_async}")
    for name in expected["top_level_names"]:
        if not hasattr(gradwire, name):
            problems.append(f"gradwire.{name} is missing")
    assert not problems, "\n".join(problems)
