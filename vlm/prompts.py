"""Zero-shot prompt files: one schema, validation on load, readers for peers' formats, expansion.

Prompts are data, not code. Every format loads into the same `PromptTask`: class codes in order, one or
more `PromptSet`s (synonyms per class × templates with the literal `CLASSNAME` placeholder), an optional
positive class (binary tasks) and how to read the labels table. Formats (schema in prompts/README.md):

- vlm task YAML (`prompts/*.yaml`): `type`, `classes: {CODE: [synonyms]}`, `templates`, `positive`,
  `labels: {column, map}` and free documentation fields;
- CONCH JSON: `{"0": {"classnames": {CODE: [synonyms]}, "templates": [...]}}` (one prompt set);
- MI-Zero JSON: keys "0".."N-1", each a prompt set with ONE synonym (a string) per class; every set is
  scored on its own and the median over sets is the headline, as MI-Zero reports it;
- TITAN YAML (its `datasets/config_*.yaml`): `prompts: {CODE: [synonyms]}`, `label_dict: {CODE: index}`
  (the class order), `target` (the label column); without `templates`, TITAN's own 23 templates
  (`template_list("titan")`). A synonym listed under two classes is kept in both with a warning, as
  TITAN's notebook uses its file as is.

CONCH's and MI-Zero's own code read labels from the `OncoTreeCode` column; so does vlm for these formats
when the labels file has it (else `label`).

Errors are `ValueError`s that name the file and the field, so a typo is fixed without reading code.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlm.errors import InputError, MissingInputError, UsageError
from vlm.resources import TASK_SUFFIXES, resolve_task

log = logging.getLogger(__name__)

PLACEHOLDER = "CLASSNAME"
TASK_TYPES = ("multiclass", "binary")
PEER_LABEL_COLUMN = "OncoTreeCode"  # CONCH's and MI-Zero's label column (TITAN names its own `target`)

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

TEMPLATE_LISTS = Path(__file__).parent / "prompt_templates"


@functools.cache
def template_list(name: str) -> tuple[str, ...]:
    """A named template list shipped as data in `vlm/prompt_templates/<name>.yaml` (source cited in the file).

    `titan` is TITAN's exact 23-template list (its `titan/utils.py`), which TITAN prompt files use when
    they carry no templates themselves, as TITAN's own zero-shot notebook does.
    """
    path = TEMPLATE_LISTS / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in TEMPLATE_LISTS.glob("*.yaml"))
        raise UsageError(f"unknown template list {name!r}; shipped lists: {known}")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return _templates(path, "templates", data.get("templates") if isinstance(data, dict) else None)


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
            code: [template.replace(PLACEHOLDER, synonym) for synonym in synonyms for template in self.templates]
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
        """Counts for `vlm prompts check`: DISTINCT synonyms and prompts per class over all sets.

        An MI-Zero file repeats the same few synonyms across its 50 sets; summing per set would report
        50 synonyms for a class that has 9.
        """
        synonyms = {code: {s for p in self.prompt_sets for s in p.classnames[code]} for code in self.classes}
        return {
            "task": self.name,
            "format": self.format,
            "type": "binary" if self.positive else "multiclass",
            "positive": self.positive,
            "classes": list(self.classes),
            "prompt_sets": len(self.prompt_sets),
            "synonyms": {code: len(found) for code, found in synonyms.items()},
            "templates": sorted({len(s.templates) for s in self.prompt_sets}),
            "distinct_templates": len({t for s in self.prompt_sets for t in s.templates}),
            "prompts": {code: len(set(p)) for code, p in self.expand().items()},
        }


# --- loading ------------------------------------------------------------------------------------------


END_MARKER = "..."  # YAML's end-of-document marker: the last line of a vlm task file


class _PromptLoader(yaml.SafeLoader):
    """SafeLoader for prompt files: no duplicate mapping keys (PyYAML silently keeps the last one), aliases of
    single values only, and a record of whether the document ends with the explicit end marker `...`.

    An alias of a list or mapping is refused: nine nested aliases make a 10⁹-leaf "billion laughs" value
    that costs minutes and gigabytes once anything walks or prints it; a prompt file has no need of them.
    """

    explicit_end = False

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            if isinstance(self.anchors.get(event.anchor), yaml.CollectionNode):
                raise InputError(
                    f"alias *{event.anchor} (line {event.start_mark.line + 1}) repeats a list or mapping; prompt "
                    "files allow aliases of single values only: write the entries out"
                )
        return super().compose_node(parent, index)

    def compose_document(self) -> yaml.Node:
        # as yaml.composer.Composer.compose_document, keeping whether the DOCUMENT-END event was explicit
        self.get_event()
        node = self.compose_node(None, None)
        self.explicit_end = self.get_event().explicit
        self.anchors = {}
        return node


def _construct_unique_mapping(loader: _PromptLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise UsageError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_PromptLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _no_duplicate_json_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise UsageError(f"duplicate key(s) {duplicates}")
    return dict(pairs)


def _read(path: Path) -> tuple[Any, bool]:
    """The file's data, and whether it ends explicitly (YAML's `...`; JSON always does: a cut one does not parse)."""
    if not path.is_file():
        raise MissingInputError(f"{path}: prompt file not found")
    try:
        if path.suffix.lower() == ".json":
            return json.loads(path.read_text(), object_pairs_hook=_no_duplicate_json_keys), True
        loader = _PromptLoader(path.read_text())
        try:
            return loader.get_single_data(), loader.explicit_end
        finally:
            loader.dispose()
    except (yaml.YAMLError, json.JSONDecodeError, ValueError) as error:
        raise InputError(f"{path}: cannot parse: {error}") from error


def load_prompt_task(path: str | os.PathLike[str]) -> PromptTask:
    """Read and validate a prompt file of any supported format (detected from its content), or a task shipped
    with vlm by name (`nsclc_subtyping`)."""
    path = resolve_task(path)
    data, complete = _read(path)
    if not isinstance(data, dict) or not data:
        raise InputError(f"{path}: expected a mapping at the top level (see prompts/README.md)")
    conch_like = all(isinstance(v, dict) and "classnames" in v for v in data.values())
    if path.suffix.lower() == ".json" or conch_like:
        return _from_conch_json(path, data)
    if "prompts" in data:
        return _from_titan_yaml(path, data)
    if not complete:
        raise InputError(
            f"{path}: the last line is not `{END_MARKER}` (YAML's end-of-document marker), which vlm task files end "
            "with: without it a file cut short at a line end still reads, with classes, templates or label "
            f"mappings missing. If the file is complete, add the line `{END_MARKER}` at its end"
        )
    return _from_vlm_yaml(path, data)


def prompt_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Prompt files named directly, by shipped task name, or found (non-recursively) in folders, sorted; READMEs
    are skipped."""
    found: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            found.extend(sorted(p for p in entry.iterdir() if p.suffix.lower() in TASK_SUFFIXES))
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
                raise UsageError(f"`classes`: class {code!r} is given twice; join its synonyms with '|'")
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
        raise InputError(f"{path}: unknown field(s) {unknown}; allowed: {sorted(_YAML_KEYS)}")
    for required in ("type", "classes", "templates"):
        if required not in data:
            raise InputError(f"{path}: missing required field '{required}' (see prompts/README.md)")
    task_type = data["type"]
    if task_type not in TASK_TYPES:
        raise InputError(f"{path}: field 'type' is {task_type!r}; use one of {list(TASK_TYPES)}")
    prompt_set = PromptSet(
        classnames=_synonyms(path, "classes", data["classes"]),
        templates=_named_or_listed_templates(path, data["templates"]),
    )
    codes = tuple(prompt_set.classnames)
    positive = data.get("positive")
    if task_type == "binary":
        if len(codes) != 2:
            raise InputError(f"{path}: field 'classes': a binary task has exactly 2 classes, got {list(codes)}")
        _check_positive(path, positive, codes, required=True)
    elif positive is not None:
        raise InputError(f"{path}: field 'positive' is only for type: binary (this task is multiclass)")
    column, label_map = _labels(path, data.get("labels"), codes)
    return PromptTask(
        name=_text(path, data, "name") or path.stem,
        classes=codes,
        prompt_sets=(prompt_set,),
        positive=positive,
        label_column=column,
        label_map=label_map,
        description=_text(path, data, "description"),
        source=str(path),
        format="vlm",
    )


