"""A synthetic, procedurally drawn slide cohort with reports, for the offline demo.

Three morphology classes differ in architecture and texture the way their real counterparts do:
- `glandular`: pink stroma holding round glands — a ring of dark nuclei around a white lumen;
- `solid`: sheets of tightly packed cells (dark nuclei on purple-pink cytoplasm) with keratin pearls;
- `papillary`: branching fronds with pink fibrovascular cores lined by nuclei, floating in white space.
Each slide is a pyramidal JPEG TIFF at 0.5 µm/px with tissue in an irregular blob on white glass, and each
has a report written from class-specific findings in varied wording. None of this is real pathology: the
cohort exists to run every stage on real code paths, and its numbers say nothing about clinical use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from vlm.wsi.synthetic import write_pyramidal_tiff

CLASSES = ("glandular", "solid", "papillary")
SLIDE_MPP = 0.5

# Report sentences per class: several phrasings of the diagnosis and of the findings.
_DIAGNOSES = {
    "glandular": [
        "invasive adenocarcinoma", "adenocarcinoma, gland-forming", "moderately differentiated adenocarcinoma",
        "adenocarcinoma with glandular architecture",
    ],
    "solid": [
        "squamous cell carcinoma", "keratinizing squamous cell carcinoma",
        "invasive squamous carcinoma with keratin pearls", "poorly differentiated squamous cell carcinoma",
    ],
    "papillary": [
        "papillary carcinoma", "carcinoma with papillary architecture", "papillary neoplasm, invasive",
        "papillary type carcinoma",
    ],
}
_FINDINGS = {
    "glandular": [
        "The tumor forms round glands with central lumina lined by columnar cells.",
        "Neoplastic glands with open lumens infiltrate a desmoplastic stroma.",
        "Back-to-back glandular structures are present.",
    ],
    "solid": [
        "Sheets of polygonal cells with keratin pearls are seen.",
        "Solid nests of tumor cells show keratinization and intercellular bridges.",
        "The tumor grows in solid sheets without gland formation.",
    ],
    "papillary": [
        "Finger-like papillae with fibrovascular cores are lined by tumor cells.",
        "Branching papillary fronds float in open spaces.",
        "Complex papillary architecture with central vascular cores.",
    ],
}
_FILLER = [
    "Margins are free of tumor.", "Lymphovascular invasion is not identified.", "Specimen received in formalin.",
    "Perineural invasion is present.", "Tumor size 2.1 cm.", "Background tissue shows chronic inflammation.",
]


@dataclass(frozen=True)
class CohortSlide:
    slide_id: str
    path: Path
    label: str
    report: str
    patient_id: str
    split: str


def _tissue_blob(size: int, rng: np.random.Generator) -> np.ndarray:
    """An irregular tissue region (bool [size, size]) covering roughly half of the slide."""
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    angle = np.arctan2(yy, xx)
    radius = 0.36 + sum(rng.uniform(0.01, 0.04) * np.sin(k * angle + rng.uniform(0, 2 * math.pi)) for k in (2, 3, 5))
    return np.hypot(xx * rng.uniform(0.9, 1.1), yy) < radius


def _speckle(image: Image.Image, rng: np.random.Generator, amount: int = 18) -> np.ndarray:
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.2)), np.int16)
    noise = rng.integers(-amount, amount, size=pixels.shape[:2] + (1,), dtype=np.int16)
    return np.clip(pixels + noise, 0, 255).astype(np.uint8)


def _nuclei(draw: ImageDraw.ImageDraw, rng: np.random.Generator, centers: np.ndarray, radius: float) -> None:
    for x, y in centers:
        r = radius * rng.uniform(0.7, 1.3)
        shade = tuple(int(v) for v in rng.integers(-15, 15, 3) + np.array([70, 40, 120]))
        draw.ellipse([x - r, y - r * 0.8, x + r, y + r * 0.8], fill=shade)


def _draw_glandular(size: int, rng: np.random.Generator) -> Image.Image:
    image = Image.new("RGB", (size, size), (232, 170, 200))  # eosinophilic stroma
    draw = ImageDraw.Draw(image)
    for _ in range(int(size * size / 9000)):
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(18, 40)
        draw.ellipse([x - r - 10, y - r - 10, x + r + 10, y + r + 10], fill=(150, 90, 170))  # epithelium
        angles = np.linspace(0, 2 * np.pi, 18, endpoint=False)
        ring = np.stack([x + (r + 5) * np.cos(angles), y + (r + 5) * np.sin(angles)], axis=1)
        _nuclei(draw, rng, ring, 4.5)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(248, 244, 248))  # lumen
    return image


def _draw_solid(size: int, rng: np.random.Generator) -> Image.Image:
    image = Image.new("RGB", (size, size), (190, 120, 175))  # cytoplasm sheets
    draw = ImageDraw.Draw(image)
    _nuclei(draw, rng, rng.uniform(0, size, (int(size * size / 160), 2)), 4.0)
    for _ in range(int(size * size / 120_000)):  # keratin pearls: concentric eosinophilic whorls
        x, y = rng.uniform(0, size, 2)
        for k, r in enumerate(np.linspace(rng.uniform(30, 50), 6, 5)):
            shade = (245, 150 + 12 * k, 175 + 8 * k) if k % 2 == 0 else (225, 120, 160)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=shade)
    return image


def _draw_papillary(size: int, rng: np.random.Generator) -> Image.Image:
    image = Image.new("RGB", (size, size), (246, 240, 244))  # open spaces
    draw = ImageDraw.Draw(image)
    for _ in range(int(size * size / 60_000)):
        stack = [(rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0, 2 * np.pi), 4)]
        while stack:
            x, y, heading, depth = stack.pop()
            length = rng.uniform(40, 90)
            x2, y2 = x + length * np.cos(heading), y + length * np.sin(heading)
            draw.line([x, y, x2, y2], fill=(120, 60, 150), width=26)  # epithelial lining
            draw.line([x, y, x2, y2], fill=(235, 150, 180), width=12)  # fibrovascular core
            if depth:
                for turn in (-0.6, 0.6):
                    stack.append((x2, y2, heading + turn + rng.normal(0, 0.2), depth - 1))
    return image


_PAINTERS = {"glandular": _draw_glandular, "solid": _draw_solid, "papillary": _draw_papillary}


def draw_slide(label: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """RGB [size, size, 3]: the class's texture inside an irregular tissue blob on white glass."""
    texture = _speckle(_PAINTERS[label](size, rng), rng)
    image = np.full((size, size, 3), 243, np.uint8)
    blob = _tissue_blob(size, rng)
    image[blob] = texture[blob]
    return image


