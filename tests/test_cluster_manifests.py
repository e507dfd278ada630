"""cluster/: KubeRay manifests, Kustomize overlays, the Secret template and the training image.

Every manifest (the base and each overlay, rendered the way ``kubectl kustomize`` renders them) is
validated against the KubeRay CRD schemas carried in ``cluster/crds/`` (jsonschema on the v1
``openAPIV3Schema``, unknown fields rejected wherever the schema lists ``properties``), built-in kinds
and every embedded pod template with ``kubernetes-validate --strict``; every RayJob entrypoint names a
config in ``configs/`` that loads with its ``--set`` overrides; the Dockerfile installs the package
``pyproject.toml`` defines; no credential is ever inline.
"""
from __future__ import annotations

import copy
import functools
import glob
import os
import re
import shlex
import shutil
import subprocess

import jsonschema
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "cluster")
# KubeRay's published CRDs (1.7.0, trimmed to the v1 schemas; see cluster/crds/README.md), carried in the
# repo so a fresh clone validates on its own; $SSFER_KUBERAY_CRDS points at another copy (.json or .yaml).
CRD_DIR = os.environ.get("SSFER_KUBERAY_CRDS") or os.path.join(CLUSTER, "crds")
K8S_VERSION = "1.32"
SECRET_NAME = "ssfer-s3"
CONFIGMAP_NAME = "ssfer-storage"
SECRET_TEMPLATE = os.path.join(CLUSTER, "s3-secret.template.yaml")
OVERLAYS = sorted(os.path.relpath(os.path.dirname(p), CLUSTER)
                  for p in glob.glob(os.path.join(CLUSTER, "overlays", "*", "kustomization.yaml")))
TARGETS = ["base"] + OVERLAYS
SECRETISH = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|KEY_ID|CREDENTIAL|PRIVATE)", re.I)


# ------------------------------------------------------------------------------- a small kustomize
# Enough of kustomize for our overlays (resources, namespace, images, JSON-6902 patches); anything
# else is an error so the renderer can never silently disagree with kubectl. Where kubectl is
# installed, test_renderer_matches_kubectl_kustomize checks the two agree.

_SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)     # the CRDs are 1-2 MB of YAML


def _load_docs(path):
    with open(path) as f:
        return [d for d in yaml.load_all(f, Loader=_Loader) if d]


def _pointer(path):
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")] if path else []


def _json_patch(doc, ops, where):
    """RFC 6902 add/replace/remove/test on a plain dict (the ops our overlays use)."""
    for op in ops:
        parts = _pointer(op["path"])
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        kind = op["op"]
        if isinstance(parent, list):
            key = len(parent) if parts[-1] == "-" else int(parts[-1])
        else:
            key = parts[-1]
            if kind in ("replace", "remove", "test") and key not in parent:
                raise AssertionError(f"{where}: {kind} of missing path {op['path']}")
        if kind == "add" and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(op["value"]))
        elif kind in ("add", "replace"):
            parent[key] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[key]
        elif kind == "test":
            assert parent[key] == op["value"], f"{where}: test failed at {op['path']}"
        else:
            raise AssertionError(f"{where}: unsupported op {kind}")


def _matches(doc, target):
    md = doc.get("metadata", {})
    for key, val in target.items():
        if key == "kind" and doc.get("kind") != val:
            return False
        if key == "name" and md.get("name") != val:
            return False
        if key == "labelSelector":
            want = dict(kv.split("=", 1) for kv in val.split(","))
            if any(md.get("labels", {}).get(k) != v for k, v in want.items()):
                return False
        if key not in ("kind", "name", "labelSelector", "group", "version"):
            raise AssertionError(f"unsupported patch target key {key}")
    return True


def _set_images(node, images):
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("containers", "initContainers") and isinstance(v, list):
                for c in v:
                    img = c.get("image", "")
                    name, _, tag = img.partition(":")
                    for rule in images:
                        if rule["name"] == name:
                            c["image"] = rule.get("newName", name) + ":" + str(rule.get("newTag", tag))
            else:
                _set_images(v, images)
    elif isinstance(node, list):
        for v in node:
            _set_images(v, images)


