"""Data specs for an evaluation: reading them, writing them back, and the split-overlap refusal.

:func:`load_data_spec` reads a :class:`DataSpec` from a spec, a mapping, a YAML/JSON file (a data
spec or a whole recipe) or the inline ``kind:key=value,...`` form, and :func:`data_spec_to_text`
writes that inline form back. :func:`check_split_overlap` compares the evaluated split with the
training split recorded in the model's config.json and refuses an evaluation on cases the model
was trained on.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from mlmi_zoo._config import OverrideError, from_jsonable, parse_override_value, to_jsonable
from mlmi_zoo.training.data_spec import DataSpec


_SPEC_FIELDS = {f.name for f in dataclasses.fields(DataSpec)} - {"kind", "params"}


def _split_top_level(text: str) -> list[str]:
    """Split ``a=1,b=[1, 2],c={x: 1}`` at commas outside brackets and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def load_data_spec(data: DataSpec | str | Path | Mapping[str, Any]) -> DataSpec:
    """A :class:`DataSpec` from a spec, a dict, a YAML/JSON file or an inline string.

    Files hold a data spec (``kind``, ``params``, ``train_size``...) or a whole recipe (its ``data``
    section is used). The inline form is ``kind:key=value,key=value``: keys that are fields of
    :class:`DataSpec` (``train_size``, ``val_size``, ``test_size``, ``val_fraction``,
    ``test_fraction``, ``split_seed``) set them, every other key goes to ``params``; values are
    read as YAML (``spacing_range=[0.5, 1.0]``), e.g.
    ``nodule_phantom:seed=0,size=64,train_size=2000,val_size=400,test_size=400``.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: an unreadable file or string, unknown fields or wrong types (naming the key).
    """
    if isinstance(data, DataSpec):
        return data
    if isinstance(data, Mapping):
        doc: Any = dict(data)
    else:
        text = str(data).strip()
        path = Path(text).expanduser()
        if path.suffix.lower() in (".yaml", ".yml", ".json") or path.is_file():
            if not path.is_file():
                raise FileNotFoundError(f"data spec file not found: {str(path)!r}")
            import yaml

            try:
                doc = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML
            except yaml.YAMLError as err:
                raise ValueError(f"{path} is not valid YAML/JSON: {err}") from err
            if isinstance(doc, dict) and "data" in doc and "kind" not in doc:
                doc = doc["data"]
        else:
            kind, sep, rest = text.partition(":")
            if not kind or (not sep and "=" in kind):
                raise ValueError(f"cannot read data spec {text!r}: expected a YAML/JSON file or "
                                 "'kind:key=value,...' (e.g. 'nodule_phantom:seed=0,train_size=200,val_size=50,test_size=100')")
            doc = {"kind": kind.strip(), "params": {}}
            for item in _split_top_level(rest):
                key, eq, value = item.partition("=")
                if not eq or not key.strip():
                    raise ValueError(f"data spec item {item!r} is not of the form key=value")
                key = key.strip().removeprefix("params.")
                target = doc if key in _SPEC_FIELDS else doc["params"]
                target[key] = parse_override_value(value.strip())
    if not isinstance(doc, dict) or "kind" not in doc:
        raise ValueError(f"a data spec is a mapping with at least 'kind'; got {doc!r}")
    try:
        return from_jsonable(DataSpec, doc, where="data")
    except OverrideError:
        raise
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid data spec: {err}") from err


def data_spec_to_text(spec: DataSpec) -> str:
    """The inline ``kind:key=value,...`` form of ``spec`` that :func:`load_data_spec` reads back."""
    import yaml

    def flow(value: Any) -> str:
        return yaml.safe_dump(to_jsonable(value), default_flow_style=True, width=10_000).strip().removesuffix("...").strip()

    items = [f"{k}={flow(v)}" for k, v in spec.params.items()]
    defaults = DataSpec(kind="folder_csv")
    for name in sorted(_SPEC_FIELDS):
        value = getattr(spec, name)
        if value != getattr(defaults, name):
            items.append(f"{name}={flow(value)}")
    return f"{spec.kind}:" + ",".join(items)