def report_phrases() -> list[str]:
    """Every phrase a report can be built from (any seed): the demo's search query must avoid their wording."""
    return [*sum(_DIAGNOSES.values(), []), *sum(_FINDINGS.values(), []), *_FILLER, "FINAL DIAGNOSIS", "MICROSCOPIC"]


def write_report(label: str, rng: np.random.Generator) -> str:
    diagnosis = rng.choice(_DIAGNOSES[label])
    findings = rng.choice(_FINDINGS[label], size=2, replace=False)
    filler = rng.choice(_FILLER, size=2, replace=False)
    return f"FINAL DIAGNOSIS: {diagnosis}. MICROSCOPIC: {' '.join(findings)} {' '.join(filler)}"


def make_cohort(
    folder: str | Path, per_class: int = 12, test_per_class: int = 4, size: int = 2048, seed: int = 0
) -> list[CohortSlide]:
    """Write `per_class` slides per class (the last `test_per_class` of each in the test split)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cohort = []
    for label in CLASSES:
        for index in range(per_class):
            slide_id = f"{label}-{index:02d}"
            path = folder / f"{slide_id}.tiff"
            if not path.exists():
                write_pyramidal_tiff(path, (size, size), draw_slide(label, size, rng), mpp=SLIDE_MPP, n_levels=3)
            split = "test" if index >= per_class - test_per_class else "train"
            cohort.append(CohortSlide(slide_id, path, label, write_report(label, rng), f"P{label[:3]}{index:02d}",
                                      split))
    return cohort
