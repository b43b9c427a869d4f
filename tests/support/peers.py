"""Feature files laid out the way TRIDENT's and CLAM's own writer code lays them out (not their code).

Followed (read with the `fetch` tool):
- TRIDENT a91fa8490e0210ebbbe58452c3babe009e0ab7ca
  - trident/IO.py:646-687 `coords_to_h5`: int64 `coords`, attributes on the `coords` dataset `patch_size`,
    `patch_size_level0 = patch_size * src_mag // target_mag`, `level0_magnification`, `target_magnification`,
    `overlap`, `name`, `savetodir`, `level0_width`, `level0_height`; no `mpp` anywhere.
  - trident/IO.py:460-517 `save_h5`: datasets chunked (1, ...) with maxshape (None, ...); None -> 'None'.
  - trident/wsi_objects/WSI.py:1024-1035: the feature file repeats `coords` with the coords attributes and
    puts `name`, `savetodir`, `encoder` on `features` [N, D].
  - trident/wsi_objects/WSIPatcher.py:147,171-174: the grid starts at (0, 0) with step
    `round(patch_size * downsample)` level-0 px; level-0 µm/px is `10 / level0_magnification` (:135).
- CLAM 53e2409d4a8189c682c173382964a85f114f923c
  - wsi_core/WholeSlideImage.py:394-475 `process_contour`: each tissue contour's grid starts at its
    bounding box `cv2.boundingRect` (:396), step `step_size * int(downsample)` (:443-449); attributes on
    `coords`: `patch_size`, `patch_level`, `downsample` (the level's (dx, dy)), `downsampled_level_dim`,
    `level_dim`, `name`, `save_path` (:466-474). Only the first contour writes them (:383-389, mode 'w'
    then 'a' without attributes), via wsi_core/wsi_utils.py:55-74 `save_hdf5` (chunks (1, ...)).
  - extract_features_fp.py:34-46 with utils/file_utils.py:16-34 `save_hdf5`: `h5_files/<slide>.h5` gets
    float32 `features` [N, D] and int32 `coords`, batch by batch (mode 'w' then 'a'), with NO attributes.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np


def _append(
    path: Path, assets: dict[str, np.ndarray], attributes: dict[str, dict] | None, mode: str, chunk: int
) -> None:
    """Both peers' `save_h5`/`save_hdf5`: resizable datasets, attributes only when a dataset is created."""
    with h5py.File(path, mode) as h5:
        for key, value in assets.items():
            if key not in h5:
                dset = h5.create_dataset(
                    key,
                    shape=value.shape,
                    maxshape=(None, *value.shape[1:]),
                    chunks=(chunk, *value.shape[1:]),
                    dtype=value.dtype,
                )
                dset[:] = value
                for name, attr in ((attributes or {}).get(key) or {}).items():
                    dset.attrs[name] = "None" if attr is None else attr
            else:
                dset = h5[key]
                dset.resize(len(dset) + len(value), axis=0)
                dset[-len(value) :] = value


def trident_grid(
    rows: int, cols: int, level0_magnification: int, target_magnification: int = 20, patch_size: int = 256
) -> np.ndarray:
    """TRIDENT's default grid: (col, row) * step from (0, 0), row-major."""
    step = round(patch_size * level0_magnification / target_magnification)
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return np.stack([c.ravel() * step, r.ravel() * step], axis=1).astype(np.int64)


def write_trident_features(
    path: Path,
    coords: np.ndarray,
    features: np.ndarray,
    level0_magnification: int,
    target_magnification: int = 20,
    patch_size: int = 256,
    encoder: str = "conch_v15",
) -> None:
    coords_attrs = {
        "patch_size": patch_size,
        "patch_size_level0": patch_size * level0_magnification // target_magnification,
        "level0_magnification": level0_magnification,
        "target_magnification": target_magnification,
        "overlap": 0,
        "name": path.stem,
        "savetodir": str(path.parent),
        "level0_width": int(coords[:, 0].max()) + 2048,
        "level0_height": int(coords[:, 1].max()) + 2048,
    }
    _append(
        path,
        {"features": np.asarray(features, np.float32), "coords": np.asarray(coords, np.int64)},
        {"features": {"name": path.stem, "savetodir": str(path.parent), "encoder": encoder}, "coords": coords_attrs},
        mode="w",
        chunk=1,
    )


