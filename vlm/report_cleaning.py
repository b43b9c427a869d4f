"""Report cleaning: OCR artefacts, header / footer / identifier lines, with an audit of every removal.

Public reports are OCR'd PDFs and hospital exports carry headers, footers, identifiers and dates: text a
report encoder should not learn from (and that may identify a patient). The rules are data, a YAML file
(`vlm/_data/report_cleaning.yaml`, the default; `--clean-rules FILE` for an edited copy), applied in order:

1. OCR artefacts: a word hyphenated at a line end is joined with the next line when that line starts with a
   lower-case letter; runs of spaces and tabs become one space.
2. Line rules: a line that matches a rule from start to end is removed, unless it is longer than
   `max_removed_line_chars` (a report stored as one long line, as TCGA-Reports stores them, is never removed whole).
3. Span rules: text matching a rule (a barcode, a date, an MRN) is cut out of the line that holds it.
4. Empty lines are dropped.

Every removed line and span is returned as an `AuditEntry` with the rule that removed it.

What this guarantees: exactly the listed patterns are removed, and every removal is in the audit. What it
does not: it is not de-identification. Names, addresses and free-text identifiers in running text are not
recognised (that needs a named-entity model; none can be fetched here, see the cohort docs), so reports that
must be de-identified need a dedicated tool and review before they are shared.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from vlm.errors import InputError, MissingInputError

DEFAULT_RULES = "report_cleaning.yaml"
_KEYS = {"dehyphenate", "collapse_whitespace", "max_removed_line_chars", "line_rules", "span_rules"}
_HYPHENATED = re.compile(r"([A-Za-z]+)-[ \t]*\n[ \t]*([a-z]+)")
_SPACES = re.compile(r"[ \t\u00a0]{2,}|\t")
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([.,;:])")
_LONE_PUNCTUATION = re.compile(r"([.,;:])(?:\s*[.,;:])+")


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: re.Pattern[str]


@dataclass(frozen=True)
class CleaningRules:
    """The rules of one YAML file; `source` names it in the audit and the run report."""

    line_rules: tuple[Rule, ...]
    span_rules: tuple[Rule, ...]
    dehyphenate: bool = True
    collapse_whitespace: bool = True
    max_removed_line_chars: int = 120
    source: str = DEFAULT_RULES


@dataclass(frozen=True)
class AuditEntry:
    """One removal: which report, which line (1-based, after OCR joins), which rule, what text."""

    report_id: str
    line: int
    scope: str  # "line" (the whole line), "span" (part of it) or "join" (a word hyphenated at a line end)
    rule: str
    removed: str


def load_cleaning_rules(path: str | os.PathLike[str] | None = None) -> CleaningRules:
    """The shipped rules (`path=None`) or a user's YAML file of the same layout; errors name the file and rule."""
    import yaml

    if path is None:
        text = resources.files("vlm").joinpath("_data", DEFAULT_RULES).read_text(encoding="utf-8")
        source = DEFAULT_RULES
    else:
        file = Path(path)
        if not file.is_file():
            raise MissingInputError(f"{file}: no such cleaning-rules file (YAML, laid out as vlm's {DEFAULT_RULES})")
        text, source = file.read_text(encoding="utf-8"), str(file)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise InputError(f"{source}: not valid YAML ({error})") from error
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a mapping with line_rules and span_rules")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise InputError(f"{source}: unknown field(s) {unknown}; known: {sorted(_KEYS)}")
    limit = data.get("max_removed_line_chars", 120)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise InputError(f"{source}: max_removed_line_chars must be a positive integer, got {limit!r}")
    return CleaningRules(
        line_rules=_rules(data.get("line_rules") or {}, "line_rules", source, whole_line=True),
        span_rules=_rules(data.get("span_rules") or {}, "span_rules", source, whole_line=False),
        dehyphenate=bool(data.get("dehyphenate", True)),
        collapse_whitespace=bool(data.get("collapse_whitespace", True)),
        max_removed_line_chars=limit,
        source=source,
    )


