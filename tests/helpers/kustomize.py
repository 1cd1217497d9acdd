"""A small kustomize renderer for the infra tests: resources, namespace, images and RFC 6902 `patches`, exactly
what infra/k8s uses. A kustomization using anything else raises instead of being half-rendered."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterator

import yaml

def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _pointer(path: str, where: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"{where}: JSON pointer {path!r} must start with '/'")
    return [part.replace("~1", "/").replace("~0", "~") for part in path.split("/")[1:]]


def json_patch(doc: Any, ops: list[dict], where: str) -> Any:
    """RFC 6902 add / remove / replace / test (what the overlays use) on a copy of `doc`."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = _pointer(op["path"], where)
        node = doc
        try:
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node[part]
            key: Any = last
            if isinstance(node, list):
                key = len(node) if (last == "-" and op["op"] == "add") else int(last)
            if op["op"] == "add" and isinstance(node, list):
                node.insert(key, op["value"])
            elif op["op"] == "add":
                node[key] = op["value"]
            elif op["op"] == "remove":
                del node[key]
            elif op["op"] == "replace":
                node[key]  # must exist: replace never creates
                node[key] = op["value"]
            elif op["op"] == "test":
                if node[key] != op["value"]:
                    raise ValueError(f"{where}: test {op['path']} == {op['value']!r} failed (is {node[key]!r})")
            else:
                raise ValueError(f"{where}: unsupported patch op {op['op']!r}")
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"{where}: path {op['path']} does not exist in the target ({e!r})") from None
    return doc


def containers(obj: Any) -> Iterator[dict]:
    """Every container of an object, wherever its pod templates sit (CRDs nest them deeply)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from containers(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from containers(value)


KUSTOMIZE_KEYS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}


def render(directory: Path) -> list[dict]:
    """The objects `kubectl kustomize directory` emits, for the kustomize subset infra/k8s uses."""
    kfile = directory / "kustomization.yaml"
    k = yaml.safe_load(kfile.read_text())
    unsupported = set(k) - KUSTOMIZE_KEYS
    assert not unsupported, (
        f"{kfile}: keys {sorted(unsupported)} are not understood by this test's renderer; use "
        f"{sorted(KUSTOMIZE_KEYS)} or extend render() in {Path(__file__).name}")
    objs: list[dict] = []
    for res in k["resources"]:
        path = directory / res
        objs += render(path) if path.is_dir() else load_yaml_docs(path)
    for patch in k.get("patches", []):
        target, where = patch["target"], f"{kfile}: patch {patch['path']}"
        hits = [i for i, o in enumerate(objs)
                if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]
                and o["apiVersion"] == "/".join(p for p in (target.get("group"), target["version"]) if p)]
        assert len(hits) == 1, f"{where}: target {target} matches {len(hits)} objects, expected 1"
        ops = yaml.safe_load((directory / patch["path"]).read_text())
        assert isinstance(ops, list), f"{where}: only RFC 6902 patches (a list of ops) are supported"
        objs[hits[0]] = json_patch(objs[hits[0]], ops, where)
    if "namespace" in k:
        for o in objs:
            if o["kind"] != "Namespace":
                o["metadata"]["namespace"] = k["namespace"]
    for image in k.get("images", []):
        for c in (c for o in objs for c in containers(o)):
            name, sep, tag = c["image"].rpartition(":")
            if not sep or "/" in tag:  # no tag; the colon belonged to a registry port
                name, tag = c["image"], ""
            if name == image["name"]:
                c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return objs


def overlay_objects(k8s: Path, overlays: tuple[str, ...]) -> list[tuple[str, dict]]:
    """(label, object) for every object as written in <k8s>/base and as rendered by each overlay."""
    out = []
    for path in sorted((k8s / "base").glob("*.yaml")):
        if path.name != "kustomization.yaml":
            out += [(f"base/{path.name}", o) for o in load_yaml_docs(path)]
    for overlay in overlays:
        out += [(f"overlays/{overlay}", o) for o in render(k8s / "overlays" / overlay)]
    return out
