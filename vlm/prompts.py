"""Zero-shot prompt files: one schema, validation on load, readers for peers' formats, expansion.

Prompts are data, not code. Every format loads into the same `PromptTask`: class codes in order, one or
more `PromptSet`s (synonyms per class × templates with the literal `CLASSNAME` placeholder), an optional
positive class (binary tasks) and how to read the labels table. Formats (schema in prompts/README.md):

- vlm task YAML (`prompts/*.yaml`): `type`, `classes: {CODE: [synonyms]}`, `templates`, `positive`,
  `labels: {column, map}` and free documentation fields;
- CONCH JSON: `{"0": {"classnames": {CODE: [synonyms]}, "templates": [...]}}` (one prompt set);
- MI-Zero JSON: keys "0".."N", each a prompt set with ONE synonym (a string) per class; every set is
  scored on its own and the median and spread over sets are reported, as MI-Zero does;
- TITAN YAML: `prompts: {CODE: [synonyms]}` (+ optional `templates`); without templates the documented
  `TITAN_LIKE_TEMPLATES` are used.

Errors are `ValueError`s that name the file and the field, so a typo is fixed without reading code.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlm.resources import resolve_task

log = logging.getLogger(__name__)

PLACEHOLDER = "CLASSNAME"
TASK_TYPES = ("multiclass", "binary")
PROMPT_SUFFIXES = (".yaml", ".yml", ".json")

# Used for `--classes` on the command line: histology wording for whole-slide H&E images.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "CLASSNAME.",
    "an H&E image of CLASSNAME.",
    "an H&E stained whole slide image of CLASSNAME.",
    "a whole slide image of CLASSNAME.",
    "a histopathology slide of CLASSNAME.",
    "a histopathological image showing CLASSNAME.",
    "histology shows CLASSNAME.",
    "the histology is consistent with CLASSNAME.",
    "the slide shows CLASSNAME.",
    "the tissue section shows CLASSNAME.",
    "microscopic examination shows CLASSNAME.",
    "an image of a tumor with features of CLASSNAME.",
    "a photomicrograph of CLASSNAME.",
    "a hematoxylin and eosin stained section of CLASSNAME.",
    "the diagnosis is CLASSNAME.",
    "findings are diagnostic of CLASSNAME.",
    "sections show CLASSNAME.",
    "this is CLASSNAME.",
)

# For TITAN-style files without templates: short statements in the style of TITAN's zero-shot ensemble
# (TITAN ships 23 such templates in its code, not in its prompt files). Put TITAN's exact list under
# `templates:` in the file to reproduce its numbers.
TITAN_LIKE_TEMPLATES: tuple[str, ...] = (
    "CLASSNAME.",
    "an image of CLASSNAME.",
    "the image shows CLASSNAME.",
    "this image displays CLASSNAME.",
    "an example of CLASSNAME.",
    "CLASSNAME is shown.",
    "this is CLASSNAME.",
    "CLASSNAME is seen.",
    "the pathology image shows CLASSNAME.",
    "a pathology image of CLASSNAME.",
    "the pathology slide shows CLASSNAME.",
    "the slide contains CLASSNAME.",
    "presence of CLASSNAME.",
    "CLASSNAME is present.",
    "CLASSNAME is observed.",
    "the pathology image demonstrates CLASSNAME.",
    "a microscopic image showing CLASSNAME.",
    "histology shows CLASSNAME.",
    "CLASSNAME is visible.",
    "the tissue shows CLASSNAME.",
    "CLASSNAME is identified.",
    "the section is consistent with CLASSNAME.",
    "findings of CLASSNAME.",
)

_YAML_KEYS = {
    "name",
    "description",
    "type",
    "positive",
    "classes",
    "templates",
    "labels",
    "cohorts",
    "references",
    "notes",
}
_LABEL_KEYS = {"column", "map"}


@dataclass(frozen=True)
class PromptSet:
    """Synonyms per class (class code -> synonyms) and the templates they are put into."""

    classnames: Mapping[str, tuple[str, ...]]
    templates: tuple[str, ...]

    def expand(self) -> dict[str, list[str]]:
        """Class code -> every template with `CLASSNAME` replaced by every synonym (synonym-major order)."""
        return {
            code: [
                template.replace(PLACEHOLDER, synonym) for synonym in synonyms for template in self.templates
            ]
            for code, synonyms in self.classnames.items()
        }


@dataclass(frozen=True)
class PromptTask:
    """A zero-shot task: ordered class codes, prompt set(s), optional positive class and label reading."""

    name: str
    classes: tuple[str, ...]
    prompt_sets: tuple[PromptSet, ...]
    positive: str | None = None
    label_column: str = "label"
    label_map: Mapping[str, str] = field(default_factory=dict)
    description: str = ""
    source: str = ""
    format: str = "vlm"

    @property
    def positive_index(self) -> int | None:
        return None if self.positive is None else self.classes.index(self.positive)

    def expand(self) -> dict[str, list[str]]:
        """Class code -> all prompts of all sets (the full ensemble behind each prototype)."""
        out: dict[str, list[str]] = {code: [] for code in self.classes}
        for prompt_set in self.prompt_sets:
            for code, prompts in prompt_set.expand().items():
                out[code].extend(prompts)
        return out

    def label_to_class(self, value: object) -> str | None:
        """A raw label value -> class code via `label_map` or the code itself; None when unknown."""
        text = str(value).strip()
        if text in self.label_map:
            return self.label_map[text]
        return text if text in self.classes else None

    def summary(self) -> dict[str, Any]:
        """Counts for `vlm prompts check`: classes × synonyms × templates per set."""
        sets = [
            {
                "synonyms": {code: len(syn) for code, syn in s.classnames.items()},
                "templates": len(s.templates),
            }
            for s in self.prompt_sets
        ]
        return {
            "task": self.name,
            "format": self.format,
            "type": "binary" if self.positive else "multiclass",
            "positive": self.positive,
            "classes": list(self.classes),
            "prompt_sets": len(self.prompt_sets),
            "synonyms": {code: sum(s["synonyms"][code] for s in sets) for code in self.classes},
            "templates": sorted({s["templates"] for s in sets}),
            "prompts": {code: len(p) for code, p in self.expand().items()},
        }


# --- loading ------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ValueError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _no_duplicate_json_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"duplicate key(s) {duplicates}")
    return dict(pairs)


def _read(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt file not found")
    try:
        if path.suffix.lower() == ".json":
            return json.loads(path.read_text(), object_pairs_hook=_no_duplicate_json_keys)
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, json.JSONDecodeError, ValueError) as error:
        raise ValueError(f"{path}: cannot parse: {error}") from error


def load_prompt_task(path: str | os.PathLike[str]) -> PromptTask:
    """Read and validate a prompt file of any supported format (detected from its content), or a task shipped
    with vlm by name (`nsclc_subtyping`)."""
    path = resolve_task(path)
    data = _read(path)
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a mapping at the top level (see prompts/README.md)")
    conch_like = all(isinstance(v, dict) and "classnames" in v for v in data.values())
    if path.suffix.lower() == ".json" or conch_like:
        return _from_conch_json(path, data)
    if "prompts" in data:
        return _from_titan_yaml(path, data)
    return _from_vlm_yaml(path, data)


def prompt_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Prompt files named directly, by shipped task name, or found (non-recursively) in folders, sorted; READMEs
    are skipped."""
    found: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            found.extend(sorted(p for p in entry.iterdir() if p.suffix.lower() in PROMPT_SUFFIXES))
        else:
            found.append(resolve_task(entry))  # a file, or a shipped task by name
    return found


