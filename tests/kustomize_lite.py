"""A Python renderer of the kustomize SUBSET that deploy/k8s uses, for machines without kubectl.

Not kustomize: it knows only what our kustomizations use, and refuses anything else rather than
guess. Supported: ``resources`` (files and kustomization directories), ``namespace``,
``labels`` (``pairs``, metadata only), ``configMapGenerator`` (``files``, ``behavior``
create/replace, ``options.labels``) with ``generatorOptions.disableNameSuffixHash: true``,
``images`` (``newName``/``newTag``), ``replicas`` and ``patches`` holding JSON 6902 operations
(add, replace, remove, test) with a kind+name target. tests/test_k8s_manifests.py renders with
``kubectl kustomize`` where it exists and checks this renderer gives the same objects.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KNOWN_KEYS = {"apiVersion", "kind", "namespace", "labels", "resources", "configMapGenerator",
              "generatorOptions", "images", "replicas", "patches"}  # fmt: skip
CLUSTER_SCOPED = {"Namespace"}
WORKLOADS = {"Deployment", "StatefulSet", "ReplicaSet"}  # what `replicas` may target
Obj = dict[str, Any]


class Unsupported(ValueError):
    """The kustomization uses something this subset renderer does not implement."""


def render(directory: str | Path) -> list[Obj]:
    root = Path(directory)
    kust = yaml.safe_load((root / "kustomization.yaml").read_text())
    unknown = set(kust) - KNOWN_KEYS
    if unknown:
        raise Unsupported(f"{root}: kustomization keys {sorted(unknown)} are not in the subset")
    objs: list[Obj] = []
    for res in kust.get("resources", []):
        path = root / res
        objs += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    options = kust.get("generatorOptions") or {}
    if kust.get("configMapGenerator") and options.get("disableNameSuffixHash") is not True:
        raise Unsupported(f"{root}: name-suffix hashes are not in the subset")
    for gen in kust.get("configMapGenerator", []):
        _generate_config_map(root, gen, objs)
    for patch in kust.get("patches", []):
        _apply_patch(root, patch, objs)
    ns = kust.get("namespace")
    labels: dict[str, str] = {}
    for entry in kust.get("labels", []):
        if entry.get("includeSelectors") or entry.get("includeTemplates"):
            raise Unsupported("labels with selectors/templates are not in the subset")
        labels.update(entry["pairs"])
    for obj in objs:
        meta = obj.setdefault("metadata", {})
        if ns and obj["kind"] not in CLUSTER_SCOPED:
            meta["namespace"] = ns
        if labels:
            meta["labels"] = {**meta.get("labels", {}), **labels}
    for image in kust.get("images", []):
        _set_image(objs, image)
    for rep in kust.get("replicas", []):
        workloads = [o for o in objs if o["kind"] in WORKLOADS]
        _find(workloads, None, rep["name"])["spec"]["replicas"] = rep["count"]
    return objs


def _find(objs: list[Obj], kind: str | None, name: str) -> Obj:
    hits = [o for o in objs if o["metadata"]["name"] == name and kind in (None, o["kind"])]
    if len(hits) != 1:
        raise Unsupported(f"target {kind}/{name} matches {len(hits)} objects")
    return hits[0]


def _generate_config_map(root: Path, gen: Obj, objs: list[Obj]) -> None:
    data = {}
    for f in gen.get("files", []):
        key, _, path = f.partition("=") if "=" in f else (Path(f).name, "", f)
        data[key] = (root / path).read_text()
    cm: Obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data}
    labels = (gen.get("options") or {}).get("labels")
    if labels:
        cm["metadata"]["labels"] = dict(labels)
    behavior = gen.get("behavior", "create")
    if behavior == "create":
        objs.append(cm)
    elif behavior == "replace":
        old = _find(objs, "ConfigMap", gen["name"])
        old["data"] = data
        if labels:
            old["metadata"]["labels"] = {**old["metadata"].get("labels", {}), **labels}
    else:
        raise Unsupported(f"configMapGenerator behavior {behavior!r}")


def _apply_patch(root: Path, patch: Obj, objs: list[Obj]) -> None:
    target = patch.get("target") or {}
    if set(target) - {"kind", "name"}:
        raise Unsupported(f"patch target {target} (only kind and name)")
    ops = yaml.safe_load(patch["patch"] if "patch" in patch else (root / patch["path"]).read_text())
    if not isinstance(ops, list):
        raise Unsupported("strategic-merge patches are not in the subset (JSON 6902 lists only)")
    obj = _find(objs, target.get("kind"), target["name"])
    for op in ops:
        _json6902(obj, op)


def _json6902(doc: Obj, op: Obj) -> None:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
    parent: Any = doc
    for p in parts[:-1]:
        parent = parent[int(p)] if isinstance(parent, list) else parent[p]
    last = parts[-1]
    kind = op["op"]
    value = copy.deepcopy(op.get("value"))
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if kind == "add":
            parent.insert(index, value)
        elif kind == "replace":
            parent[index] = value
        elif kind == "remove":
            del parent[index]
        elif kind == "test":
            if parent[index] != value:
                raise ValueError(f"test failed at {op['path']}: {parent[index]!r} != {value!r}")
        else:
            raise Unsupported(f"JSON 6902 op {kind!r}")
        return
    if kind in ("add", "replace"):
        if kind == "replace" and last not in parent:
            raise ValueError(f"replace: no {op['path']}")
        parent[last] = value
    elif kind == "remove":
        del parent[last]
    elif kind == "test":
        if parent.get(last) != value:
            raise ValueError(f"test failed at {op['path']}: {parent.get(last)!r} != {value!r}")
    else:
        raise Unsupported(f"JSON 6902 op {kind!r}")


def _set_image(objs: list[Obj], image: Obj) -> None:
    for obj in objs:
        spec = obj.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            name, _, tag = c["image"].partition(":")
            if name == image["name"]:
                c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}".rstrip(":")