def render(kdir):
    """Render a kustomization folder into a list of documents."""
    kfile = os.path.join(kdir, "kustomization.yaml")
    (k,) = _load_docs(kfile)
    unknown = set(k) - _SUPPORTED
    assert not unknown, f"{kfile}: fields {sorted(unknown)} are not supported by the test renderer"
    docs = []
    for res in k.get("resources", []):
        p = os.path.normpath(os.path.join(kdir, res))
        docs.extend(render(p) if os.path.isdir(p) else _load_docs(p))
    for patch in k.get("patches", []):
        assert set(patch) <= {"path", "patch", "target"}, f"{kfile}: unsupported patch form {patch}"
        text = open(os.path.join(kdir, patch["path"])).read() if "path" in patch else patch["patch"]
        ops = yaml.safe_load(text)
        assert isinstance(ops, list) and "target" in patch, f"{kfile}: only JSON-6902 patches with a target"
        hits = [d for d in docs if _matches(d, patch["target"])]
        assert hits, f"{kfile}: patch target {patch['target']} matches nothing"
        for d in hits:
            _json_patch(d, ops, kfile)
    if k.get("images"):
        for d in docs:
            _set_images(d, k["images"])
    if k.get("namespace"):
        for d in docs:
            d.setdefault("metadata", {})["namespace"] = k["namespace"]
    return docs


@functools.lru_cache(maxsize=None)
def _rendered(target):
    return render(os.path.join(CLUSTER, target))


def rendered(target):
    return copy.deepcopy(_rendered(target))


# ------------------------------------------------------------------------------- CRD schemas


def _strict(schema):
    """Close every object schema that lists ``properties`` (unless it preserves unknown fields)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.lru_cache(maxsize=None)
def crd_validator(kind):
    stem = {"RayJob": "ray.io_rayjobs", "RayCluster": "ray.io_rayclusters"}[kind]
    path = next((os.path.join(CRD_DIR, stem + ext) for ext in (".json", ".yaml")
                 if os.path.exists(os.path.join(CRD_DIR, stem + ext))), os.path.join(CRD_DIR, stem + ".json"))
    if not os.path.exists(path):
        pytest.fail(f"KubeRay CRD schema not found: {path} (set SSFER_KUBERAY_CRDS)")
    (crd,) = _load_docs(path)
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(v1["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def validate_crd(doc):
    errors = sorted(crd_validator(doc["kind"]).iter_errors(doc), key=lambda e: list(e.path))
    msgs = [f"{doc['kind']}/{doc['metadata'].get('name')}: {'.'.join(map(str, e.path))}: {e.message}"
            for e in errors]
    assert doc["apiVersion"] == "ray.io/v1", doc["apiVersion"]
    name = doc["metadata"].get("name", "")
    # RayJob names prefix generated cluster/service names: KubeRay caps them well below 63.
    if not DNS1123.match(name) or len(name) > 47:
        msgs.append(f"{doc['kind']}/{name}: metadata.name must be a DNS-1123 label of at most 47 characters")
    return msgs


def validate_builtin(doc):
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{doc['kind']}/{doc['metadata'].get('name')}: {'.'.join(map(str, e.path))}: {e.message}"]
    return []


# ------------------------------------------------------------------------------- walking the manifests


def rayjobs(docs):
    return [d for d in docs if d["kind"] == "RayJob"]


def cluster_specs(docs):
    """(owner name, RayClusterSpec) for every RayCluster and every RayJob's inline cluster."""
    out = []
    for d in docs:
        if d["kind"] == "RayCluster":
            out.append((d["metadata"]["name"], d["spec"]))
        elif d["kind"] == "RayJob" and "rayClusterSpec" in d["spec"]:
            out.append((d["metadata"]["name"], d["spec"]["rayClusterSpec"]))
    return out