def _from_conch_json(path: Path, data: dict[str, Any]) -> PromptTask:
    """CONCH (one set, synonym lists) and MI-Zero (several sets, one synonym string per class).

    Both peers read the sets by the keys "0", "1", … (CONCH: `json.load(f)['0']`; MI-Zero:
    `prompts[str(prompt_idx)] for prompt_idx in range(len(prompts))`), so other keys are refused.
    """
    expected = [str(i) for i in range(len(data))]
    if list(data) != expected:
        raise InputError(
            f'{path}: prompt sets must be keyed "0".."{len(data) - 1}" in order (CONCH / MI-Zero format), '
            f"got keys {list(data)[:10]}"
        )
    sets: list[PromptSet] = []
    codes: tuple[str, ...] | None = None
    for key, entry in data.items():
        where = f"['{key}']"
        if not isinstance(entry, dict) or "classnames" not in entry or "templates" not in entry:
            raise InputError(
                f"{path}: entry {where} must be an object with 'classnames' and 'templates' "
                "(CONCH / MI-Zero prompt format)"
            )
        prompt_set = PromptSet(
            classnames=_synonyms(path, f"{where}.classnames", entry["classnames"]),
            templates=_templates(path, f"{where}.templates", entry["templates"]),
        )
        set_codes = tuple(prompt_set.classnames)
        if codes is not None and set(set_codes) != set(codes):
            raise InputError(f"{path}: entry {where}.classnames has classes {list(set_codes)}, not {list(codes)}")
        codes = codes or set_codes
        sets.append(prompt_set)
    is_mizero = len(sets) > 1 or all(isinstance(v, str) for v in data["0"]["classnames"].values())
    return PromptTask(
        name=path.stem,
        classes=codes or (),
        prompt_sets=tuple(sets),
        label_column=PEER_LABEL_COLUMN,
        source=str(path),
        format="mi-zero" if is_mizero else "conch",
    )


