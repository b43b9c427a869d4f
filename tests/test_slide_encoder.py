"""GigaPath slide encoder: official keys, golden outputs of the official code, dense reference, batching.

Golden outputs (tests/fixtures/gigapath_slide_encoder_golden.json) come from the official
prov-gigapath code (commit 09d8e87), run once outside this repo in fp32 with its flash-attn call replaced
by an exact float64 softmax attention, with `slide_ngrids=100` (rows of the 100×100 table equal those
of the 1000×1000 one, checked against the official helper) and weights/inputs made by `seeded_state_dict`
and `seeded_inputs` below from the seeds stored in the fixture. The tiny case uses the official code with
`LongNet_2_layers_64_dim` (E=64, 4 heads, FFN 128, in_dim 32) and its segment lengths set to the tiny
preset's.
`all-layers` there is the official `all_layer_embed=True` with `global_pool=True`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vlm.encoders.longnet import attend, attend_chunked, dilated_attention
from vlm.encoders.positions import gigapath_cells, sincos_positions
from vlm.encoders.slide import (
    GigaPathSlideEncoder,
    create_slide_encoder,
    load_slide_encoder_weights,
    to_gigapath_coords,
)

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = json.loads((FIXTURES / "gigapath_slide_encoder_golden.json").read_text())
OFFICIAL_KEYS = json.loads((FIXTURES / "gigapath_slide_encoder_keys.json").read_text())


def seeded_state_dict(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Weights from a seed alone: N(0, 0.02) per tensor in sorted key order; LayerNorm gains get +1."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key in sorted(shapes):
        value = torch.randn(shapes[key], generator=generator) * 0.02
        if key.endswith(".weight") and len(shapes[key]) == 1:
            value += 1.0
        state[key] = value
    return state


def seeded_inputs(n: int, in_dim: int, seed: int, cells: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """N(0, 1) features and distinct random cells of a cells×cells grid, jittered inside the 256-px tile."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, in_dim, generator=generator)
    cell = torch.randperm(cells * cells, generator=generator)[:n]
    offset = torch.randint(0, 256, (n, 2), generator=generator)
    coords = torch.stack([cell // cells, cell % cells], dim=1) * 256 + offset
    return features, coords.double()


def seeded_model(preset: str, seed: int, **overrides: object) -> GigaPathSlideEncoder:
    model = create_slide_encoder(preset, **overrides)
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    model.load_state_dict(seeded_state_dict(shapes, seed), strict=True)
    return model


def tiny(seed: int = 0, **overrides: object) -> GigaPathSlideEncoder:
    return seeded_model("tiny", seed, **overrides)


# --- official weights -------------------------------------------------------------------------------


def test_parameter_names_and_shapes_are_the_official_247(tmp_path: Path) -> None:
    model = create_slide_encoder("gigapath")
    ours = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert ours == {key: shape for key, shape in OFFICIAL_KEYS["keys"]}
    assert len(ours) == 247 and sum(p.numel() for p in model.parameters()) == OFFICIAL_KEYS["n_params"]
    state = seeded_state_dict({key: tuple(shape) for key, shape in OFFICIAL_KEYS["keys"]}, seed=0)
    torch.save({"model": state, "epoch": 1}, tmp_path / "slide_encoder.pth")
    loaded = create_slide_encoder("gigapath", checkpoint=tmp_path / "slide_encoder.pth")
    assert torch.equal(loaded.encoder.layers[11].ffn.fc2.weight, state["encoder.layers.11.ffn.fc2.weight"])
    assert not loaded.training


def test_checkpoint_with_missing_or_unexpected_keys_lists_them(tmp_path: Path) -> None:
    model = tiny()
    state = model.state_dict()
    state.pop("norm.bias")
    state["pos_embed"] = torch.zeros(1, 2, 64)
    state["cls_token"] = torch.zeros(1, 1, 32)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing keys \['norm.bias'\].*unexpected keys \['pos_embed'\]"):
        load_slide_encoder_weights(model, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="cls_token"):
        load_slide_encoder_weights(model, tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="no such slide-encoder checkpoint"):
        load_slide_encoder_weights(model, tmp_path / "missing.pth")


def test_unknown_preset_and_pool_name_the_choices() -> None:
    with pytest.raises(ValueError, match="close matches: \\['gigapath'\\]"):
        create_slide_encoder("gigapth")
    with pytest.raises(ValueError, match="no published weights"):
        create_slide_encoder("tiny", pretrained=True)
    with pytest.raises(ValueError, match="mean, cls, all-layers"):
        tiny(in_dim=32).pooled_dim("max")


# --- golden outputs of the official implementation ---------------------------------------------------


def _golden_cases() -> list[object]:
    cases = []
    for case in GOLDEN["cases"]:
        marks = [pytest.mark.slow] if case["preset"] == "gigapath" else []  # the full-size model: > 5 s each
        cases.append(pytest.param(case, marks=marks, id=f"{case['preset']}-{case['n_tiles']}"))
    return cases


@pytest.mark.parametrize("case", _golden_cases())
def test_matches_official_outputs(case: dict) -> None:
    overrides = {"in_dim": 32} if case["preset"] == "tiny" else {}
    model = seeded_model(case["preset"], case["weight_seed"], **overrides)
    features, coords = seeded_inputs(case["n_tiles"], model.config.in_dim, case["input_seed"])
    with torch.no_grad():
        for pool in ("cls", "mean"):
            out = model(features[None], coords[None], pool=pool)[0]
            torch.testing.assert_close(out, torch.tensor(case[pool]), atol=1e-4, rtol=0)
        layers = model(features[None], coords[None], pool="all-layers")[0]
    assert layers.shape == (model.pooled_dim("all-layers"),)
    expected = case["all-layers"]
    if isinstance(expected, list):
        torch.testing.assert_close(layers, torch.tensor(expected), atol=1e-4, rtol=0)
    else:  # full-size fixture keeps a summary of each of the 13 vectors
        per_layer = layers.view(model.config.depth + 1, -1).double()
        summaries = {key: torch.tensor(value).double() for key, value in expected.items()}
        torch.testing.assert_close(per_layer[:, :16], summaries["first16_per_layer"], atol=1e-4, rtol=0)
        torch.testing.assert_close(per_layer.sum(1), summaries["sum_per_layer"], atol=1e-3, rtol=0)
        torch.testing.assert_close(per_layer.square().sum(1), summaries["sumsq_per_layer"], atol=1e-3, rtol=1e-6)


def test_positional_rows_equal_the_official_table() -> None:
    cells = torch.tensor(GOLDEN["positions"]["cells_ij"], dtype=torch.float64)
    coords = cells * 256 + 255  # any pixel inside the cell
    rows = sincos_positions(coords, 768)
    assert torch.equal(rows, torch.tensor(GOLDEN["positions"]["rows"], dtype=torch.float32))


# --- dense reference -------------------------------------------------------------------------------


def dense_dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments, ratios) -> torch.Tensor:
    """One softmax over every (branch, key) pair that covers each (position, head), from index arithmetic.

    Branch b lays the sequence out in `n_seg` slots of `s_r = ceil(s / r) * r` (the official r-padded
    segments, zero vectors where no token is) and reads position p's result from slot p, so a covered
    (slot, head) attends, with slot p's query, to the slots of its segment with the same offset mod r.
    """
    n, heads, dim = q.shape
    logits, values = [], []
    for segment, ratio in zip(segments, ratios, strict=True):
        s = min(segment, n)
        n_seg = math.ceil(n / s)
        s_r = math.ceil(s / ratio) * ratio
        per_group = math.ceil(heads / ratio)
        slots = torch.arange(n_seg * s_r)
        seg_of, offset = slots // s_r, slots % s_r
        source = seg_of * s + offset
        real = (offset < s) & (source < n)
        qs, ks, vs = (torch.where(real[:, None, None], x[source.clamp(max=n - 1)], 0) for x in (q, k, v))
        group = torch.arange(heads) // per_group  # [H]
        query_slot = torch.arange(n)  # position p reads slot p
        covered_query = offset[query_slot][:, None] % ratio == group[None, :]  # [n, H]
        same = (seg_of[query_slot][:, None] == seg_of[None, :]) & (
            offset[query_slot][:, None] % ratio == offset[None, :] % ratio
        )  # [n, slots]
        mask = covered_query[:, :, None] & same[:, None, :]  # [n, H, slots]
        scores = torch.einsum("phd,shd->phs", qs[query_slot], ks) * dim**-0.5
        logits.append(scores.masked_fill(~mask, -math.inf))
        values.append(vs)  # [slots, H, D]
    weights = torch.softmax(torch.cat(logits, dim=-1), dim=-1)
    return torch.einsum("phs,shd->phd", weights, torch.cat(values, dim=0))


@pytest.mark.parametrize("n", [1, 3, 16, 17, 36, 37, 38, 75, 149, 150, 151, 301, 333])
@pytest.mark.parametrize(
    ("heads", "segments", "ratios"),
    [
        (4, (16, 37, 64, 150), (1, 2, 4, 8)),
        (4, (16, 37, 64, 150, 1024), (1, 2, 4, 8, 16)),
        (6, (10, 24), (1, 4)),
    ],
)
def test_fast_path_equals_dense_union_softmax(n: int, heads: int, segments, ratios) -> None:
    generator = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(n, heads, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    dense = dense_dilated_attention(q, k, v, segments, ratios)
    torch.testing.assert_close(dilated_attention(q, k, v, segments, ratios), dense, atol=1e-10, rtol=1e-10)
    q.requires_grad_(True)  # the autograd path (dense scatter per branch) must agree too
    torch.testing.assert_close(dilated_attention(q, k, v, segments, ratios), dense, atol=1e-10, rtol=1e-10)


def test_portable_attention_fallback_matches_the_fused_kernel() -> None:
    q, k, v = (torch.randn(3, 2, 700, 16, dtype=torch.float64) for _ in range(3))
    fused, chunked = attend(q, k, v), attend_chunked(q, k, v, chunk=256)
    torch.testing.assert_close(chunked[0], fused[0])
    torch.testing.assert_close(chunked[1], fused[1])


# --- batching, training switches ----------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["mean", "cls", "all-layers"])
def test_padded_batch_equals_each_slide_alone(pool: str) -> None:
    model = tiny(in_dim=32)
    lengths = [41, 97, 150]
    inputs = [seeded_inputs(n, 32, seed=n) for n in lengths]
    features = torch.zeros(len(lengths), max(lengths), 32)
    coords = torch.zeros(len(lengths), max(lengths), 2, dtype=torch.float64)
    mask = torch.ones(len(lengths), max(lengths), dtype=torch.bool)
    for row, (f, c) in enumerate(inputs):
        features[row, : len(f)], coords[row, : len(f)], mask[row, : len(f)] = f, c, False
    features[0, 50] = math.nan  # padding is never read
    with torch.no_grad():
        batched = model(features, coords, padding_mask=mask, pool=pool)
        alone = torch.cat([model(f[None], c[None], pool=pool) for f, c in inputs])
    assert batched.shape == (3, model.pooled_dim(pool))
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    features, coords = seeded_inputs(120, 32, seed=1)
    grads = []
    for enable in (False, True):
        model = tiny(in_dim=32, dropout=0.0, drop_path=0.0).train()
        model.set_grad_checkpointing(enable)
        model(features[None], coords[None]).square().sum().backward()
        grads.append(model.encoder.layers[0].self_attn.q_proj.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_eval_is_deterministic_and_train_uses_dropout() -> None:
    model = tiny(in_dim=32)
    features, coords = seeded_inputs(60, 32, seed=2)
    with torch.no_grad():
        first, second = model(features[None], coords[None]), model(features[None], coords[None])
        assert torch.equal(first, second)
        assert not torch.allclose(model.train()(features[None], coords[None]), first)


# --- bad inputs ---------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors() -> None:
    model = tiny(in_dim=32)
    features, coords = seeded_inputs(20, 32, seed=3)
    with pytest.raises(ValueError, match=r"coords must have shape \[B, L, 2\]"):
        model(features[None], coords[None, :19])
    with pytest.raises(ValueError, match=r"features must have shape \[B, L, 32\]"):
        model(torch.zeros(1, 20, 1536), coords[None])
    bad = features.clone()
    bad[3, 1] = math.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        model(bad[None], coords[None])
    far = coords.clone()
    far[5, 0] = 256_000.0
    with pytest.raises(ValueError, match="outside the 1000×1000 grid"):
        model(features[None], far[None])
    with pytest.raises(ValueError, match="no tiles"):
        model(torch.zeros(1, 0, 32), torch.zeros(1, 0, 2))
    mask = torch.zeros(1, 20, dtype=torch.bool)
    mask[0, 3] = True
    with pytest.raises(ValueError, match="trailing"):
        model(features[None], coords[None], padding_mask=mask)


def test_to_gigapath_coords_converts_and_names_the_slide() -> None:
    level0 = np.array([[0, 0], [1000, 2048]], dtype=np.int64)
    np.testing.assert_allclose(to_gigapath_coords(level0, mpp=0.25), [[0, 0], [500, 1024]])
    with pytest.raises(ValueError, match="slide 'TCGA-XY': 1 tile"):
        to_gigapath_coords(np.array([[0, 0], [600_000, 0]]), mpp=0.25, slide_id="TCGA-XY")
    with pytest.raises(ValueError, match="slide 'TCGA-XY': 1 tile"):
        to_gigapath_coords(np.array([[0, 0], [600_000, 0]]), mpp=0.25, slide_id="TCGA-XY", tile_size_level0=512)
    with pytest.raises(ValueError, match="mpp must be a positive"):
        to_gigapath_coords(level0, mpp=float("nan"), slide_id="s")


def _official_cells(coords_level0: np.ndarray, mpp: float) -> np.ndarray:
    """Prov-GigaPath's cell of a tile: floor(top-left in 0.5-mpp px / 256) (gigapath/slide_encoder.py)."""
    return np.floor(coords_level0 * (mpp / 0.5) / 256).astype(np.int64)


def _grid(origin: tuple[int, int], step: int, rows: int = 30, cols: int = 40) -> np.ndarray:
    y, x = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return np.stack([origin[0] + x.ravel() * step, origin[1] + y.ravel() * step], axis=1)


def test_cells_equal_the_official_ones_for_exact_tiles_at_any_origin() -> None:
    # CLAM starts each contour's grid at the tissue's bounding box, e.g. level-0 (1000, 3000) at 0.5 µm/px:
    # the official cell is (3, 11); tile centres (the previous rule) gave (4, 12).
    corner = np.array([[1000, 3000]])
    np.testing.assert_array_equal(gigapath_cells(corner, 0.5, 256), [[3, 11]])
    np.testing.assert_array_equal(to_gigapath_coords(corner, 0.5, tile_size_level0=256), [[3 * 256, 11 * 256]])
    rng = np.random.default_rng(0)
    for mpp, step in ((0.5, 256), (0.25, 512), (0.125, 1024)):
        for origin in [(0, 0), (1000, 3000), *rng.integers(0, 5000, size=(20, 2)).tolist()]:
            coords = _grid(tuple(origin), step)
            np.testing.assert_array_equal(gigapath_cells(coords, mpp, step), _official_cells(coords, mpp))
    # Tiles of two cells (512 px at 0.5 µm/px) too.
    coords = _grid((777, 1234), 512)
    np.testing.assert_array_equal(gigapath_cells(coords, 0.5, 512), _official_cells(coords, 0.5))


@pytest.mark.parametrize("mpp", [0.2495, 0.2520, 0.2263, 0.499, 0.5034])
def test_no_two_tiles_of_an_inexact_grid_share_a_cell(mpp: float) -> None:
    step = round(256 * 0.5 / mpp)  # vlm tile's level-0 tile size, e.g. 513 px at 0.2495 µm/px
    rng = np.random.default_rng(1)
    for origin in [(0, 0), (1000, 3000), *rng.integers(0, 20_000, size=(10, 2)).tolist()]:
        coords = _grid(tuple(origin), step, rows=60, cols=400)
        cells = gigapath_cells(coords, mpp, step)
        assert len({tuple(c) for c in cells.tolist()}) == len(coords)
        # Neighbours stay neighbours: one grid step is one cell.
        assert set(np.diff(cells[:400, 0]).tolist()) == {1}
    # The official floor(top-left) does merge tiles here (what the rule exists to avoid).
    coords = _grid((0, 0), step, rows=1, cols=400)
    if mpp == 0.2495:
        assert len(np.unique(_official_cells(coords, mpp)[:, 0])) < 400


def test_a_cell_does_not_depend_on_the_other_tiles() -> None:
    coords = _grid((1000, 3000), 513, rows=20, cols=20)
    full = gigapath_cells(coords, 0.2495, 513)
    keep = np.random.default_rng(2).permutation(len(coords))[:37]
    np.testing.assert_array_equal(gigapath_cells(coords[keep], 0.2495, 513), full[keep])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu_fp32(dtype: torch.dtype) -> None:
    model = tiny(in_dim=32)
    features, coords = seeded_inputs(300, 32, seed=4)
    with torch.no_grad():
        expected = model(features[None], coords[None])
    cuda = model.cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        got = cuda(features[None].cuda(), coords[None].cuda()).float().cpu()
    torch.testing.assert_close(got, expected, atol=1e-4 if dtype == torch.float32 else 5e-2, rtol=0)
    cuda.train()(features[None].cuda(), coords[None].cuda()).sum().backward()  # fused kernels have backward


@pytest.mark.slow
def test_compiled_token_wise_layers_match_eager_for_any_length_without_recompiling() -> None:
    """`compile_token_wise` (the `--compile` of embed-slides): a padded batch, then other lengths, give the
    eager numbers; the token-wise graphs are compiled once (dynamic lengths), not once per slide length."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = create_slide_encoder("tiny")
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, 300, 32, generator=generator)
    coords = torch.randint(0, 50, (2, 300, 2), generator=generator).double() * 256
    mask = torch.zeros(2, 300, dtype=torch.bool)
    mask[1, 170:] = True
    cases = [(features, coords, mask, "mean"), (features[:, :250], coords[:, :250], mask[:, :250], "all-layers"),
             (features[:, :77], coords[:, :77], None, "cls")]
    with torch.inference_mode():
        eager = [model(f, c, padding_mask=m, pool=pool) for f, c, m, pool in cases]
        model.encoder.compile_token_wise()
        torch._dynamo.reset()
        counters.clear()
        compiled = [model(*cases[0][:2], padding_mask=cases[0][2], pool=cases[0][3])]
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 2  # both token-wise parts really went through the compiler
        compiled += [model(f, c, padding_mask=m, pool=pool) for f, c, m, pool in cases[1:]]
        assert counters["stats"]["unique_graphs"] == graphs  # new lengths reuse the graphs
        model.encoder.compile_token_wise(False)
        again = model(*cases[0][:2], padding_mask=cases[0][2], pool=cases[0][3])
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, eager[0], rtol=0, atol=0)