def pod_templates(docs):
    """(where, PodTemplateSpec) for every pod the manifests create."""
    out = []
    for owner, spec in cluster_specs(docs):
        out.append((f"{owner}/head", spec["headGroupSpec"]["template"]))
        for g in spec.get("workerGroupSpecs", []):
            out.append((f"{owner}/{g['groupName']}", g["template"]))
    for d in rayjobs(docs):
        if "submitterPodTemplate" in d["spec"]:
            out.append((f"{d['metadata']['name']}/submitter", d["spec"]["submitterPodTemplate"]))
    return out


def ray_containers(docs):
    """(where, container) for the Ray head and worker containers (the ones running our code)."""
    out = []
    for owner, spec in cluster_specs(docs):
        groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
        for gname, g in groups:
            out.append((f"{owner}/{gname}", g["template"]["spec"]["containers"][0], g))
    return out


def _gpus(container):
    return int(str(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)))


# ------------------------------------------------------------------------------- tests: schemas


def test_layout_has_every_job_and_overlays():
    comps = {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in rayjobs(rendered("base"))}
    assert {"shard-build", "pretrain", "finetune", "semisup", "pipeline"} <= comps
    kinds = [d["kind"] for d in rendered("base")]
    assert "RayCluster" in kinds and "ConfigMap" in kinds
    assert OVERLAYS, "expected size overlays under cluster/overlays/"
    assert os.path.exists(os.path.join(CLUSTER, "Dockerfile"))
    assert os.path.exists(SECRET_TEMPLATE)


@pytest.mark.parametrize("target", TARGETS)
def test_manifests_validate_against_kuberay_crds_and_k8s(target):
    docs = rendered(target)
    errors = []
    for d in docs:
        if d["apiVersion"].startswith("ray.io/"):
            errors += validate_crd(d)
        else:
            errors += validate_builtin(d)
    for where, tmpl in pod_templates(docs):
        # The CRD types pod templates too, but kubernetes-validate also knows formats and required fields.
        pt = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": tmpl}
        errors += [f"{where}: {m}" for m in validate_builtin(pt)]
    assert not errors, "\n".join(errors)


def test_secret_template_validates_and_holds_placeholders_only():
    docs = _load_docs(SECRET_TEMPLATE)
    assert [d["kind"] for d in docs] == ["Secret"]
    (secret,) = docs
    assert not validate_builtin(secret)
    assert secret["metadata"]["name"] == SECRET_NAME
    assert "data" not in secret, "the template uses stringData placeholders, never base64 data"
    for key, val in secret["stringData"].items():
        assert re.fullmatch(r"REPLACE_WITH_[A-Z_]+|https://s3\.example\.com", str(val)), (key, val)


def test_strict_validation_rejects_unknown_fields_and_bad_types():
    """The validators can fail: a typo'd field, a wrong type and a bad Secret are all caught."""
    job = rayjobs(rendered("base"))[0]
    typo = copy.deepcopy(job)
    typo["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}
    assert any("rayStartParam" in m for m in validate_crd(typo))
    typo = copy.deepcopy(job)
    typo["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    assert any("volumeMount" in m for m in validate_crd(typo))
    bad = copy.deepcopy(job)
    bad["spec"]["backoffLimit"] = "two"
    assert validate_crd(bad)
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("maxReplicas")
    assert validate_crd(bad)
    (secret,) = _load_docs(SECRET_TEMPLATE)
    secret = copy.deepcopy(secret)
    secret["stringdata"] = secret.pop("stringData")
    assert validate_builtin(secret)


# ------------------------------------------------------------------------------- tests: semantics


@pytest.mark.parametrize("target", TARGETS)
def test_pods_share_image_shm_and_secret_by_reference(target):
    docs = rendered(target)
    (secret,) = _load_docs(SECRET_TEMPLATE)
    secret_keys = set(secret["stringData"])
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    images = set()
    for where, c, group in ray_containers(docs):
        images.add(c["image"])
        assert c.get("workingDir") == "/app", f"{where}: entrypoints name configs relative to /app"
        spec = group["template"]["spec"]
        shm = [v for v in spec.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert shm, f"{where}: needs a memory-backed emptyDir for /dev/shm"
        assert any(m["mountPath"] == "/dev/shm" and m["name"] == shm[0]["name"] for m in c["volumeMounts"]), where
        assert shm[0]["emptyDir"].get("sizeLimit"), f"{where}: /dev/shm needs a sizeLimit (it counts as pod memory)"
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})}
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert var in refs and refs[var]["name"] == SECRET_NAME, f"{where}: {var} must come from the Secret"
            assert not refs[var].get("optional"), where
        for var, ref in refs.items():
            assert ref["key"] in secret_keys, f"{where}: {var} refers to key {ref['key']} not in the Secret template"
        for ef in c.get("envFrom", []):
            if "configMapRef" in ef:
                assert ef["configMapRef"]["name"] in configmaps, f"{where}: ConfigMap {ef['configMapRef']} missing"
    assert len(images) == 1, f"every Ray pod runs the same image, got {images}"
    for where, tmpl in pod_templates(docs):
        for c in tmpl["spec"]["containers"]:
            assert c["image"] in images, f"{where}: submitter image {c['image']} differs from the Ray image"


