"""TCGA barcodes and GDC file names: which case a slide, a report or a sequenced aliquot belongs to.

A TCGA barcode names a case and, further right, a sample, a portion and a slide or an aliquot:

    TCGA-05-4244            case (project TCGA, tissue source site 05, participant 4244)
    TCGA-05-4244-01Z-00-DX1 slide: sample type 01 (primary solid tumour), vial Z, portion 00, slide DX1
    TCGA-05-4244-01A-01D-1105-08  aliquot (the `Tumor_Sample_Barcode` of a MAF row)

Sample types 01-09 are tumour, 10-19 normal, 20-29 controls (the GDC's TCGA code tables, "Sample Type Codes",
gdc.cancer.gov/resources-tcga-users/tcga-code-tables/sample-type-codes). Slide codes:
`DX<n>` a diagnostic slide (formalin-fixed, paraffin-embedded), `TS`/`BS`/`MS` + a digit or letter the top,
bottom or middle section of a frozen block (e.g. `TS1`, `BS2`, `TSA`, `MSA`).

GDC names a slide file `<slide barcode>.<file uuid>.svs` (`TCGA-05-4244-01Z-00-DX1.D4FF32CD-....svs`); feature
tools keep the stem (`....h5`). The TCGA-Reports corpus (github.com/tatonetti-lab/tcga-path-reports,
training_set_split.py) names a report `<case barcode>.<uuid>` in its `patient_filename` column.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CASE_PATTERN = r"TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}"
_UUID = r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"
_CASE = re.compile(rf"^{CASE_PATTERN}$")
_SLIDE = re.compile(
    rf"^(?P<case>{CASE_PATTERN})-(?P<sample>\d{{2}})(?P<vial>[A-Z])-(?P<portion>\d{{2}})-"
    rf"(?P<section>DX|TS|BS|MS)(?P<number>[0-9A-Z]{{1,2}})(?:\.(?P<uuid>{_UUID}))?$"
)
_REPORT = re.compile(rf"^(?P<case>{CASE_PATTERN})(?:\.(?P<uuid>{_UUID}))?$")
_ALIQUOT = re.compile(rf"^(?P<case>{CASE_PATTERN})-(?P<sample>\d{{2}})[A-Z]?(?:-.*)?$")

#: slide kinds a user may ask for (`vlm pairs --slide-types`); "diagnostic" alone is the default.
SLIDE_TYPES: tuple[str, ...] = ("diagnostic", "frozen", "normal")
DEFAULT_SLIDE_TYPES: tuple[str, ...] = ("diagnostic",)


@dataclass(frozen=True)
class SlideBarcode:
    """The parts of a TCGA slide barcode that decide whether a slide may be paired with a tumour report."""

    slide_id: str
    case: str
    sample_type: int  # 01-09 tumour, 10-19 normal, 20-29 control
    section: str  # DX (diagnostic FFPE), TS / BS / MS (frozen)

    @property
    def kind(self) -> str:
        """ "normal" for a normal-tissue sample, else "diagnostic" (DX) or "frozen" (TS/BS/MS)."""
        if not is_tumour_sample(self.sample_type):
            return "normal"
        return "diagnostic" if self.section == "DX" else "frozen"


def is_case_barcode(value: str) -> bool:
    return bool(_CASE.match(value))


def is_tumour_sample(sample_type: int) -> bool:
    return 1 <= sample_type <= 9


def parse_slide_id(slide_id: str) -> SlideBarcode | None:
    """The barcode of a GDC slide file stem (`TCGA-05-4244-01Z-00-DX1.<uuid>`); None if it is not one."""
    match = _SLIDE.match(slide_id)
    if match is None:
        return None
    return SlideBarcode(slide_id, match["case"], int(match["sample"]), match["section"])


def case_of_report_id(report_id: str) -> str | None:
    """The case of a TCGA-Reports `patient_filename` (`TCGA-05-4244.<uuid>`, or a bare case barcode)."""
    match = _REPORT.match(report_id.strip())
    return match["case"] if match else None


def parse_aliquot(barcode: str) -> tuple[str, int] | None:
    """(case, sample type) of a sample or aliquot barcode (a MAF `Tumor_Sample_Barcode`); None if not TCGA."""
    match = _ALIQUOT.match(barcode.strip())
    return (match["case"], int(match["sample"])) if match else None
