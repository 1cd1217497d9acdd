"""infra/: the container image and the kustomize manifests, read statically (tests/integration/test_ray_jobs.py
submits jobs to a real local Ray cluster).

What runs where:
- Static checks read infra/docker/Dockerfile and every object of infra/k8s/base and of each overlay. Overlays
  are rendered in Python by `render()` below, a small kustomize subset (resources, namespace, images, and
  RFC 6902 `patches`) that covers exactly what infra/k8s uses; a kustomization using anything else fails the
  test instead of being half-rendered. Where `kubectl` is installed, its own `kubectl kustomize` output must
  equal ours.
- KubeRay objects are validated against the v1.7.0 CRD schemas in shared/kuberay/crds/ with unknown fields
  rejected, as `kubectl apply` (field validation "Strict") does.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from functools import cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

from common import configlib
from common.configlib import read_yaml
from tests.helpers.kustomize import containers, load_yaml_docs, overlay_objects, render

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "infra" / "k8s"
DOCKERFILE = REPO / "infra" / "docker" / "Dockerfile"
DOCS = REPO / "docs" / "kubernetes.md"
OVERLAYS = ("dev", "prod", "prod-volume")
KUBERAY_KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayCronJob": "raycronjobs"}
# The Secrets the manifests may reference; docs/kubernetes.md must tell how to create each one.
SECRETS = {"omnidiff-s3", "omnidiff-ray-auth", "omnidiff-mlflow-db"}
TOKENIZE_KINDS = {"messages", "image-text", "speech-text", "text"}
RAY_BIN = Path(sys.executable).parent / "ray"  # the venv's CLI, matching the venv's Ray


def _obj_id(label_obj: tuple[str, dict]) -> str:
    label, o = label_obj
    return f"{label}:{o['kind']}/{o['metadata']['name']}"


ALL_OBJECTS = overlay_objects(K8S, OVERLAYS)
KUBERAY_OBJECTS = [lo for lo in ALL_OBJECTS if lo[1]["kind"] in KUBERAY_KINDS]


def of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(label, o) for label, o in ALL_OBJECTS if o["kind"] == kind]


def cluster_spec(o: dict) -> dict:
    """The RayClusterSpec inside a KubeRay object."""
    if o["kind"] == "RayCluster":
        return o["spec"]
    return job_spec(o)["rayClusterSpec"]


def job_spec(o: dict) -> dict | None:
    """The RayJobSpec inside a KubeRay object (a RayCronJob's jobTemplate is one); None for a RayCluster."""
    if o["kind"] == "RayJob":
        return o["spec"]
    if o["kind"] == "RayCronJob":
        return o["spec"]["jobTemplate"]
    return None


# --------------------------------------------------------------------------------------------- CRD schemas

def shared_dir() -> Path | None:
    # CI runs in a fresh clone with shared/ beside it; developers have it at /work/shared.
    for candidate in (REPO.parent / "shared", Path("/work/shared")):
        if (candidate / "kuberay" / "crds").is_dir():
            return candidate
    return None


def _strict(schema: Any) -> Any:
    """A CRD's structural schema as JSON Schema, with the API server's behaviour made explicit:
    unknown fields are errors (kubectl's default field validation is Strict), and int-or-string fields
    accept both types."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: _strict(s) for name, s in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = _strict(out[key])
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


@cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    shared = shared_dir()
    if shared is None:
        pytest.skip("KubeRay CRDs not found: neither ../shared/kuberay/crds (beside the repo) nor "
                    "/work/shared/kuberay/crds exists")
    path = shared / "kuberay" / "crds" / f"ray.io_{KUBERAY_KINDS[kind]}.yaml"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~1 MB each
    crd = yaml.load(path.read_text(), Loader=loader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def test_strict_schema_rejects_unknown_and_misspelled_fields():
    # The validation below is only as good as this: a typo must not be silently pruned.
    base = load_yaml_docs(K8S / "base" / "raycluster.yaml")[0]
    validator = crd_validator("RayCluster")
    assert not list(validator.iter_errors(base))
    typo = copy.deepcopy(base)
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert any("maxReplica" in e.message for e in validator.iter_errors(typo))
    deep = copy.deepcopy(base)
    deep["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limit"] = {"cpu": "1"}
    assert list(validator.iter_errors(deep))
    int_or_string = copy.deepcopy(base)
    int_or_string["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 4
    assert not list(validator.iter_errors(int_or_string))


@pytest.mark.parametrize("label_obj", KUBERAY_OBJECTS, ids=_obj_id)
def test_kuberay_object_matches_crd_schema(label_obj):
    label, o = label_obj
    assert o["apiVersion"] == "ray.io/v1", f"{label}: {o['kind']} must use ray.io/v1"
    errors = sorted(crd_validator(o["kind"]).iter_errors(o), key=lambda e: list(e.path))
    assert not errors, f"{label} {o['kind']}/{o['metadata']['name']}:\n" + "\n".join(
        f"  at {'/'.join(map(str, e.path))}: {e.message[:300]}" for e in errors[:10])


def test_every_overlay_renders_every_base_object():
    base = {(o["kind"], o["metadata"]["name"]) for label, o in ALL_OBJECTS if label.startswith("base/")}
    for overlay in OVERLAYS:
        rendered = {(o["kind"], o["metadata"]["name"]) for o in render(K8S / "overlays" / overlay)}
        assert base <= rendered, f"overlays/{overlay} lost {sorted(base - rendered)}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed: render() is the only renderer")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_python_render_equals_kubectl_kustomize(overlay):
    out = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    ours = {(o["kind"], o["metadata"]["name"]): o for o in render(K8S / "overlays" / overlay)}
    theirs = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(out.stdout) if o}
    assert ours == theirs


def test_platform_and_job_labels_select_what_the_docs_say():
    # docs/kubernetes.md applies `-l omnidiff.io/part=platform` and creates jobs with `-l omnidiff.io/job=<name>`:
    # a RayJob labelled `platform` would start on every platform apply; an unlabelled object would never deploy.
    docs = DOCS.read_text()
    for label, o in ALL_OBJECTS:
        labels = o["metadata"].get("labels", {})
        part = labels.get("omnidiff.io/part")
        assert part == ("job" if o["kind"] == "RayJob" else "platform"), f"{label} {o['kind']}: omnidiff.io/part={part}"
        if o["kind"] == "RayJob":
            job = labels["omnidiff.io/job"]
            assert f"-l omnidiff.io/job={job}" in docs, f"docs/kubernetes.md never starts the {job} job"
    assert "-l omnidiff.io/part=platform" in docs


# --------------------------------------------------------------------------------------------- KubeRay shape

def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def ray_pin() -> str:
    pins = [m.group(1) for dep in pyproject()["project"]["dependencies"]
            if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?==([\w.]+)", dep.replace(" ", "")))]
    assert len(pins) == 1, "pyproject.toml must pin ray with == exactly once"
    return pins[0]


def quantity(value: str | int) -> float:
    """Kubernetes resource quantity -> number (cores or bytes)."""
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert m and (m.group(2) in units or not m.group(2)), f"unparseable quantity {value!r}"
    return float(m.group(1)) * units.get(m.group(2), 1)


def ray_pods(spec: dict) -> list[tuple[str, dict]]:
    """(group name, group spec) for the head and every worker group of a RayClusterSpec."""
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


@pytest.mark.parametrize("label_obj", KUBERAY_OBJECTS, ids=_obj_id)
def test_ray_clusters_use_project_ray_token_auth_and_sized_shm(label_obj):
    label, o = label_obj
    spec = cluster_spec(o)
    assert spec["rayVersion"] == ray_pin(), f"{label}: rayVersion must equal pyproject's ray pin"
    assert spec["authOptions"] == {"mode": "token", "secretName": "omnidiff-ray-auth"}, label
    for group, g in ray_pods(spec):
        pod = g["template"]["spec"]
        ray = pod["containers"][0]
        shm = [v for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"]
        mounts = {m["name"]: m["mountPath"] for m in ray.get("volumeMounts", [])}
        assert len(shm) == 1 and mounts.get(shm[0]["name"]) == "/dev/shm", \
            f"{label} {group}: the Ray container needs a medium: Memory emptyDir at /dev/shm"
        size = quantity(shm[0]["emptyDir"]["sizeLimit"])
        store = float(g["rayStartParams"]["object-store-memory"])
        memory = quantity(ray["resources"]["limits"]["memory"])
        # Ray's object store is a file in /dev/shm; tmpfs pages count against the memory limit.
        assert store <= size < memory, \
            f"{label} {group}: need object store ({store:.3g}) <= /dev/shm ({size:.3g}) < memory limit ({memory:.3g})"


def test_interactive_cluster_autoscales_gpu_and_cpu_groups():
    for label, o in of_kind("RayCluster"):
        spec = o["spec"]
        assert spec["enableInTreeAutoscaling"] is True, label
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        for name, g in groups.items():
            assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], f"{label} {name}"
        gpus = {name: quantity(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
                for name, g in groups.items()}
        assert gpus.get("cpu") == 0, f"{label}: the tokenization group must be CPU-only"
        if label == "overlays/dev":
            assert "gpu" not in groups, "dev is CPU-only"
        else:
            assert gpus.get("gpu", 0) > 0, f"{label}: needs a GPU worker group"
            assert groups["gpu"]["maxReplicas"] > groups["gpu"]["minReplicas"], f"{label}: GPU group must scale"


def test_dev_overlay_requests_no_gpu_anywhere():
    dev = render(K8S / "overlays" / "dev")
    assert "nvidia.com/gpu" not in json.dumps(dev)
    assert "tolerations" not in json.dumps(dev), "dev pods must not tolerate GPU taints (they would sit on GPU nodes)"


@pytest.mark.parametrize("label_obj", [lo for lo in KUBERAY_OBJECTS if lo[1]["kind"] != "RayCluster"],
                         ids=_obj_id)
def test_jobs_clean_up_after_themselves_and_have_deadlines(label_obj):
    label, o = label_obj
    job = job_spec(o)
    assert job["shutdownAfterJobFinishes"] is True, label
    assert 0 < job["ttlSecondsAfterFinished"] <= 24 * 3600, label
    assert job["activeDeadlineSeconds"] > 0, label
    assert job["backoffLimit"] >= 0, label
    submitter = job["submitterPodTemplate"]["spec"]["containers"][0]
    assert submitter["name"] == "ray-job-submitter" and "command" not in submitter, \
        f"{label}: leave the submitter command empty so KubeRay generates `ray job submit` with the token"


def test_cronjob_schedule_and_no_concurrency_field():
    for label, o in of_kind("RayCronJob"):
        spec = o["spec"]
        # KubeRay's RayCronJob has no concurrencyPolicy: overlap is handled by the tokenizer's lock.
        assert set(spec) <= {"schedule", "jobTemplate", "suspend", "timeZone"}, label
        assert len(spec["schedule"].split()) == 5, f"{label}: schedule must be a 5-field cron expression"
        assert spec["timeZone"], label
        assert spec["jobTemplate"]["activeDeadlineSeconds"] < 24 * 3600, \
            f"{label}: a run must end before the next daily one starts"


# --------------------------------------------------------------------------------------------- entrypoints

def shell_commands(entrypoint: str) -> list[list[str]]:
    """Simple commands of an entrypoint; `bash -c '...'` / `sh -c '...'` are opened up."""
    lexer = shlex.shlex(entrypoint, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in (";", "&&", "||", "&", "|"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    out = []
    for cmd in filter(None, commands):
        if cmd[0] in ("bash", "sh") and len(cmd) == 3 and cmd[1] == "-c":
            out += shell_commands(cmd[2])
        else:
            out.append(cmd)
    return out


def entrypoints() -> list[tuple[str, str]]:
    return [(f"{label}:{o['kind']}/{o['metadata']['name']}", job["entrypoint"])
            for label, o in KUBERAY_OBJECTS if (job := job_spec(o))]


def test_shell_commands_opens_bash_c():
    cmds = shell_commands("bash -c 'set -e; python -m a --config x.yaml && python -m b'")
    assert cmds == [["set", "-e"], ["python", "-m", "a", "--config", "x.yaml"], ["python", "-m", "b"]]


@pytest.mark.parametrize("where,entrypoint", entrypoints(), ids=[w for w, _ in entrypoints()])
def test_entrypoint_module_and_config_exist(where, entrypoint):
    pythons = [c for c in shell_commands(entrypoint) if c[0] in ("python", "python3")]
    others = [c for c in shell_commands(entrypoint) if c[0] not in ("python", "python3", "set")]
    assert pythons and not others, f"{where}: expected only `python -m ...` commands, got {entrypoint!r}"
    for cmd in pythons:
        assert cmd[1] == "-m", f"{where}: run modules (python -m pkg.mod), not scripts: {cmd}"
        module = cmd[2]
        assert importlib.util.find_spec(module) is not None, f"{where}: module {module} does not exist"
        args = cmd[3:]
        assert "--config" in args, f"{where}: pin a config file (--config configs/...) in {shlex.join(cmd)}"
        config = REPO / args[args.index("--config") + 1]
        assert config.is_file(), f"{where}: config file {config.relative_to(REPO)} does not exist in the repo"
        assert read_yaml(config), f"{where}: {config.relative_to(REPO)} is empty"
        if module == "tokenize_jobs.run":
            assert args[args.index("--kind") + 1] in TOKENIZE_KINDS, f"{where}: --kind must be one of {TOKENIZE_KINDS}"


@pytest.mark.parametrize("where,entrypoint", entrypoints(), ids=[w for w, _ in entrypoints()])
def test_entrypoint_survives_the_kuberay_submitter_shell(where, entrypoint):
    # KubeRay's submitter runs `/bin/bash -c "... ray job submit ... -- <entrypoint> ;"` with the entrypoint pasted
    # in unquoted: shell operators, `$VAR`s or stray quotes in it would be taken by that shell, not the job.
    probe = f"{shlex.quote(sys.executable)} -c 'import json, sys; print(json.dumps(sys.argv[1:]))' {entrypoint} ;"
    out = subprocess.run(["/bin/bash", "-c", probe], capture_output=True, text=True, timeout=30, env={})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == shlex.split(entrypoint), f"{where}: the submitter shell changes the entrypoint"


TRAIN_JOBS = [lo for lo in KUBERAY_OBJECTS if "pipelines.train" in (job_spec(lo[1]) or {}).get("entrypoint", "")]


@pytest.mark.parametrize("label_obj", TRAIN_JOBS, ids=_obj_id)
def test_train_job_cluster_fits_its_config_scaling(label_obj):
    from pipelines.train.config import TrainConfig

    label, o = label_obj
    (cmd,) = [c for c in shell_commands(job_spec(o)["entrypoint"]) if c[:3] == ["python", "-m", "pipelines.train"]]
    args = cmd[3:]
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    scaling = configlib.load(TrainConfig, REPO / args[args.index("--config") + 1], overrides).scaling
    groups = cluster_spec(o)["workerGroupSpecs"]

    def total(resource: str) -> float:
        return sum(g["replicas"] * quantity(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                                            .get(resource, 0)) for g in groups)

    assert all(g["minReplicas"] == g["replicas"] == g["maxReplicas"] for g in groups), \
        f"{label}: a training cluster has a fixed size (the world size does not change mid-run)"
    assert total("cpu") >= scaling.num_workers * scaling.cpus_per_worker, f"{label}: too few CPUs for {scaling}"
    if scaling.use_gpu:
        # Every GPU used, none missing: Ray Train would wait forever for a missing one and idle GPUs cost money.
        assert total("nvidia.com/gpu") == scaling.num_workers * scaling.gpus_per_worker, \
            f"{label}: {total('nvidia.com/gpu'):g} GPUs for {scaling.num_workers} workers x {scaling.gpus_per_worker}"
    else:
        assert total("nvidia.com/gpu") == 0, f"{label}: GPU nodes for a CPU run (scaling.use_gpu is false)"


def test_job_drivers_run_in_the_image_project_dir():
    # Relative `--config configs/...` paths resolve against the head's working directory.
    workdir = [line.split(None, 1)[1].strip() for line in DOCKERFILE.read_text().splitlines()
               if line.startswith("WORKDIR")][-1]
    for label, o in KUBERAY_OBJECTS:
        head = cluster_spec(o)["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert head.get("workingDir") == workdir, f"{label}: head workingDir must be the image WORKDIR {workdir}"


# --------------------------------------------------------------------------------------------- pods & secrets

def pod_specs(obj: Any) -> Iterator[dict]:
    if isinstance(obj, dict):
        if isinstance(obj.get("containers"), list):
            yield obj
        for value in obj.values():
            yield from pod_specs(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from pod_specs(value)


@pytest.mark.parametrize("label_obj", ALL_OBJECTS, ids=_obj_id)
def test_containers_have_limits_and_run_as_non_root(label_obj):
    label, o = label_obj
    checked = []
    for pod in pod_specs(o):
        pod_sc = pod.get("securityContext", {})
        for c in pod["containers"] + pod.get("initContainers", []):
            checked.append(c)
            where = f"{label} {o['kind']}/{o['metadata']['name']} container {c['name']}"
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(part, {})), f"{where}: needs {part}.cpu and {part}.memory"
            for name, request in res["requests"].items():
                assert quantity(request) <= quantity(res["limits"][name]), f"{where}: {name} request > limit"
            if "nvidia.com/gpu" in res["limits"] or "nvidia.com/gpu" in res["requests"]:
                assert res["requests"].get("nvidia.com/gpu") == res["limits"].get("nvidia.com/gpu"), where
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot"
            assert sc.get("runAsUser", pod_sc.get("runAsUser")) == 1000, f"{where}: runAsUser 1000 (image user ray)"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation false"
    if o["kind"] == "RayCluster" and o["spec"].get("enableInTreeAutoscaling"):
        # KubeRay injects the autoscaler sidecar from these options.
        opts = o["spec"]["autoscalerOptions"]
        assert {"cpu", "memory"} <= set(opts["resources"]["limits"]) & set(opts["resources"]["requests"]), label
        assert opts["securityContext"]["runAsNonRoot"] is True, label
    if o["kind"] in ("Deployment", *KUBERAY_KINDS):
        assert checked, f"{label}: found no containers in {o['kind']}"


SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.I)
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
URI_PASSWORD = re.compile(r"://[^/\s:@]+:[^/\s@]+@")


def _env_vars(obj: Any) -> Iterator[dict]:
    if isinstance(obj, dict):
        if isinstance(obj.get("env"), list):
            yield from obj["env"]
        for value in obj.values():
            yield from _env_vars(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _env_vars(value)


def test_no_plaintext_secrets():
    files = [*K8S.rglob("*.yaml"), DOCKERFILE, REPO / ".dockerignore"]
    for path in files:
        text = path.read_text()
        for pattern in (AWS_KEY_ID, URI_PASSWORD):
            assert not pattern.search(text), f"{path.relative_to(REPO)}: looks like a credential: {pattern.pattern}"
        # A secret access key is 40 random base64 characters: upper, lower and digits all appear.
        for m in AWS_SECRET.finditer(text):
            word = m.group(0)
            assert not (re.search(r"[A-Z]", word) and re.search(r"[a-z]", word) and re.search(r"\d", word)), \
                f"{path.relative_to(REPO)}: {word[:6]}... looks like an AWS secret access key"
    for label, o in ALL_OBJECTS:
        assert o["kind"] != "Secret", f"{label}: Secrets are created out of band (docs/kubernetes.md), not committed"
        for var in _env_vars(o):
            if SECRET_NAME.search(var["name"]):
                assert "value" not in var and "secretKeyRef" in var.get("valueFrom", {}), \
                    f"{label}: env {var['name']} must come from a Secret (valueFrom.secretKeyRef), not value:"
    for line in DOCKERFILE.read_text().splitlines():
        if re.match(r"\s*(ENV|ARG)\s", line):
            assert not SECRET_NAME.search(line), f"Dockerfile: no credentials in ENV/ARG: {line.strip()}"


def _secret_refs(obj: Any) -> Iterator[str]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("secretRef", "secretKeyRef") and isinstance(value, dict):
                yield value["name"]
            elif key == "authOptions":
                yield value["secretName"]
            else:
                yield from _secret_refs(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _secret_refs(value)


def test_secret_references_are_the_documented_ones():
    referenced = {name for _, o in ALL_OBJECTS for name in _secret_refs(o)}
    assert referenced == SECRETS, f"referenced {sorted(referenced)}, expected {sorted(SECRETS)}"
    docs = DOCS.read_text()
    for name in SECRETS:
        assert re.search(rf"kubectl[^\n]*create secret generic {name}\b", docs), \
            f"docs/kubernetes.md must show `kubectl create secret generic {name} ...`"
    # Every Ray container gets the S3 credentials.
    for label, o in KUBERAY_OBJECTS:
        for group, g in ray_pods(cluster_spec(o)):
            refs = [e.get("secretRef", {}).get("name") for e in g["template"]["spec"]["containers"][0]["envFrom"]]
            assert "omnidiff-s3" in refs, f"{label} {group}: needs envFrom secretRef omnidiff-s3"


def test_config_map_references_resolve():
    for overlay in OVERLAYS:
        objs = render(K8S / "overlays" / overlay)
        maps = {o["metadata"]["name"] for o in objs if o["kind"] == "ConfigMap"}
        refs = {e["configMapRef"]["name"] for o in objs for c in containers(o) for e in c.get("envFrom", [])
                if "configMapRef" in e}
        assert refs and refs <= maps, f"overlays/{overlay}: ConfigMaps {sorted(refs - maps)} are not defined"
        assert all(o["metadata"].get("namespace") == f"omnidiff{'-dev' if overlay == 'dev' else ''}"
                   for o in objs if o["kind"] != "Namespace"), f"overlays/{overlay}: objects outside its namespace"


def _container_env(objs: list[dict], container: dict) -> dict[str, Any]:
    """A container's environment as Kubernetes builds it: envFrom ConfigMaps first, then `env` over them."""
    maps = {o["metadata"]["name"]: o.get("data", {}) for o in objs if o["kind"] == "ConfigMap"}
    env: dict[str, Any] = {}
    for e in container.get("envFrom", []):
        if "configMapRef" in e:
            env.update(maps.get(e["configMapRef"]["name"], {}))
    env.update({e["name"]: e.get("value") for e in container.get("env", [])})
    return env


def test_training_pods_pin_the_process_group_interface():
    # One Ray Train worker per pod: without these gloo may connect to 127.0.0.1 ("Gloo connectFullMesh failed").
    # Every pod of a training cluster (the train jobs' and the interactive cluster that `ray job submit` uses).
    checked = 0
    for overlay in OVERLAYS:
        objs = render(K8S / "overlays" / overlay)
        for o in objs:
            if o["kind"] not in KUBERAY_KINDS:
                continue
            spec = job_spec(o)
            if spec is not None and "pipelines.train" not in spec.get("entrypoint", ""):
                continue
            cluster = cluster_spec(o)
            for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
                for c in group["template"]["spec"]["containers"]:
                    env = _container_env(objs, c)
                    where = f"overlays/{overlay} {o['kind']}/{o['metadata']['name']} {group.get('groupName', 'head')}"
                    for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
                        assert env.get(key) == "eth0", f"{where}: {key} is {env.get(key)!r}, expected eth0"
                    checked += 1
    assert checked >= 2 * len(OVERLAYS), "no training cluster found in the overlays"


def test_mlflow_deployment_and_service():
    for overlay in OVERLAYS:
        objs = render(K8S / "overlays" / overlay)
        (dep,) = [o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "omnidiff-mlflow"]
        (svc,) = [o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == "omnidiff-mlflow"]
        (cm,) = [o for o in objs if o["kind"] == "ConfigMap"]
        pod = dep["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert svc["spec"]["selector"].items() <= labels.items(), "Service selects no MLflow pod"
        (c,) = pod["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        (svc_port,) = svc["spec"]["ports"]
        assert svc_port["targetPort"] in ports
        args = c["command"] + c["args"]
        assert args[:2] == ["mlflow", "server"] and "--serve-artifacts" in args
        assert any(re.fullmatch(r"--artifacts-destination=s3://\S+", a) for a in args), "artifact root must be S3"
        assert f"--port={ports[svc_port['targetPort']]}" in args
        assert not any("postgresql" in a or ("://" in a and "@" in a) for a in args), "no DB URI on the command line"
        env = {e["name"]: e for e in c["env"]}
        # `mlflow server` reads --backend-store-uri from MLFLOW_BACKEND_STORE_URI (its click envvar), so the DB
        # password stays off the command line.
        assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "omnidiff-mlflow-db", "key": "uri"}
        assert {"secretRef": {"name": "omnidiff-s3"}} in c["envFrom"]
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/health", "port": svc_port["targetPort"]}, probe
        # Jobs reach the server by the Service name; MLflow's Host check must accept it.
        uri = cm["data"]["MLFLOW_TRACKING_URI"]
        assert uri == f"http://{svc['metadata']['name']}:{svc_port['port']}"
        allowed = env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
        host = f"{svc['metadata']['name']}:{svc_port['port']}"
        assert any(fnmatch(host, a) for a in allowed) and any(fnmatch("localhost:5000", a) for a in allowed)


# --------------------------------------------------------------------------------------------- Dockerfile

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and ${ARG}s replaced by their defaults."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out, args = [], {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        ins, rest = line.split(None, 1)
        rest = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), rest)
        if ins.upper() == "ARG" and "=" in rest:
            name, default = rest.split("=", 1)
            args[name.strip()] = default.strip()
        out.append((ins.upper(), rest))
    return out