@pytest.mark.parametrize("target", TARGETS)
def test_every_pod_runs_unprivileged_with_a_read_only_root(target):
    """Pod security: non-root as the image's user, no privilege escalation, every capability dropped, a
    read-only root filesystem; /tmp (Ray's session dir, caches, HOME) and /dev/shm are the writable mounts."""
    uid = int(re.search(r"useradd[^\n]*--uid (\d+)", open(os.path.join(CLUSTER, "Dockerfile")).read()).group(1))
    templates = pod_templates(rendered(target))
    assert len(templates) == 18, [w for w, _ in templates]    # RayCluster 3 + 5 RayJobs × (submitter, head, worker)
    for where, tmpl in templates:
        pod = tmpl["spec"].get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, f"{where}: securityContext.runAsNonRoot must be true"
        assert pod.get("runAsUser") == uid, f"{where}: runAsUser must be the image's user {uid}"
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        volumes = {v["name"]: v for v in tmpl["spec"].get("volumes", [])}
        for c in tmpl["spec"]["containers"]:
            sc = c.get("securityContext", {})
            cw = f"{where}/{c['name']}"
            assert sc.get("allowPrivilegeEscalation") is False, f"{cw}: allowPrivilegeEscalation must be false"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{cw}: drop every capability"
            assert sc.get("readOnlyRootFilesystem") is True, f"{cw}: the root filesystem must be read-only"
            assert not sc.get("privileged"), cw
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]], f"{cw}: /tmp must be a writable emptyDir"
            home = {e["name"]: e.get("value") for e in c.get("env", [])}.get("HOME", "")
            assert home.startswith("/tmp/"), f"{cw}: HOME must be writable (under /tmp), got {home!r}"


@pytest.mark.parametrize("target", TARGETS + ["secret-template"])
def test_no_inline_secrets(target):
    docs = _load_docs(SECRET_TEMPLATE) if target == "secret-template" else rendered(target)
    text = yaml.safe_dump(docs)
    assert not re.search(r"AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}", text), "an AWS access key id is in the manifests"
    assert not re.search(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])", text), \
        "something shaped like an AWS secret key is in the manifests"
    for d in docs:
        if d["kind"] == "ConfigMap":
            bad = [k for k in d.get("data", {}) if SECRETISH.search(k)]
            assert not bad, f"ConfigMap {d['metadata']['name']} holds credential-like keys {bad}"
        if d["kind"] == "Secret" and target != "secret-template":
            pytest.fail("a Secret with values must not be part of the kustomization; use the template")
    for where, tmpl in pod_templates(docs):
        for c in tmpl["spec"]["containers"]:
            for e in c.get("env", []):
                if SECRETISH.search(e["name"]):
                    assert "value" not in e, f"{where}: {e['name']} is inline; use valueFrom.secretKeyRef"
            cmd = " ".join(c.get("command", []) + c.get("args", []))
            assert not SECRETISH.search(cmd), f"{where}: credential-like text in the command line"
    for job in rayjobs(docs):
        assert not SECRETISH.search(job["spec"]["entrypoint"]), job["metadata"]["name"]
        assert not SECRETISH.search(job["spec"].get("runtimeEnvYAML", "")), job["metadata"]["name"]


