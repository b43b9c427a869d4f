"""Prompt files: the shipped tasks validate, bad files fail naming file and field, peers' formats read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlm.cli import main
from vlm.prompts import (
    DEFAULT_TEMPLATES,
    TITAN_LIKE_TEMPLATES,
    load_prompt_task,
    prompt_files,
    task_from_classes,
)

PROMPTS = Path(__file__).resolve().parents[1] / "prompts"
SHIPPED = prompt_files([PROMPTS])

TEMPLATES_LINE = 'templates: ["CLASSNAME.", "an H&E image of CLASSNAME.", "histology shows CLASSNAME."]\n'
GOOD = f"""\
name: demo
type: binary
positive: mut
classes:
  mut: [EGFR-mutant lung adenocarcinoma, lung adenocarcinoma with an EGFR mutation]
  wt: [EGFR wild-type lung adenocarcinoma]
{TEMPLATES_LINE}labels:
  column: EGFR
  map: {{"1": mut, "0": wt}}
"""


def _write(tmp_path: Path, text: str, name: str = "task.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_tasks_cover_the_issue() -> None:
    names = {path.stem for path in SHIPPED}
    required = {"nsclc_subtyping", "coadread_subtyping", "brca_subtyping", "rcc_subtyping", "tmb_high_vs_low"}
    required |= {f"luad_{gene}_mutation" for gene in ("egfr", "kras", "tp53", "fat1", "lrp1b")}
    required |= {f"pancancer_{gene}_mutation" for gene in ("tp53", "kras", "pik3ca", "braf", "apc", "idh1")}
    assert required <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_each_shipped_task_validates(path: Path) -> None:
    task = load_prompt_task(path)
    assert task.format == "vlm"
    (prompt_set,) = task.prompt_sets
    assert len(prompt_set.templates) >= 15
    assert all(len(synonyms) >= 3 for synonyms in prompt_set.classnames.values())
    if "mutation" in path.stem or "tmb" in path.stem:
        assert task.positive is not None and len(task.classes) == 2
    for code, prompts in task.expand().items():
        assert len(prompts) == len(prompt_set.classnames[code]) * len(prompt_set.templates)
        assert not any("CLASSNAME" in prompt for prompt in prompts)


def test_prompts_check_cli_prints_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prompts", "check", str(PROMPTS)]) == 0
    out = capsys.readouterr().out
    assert out.count("ok   ") == len(SHIPPED)
    assert "LUAD: 5 synonyms × 18 templates = 90 prompts" in out
    assert "positive mutant" in out


def test_expansion_is_exact(tmp_path: Path) -> None:
    task = load_prompt_task(_write(tmp_path, GOOD))
    expanded = task.expand()
    assert expanded["mut"][:3] == [
        "EGFR-mutant lung adenocarcinoma.",
        "an H&E image of EGFR-mutant lung adenocarcinoma.",
        "histology shows EGFR-mutant lung adenocarcinoma.",
    ]
    assert len(expanded["mut"]) == 2 * 3 and len(expanded["wt"]) == 1 * 3
    assert task.positive == "mut" and task.positive_index == 0
    assert task.label_column == "EGFR"
    assert [task.label_to_class(v) for v in ("1", "0", "wt", "2")] == ["mut", "wt", "wt", None]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda t: t.replace(TEMPLATES_LINE, ""), "'templates'"),
        (lambda t: t.replace('"histology shows CLASSNAME."', '"histology shows it."'), "templates[2]"),
        (lambda t: t.replace("positive: mut\n", ""), "'positive'"),
        (lambda t: t.replace("positive: mut", "positive: mutant"), "'positive'"),
        (lambda t: t.replace("  wt: [EGFR wild-type", "  mut: [EGFR wild-type"), "duplicate key 'mut'"),
        (
            lambda t: t.replace("[EGFR wild-type lung adenocarcinoma]", "[EGFR-mutant lung adenocarcinoma]"),
            "classes.wt[0]",
        ),
        (lambda t: t.replace("type: binary", "type: regression"), "'type'"),
        (lambda t: t + "colour: blue\n", "unknown field"),
        (lambda t: t.replace('"0": wt', '"0": wildtype'), "labels.map.0"),
        (lambda t: t.replace("  wt: [EGFR wild-type lung adenocarcinoma]\n", ""), "'classes'"),
        (
            lambda t: t.replace('"CLASSNAME.", "an H&E', '"CLASSNAME.", "CLASSNAME.", "an H&E'),
            "appears twice",
        ),
    ],
    ids=[
        "no-templates",
        "no-placeholder",
        "binary-no-positive",
        "positive-not-a-class",
        "duplicate-class",
        "synonym-in-two-classes",
        "bad-type",
        "unknown-field",
        "label-map-to-unknown",
        "one-class",
        "duplicate-template",
    ],
)
def test_malformed_files_name_file_and_field(tmp_path: Path, change, field: str) -> None:  # noqa: ANN001
    path = _write(tmp_path, change(GOOD), "broken_task.yaml")
    with pytest.raises(ValueError, match="broken_task.yaml") as error:
        load_prompt_task(path)
    assert field in str(error.value)


def test_prompts_check_reports_every_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path, GOOD, "good.yaml")
    _write(tmp_path, GOOD.replace("positive: mut\n", ""), "bad.yaml")
    assert main(["prompts", "check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "bad.yaml" in out and "ok   " in out


def test_conch_json_reads_synonym_lists(tmp_path: Path) -> None:
    classnames = {"LUAD": ["adenocarcinoma", "lung adenocarcinoma"], "LUSC": ["squamous cell carcinoma"]}
    conch = {"0": {"classnames": classnames, "templates": ["CLASSNAME.", "an H&E image of CLASSNAME."]}}
    task = load_prompt_task(_write(tmp_path, json.dumps(conch), "nsclc_conch.json"))
    assert task.format == "conch" and task.classes == ("LUAD", "LUSC") and len(task.prompt_sets) == 1
    assert task.expand()["LUAD"] == [
        "adenocarcinoma.",
        "an H&E image of adenocarcinoma.",
        "lung adenocarcinoma.",
        "an H&E image of lung adenocarcinoma.",
    ]


def test_mizero_json_reads_every_set(tmp_path: Path) -> None:
    sets = {
        str(i): {
            "classnames": {"LUAD": luad, "LUSC": lusc},
            "templates": ["CLASSNAME.", f"image {i} of CLASSNAME."],
        }
        for i, (luad, lusc) in enumerate(
            [
                ("adenocarcinoma", "squamous cell carcinoma"),
                ("lung adenocarcinoma", "lung squamous cell carcinoma"),
                ("pulmonary adenocarcinoma", "pulmonary squamous cell carcinoma"),
            ]
        )
    }
    task = load_prompt_task(_write(tmp_path, json.dumps(sets), "mizero.json"))
    assert task.format == "mi-zero" and len(task.prompt_sets) == 3
    assert task.prompt_sets[1].expand()["LUSC"] == [
        "lung squamous cell carcinoma.",
        "image 1 of lung squamous cell carcinoma.",
    ]
    assert len(task.expand()["LUAD"]) == 6
    mismatched = dict(sets, **{"3": {"classnames": {"LUAD": "x"}, "templates": ["CLASSNAME."]}})
    with pytest.raises(ValueError, match=r"mizero_bad.json.*\['3'\]\.classnames"):
        load_prompt_task(_write(tmp_path, json.dumps(mismatched), "mizero_bad.json"))


def test_titan_yaml_with_and_without_templates(tmp_path: Path) -> None:
    text = "prompts:\n  LUAD: [lung adenocarcinoma, adenocarcinoma]\n  LUSC: [lung squamous cell carcinoma]\n"
    task = load_prompt_task(_write(tmp_path, text, "titan.yaml"))
    assert task.format == "titan" and task.prompt_sets[0].templates == TITAN_LIKE_TEMPLATES
    assert len(task.expand()["LUAD"]) == 2 * len(TITAN_LIKE_TEMPLATES)
    own = load_prompt_task(_write(tmp_path, text + "templates: ['CLASSNAME is seen.']\n", "titan2.yaml"))
    assert own.expand()["LUSC"] == ["lung squamous cell carcinoma is seen."]


def test_classes_from_the_command_line() -> None:
    task = task_from_classes(["LUAD=lung adenocarcinoma|adenocarcinoma", "LUSC=lung squamous cell carcinoma"])
    assert task.classes == ("LUAD", "LUSC")
    assert len(task.expand()["LUAD"]) == 2 * len(DEFAULT_TEMPLATES)
    assert task_from_classes(["a=x", "b=y"], positive="b").positive_index == 1
    with pytest.raises(ValueError, match="given twice"):
        task_from_classes(["LUAD=x", "LUAD=y"])
    with pytest.raises(ValueError, match="positive"):
        task_from_classes(["a=x", "b=y"], positive="c")