def _from_titan_yaml(path: Path, data: dict[str, Any]) -> PromptTask:
    """TITAN's task config, read the way TITAN's zero-shot notebook reads it (notebooks/zeroshot_demo.ipynb).

    The notebook sorts `prompts` by `label_dict` (the class order), scores every synonym with TITAN's
    `TEMPLATES`, and reads each slide's label from the `target` column through `label_dict`.
    """
    templates = data.get("templates")
    if templates is None:
        templates = list(template_list("titan"))
        log.info("%s: no templates in the TITAN file; using TITAN's own %d templates", path, len(templates))
    prompt_set = PromptSet(
        classnames=_synonyms(path, "prompts", data["prompts"], shared="warn"),
        templates=_named_or_listed_templates(path, templates),
    )
    classes, label_map = _titan_class_order(path, data.get("label_dict"), tuple(prompt_set.classnames))
    target = data.get("target", "label")
    if not isinstance(target, str) or not target:
        raise InputError(f"{path}: field 'target' must be the label column's name, got {target!r}")
    return PromptTask(
        name=_text(path, data, "name") or path.stem,
        classes=classes,
        prompt_sets=(PromptSet({c: prompt_set.classnames[c] for c in classes}, prompt_set.templates),),
        label_column=target,
        label_map=label_map,
        source=str(path),
        format="titan",
    )


def _titan_class_order(
    path: Path, label_dict: object, codes: tuple[str, ...]
) -> tuple[tuple[str, ...], dict[str, str]]:
    """Classes in `label_dict` order; extra `label_dict` keys sharing a class's index become label aliases."""
    if label_dict is None:
        return codes, {}
    if not isinstance(label_dict, dict) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in label_dict.values()
    ):
        raise InputError(f"{path}: field 'label_dict' must map label values to class indices (integers)")
    missing = [c for c in codes if c not in label_dict]
    if missing:
        raise InputError(f"{path}: field 'label_dict' lacks the prompt classes {missing}")
    index = {c: label_dict[c] for c in codes}
    if sorted(index.values()) != list(range(len(codes))):
        raise InputError(
            f"{path}: field 'label_dict' must give the {len(codes)} prompt classes the indices "
            f"0..{len(codes) - 1} once each, got {index}"
        )
    classes = tuple(sorted(codes, key=index.__getitem__))
    outside = {k: label_dict[k] for k in label_dict if k not in index and not 0 <= label_dict[k] < len(codes)}
    if outside:
        raise InputError(f"{path}: field 'label_dict' has indices with no prompt class: {outside}")
    return classes, {str(k).strip(): classes[v] for k, v in label_dict.items() if k not in index}


# --- field validation ---------------------------------------------------------------------------------


def _text(source: object, data: Mapping[str, Any], key: str) -> str:
    """A free-text field (`name`, `description`): a string, or "" when absent; a list or mapping is refused
    before anything turns it into text."""
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise InputError(f"{source}: field '{key}' must be text, got a {type(value).__name__}")
    return str(value)