@pytest.mark.parametrize("target", TARGETS)
def test_gpus_are_held_only_by_autoscaled_workers(target):
    """The head never holds a GPU, so `ssfer run`'s pre-flight (on the head) fails before any GPU node starts."""
    docs = rendered(target)
    for job in rayjobs(docs):
        # No entrypoint resources: Ray runs the driver (and so the pre-flight) on the head, GPU-free.
        assert not job["spec"].get("entrypointNumGpus"), job["metadata"]["name"]
        assert not job["spec"].get("entrypointResources"), job["metadata"]["name"]
        assert job["spec"].get("shutdownAfterJobFinishes") is True, job["metadata"]["name"]
    for owner, spec in cluster_specs(docs):
        head = spec["headGroupSpec"]
        assert head["rayStartParams"].get("num-gpus") == "0", owner
        assert _gpus(head["template"]["spec"]["containers"][0]) == 0, owner
        assert spec.get("enableInTreeAutoscaling") is True, owner
        assert str(spec["rayVersion"]) == dockerfile_args()["RAY_VERSION"], owner
        for g in spec["workerGroupSpecs"]:
            n = _gpus(g["template"]["spec"]["containers"][0])
            if n:
                assert g["minReplicas"] == 0 and g.get("replicas", 0) == 0, f"{owner}/{g['groupName']}"
                assert g["template"]["spec"].get("tolerations"), f"{owner}/{g['groupName']}: GPU taint toleration"


def _env_for(docs):
    """The environment an entrypoint sees: the ConfigMap values (what the submitter pod exports)."""
    env = {}
    for d in docs:
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == CONFIGMAP_NAME:
            env.update(d["data"])
    return env


def check_entrypoint(job, env):
    """Each `ssfer run|pipeline` entrypoint parses with ssfer's own CLI, names a config in configs/, and
    that config loads with the entrypoint's --set overrides (cwd = repo root, as /app in the image)."""
    from ssfer_dist import cli
    from ssfer_dist import config as C

    name = job["metadata"]["name"]
    entry = job["spec"]["entrypoint"]
    used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", entry))
    assert used <= set(env), f"{name}: entrypoint uses {used - set(env)}, not in ConfigMap {CONFIGMAP_NAME}"
    if used:
        sub = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
        assert {"configMapRef": {"name": CONFIGMAP_NAME}} in sub.get("envFrom", []), \
            f"{name}: the submitter pod expands ${{VARS}} and must load ConfigMap {CONFIGMAP_NAME}"
    # KubeRay splices the entrypoint unquoted into the submitter's shell line
    # (`ray job submit ... -- ENTRYPOINT ; fi ; ...`): a `;`, `&&` or `|` would run on the submitter.
    assert not re.search(r"[;&|<>`]|\$\(", entry), f"{name}: shell control characters in the entrypoint"
    argv = shlex.split(os.path.expandvars(entry))     # what the submitter pod's shell passes on
    if argv[0] == "ssfer-shard":
        return  # checked in test_shard_build_entrypoint_parses
    assert argv[0] == "ssfer" and argv[1] in ("run", "pipeline"), f"{name}: {argv}"
    try:
        ns = cli.build_parser().parse_args(argv[1:])
    except SystemExit as e:
        raise AssertionError(f"{name}: `{entry}` is not a valid ssfer command line (exit {e.code})") from None
    assert ns.config.startswith("configs/"), f"{name}: {ns.config} is not under configs/"
    assert os.path.isfile(ns.config), f"{name}: entrypoint names {ns.config}, which is not in configs/"
    if argv[1] == "run":
        _check_fits(name, job, C.load_config(ns.config, ns.overrides))
    else:
        from ssfer_dist.launchers import pipeline_configs

        for cfg in pipeline_configs(ns.config, ns.overrides):
            _check_fits(f"{name}/{cfg.train.stage}", job, cfg)


