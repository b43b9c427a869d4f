"""Prompt files: the shipped tasks validate, bad files fail naming file and field, peers' formats read."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.peers import MIZERO_POOL, write_mizero_file
from vlm.cli import main
from vlm.prompts import (
    DEFAULT_TEMPLATES,
    load_prompt_task,
    prompt_files,
    task_from_classes,
    template_list,
)

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "prompts"
UPSTREAM = Path(__file__).resolve().parent / "fixtures" / "prompts"  # peers' real files; see SOURCES.md there
TITAN_CONFIG = UPSTREAM / "titan_config_tcga-ot.yaml"
CONCH_NSCLC = UPSTREAM / "conch_nsclc_prompts_all_per_class.json"
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
...
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
        (lambda t: t.replace("labels:", "colour: blue\nlabels:"), "unknown field"),
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
    assert task.format == "titan" and task.prompt_sets[0].templates == template_list("titan")
    assert len(task.expand()["LUAD"]) == 2 * 23
    own = load_prompt_task(_write(tmp_path, text + "templates: ['CLASSNAME is seen.']\n", "titan2.yaml"))
    assert own.expand()["LUSC"] == ["lung squamous cell carcinoma is seen."]


def test_titan_templates_are_titans_exact_23() -> None:
    """TITAN's `TEMPLATES` (mahmoodlab/TITAN titan/utils.py lines 13-38 at 33042f5), verbatim and in order,
    including its own wording slips ("a microscopic image of showing CLASSNAME.")."""
    templates = template_list("titan")
    assert len(templates) == 23 == len(set(templates))
    assert templates[:3] == ("CLASSNAME.", "an image of CLASSNAME.", "the image shows CLASSNAME.")
    assert templates[8] == "I observe CLASSNAME."
    assert templates[18] == "a microscopic image of showing CLASSNAME."
    assert templates[-1] == "CLASSNAME is identified."
    with pytest.raises(ValueError, match="unknown template list 'nope'.*titan"):
        template_list("nope")


def test_a_task_file_can_name_titans_template_list(tmp_path: Path) -> None:
    task = load_prompt_task(_write(tmp_path, GOOD.replace(TEMPLATES_LINE, "templates: titan\n")))
    assert task.prompt_sets[0].templates == template_list("titan")
    with pytest.raises(ValueError, match="bad.yaml: field 'templates': unknown template list 'titn'"):
        load_prompt_task(_write(tmp_path, GOOD.replace(TEMPLATES_LINE, "templates: titn\n"), "bad.yaml"))


def test_titan_real_config_is_read_as_titans_notebook_reads_it(caplog: pytest.LogCaptureFixture) -> None:
    """TITAN's real `datasets/config_tcga-ot.yaml`, read the way notebooks/zeroshot_demo.ipynb (cells 5 and
    7) uses it: prompts sorted by `label_dict`, TITAN's templates, labels from the `target` column. The file
    lists 4 synonyms under two classes; TITAN uses it as is, so vlm accepts it and names them."""
    with caplog.at_level(logging.WARNING, logger="vlm.prompts"):
        task = load_prompt_task(TITAN_CONFIG)
    assert task.format == "titan"
    import yaml

    raw = yaml.safe_load(TITAN_CONFIG.read_text())
    assert task.classes == tuple(sorted(raw["label_dict"], key=raw["label_dict"].get))
    assert len(task.classes) == raw["num_classes"] == 46
    assert task.label_column == "OncoTreeCode" == raw["target"]
    (prompt_set,) = task.prompt_sets
    assert prompt_set.templates == template_list("titan")
    for code in task.classes:
        assert list(prompt_set.classnames[code]) == raw["prompts"][code]
    shared = ["anaplastic astrocytoma", "grade III astrocytoma", "oligoastrocytoma", "diffuse gastric adenocarcinoma"]
    assert "4 synonym(s) appear under more than one class" in caplog.text
    assert all(f"'{synonym}'" in caplog.text for synonym in shared)
    assert "AASTR, ASTR" in caplog.text and "DSTAD, STAD" in caplog.text
    assert "anaplastic astrocytoma." in task.expand()["AASTR"] and "anaplastic astrocytoma." in task.expand()["ASTR"]
    assert "Müllerian" in " ".join(task.expand()["UCS"])  # YAML's "\xFC" escape read as ü


def test_titan_label_dict_decides_order_and_is_checked(tmp_path: Path) -> None:
    body = "prompts:\n  A: [alpha tumour]\n  B: [beta tumour]\n  C: [gamma tumour]\ntarget: subtype\n"
    task = load_prompt_task(_write(tmp_path, body + "label_dict: {C: 0, A: 1, B: 2, A2: 1}\n", "t.yaml"))
    assert task.classes == ("C", "A", "B") and task.label_column == "subtype"
    assert [task.label_to_class(v) for v in ("A2", "C", "D")] == ["A", "C", None]
    for label_dict, message in [
        ("{A: 0, B: 1}", r"lacks the prompt classes \['C'\]"),
        ("{A: 0, B: 1, C: 1}", "0..2 once each"),
        ("{A: 0, B: 1, C: 2, D: 7}", "no prompt class"),
        ("{A: x, B: 1, C: 2}", "integers"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_prompt_task(_write(tmp_path, body + f"label_dict: {label_dict}\n", "bad_titan.yaml"))
    with pytest.raises(ValueError, match="'prompts.A\\[1\\]'.*appears twice"):
        load_prompt_task(_write(tmp_path, body.replace("[alpha tumour]", "[alpha tumour, Alpha tumour]"), "d.yaml"))


def test_conch_real_file_reads_as_conch_uses_it() -> None:
    """CONCH's real prompts/nsclc_prompts_all_per_class.json. CONCH's notebooks read `json.load(f)['0']`,
    expand every synonym × template per class (conch/downstream/zeroshot_path.py `zero_shot_classifier`) and
    take labels from `target_col = 'OncoTreeCode'` (MI-zeroshot_classification_example_ensemble.ipynb)."""
    task = load_prompt_task(CONCH_NSCLC)
    raw = json.loads(CONCH_NSCLC.read_text())["0"]
    assert task.format == "conch" and task.classes == ("LUAD", "LUSC")
    assert task.label_column == "OncoTreeCode"
    expected = [t.replace("CLASSNAME", name) for name in raw["classnames"]["LUAD"] for t in raw["templates"]]
    assert task.expand()["LUAD"] == expected and len(expected) == 4 * 22


def test_mizero_prompts_check_counts_distinct_synonyms(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_mizero_file(tmp_path / "nsclc_prompts.json")
    task = load_prompt_task(path)
    data = json.loads(path.read_text())
    assert task.format == "mi-zero" and len(task.prompt_sets) == 12 and task.label_column == "OncoTreeCode"
    distinct = {code: len({entry["classnames"][code] for entry in data.values()}) for code in MIZERO_POOL}
    assert task.summary()["synonyms"] == distinct and max(distinct.values()) <= 4
    assert main(["prompts", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"LUAD: {distinct['LUAD']} distinct synonyms" in out and "12 prompt sets" in out


def test_mizero_sets_must_be_keyed_0_to_n(tmp_path: Path) -> None:
    data = json.loads(write_mizero_file(tmp_path / "ok.json", iters=3).read_text())
    data["7"] = data.pop("2")
    with pytest.raises(ValueError, match=r"gap.json: prompt sets must be keyed \"0\"..\"2\""):
        load_prompt_task(_write(tmp_path, json.dumps(data), "gap.json"))


def test_classes_from_the_command_line() -> None:
    task = task_from_classes(["LUAD=lung adenocarcinoma|adenocarcinoma", "LUSC=lung squamous cell carcinoma"])
    assert task.classes == ("LUAD", "LUSC")
    assert len(task.expand()["LUAD"]) == 2 * len(DEFAULT_TEMPLATES)
    assert task_from_classes(["a=x", "b=y"], positive="b").positive_index == 1
    with pytest.raises(ValueError, match="given twice"):
        task_from_classes(["LUAD=x", "LUAD=y"])
    with pytest.raises(ValueError, match="positive"):
        task_from_classes(["a=x", "b=y"], positive="c")


def _alias_bomb(field: str, levels: int = 9) -> str:
    """A "billion laughs" task file: `field` holds 10**levels leaves through nested aliases (a few hundred bytes)."""
    chain = ["&l0 [" + ", ".join(["lol"] * 10) + "]"]
    chain += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return GOOD.replace("name: demo\n", f"name: demo\n{field}: [{', '.join(chain)}]\n" if field != "name" else
                        f"name: [{', '.join(chain)}]\n")


@pytest.mark.parametrize("field", ["name", "description"])
def test_an_alias_bomb_in_a_free_text_field_is_refused_at_once(tmp_path: Path, field: str) -> None:
    """10**9 leaves: turning the value into text took minutes and gigabytes. Run in a subprocess with a time
    limit, so that the bug fails this test instead of hanging the suite."""
    path = _write(tmp_path, _alias_bomb(field), "bomb.yaml")
    done = subprocess.run([sys.executable, "-m", "vlm", "prompts", "check", str(path)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 1
    assert "bomb.yaml" in done.stdout + done.stderr
    assert "alias *l0 (line " in done.stdout + done.stderr and "repeats a list or mapping" in done.stdout + done.stderr


def test_aliases_of_single_values_still_load(tmp_path: Path) -> None:
    text = GOOD.replace("name: demo", "name: &n demo\ndescription: *n")
    task = load_prompt_task(_write(tmp_path, text))
    assert task.name == task.description == "demo"


@pytest.mark.parametrize("value", ["[a, b]", "{a: b}"])
@pytest.mark.parametrize("field", ["name", "description"])
def test_free_text_fields_must_be_text(tmp_path: Path, field: str, value: str) -> None:
    text = GOOD.replace("name: demo\n", f"name: demo\n{field}: {value}\n" if field != "name" else f"name: {value}\n")
    with pytest.raises(ValueError, match=rf"task\.yaml: field '{field}' must be text, got a (list|dict)"):
        load_prompt_task(_write(tmp_path, text))


@pytest.mark.parametrize("path", sorted(PROMPTS.glob("*.yaml")), ids=lambda p: p.stem)
def test_a_task_file_cut_at_any_line_end_is_refused(tmp_path: Path, path: Path) -> None:
    """A copy cut short at a line end is still valid YAML: it lost its last classes, templates or label
    mappings silently. Every shipped file, cut after each of its lines, is refused; whole, it loads."""
    lines = path.read_text().splitlines(keepends=True)
    assert lines[-1] == "...\n"
    for end in range(1, len(lines)):
        cut = _write(tmp_path, "".join(lines[:end]), "cut.yaml")
        with pytest.raises(ValueError, match=r"cut\.yaml: "):
            load_prompt_task(cut)
    assert load_prompt_task(_write(tmp_path, "".join(lines), "whole.yaml")).classes
