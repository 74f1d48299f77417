"""Check deploy/k8s/*.yaml offline: schemas, and agreement with the image and the service.

No cluster is needed (none runs here):

* core kinds (Deployment, Service, HorizontalPodAutoscaler, PodDisruptionBudget) against the
  Kubernetes OpenAPI schemas that ``kubernetes-validate`` ships, strict (an unknown field fails);
* custom resources (KServe ``InferenceService``, KubeRay ``RayService``) against the
  ``openAPIV3Schema`` of their CRDs, vendored in ``schemas/`` (source and sha256 inside each file),
  with ``jsonschema``; unknown fields fail, as ``kubectl apply --validate=strict`` would;
* every container of the course image: its port is the Dockerfile's ``EXPOSE``, it runs as the
  Dockerfile's ``USER``, readiness probes ``/ready`` and liveness ``/health`` (the service's routes),
  and every ``COURSE_SERVE_*`` variable is one the service reads.

    python deploy/k8s/validate.py                 # every manifest; exit 1 on any problem
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
KUBERNETES = "1.33"          # the Kubernetes schema version checked against
COURSE_IMAGES = {"course-service:cpu"}
SCHEMAS = {("serving.kserve.io/v1beta1", "InferenceService"): "kserve-inferenceservice-v1beta1.json.gz",
           ("ray.io/v1", "RayService"): "kuberay-rayservice-v1.json.gz"}


def to_json_schema(node: Any) -> Any:
    """A Kubernetes structural schema (OpenAPI 3.0 dialect) as plain JSON Schema.

    ``nullable`` becomes a null type, ``x-kubernetes-int-or-string`` an integer-or-string, a
    required field with a default may be left out (the API server fills it in), and objects with
    listed properties refuse others unless ``x-kubernetes-preserve-unknown-fields`` says otherwise.

    >>> to_json_schema({"type": "object", "properties": {"a": {"type": "string", "nullable": True}}})
    {'type': 'object', 'properties': {'a': {'type': ['string', 'null']}}, 'additionalProperties': False}
    """
    if isinstance(node, list):
        return [to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key.startswith("x-kubernetes-") or key in ("nullable", "format", "description", "default", "example"):
            continue
        else:
            out[key] = to_json_schema(value)
    properties = node.get("properties", {})
    if "required" in out:
        out["required"] = [name for name in out["required"] if "default" not in properties.get(name, {})]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in out and "additionalProperties" not in out and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    """The vendored CRD schema for ``kind`` as JSON Schema (``status`` left out: never in a manifest)."""
    vendored = json.loads(gzip.decompress((HERE / "schemas" / SCHEMAS[(api_version, kind)]).read_bytes()))
    schema = to_json_schema(vendored["openAPIV3Schema"])
    schema["properties"].pop("status", None)
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    return schema


def documents(path: Path) -> list[dict[str, Any]]:
    """The non-empty YAML documents of ``path``."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def schema_problems(doc: dict[str, Any]) -> list[str]:
    """What the schema of ``doc``'s kind refuses in it (empty: valid)."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in SCHEMAS:
        import jsonschema

        validator = jsonschema.Draft202012Validator(crd_schema(*key))
        return [f"{'.'.join(map(str, error.path)) or '<root>'}: {error.message[:200]}"
                for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))]
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'.'.join(map(str, error.path)) or '<root>'}: {error.message[:200]}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {key[1]} {key[0]} in Kubernetes {KUBERNETES}"]
    return []


def image_facts(dockerfile: Path = ROOT / "deploy" / "docker" / "Dockerfile") -> dict[str, Any]:
    """The port, user and model the serving image declares."""
    text = dockerfile.read_text()
    return {"port": int(re.search(r"^EXPOSE\s+(\d+)", text, re.M).group(1)),      # type: ignore[union-attr]
            "user": int(re.search(r"^USER\s+(\d+)", text, re.M).group(1))}        # type: ignore[union-attr]


def service_env_names() -> set[str]:
    """The ``COURSE_SERVE_*`` variables the service reads (``ServiceConfig.from_env``)."""
    from dataclasses import fields

    from course_utils.serving.service import ENV_PREFIX, ServiceConfig

    return {ENV_PREFIX + field.name.upper() for field in fields(ServiceConfig)}


def _containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = doc.get("spec", {})
    pods = [spec.get("template", {}).get("spec", {}), spec.get("predictor", {})]
    for pod in pods:
        yield from pod.get("containers", [])


def contract_problems(doc: dict[str, Any], facts: dict[str, Any] | None = None) -> list[str]:
    """Where a container of the course image disagrees with the Dockerfile or the service."""
    facts = facts or image_facts()
    known_env = service_env_names()
    problems = serve_config_problems(doc) if doc.get("kind") == "RayService" else []
    pod_user = doc.get("spec", {}).get("template", {}).get("spec", {}).get("securityContext", {}).get("runAsUser")
    for container in _containers(doc):
        if container.get("image") not in COURSE_IMAGES:
            continue
        name = container.get("name")
        ports = {p.get("containerPort") for p in container.get("ports", [])}
        if ports != {facts["port"]}:
            problems.append(f"{name}: containerPort {sorted(ports)} but the image listens on {facts['port']}")
        user = container.get("securityContext", {}).get("runAsUser", pod_user)
        if user != facts["user"]:
            problems.append(f"{name}: runs as user {user} but the image's USER is {facts['user']}")
        for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health")):
            got = container.get(probe, {}).get("httpGet", {}).get("path")
            if got != path:
                problems.append(f"{name}: {probe} asks {got!r}, the service answers it on {path!r}")
        for variable in container.get("env", []):
            if variable["name"].startswith("COURSE_SERVE_") and variable["name"] not in known_env:
                problems.append(f"{name}: env {variable['name']} is not read by the service")
    return problems


def serve_config_problems(doc: dict[str, Any]) -> list[str]:
    """A RayService's ``serveConfigV2`` must name what ``deploy/ray`` defines: module, builder, deployments."""
    import ast

    config = yaml.safe_load(doc.get("spec", {}).get("serveConfigV2", "")) or {}
    problems = []
    for app in config.get("applications", []):
        module, _, attribute = str(app.get("import_path", "")).partition(":")
        source = HERE.parent / "ray" / f"{module}.py"
        if not source.is_file():
            problems.append(f"serveConfigV2: import_path {app.get('import_path')!r}: no deploy/ray/{module}.py")
            continue
        names = {node.name for node in ast.parse(source.read_text()).body
                 if isinstance(node, ast.FunctionDef | ast.ClassDef)}
        if attribute not in names:
            problems.append(f"serveConfigV2: {module}.py defines no {attribute!r}")
        problems += [f"serveConfigV2: {module}.py has no deployment {d.get('name')!r}"
                     for d in app.get("deployments", []) if d.get("name") not in names]
        autoscaling = next((ast.literal_eval(node.value) for node in ast.parse(source.read_text()).body
                            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "AUTOSCALING"), None)
        problems += [f"serveConfigV2: {d['name']}'s autoscaling_config {d['autoscaling_config']} is not "
                     f"{module}.AUTOSCALING {autoscaling}" for d in app.get("deployments", [])
                     if "autoscaling_config" in d and autoscaling is not None and d["autoscaling_config"] != autoscaling]
    return problems


def check(paths: list[Path]) -> list[str]:
    """One line per document: ``OK path Kind/name`` or ``ERROR path Kind/name: problem``."""
    lines = []
    for path in paths:
        for doc in documents(path):
            label = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} " \
                    f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            problems = schema_problems(doc) + contract_problems(doc)
            lines += [f"ERROR {label}: {problem}" for problem in problems] or [f"OK    {label}"]
    return lines


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p).resolve() for p in (argv if argv else sorted(str(p) for p in HERE.glob("*.yaml")))]
    lines = check(paths)
    print("\n".join(lines))
    return int(any(line.startswith("ERROR") for line in lines))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
