"""deploy/kubernetes (issue 8): the manifests are valid Kubernetes objects and agree with each
other, with the image, and with the edgeterm config they carry; the reloader sidecar reloads a
real edgeterm when its mounted files change.

Schemas: ``kubernetes-validate`` (PyPI) bundles the API's JSON schemas, so the check runs
offline. The ConfigMaps that kustomization.yaml generates from files are built here the way
kustomize builds them (name, one key per file, the file's text) and validated too.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_deploy_docker import (
    DOCKERFILE,
    etc_tree,
    install_prefix,
    parse_dockerfile,
)
from tests.support.certs import CertSet
from tests.support.launcher import EdgetermFactory, edgeterm_command
from tests.support.supervision import start_supervised, wait_status

yaml = pytest.importorskip("yaml", reason="PyYAML is a test dependency (pip install pyyaml)")

pytestmark = pytest.mark.timeout(120)

K8S = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")  # preStop sleep: 1.30+


def load_yaml(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    [k] = load_yaml(K8S / "kustomization.yaml")
    return k


@pytest.fixture(scope="module")
def objects(kustomization: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """Every object ``kubectl apply -k`` creates, plus the example Secrets, by (kind, name)."""
    docs = [d for r in kustomization["resources"] for d in load_yaml(K8S / r)]
    for gen in kustomization["configMapGenerator"]:
        data = {Path(f).name: (K8S / f).read_text() for f in gen["files"]}
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": gen["name"]},
                "data": data,
            }
        )
    docs += load_yaml(K8S / "secrets.example.yaml")
    out = {}
    for d in docs:
        key = (d["kind"], d["metadata"]["name"])
        assert key not in out, f"duplicate {key}"
        out[key] = d
    return out


def pod_spec(objects: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = objects["Deployment", "edgeterm"]["spec"]["template"]["spec"]
    return spec


def container(objects: dict[tuple[str, str], dict[str, Any]], name: str) -> dict[str, Any]:
    [c] = [c for c in pod_spec(objects)["containers"] if c["name"] == name]
    return c


def edgeterm_config(objects: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    return tomllib.loads(objects["ConfigMap", "edgeterm-config"]["data"]["edgeterm.toml"])


# --- schemas --------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(
    objects: dict[tuple[str, str], dict[str, Any]], version: str
) -> None:
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is a test dependency"
    )
    problems = []
    for key, doc in objects.items():
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            problems.append(f"{key}: {exc.message} at {'.'.join(map(str, exc.path))}")
    assert not problems, "\n".join(problems)
    # and the validator does reject what the API server would
    broken = copy.deepcopy(objects["Deployment", "edgeterm"])
    broken["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []  # a typo
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, version, strict=True)


def test_generator_files_and_resources_exist(kustomization: dict[str, Any]) -> None:
    for r in kustomization["resources"]:
        assert (K8S / r).is_file(), r
    for gen in kustomization["configMapGenerator"]:
        for f in gen["files"]:
            assert (K8S / f).is_file(), f
    # stable names: the reloader, not a rollout, applies a config change
    assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True
    assert "secrets.example.yaml" not in kustomization["resources"], "no keys in the repository"


# --- cross-checks -----------------------------------------------------------------------------


def test_selectors_and_labels_agree(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    deploy = objects["Deployment", "edgeterm"]
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert objects["Service", "edgeterm"]["spec"]["selector"].items() <= labels.items()
    pdb = objects["PodDisruptionBudget", "edgeterm"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_ports_agree_with_the_config(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    cfg = edgeterm_config(objects)
    [listener] = cfg["listeners"]
    host, _, port = listener["bind"].rpartition(":")
    assert host == "0.0.0.0", "listen on the pod's address"
    [cport] = container(objects, "edgeterm")["ports"]
    assert cport["containerPort"] == int(port)
    svc = objects["Service", "edgeterm"]["spec"]
    assert svc["type"] == "LoadBalancer"
    [sport] = svc["ports"]
    assert sport["protocol"] == "TCP" and sport["port"] == 443
    target = sport["targetPort"]
    assert target == cport.get("name") or target == cport["containerPort"]
    # the image exposes the same port
    final = parse_dockerfile(DOCKERFILE.read_text())[-1]
    assert str(port) in " ".join(i.args for i in final.all("EXPOSE"))


def mounts_by_path(c: dict[str, Any]) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in c["volumeMounts"]}


def projected_files(objects: dict[tuple[str, str], dict[str, Any]], volume: str) -> dict[str, Any]:
    """path in the volume -> (kind, object name, key)"""
    [vol] = [v for v in pod_spec(objects)["volumes"] if v["name"] == volume]
    files = {}
    for source in vol["projected"]["sources"]:
        [(kind, ref)] = source.items()
        for item in ref["items"]:
            files[item["path"]] = (
                {"configMap": "ConfigMap", "secret": "Secret"}[kind],
                ref["name"],
                item["key"],
            )
    return files


def test_every_file_the_config_names_is_mounted(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    cfg = edgeterm_config(objects)
    c = container(objects, "edgeterm")
    mounts = mounts_by_path(c)
    etc_volume = mounts["/etc/edgeterm"]
    files = projected_files(objects, etc_volume)
    # the image's entry point reads /etc/edgeterm/edgeterm.toml: the ConfigMap's key
    assert files["edgeterm.toml"] == ("ConfigMap", "edgeterm-config", "edgeterm.toml")
    named = [p for e in cfg["tls"]["certificates"] for p in e.values()]
    named += cfg["tls"]["tickets"]["key_files"]
    for path in named:
        assert path.startswith("/etc/edgeterm/"), path
        kind, name, key = files[path.removeprefix("/etc/edgeterm/")]
        assert kind == "Secret", f"{path} must come from a Secret, not a {kind}"
        secret = objects["Secret", name]
        assert key in secret["data"], f"{path}: Secret {name} has no key {key}"
    tls = objects["Secret", "edgeterm-tls"]
    assert tls["type"] == "kubernetes.io/tls"
    # pidfile and admin socket: in a writable volume shared with the reloader
    for key in ("pidfile", "admin_socket"):
        directory = str(Path(cfg["server"][key]).parent)
        assert directory in mounts, f"server.{key}: {directory} is not mounted"
        [vol] = [v for v in pod_spec(objects)["volumes"] if v["name"] == mounts[directory]]
        assert "emptyDir" in vol
        assert mounts_by_path(container(objects, "reloader")).get(directory) == mounts[directory]


def test_reloader_sidecar(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    spec = pod_spec(objects)
    assert spec["shareProcessNamespace"] is True, "the reloader signals the supervisor's pid"
    r = container(objects, "reloader")
    e = container(objects, "edgeterm")
    assert r["image"] == e["image"]
    prefix = install_prefix(parse_dockerfile(DOCKERFILE.read_text())[0])
    python, script = r["command"]
    assert python == f"{prefix}/bin/python"
    directory = str(Path(script).parent)
    vol = mounts_by_path(r)[directory]
    [volume] = [v for v in spec["volumes"] if v["name"] == vol]
    assert volume["configMap"]["name"] == "edgeterm-reloader"
    assert Path(script).name in objects["ConfigMap", "edgeterm-reloader"]["data"]
    assert mounts_by_path(r)["/etc/edgeterm"] == mounts_by_path(e)["/etc/edgeterm"]
    for c in (r, e):
        for probe in ("startupProbe", "livenessProbe"):
            if probe in c:
                assert c[probe]["exec"]["command"][0] == f"{prefix}/bin/edgeterm"


def test_pod_runs_as_the_image_user_and_sizes_agree(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    spec = pod_spec(objects)
    sc = spec["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 65532  # distroless "nonroot"
    cfg = edgeterm_config(objects)
    assert spec["terminationGracePeriodSeconds"] > cfg["server"]["graceful_timeout"]
    c = container(objects, "edgeterm")
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    cpus = float(c["resources"]["limits"]["cpu"])
    workers = cfg["server"]["workers"]
    assert isinstance(workers, int) and workers <= cpus, "workers must fit the CPU limit"
    assert cfg["server"]["pin_cpus"] is False


def test_one_pod_per_node(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Required pod anti-affinity on the node name: never two edgeterm pods on one node (a
    topology spread with maxSkew 1 would allow it once every node has one)."""
    deploy = objects["Deployment", "edgeterm"]
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    terms = pod_spec(objects)["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert any(
        term["topologyKey"] == "kubernetes.io/hostname"
        and term["labelSelector"]["matchLabels"].items() <= labels.items()
        and not term.get("namespaces")
        for term in terms
    ), terms
    # a rollout must not wait for a spare node: with one pod per node, a surge pod has no
    # node to go to on a cluster of exactly `replicas` nodes, so an old pod must go first
    rolling = deploy["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] >= 1 or rolling["maxSurge"] == 0, rolling
    assert (
        rolling["maxUnavailable"]
        <= objects["PodDisruptionBudget", "edgeterm"]["spec"]["maxUnavailable"]
    )


def test_probes(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Readiness and startup: every worker accepts (`status --ready`). Liveness: the supervisor
    answers (`status`): a worker is the supervisor's to replace, not a reason to restart the
    container and drop every connection."""
    c = container(objects, "edgeterm")
    config = ["-c", "/etc/edgeterm/edgeterm.toml"]
    for probe in ("startupProbe", "readinessProbe"):
        command = c[probe]["exec"]["command"]
        assert command[1:] == ["status", "--ready", *config], (probe, command)
    assert c["livenessProbe"]["exec"]["command"][1:] == ["status", *config]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # an exec starts a Python process: the kubelet's default 1 s is too tight
        assert c[probe].get("timeoutSeconds", 1) >= 2, probe


def test_configmap_config_checks(
    objects: dict[tuple[str, str], dict[str, Any]], certs: CertSet, tmp_path: Path
) -> None:
    """The config in the ConfigMap, with the Secrets' files where the volume puts them."""
    text = objects["ConfigMap", "edgeterm-config"]["data"]["edgeterm.toml"]
    config = etc_tree(text, tmp_path, certs)
    r = subprocess.run(
        [*edgeterm_command(), "check-config", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (r.returncode, r.stdout.strip()) == (0, "ok"), r.stderr


# --- the reloader, for real -----------------------------------------------------------------


def atomic_update(root: Path, files: dict[str, bytes], generation: int) -> None:
    """What the kubelet does to a ConfigMap/Secret volume: write a new hidden directory, then
    swap the ``..data`` symlink (the visible names are symlinks through it)."""
    new = root / f"..{generation}"
    for rel, data in files.items():
        (new / rel).parent.mkdir(parents=True, exist_ok=True)
        (new / rel).write_bytes(data)
    tmp = root / "..data_tmp"
    tmp.symlink_to(new.name)
    tmp.rename(root / "..data")
    for rel in files:
        top = rel.split("/")[0]
        if not (root / top).is_symlink():
            (root / top).symlink_to(f"..data/{top}")


def test_reloader_reloads_edgeterm_when_mounted_files_change(
    edgeterm: EdgetermFactory, echo: Any, tmp_path: Path
) -> None:
    sv = start_supervised(edgeterm, [echo.addr])
    watched = tmp_path / "watched"
    watched.mkdir()
    atomic_update(watched, {"certs/tls.crt": b"one", "tickets/current.key": b"a" * 80}, 1)
    script = tmp_path / "reloader.py"
    script.write_text((K8S / "reloader.py").read_text())
    [exe] = edgeterm_command()
    env = dict(
        os.environ,
        EDGETERM=exe,
        EDGETERM_CONFIG=str(sv.config),
        EDGETERM_WATCH=str(watched),
        EDGETERM_WATCH_INTERVAL="0.2",
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        time.sleep(1.0)  # several looks at unchanged files: nothing happens
        assert sv.status()["generation"] == 1
        atomic_update(watched, {"certs/tls.crt": b"two", "tickets/current.key": b"b" * 80}, 2)
        wait_status(
            sv.admin_socket,
            lambda st: st["generation"] == 2 and st["reloads"]["ok"] == 1,
            timeout=30,
            what="a reload by the reloader",
        )
        sv.server.remember_pids()
        time.sleep(1.0)  # and only one
        assert sv.status()["reloads"]["ok"] == 1
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert "files changed: reloading" in out, out
    assert "reloaded: generation 2 serving" in out, out