@pytest.mark.parametrize("target", TARGETS)
def test_entrypoints_name_configs_that_exist_and_load(target, monkeypatch):
    docs = rendered(target)
    env = _env_for(docs)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(ROOT)
    for job in rayjobs(docs):
        check_entrypoint(job, env)


def test_entrypoint_check_rejects_bad_entrypoints(monkeypatch):
    """The entrypoint check can fail: missing config, unknown key, unknown variable, chained commands."""
    from ssfer_dist.errors import UserError

    docs = rendered("base")
    env = _env_for(docs)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(ROOT)
    (job,) = [j for j in rayjobs(docs) if j["metadata"]["name"] == "ssfer-pretrain"]
    good = job["spec"]["entrypoint"]
    cases = [
        (good.replace("configs/", "configs/no_such_"), AssertionError),
        (good + " --set scaling.num_wrokers=8", UserError),                         # typo'd key
        (good + " --set scaling.num_workers=1000", AssertionError),                 # more GPUs than the group
        (good + ' --set "run.storage=${SSFER_NOT_IN_CONFIGMAP}"', AssertionError),
        (good + " && rm -rf /", AssertionError),
        (good.replace("ssfer run", "ssfer runn"), AssertionError),
    ]
    for entry, exc in cases:
        bad = copy.deepcopy(job)
        bad["spec"]["entrypoint"] = entry
        with pytest.raises(exc):
            check_entrypoint(bad, env)


def _check_fits(where, job, cfg):
    """A GPU job's Train workers fit the GPU group (and a CPU job asks for no GPU)."""
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpu_groups = [g for g in groups if _gpus(g["template"]["spec"]["containers"][0])]
    if not cfg.scaling.use_gpu:
        return
    assert gpu_groups, f"{where}: scaling.use_gpu but the cluster has no GPU worker group"
    # The driver (on the GPU-less head) forwards its DS_ACCELERATOR to the Train workers; unset, it
    # would pick "cpu" there.
    head_env = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].get("env", [])
    assert {"name": "DS_ACCELERATOR", "value": "cuda"} in head_env, f"{where}: head needs DS_ACCELERATOR=cuda"
    per_worker = cfg.scaling.gpus_per_worker or 1.0
    capacity = sum(g["maxReplicas"] * _gpus(g["template"]["spec"]["containers"][0]) for g in gpu_groups)
    need = cfg.scaling.num_workers * per_worker
    assert need <= capacity, f"{where}: {cfg.scaling.num_workers} workers x {per_worker} GPU > {capacity} GPUs"
    for g in gpu_groups:
        c = g["template"]["spec"]["containers"][0]
        node_gpus = _gpus(c)
        cpus = float(str(c["resources"]["limits"]["cpu"]))
        workers_per_node = node_gpus / per_worker
        assert workers_per_node * cfg.scaling.cpus_per_worker <= cpus, \
            f"{where}: {workers_per_node:g} workers x {cfg.scaling.cpus_per_worker} CPUs exceed a node's {cpus:g}"


def test_shard_build_entrypoint_parses(monkeypatch):
    for target in TARGETS:
        docs = rendered(target)
        for k, v in _env_for(docs).items():
            monkeypatch.setenv(k, v)
        for job in rayjobs(docs):
            argv = shlex.split(os.path.expandvars(job["spec"]["entrypoint"]))
            if argv[0] != "ssfer-shard":
                continue
            assert argv[1] == "build" and "--ray" in argv, argv
            groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
            assert groups and all(_gpus(g["template"]["spec"]["containers"][0]) == 0 for g in groups), \
                "shard building runs on CPU workers only"
            try:
                from sharding import cli as shard_cli
            except ImportError:
                pytest.skip("sharding.cli not available yet")
            parser = shard_cli.build_parser()
            try:
                parser.parse_args(argv[1:])
            except SystemExit as e:
                pytest.fail(f"{job['metadata']['name']}: `{' '.join(argv)}` does not parse (exit {e.code})")