def clam_contour_grid(
    origin: tuple[int, int], size: tuple[int, int], patch_size: int = 256, downsample: int = 1
) -> np.ndarray:
    """One contour's candidates: np.arange from the bounding box's corner, meshgrid 'ij', flattened."""
    step = patch_size * downsample
    xs = np.arange(origin[0], origin[0] + size[0], step)
    ys = np.arange(origin[1], origin[1] + size[1], step)
    x, y = np.meshgrid(xs, ys, indexing="ij")
    return np.array([x.flatten(), y.flatten()]).transpose()


def write_clam_patches(
    path: Path,
    contours: list[np.ndarray],
    patch_size: int = 256,
    patch_level: int = 0,
    downsample: float = 1.0,
    level_dim: tuple[int, int] = (100_000, 80_000),
) -> np.ndarray:
    """`patches/<slide>.h5`; returns all coords in file order."""
    attrs = {
        "patch_size": patch_size,
        "patch_level": patch_level,
        "downsample": (downsample, downsample),
        "downsampled_level_dim": tuple(np.array(level_dim)),
        "level_dim": level_dim,
        "name": path.stem,
        "save_path": str(path.parent),
    }
    for index, coords in enumerate(contours):
        _append(
            path,
            {"coords": coords},
            {"coords": attrs} if index == 0 else None,
            mode="w" if index == 0 else "a",
            chunk=1,
        )
    return np.concatenate(contours)


def write_clam_features(path: Path, coords: np.ndarray, features: np.ndarray, batch_size: int = 7) -> None:
    """`h5_files/<slide>.h5` as `compute_w_loader` writes it: batches, int32 coords, no attributes."""
    mode = "w"
    for start in range(0, len(coords), batch_size):
        batch = slice(start, start + batch_size)
        _append(
            path,
            {"features": np.asarray(features[batch], np.float32), "coords": np.asarray(coords[batch]).astype(np.int32)},
            None,
            mode=mode,
            chunk=32,
        )
        mode = "a"


# MI-Zero's real files (src/prompts/nsclc_prompts.json) are written by src/presample_prompts.py: 50 sets keyed
# 0..49 (json.dump of an int-keyed dict, indent=4), each ONE synonym per class drawn from a pool
# (`np.random.choice(v, size=1)`) and a random subset of a 16-template pool. Same writer calls here.
MIZERO_POOL = {
    "LUAD": ["adenocarcinoma", "lung adenocarcinoma", "adenocarcinoma of the lung", "pulmonary adenocarcinoma"],
    "LUSC": ["squamous cell carcinoma", "lung squamous cell carcinoma", "squamous cell carcinoma of the lung"],
}
MIZERO_TEMPLATES = ["CLASSNAME.", "an image of CLASSNAME.", "this is CLASSNAME.", "presence of CLASSNAME.",
                    "CLASSNAME is shown.", "a photomicrograph of CLASSNAME."]


def write_mizero_file(path: Path, iters: int = 12, seed: int = 0) -> Path:
    """A prompt file written the way MI-Zero's presample_prompts.py `main` writes one (lines 60-75)."""

    rng = np.random.default_rng(seed)
    sampled = {}
    for i in range(iters):
        size = rng.choice(range(1, len(MIZERO_TEMPLATES) + 1))
        classnames = {k: str(rng.choice(v, size=1, replace=False)[0]) for k, v in MIZERO_POOL.items()}
        templates = rng.choice(MIZERO_TEMPLATES, size=size, replace=False).tolist()
        sampled[i] = {"classnames": classnames, "templates": templates}
    path.write_text(json.dumps(sampled, indent=4))
    return path


