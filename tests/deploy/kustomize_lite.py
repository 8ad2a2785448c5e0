"""The part of kustomize that deploy/k8s uses, in Python, so that the manifests render where kustomize is missing.

Supported: ``resources`` (files and directories), ``namespace``, ``images`` and ``patches`` given by ``path``
(strategic merge patches, with Kubernetes' merge keys for the lists they touch). Anything else in a kustomization
raises, so that a manifest change this renderer would silently get wrong fails loudly. tests/deploy/test_k8s.py
compares its output with ``kubectl kustomize`` wherever kubectl is installed.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

KEYS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
# Kubernetes' strategic-merge keys for the lists our patches touch; every other list is replaced whole.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
              "volumeMounts": "mountPath", "ports": "containerPort"}


def render(directory: Path) -> list[dict]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KEYS
    if unknown:
        raise ValueError(f"{directory}: kustomization keys this renderer does not implement: {sorted(unknown)}")
    docs: list[dict] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        docs += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in kustomization.get("patches", []):
        if set(patch) != {"path"}:
            raise ValueError(f"{directory}: only `patches: - path: FILE` is implemented, not {patch}")
        apply_patch(docs, yaml.safe_load((directory / patch["path"]).read_text()))
    for image in kustomization.get("images", []):
        set_image(docs, image)
    if "namespace" in kustomization:
        for doc in docs:
            doc["metadata"]["namespace"] = kustomization["namespace"]
    return docs


def apply_patch(docs: list[dict], patch: dict) -> None:
    (target,) = [d for d in docs if d["kind"] == patch["kind"] and d["metadata"]["name"] == patch["metadata"]["name"]]
    body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind", "metadata")}
    docs[docs.index(target)] = merge(target, body)


def merge(base, patch, key: str | None = None):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for name, value in patch.items():
            if value is None:
                out.pop(name, None)
            else:
                out[name] = merge(base[name], value, name) if name in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        merge_key, out = MERGE_KEYS[key], list(base)
        for item in patch:
            index = next((i for i, old in enumerate(out) if old[merge_key] == item[merge_key]), None)
            if index is None:
                out.append(copy.deepcopy(item))
            else:
                out[index] = merge(out[index], item)
        return out
    return copy.deepcopy(patch)


def set_image(docs: list[dict], image: dict) -> None:
    for doc in docs:
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("initContainers", []) + spec.get("containers", []):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
