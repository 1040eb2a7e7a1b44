"""Candidate models for shadow-mode tests, made from the shipped one by editing its ONNX file."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "sorter-cnn.onnx"


def _set_meta(proto: object, key: str, value: str | None) -> None:
    props = proto.metadata_props  # type: ignore[attr-defined]
    for i, prop in enumerate(props):
        if prop.key == key:
            if value is None:
                del props[i]
            else:
                prop.value = value
            return


def retagged(dst: Path, version: str) -> Path:
    """The same network under another version: a shadow that must agree with the live model on every piece."""
    import onnx

    proto = onnx.load(str(MODEL))
    _set_meta(proto, "version", version)
    onnx.save(proto, str(dst))
    return dst


def permuted(dst: Path, version: str, swap: tuple[int, int] = (0, 1)) -> Path:
    """The shipped network with two of its outputs swapped (a Gather on the logits), labels unchanged: a candidate
    with the live model's classes that calls every piece of one of the two classes the other (ndfeb <-> ferrite)."""
    import onnx
    from onnx import TensorProto, helper

    proto = onnx.load(str(MODEL))
    g = proto.graph
    n = len(json.loads(next(p.value for p in proto.metadata_props if p.key == "labels")))
    order = list(range(n))
    order[swap[0]], order[swap[1]] = order[swap[1]], order[swap[0]]
    out = g.output[0].name
    for node in g.node:
        node.output[:] = [f"{out}_raw" if o == out else o for o in node.output]
    g.initializer.append(helper.make_tensor("shadow_perm", TensorProto.INT64, [n], order))
    g.node.append(helper.make_node("Gather", [f"{out}_raw", "shadow_perm"], [out], axis=1))
    _set_meta(proto, "version", version)
    _set_meta(proto, "field_likelihood", None)  # its field model would be for the unswapped classes
    onnx.checker.check_model(proto)
    onnx.save(proto, str(dst))
    return dst


def relabelled(dst: Path, version: str) -> Path:
    """The shipped network with its classes listed in another order: refused as a shadow (and its field model,
    which names the classes in their old order, dropped so that the model itself still loads)."""
    import onnx

    proto = onnx.load(str(MODEL))
    labels = json.loads(next(p.value for p in proto.metadata_props if p.key == "labels"))
    _set_meta(proto, "labels", json.dumps(labels[::-1]))
    _set_meta(proto, "field_likelihood", None)
    _set_meta(proto, "version", version)
    onnx.save(proto, str(dst))
    return dst