# ------------------------------------------------------------------------------- tests: image


@functools.lru_cache(maxsize=None)
def dockerfile_args():
    text = open(os.path.join(CLUSTER, "Dockerfile")).read()
    return dict(re.findall(r"^ARG\s+([A-Z_]+)=(\S+)", text, re.M))


def _dockerfile_runs():
    text = open(os.path.join(CLUSTER, "Dockerfile")).read()
    text = re.sub(r"\\\n", " ", text)
    return [line.strip()[4:] for line in text.splitlines() if line.strip().startswith("RUN ")], text


def test_dockerfile_installs_the_package_pyproject_defines():
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    py = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
    proj = py["project"]
    reqs = {Requirement(r).name: Requirement(r) for r in proj["dependencies"]}
    extras = set(proj.get("optional-dependencies", {}))
    args = dockerfile_args()
    runs, text = _dockerfile_runs()
    assert re.search(r"^FROM\s+\$\{CUDA_IMAGE\}", text, re.M) and "nvidia/cuda:" in args["CUDA_IMAGE"]
    assert "devel" in args["CUDA_IMAGE"], "DeepSpeed JIT-compiles CUDA ops: use a -devel CUDA image"
    # the project itself, with extras pyproject defines, from the copied sources
    installs = [r for r in runs if "pip install" in r]
    pkg = [m for r in installs for m in re.findall(r"pip install[^&]*?[\"']?\.(\[[a-z,_-]+\])?[\"']?(?:\s|$)", r)]
    assert pkg, "the image must `pip install .` (this repository's package)"
    for spec in pkg:
        for extra in filter(None, spec.strip("[]").split(",")):
            assert extra in extras, f"extra [{extra}] is not defined in pyproject.toml"
    copied = set(re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", text, re.M))
    copied = {p for line in copied for p in line.split()}
    for needed in ["pyproject.toml", "README.md", "configs"] + [
            p.rstrip("*") for p in py["tool"]["setuptools"]["packages"]["find"]["include"]]:
        assert needed in copied, f"Dockerfile does not COPY {needed}"
    # torch's CUDA build comes from the PyTorch index at versions pyproject allows
    assert "download.pytorch.org/whl/cu" in args["TORCH_INDEX_URL"]
    assert Version(args["TORCH_VERSION"]) in reqs["torch"].specifier, (args["TORCH_VERSION"], reqs["torch"])
    assert Version(args["TORCHVISION_VERSION"]) in reqs["torchvision"].specifier
    assert Version(args["RAY_VERSION"]) in reqs["ray"].specifier
    assert {"train", "default"} <= reqs["ray"].extras
    torch_first = [i for i, r in enumerate(installs) if "${TORCH_INDEX_URL}" in r]
    proj_at = [i for i, r in enumerate(installs) if pkg and re.search(r"pip install[^&]*[\"']?\.\[", r)]
    assert torch_first and proj_at and torch_first[0] < proj_at[0], "install CUDA torch before the project"
    assert "ray[train,default]==${RAY_VERSION}" in text
    assert re.search(r"^WORKDIR /app$", text, re.M)
    # nothing secret baked into the image
    assert not re.search(r"^(ENV|ARG)\s+\S*(" + SECRETISH.pattern.strip("()") + r")", text, re.M | re.I)


def test_dockerignore_keeps_the_context_small():
    ignore = open(os.path.join(CLUSTER, "Dockerfile.dockerignore")).read().split()
    assert ".venv" in ignore and ".git" in ignore


# ------------------------------------------------------------------------------- renderer cross-check


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with built-in kustomize) not installed")
@pytest.mark.parametrize("target", TARGETS)
def test_renderer_matches_kubectl_kustomize(target):
    out = subprocess.run(["kubectl", "kustomize", os.path.join(CLUSTER, target)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    theirs = [d for d in yaml.safe_load_all(out.stdout) if d]
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(rendered(target), key=key) == sorted(theirs, key=key)