def _case_ids(record: Mapping[str, Any]) -> range | set[Any]:
    """What identifies a split's cases in a :func:`describe` record: a range or a set."""
    if "index_range" in record:
        start, stop = record["index_range"]
        return range(int(start), int(stop))
    if "indices" in record:
        return {int(i) for i in record["indices"]}
    if "patient_ids" in record:
        return {str(p) for p in record["patient_ids"]}
    if "women" in record:  # mammograms: a woman in two splits is a leak even through her other breast
        return {f"woman {w}" for w in record["women"]}
    if "image_ids" in record:  # IDRiD numbers the photographs of each official part from 001
        part = record.get("official_part")
        return {str(i) if part is None else f"{part}/{i}" for i in record["image_ids"]}
    if "indices_sha256" in record:
        return {record["indices_sha256"]}
    return {"all cases"}


def _source_identity(desc: Mapping[str, Any], split: str) -> tuple[Any, ...] | None:
    """Cases of two splits can coincide only when their source identities are equal (None: unknown)."""
    kind = desc.get("kind")
    source = desc.get("source") or {}
    record = (desc.get("splits") or {}).get(split) or {}
    if kind in ("nodule_phantom", "tilebag_phantom"):
        return (kind, source.get("generator"), record.get("seed", source.get("seed")))
    if kind == "medmnist":
        return (kind, source.get("md5") or source.get("flag"), record.get("official_split", split))
    if kind == "lidc_nodules":
        ident: tuple[Any, ...] = (kind, source.get("sha256"))
        # Without the patient ids, the deterministic patient split is the identity.
        return ident if "patient_ids" in record else ident + (record.get("patient_split", split),)
    if kind in ("mias", "mias_bags"):
        return (kind, json.dumps(source.get("Info.txt"), sort_keys=True))
    if kind in ("idrid", "idrid_bags"):
        return (kind, source.get("set"), source.get("md5_of_listing"))
    if kind in ("folder_csv", "cached_bags"):
        name = record.get("source")
        return (kind, name, json.dumps((source or {}).get(name), sort_keys=True))
    return None


def _overlap(a: range | set[Any], b: range | set[Any]) -> list[Any]:
    if isinstance(a, range) and isinstance(b, range):
        lo, hi = max(a.start, b.start), min(a.stop, b.stop)
        return list(range(lo, hi))
    if isinstance(a, range):
        a, b = b, a
    return sorted((x for x in a if x in b), key=str)


def check_split_overlap(train_description: Mapping[str, Any] | None, evaluated_description: Mapping[str, Any],
                        split: str) -> str | None:
    """Refuse an evaluated split that shares cases with the split the model was trained on.

    Args:
        train_description: the ``data`` record of the model's config.json (written by the trainer).
        evaluated_description: :func:`describe` of the evaluated data spec.
        split: the evaluated split.

    Returns:
        None when the splits are known to be disjoint (or come from different sources); a sentence
        saying why the check could not be made otherwise (e.g. no training description).

    Raises:
        ValueError: naming the shared cases when the splits overlap.
    """
    if not train_description:
        return "The model's config.json holds no training-data description, so overlap with training data was not checked."
    train_record = (train_description.get("splits") or {}).get("train")
    train_id = _source_identity(train_description, "train")
    if train_record is None or train_id is None:
        return (f"The training data ({train_description.get('kind', 'unknown kind')}) are not identified by split, "
                "so overlap with training data was not checked.")
    if train_description.get("kind") != evaluated_description.get("kind"):
        return None
    if train_id != _source_identity(evaluated_description, split):
        return None
    shared = _overlap(_case_ids(train_record), _case_ids(evaluated_description["splits"][split]))
    if shared:
        examples = ", ".join(str(s) for s in shared[:5]) + (" ..." if len(shared) > 5 else "")
        raise ValueError(
            f"the {split!r} split shares {len(shared)} case(s) with the model's training split ({examples}); "
            f"evaluate on cases the model never saw (a disjoint split, e.g. --split test, or another seed/index range)")
    return None