def task_from_classes(
    classes: Mapping[str, Sequence[str]] | Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    positive: str | None = None,
    name: str = "classes",
) -> PromptTask:
    """A task from class codes and synonyms in code (`{"LUAD": ["lung adenocarcinoma"]}`).

    Also accepts command-line strings `"CODE=synonym|other synonym"` (a bare `"CODE"` is its own synonym).
    """
    if not isinstance(classes, Mapping):
        parsed: dict[str, list[str]] = {}
        for item in classes:
            code, _, synonyms = item.partition("=")
            code = code.strip()
            if code in parsed:
                raise ValueError(f"--classes: class {code!r} is given twice; join its synonyms with '|'")
            parsed[code] = [s.strip() for s in (synonyms or code).split("|")]
        classes = parsed
    source = "--classes"
    prompt_set = PromptSet(
        classnames=_synonyms(source, "classes", dict(classes)),
        templates=_templates(source, "templates", list(templates)),
    )
    codes = tuple(prompt_set.classnames)
    _check_positive(source, positive, codes, required=False)
    return PromptTask(name=name, classes=codes, prompt_sets=(prompt_set,), positive=positive, source=source)


# --- formats ------------------------------------------------------------------------------------------


def _from_vlm_yaml(path: Path, data: dict[str, Any]) -> PromptTask:
    unknown = sorted(set(data) - _YAML_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {unknown}; allowed: {sorted(_YAML_KEYS)}")
    for required in ("type", "classes", "templates"):
        if required not in data:
            raise ValueError(f"{path}: missing required field '{required}' (see prompts/README.md)")
    task_type = data["type"]
    if task_type not in TASK_TYPES:
        raise ValueError(f"{path}: field 'type' is {task_type!r}; use one of {list(TASK_TYPES)}")
    prompt_set = PromptSet(
        classnames=_synonyms(path, "classes", data["classes"]),
        templates=_templates(path, "templates", data["templates"]),
    )
    codes = tuple(prompt_set.classnames)
    positive = data.get("positive")
    if task_type == "binary":
        if len(codes) != 2:
            raise ValueError(
                f"{path}: field 'classes': a binary task has exactly 2 classes, got {list(codes)}"
            )
        _check_positive(path, positive, codes, required=True)
    elif positive is not None:
        raise ValueError(f"{path}: field 'positive' is only for type: binary (this task is multiclass)")
    column, label_map = _labels(path, data.get("labels"), codes)
    return PromptTask(
        name=str(data.get("name") or path.stem),
        classes=codes,
        prompt_sets=(prompt_set,),
        positive=positive,
        label_column=column,
        label_map=label_map,
        description=str(data.get("description") or ""),
        source=str(path),
        format="vlm",
    )


def _from_conch_json(path: Path, data: dict[str, Any]) -> PromptTask:
    """CONCH (one set, synonym lists) and MI-Zero (several sets, one synonym string per class)."""
    sets: list[PromptSet] = []
    codes: tuple[str, ...] | None = None
    for key, entry in data.items():
        where = f"['{key}']"
        if not isinstance(entry, dict) or "classnames" not in entry or "templates" not in entry:
            raise ValueError(
                f"{path}: entry {where} must be an object with 'classnames' and 'templates' "
                "(CONCH / MI-Zero prompt format)"
            )
        prompt_set = PromptSet(
            classnames=_synonyms(path, f"{where}.classnames", entry["classnames"]),
            templates=_templates(path, f"{where}.templates", entry["templates"]),
        )
        set_codes = tuple(prompt_set.classnames)
        if codes is not None and set(set_codes) != set(codes):
            raise ValueError(
                f"{path}: entry {where}.classnames has classes {list(set_codes)}, not {list(codes)}"
            )
        codes = codes or set_codes
        sets.append(prompt_set)
    is_mizero = len(sets) > 1 or all(
        isinstance(v, str) for v in data[next(iter(data))]["classnames"].values()
    )
    return PromptTask(
        name=path.stem,
        classes=codes or (),
        prompt_sets=tuple(sets),
        source=str(path),
        format="mi-zero" if is_mizero else "conch",
    )


def _from_titan_yaml(path: Path, data: dict[str, Any]) -> PromptTask:
    templates = data.get("templates")
    if templates is None:
        log.info(
            "%s: no templates in the TITAN file; using the %d TITAN-like defaults",
            path,
            len(TITAN_LIKE_TEMPLATES),
        )
        templates = list(TITAN_LIKE_TEMPLATES)
    prompt_set = PromptSet(
        classnames=_synonyms(path, "prompts", data["prompts"]),
        templates=_templates(path, "templates", templates),
    )
    return PromptTask(
        name=str(data.get("name") or path.stem),
        classes=tuple(prompt_set.classnames),
        prompt_sets=(prompt_set,),
        source=str(path),
        format="titan",
    )


# --- field validation ---------------------------------------------------------------------------------


def _synonyms(source: object, where: str, value: object) -> dict[str, tuple[str, ...]]:
    """`{CODE: [synonyms]}` or `{CODE: "synonym"}` -> code -> non-empty, unique, unambiguous synonyms."""
    if not isinstance(value, dict) or len(value) < 2:
        raise ValueError(f"{source}: field '{where}' must map at least 2 class codes to synonyms")
    owner: dict[str, str] = {}
    out: dict[str, tuple[str, ...]] = {}
    for code, synonyms in value.items():
        if not isinstance(code, str) or not code.strip() or code != code.strip():
            raise ValueError(f"{source}: field '{where}': class code {code!r} must be a non-empty string")
        if code in ("slide_id", "predicted", "label"):
            raise ValueError(f"{source}: field '{where}': class code {code!r} clashes with an output column")
        items = [synonyms] if isinstance(synonyms, str) else synonyms
        if not isinstance(items, list) or not items:
            raise ValueError(
                f"{source}: field '{where}.{code}' must be a synonym or a non-empty list of them"
            )
        for i, synonym in enumerate(items):
            if not isinstance(synonym, str) or not synonym.strip():
                raise ValueError(f"{source}: field '{where}.{code}[{i}]' must be a non-empty string")
            key = synonym.strip().lower()
            if key in owner:
                which = "twice" if owner[key] == code else f"also under {owner[key]!r}"
                raise ValueError(
                    f"{source}: field '{where}.{code}[{i}]': synonym {synonym!r} appears {which}"
                )
            owner[key] = code
        out[code] = tuple(s.strip() for s in items)
    return out


def _templates(source: object, where: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{source}: field '{where}' must be a non-empty list of templates")
    seen: set[str] = set()
    for i, template in enumerate(value):
        if not isinstance(template, str) or PLACEHOLDER not in template:
            raise ValueError(
                f"{source}: field '{where}[{i}]' = {template!r} lacks the literal {PLACEHOLDER} placeholder"
            )
        if template in seen:
            raise ValueError(f"{source}: field '{where}[{i}]': template {template!r} appears twice")
        seen.add(template)
    return tuple(value)


def _check_positive(source: object, positive: object, codes: Sequence[str], required: bool) -> None:
    if positive is None:
        if required:
            raise ValueError(f"{source}: a binary task must name its positive class in field 'positive'")
        return
    if positive not in codes:
        raise ValueError(f"{source}: field 'positive' = {positive!r} is not one of the classes {list(codes)}")
    if len(codes) != 2:
        raise ValueError(f"{source}: field 'positive' needs exactly 2 classes, got {list(codes)}")


def _labels(source: object, value: object, codes: Sequence[str]) -> tuple[str, dict[str, str]]:
    if value is None:
        return "label", {}
    if not isinstance(value, dict) or set(value) - _LABEL_KEYS:
        raise ValueError(f"{source}: field 'labels' must be a mapping with keys {sorted(_LABEL_KEYS)}")
    column = value.get("column", "label")
    if not isinstance(column, str) or not column:
        raise ValueError(f"{source}: field 'labels.column' must be a column name")
    mapping = value.get("map") or {}
    if not isinstance(mapping, dict):
        raise ValueError(f"{source}: field 'labels.map' must map label values to class codes")
    out: dict[str, str] = {}
    for raw, code in mapping.items():
        if code not in codes:
            raise ValueError(
                f"{source}: field 'labels.map.{raw}' = {code!r} is not one of the classes {list(codes)}"
            )
        out[str(raw).strip()] = code
    return column, out