def test_dockerfile_pins_official_ray_cuda_image_of_project_ray_version():
    froms = [arg for ins, arg in dockerfile_instructions() if ins == "FROM"]
    assert len(froms) == 1, "one stage, FROM the Ray image"
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-cu\d+", froms[0].strip())
    assert m, f"FROM {froms[0]}: use a pinned rayproject/ray:<ray>-py3XX-cuXXX tag (not latest/gpu aliases)"
    assert m.group(1) == ray_pin(), f"base image Ray {m.group(1)} != pyproject's ray=={ray_pin()}"


def test_dockerfile_runs_as_non_root_and_copies_the_packages():
    ins = dockerfile_instructions()
    users = [arg.strip() for i, arg in ins if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "final USER must be non-root"
    assert users[-1].split(":")[0] in ("1000", "ray"), "run as the image's ray user (uid 1000), as the pods do"
    assert any(i == "WORKDIR" for i, _ in ins)
    copied = {src.rstrip("/") for i, arg in ins if i == "COPY"
              for src in [a for a in arg.split() if not a.startswith("--")][:-1]}
    packages = {p.rstrip("*") for p in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"configs", "pyproject.toml"} <= copied, f"COPY is missing {sorted(packages - copied)}"
    ignored = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip() and p[0] != "#"]
    for src in copied:
        assert not any(fnmatch(src, p.rstrip("/")) for p in ignored), f".dockerignore excludes COPY source {src}"
    assert {".venv", ".git"} <= set(ignored), ".dockerignore must keep the venv and git history out of the context"
    run = " ".join(arg for i, arg in ins if i == "RUN")
    assert re.search(r"torch==[\d.]+\S*\s.*--index-url\s+\S+/cu\d+", run), "install a pinned CUDA torch wheel"