def _rules(spec: Any, field: str, source: str, whole_line: bool) -> tuple[Rule, ...]:
    if not isinstance(spec, dict):
        raise InputError(f"{source}: {field} must map rule names to patterns")
    rules = []
    for name, value in spec.items():
        where = f"{source}: {field}.{name}"
        if isinstance(value, str):
            pattern, case = value, "insensitive"
        elif isinstance(value, dict) and isinstance(value.get("pattern"), str):
            pattern, case = value["pattern"], value.get("case", "insensitive")
            extra = sorted(set(value) - {"pattern", "case"})
            if extra:
                raise InputError(f"{where}: unknown key(s) {extra}; a rule has pattern and case")
        else:
            raise InputError(f"{where}: expected a pattern string or {{pattern: ..., case: ...}}")
        if case not in ("insensitive", "sensitive"):
            raise InputError(f"{where}: case must be 'insensitive' or 'sensitive', got {case!r}")
        flags = re.IGNORECASE if case == "insensitive" else 0
        try:
            compiled = re.compile(f"(?:{pattern})" if whole_line else pattern, flags)
        except re.error as error:
            raise InputError(f"{where}: not a valid regular expression ({error})") from error
        if compiled.fullmatch("") is not None and not whole_line:
            raise InputError(f"{where}: the pattern matches empty text; it would remove nothing but loop forever")
        rules.append(Rule(str(name), compiled))
    return tuple(rules)


def clean_report(text: str, rules: CleaningRules, report_id: str = "") -> tuple[str, list[AuditEntry]]:
    """One report's text, cleaned by `rules`, and the audit of what was removed or joined (the text's lines
    joined by newlines; audit line numbers count the lines after the OCR joins, except for the joins)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    audit: list[AuditEntry] = []
    if rules.dehyphenate:  # audited too (scope "join"), with the line of the hyphen in the text as given

        def join(match: re.Match[str]) -> str:
            line = text.count("\n", 0, match.start()) + 1
            audit.append(
                AuditEntry(report_id, line, "join", "dehyphenate", match.group(0).replace("\n", "<line break>"))
            )
            return match.group(1) + match.group(2)

        text = _HYPHENATED.sub(join, text)
    kept: list[str] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = _SPACES.sub(" ", raw).strip() if rules.collapse_whitespace else raw.strip()
        if not line:
            continue
        rule = _whole_line_rule(line, rules)
        if rule is not None:
            audit.append(AuditEntry(report_id, number, "line", rule, line))
            continue
        cut = False
        for span_rule in rules.span_rules:
            pieces = [m.group(0) for m in span_rule.pattern.finditer(line) if m.group(0)]
            if pieces:
                audit.extend(AuditEntry(report_id, number, "span", span_rule.name, piece) for piece in pieces)
                line = span_rule.pattern.sub(" ", line)
                cut = True
        if cut:  # "labeled TCGA-05-4244." -> "labeled.", "margins. Page 1 of 2. Diagnosis" -> "margins. Diagnosis"
            line = _LONE_PUNCTUATION.sub(r"\1", _SPACE_BEFORE_PUNCTUATION.sub(r"\1", line))
        line = _SPACES.sub(" ", line).strip() if rules.collapse_whitespace else line.strip()
        # what the cuts left of a short line may itself be a header ("DOB:"); a long line stays long
        short = len(_SPACES.sub(" ", raw).strip()) <= rules.max_removed_line_chars
        rule = _whole_line_rule(line, rules) if line and short else None
        if rule is not None:
            audit.append(AuditEntry(report_id, number, "line", rule, line))
        elif line:
            kept.append(line)
    return "\n".join(kept), audit


def _whole_line_rule(line: str, rules: CleaningRules) -> str | None:
    if len(line) > rules.max_removed_line_chars:
        return None
    for rule in rules.line_rules:
        if rule.pattern.fullmatch(line):
            return rule.name
    return None