def _synonyms(source: object, where: str, value: object, shared: str = "error") -> dict[str, tuple[str, ...]]:
    """`{CODE: [synonyms]}` or `{CODE: "synonym"}` -> code -> non-empty, unique synonyms.

    A synonym under two classes makes them indistinguishable on that prompt: an error in vlm's own
    format; `shared="warn"` (TITAN's files, which have such synonyms and are used as is) keeps it in both
    classes and logs every shared synonym with its classes.
    """
    if not isinstance(value, dict) or len(value) < 2:
        raise InputError(f"{source}: field '{where}' must map at least 2 class codes to synonyms")
    owner: dict[str, str] = {}
    both: dict[str, list[str]] = {}
    out: dict[str, tuple[str, ...]] = {}
    for code, synonyms in value.items():
        if not isinstance(code, str) or not code.strip() or code != code.strip():
            raise InputError(f"{source}: field '{where}': class code {code!r} must be a non-empty string")
        if code in ("slide_id", "predicted", "label"):
            raise InputError(f"{source}: field '{where}': class code {code!r} clashes with an output column")
        items = [synonyms] if isinstance(synonyms, str) else synonyms
        if not isinstance(items, list) or not items:
            raise InputError(f"{source}: field '{where}.{code}' must be a synonym or a non-empty list of them")
        mine: set[str] = set()
        for i, synonym in enumerate(items):
            if not isinstance(synonym, str) or not synonym.strip():
                raise InputError(f"{source}: field '{where}.{code}[{i}]' must be a non-empty string")
            key = synonym.strip().lower()
            if key in mine:
                raise InputError(f"{source}: field '{where}.{code}[{i}]': synonym {synonym!r} appears twice")
            mine.add(key)
            if key in owner:
                if shared != "warn":
                    raise InputError(
                        f"{source}: field '{where}.{code}[{i}]': synonym {synonym!r} appears also under {owner[key]!r}"
                    )
                both.setdefault(synonym.strip(), [owner[key]]).append(code)
            else:
                owner[key] = code
        out[code] = tuple(s.strip() for s in items)
    if both:
        log.warning(
            "%s: %d synonym(s) appear under more than one class and are kept in each (those classes' "
            "prototypes move closer together): %s",
            source,
            len(both),
            "; ".join(f"{synonym!r} in {', '.join(codes)}" for synonym, codes in both.items()),
        )
    return out


def _named_or_listed_templates(source: object, value: object) -> tuple[str, ...]:
    """A task file's `templates`: a list, or the name of a shipped list (`templates: titan`)."""
    if isinstance(value, str):
        try:
            return template_list(value)
        except ValueError as error:
            raise InputError(f"{source}: field 'templates': {error}") from error
    return _templates(source, "templates", value)


def _templates(source: object, where: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise InputError(f"{source}: field '{where}' must be a non-empty list of templates")
    seen: set[str] = set()
    for i, template in enumerate(value):
        if not isinstance(template, str) or PLACEHOLDER not in template:
            raise InputError(
                f"{source}: field '{where}[{i}]' = {template!r} lacks the literal {PLACEHOLDER} placeholder"
            )
        if template in seen:
            raise InputError(f"{source}: field '{where}[{i}]': template {template!r} appears twice")
        seen.add(template)
    return tuple(value)


def _check_positive(source: object, positive: object, codes: Sequence[str], required: bool) -> None:
    if positive is None:
        if required:
            raise InputError(f"{source}: a binary task must name its positive class in field 'positive'")
        return
    if positive not in codes:
        raise InputError(f"{source}: field 'positive' = {positive!r} is not one of the classes {list(codes)}")
    if len(codes) != 2:
        raise InputError(f"{source}: field 'positive' needs exactly 2 classes, got {list(codes)}")


def _labels(source: object, value: object, codes: Sequence[str]) -> tuple[str, dict[str, str]]:
    if value is None:
        return "label", {}
    if not isinstance(value, dict) or set(value) - _LABEL_KEYS:
        raise InputError(f"{source}: field 'labels' must be a mapping with keys {sorted(_LABEL_KEYS)}")
    column = value.get("column", "label")
    if not isinstance(column, str) or not column:
        raise InputError(f"{source}: field 'labels.column' must be a column name")
    mapping = value.get("map") or {}
    if not isinstance(mapping, dict):
        raise InputError(f"{source}: field 'labels.map' must map label values to class codes")
    out: dict[str, str] = {}
    for raw, code in mapping.items():
        if code not in codes:
            raise InputError(f"{source}: field 'labels.map.{raw}' = {code!r} is not one of the classes {list(codes)}")
        out[str(raw).strip()] = code
    return column, out