# TCGA-Reports (github.com/tatonetti-lab/tcga-path-reports 4e22e8a68dbcefca211a5c15905082da94bb66a5):
# TCGA_Reports.csv has `patient_filename` ("<case barcode>.<uuid>", the report PDF's name without .pdf, as
# training_set_split.py builds it from the page files) and `text`: each page's lines, cleaned by
# final_report_cleaning.py, get a "." unless they end in "." or ":", and are joined with " " (pages likewise),
# so a report is ONE line of text. pandas `to_csv(index=False)` writes it, as their scripts write their CSVs.
def write_tcga_reports_csv(path: Path, reports: dict[str, list[str]]) -> Path:
    """`reports`: patient_filename -> the report's cleaned lines (one page)."""
    import pandas as pd

    def joined(lines: list[str]) -> str:
        return " ".join(line if line[-1] in ".:" else line + "." for line in lines)

    pd.DataFrame({"patient_filename": list(reports), "text": [joined(v) for v in reports.values()]}).to_csv(
        path, index=False
    )
    return path


# GDC masked somatic MAF (docs.gdc.cancer.gov/Data/File_Formats/MAF_Format): '#' header lines as NCI-GDC's
# gdc-maf-tool writes them (gdc_maf_tool/defer.py `_write_file_headers`: #version, #filedate, #annotation.spec,
# #n.analyzed.samples, #tumor.aliquots.submitter_id), then the tab-separated columns in the spec's order (the
# first 17 of its 140 here), gzipped as the GDC serves it (*.maf.gz).
GDC_MAF_COLUMNS = (
    "Hugo_Symbol", "Entrez_Gene_Id", "Center", "NCBI_Build", "Chromosome", "Start_Position", "End_Position",
    "Strand", "Variant_Classification", "Variant_Type", "Reference_Allele", "Tumor_Seq_Allele1",
    "Tumor_Seq_Allele2", "dbSNP_RS", "dbSNP_Val_Status", "Tumor_Sample_Barcode", "Matched_Norm_Sample_Barcode",
)


def write_gdc_maf(
    path: Path,
    variants: list[tuple[str, str, str]],
    columns: tuple[str, ...] = GDC_MAF_COLUMNS,
    without_variants: tuple[str, ...] = (),
) -> Path:
    """`variants`: (Hugo_Symbol, Variant_Classification, Tumor_Sample_Barcode) rows; `without_variants`:
    analysed aliquots with no row (listed in the header only, as the GDC lists every analysed aliquot)."""
    import gzip

    aliquots = list(dict.fromkeys([*(barcode for _, _, barcode in variants), *without_variants]))
    lines = [
        "#version gdc-1.0.0",
        "#filedate 20220104",
        "#annotation.spec gdc-1.0.1-public",
        f"#n.analyzed.samples {len(aliquots)}",
        f"#tumor.aliquots.submitter_id {','.join(aliquots)}",
        "\t".join(columns),
    ]
    for number, (gene, classification, barcode) in enumerate(variants):
        values = {
            "Hugo_Symbol": gene, "Entrez_Gene_Id": "0", "Center": "BI", "NCBI_Build": "GRCh38",
            "Chromosome": "chr7", "Start_Position": str(55_000_000 + number), "End_Position": str(55_000_000 + number),
            "Strand": "+", "Variant_Classification": classification, "Variant_Type": "SNP",
            "Reference_Allele": "G", "Tumor_Seq_Allele1": "G", "Tumor_Seq_Allele2": "T", "dbSNP_RS": "",
            "dbSNP_Val_Status": "", "Tumor_Sample_Barcode": barcode,
            "Matched_Norm_Sample_Barcode": barcode[:12] + "-10A-01D-A000-08",
        }
        lines.append("\t".join(values.get(column, "") for column in columns))
    with gzip.open(path, "wt") as handle:
        handle.write("\n".join(lines) + "\n")
    return path
