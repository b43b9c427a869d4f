"""`vlm.batch.Batch`, the engine of every per-slide command: entry rules, exit rules and its three drivers."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from vlm.batch import Batch, Shard, failures_path


def _ids(path: Path) -> str:
    return path.stem


def _write_or_fail(path: Path) -> None:
    """A module-level `process` (picklable for worker processes): writes the item's output, or fails."""
    if "bad" in path.stem:
        raise ValueError(f"{path.name} is bad")
    (path.parent / "out" / f"{path.stem}.txt").write_text("done")


def _failures(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


class _ListSink:
    """A `Sink` that remembers what was saved when (the saved snapshots)."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}
        self.saves: list[list[str]] = []

    def add(self, item_id: str, result: int) -> None:
        self.rows[item_id] = result

    def save(self) -> None:
        self.saves.append(sorted(self.rows))


def _batch(items: list[str], folder: Path, **options: object) -> Batch[str]:
    return Batch(items, key=str, is_done=options.pop("is_done", None), folder=folder, desc="test", progress=False,
                 **options)  # type: ignore[arg-type]


def test_done_predicate_skips_unless_overwrite_and_none_redoes_all(tmp_path: Path) -> None:
    done = {"b", "d"}
    batch = _batch(["d", "a", "c", "b"], tmp_path, is_done=done.__contains__)
    assert batch.pending == ["a", "c"] and batch.report.skipped == ["b", "d"]
    assert _batch(["a", "b"], tmp_path, is_done=done.__contains__, overwrite=True).pending == ["a", "b"]
    assert _batch(["b", "a"], tmp_path).pending == ["a", "b"]  # is_done=None: nothing is ever done


def test_shards_split_sorted_ids_disjointly_and_name_their_failures(tmp_path: Path) -> None:
    items = [f"s{i:02d}" for i in range(10)]
    shards = [_batch(list(reversed(items)), tmp_path, shard=Shard(i, 3)) for i in range(3)]
    assert [batch.pending for batch in shards] == [items[0::3], items[1::3], items[2::3]]
    assert shards[1].report.failures == tmp_path / "failures.shard-1-of-3.csv" == failures_path(tmp_path, Shard(1, 3))
    assert _batch(items, tmp_path).report.failures == tmp_path / "failures.csv"


def test_duplicate_ids_are_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"share the slide id\(s\) \['a'\]"):
        Batch([tmp_path / "x" / "a.h5", tmp_path / "y" / "a.h5"], key=_ids, is_done=None, folder=tmp_path,
              desc="test", progress=False)


@pytest.mark.parametrize("workers", [1, 2])
def test_run_records_failures_in_the_reports_file_and_a_clean_run_removes_it(tmp_path: Path, workers: int) -> None:
    (tmp_path / "out").mkdir()
    items = [tmp_path / f"{name}.svs" for name in ("good", "bad", "fine")]

    def run() -> object:
        batch = Batch(items, key=_ids, is_done=lambda path: (tmp_path / "out" / f"{path.stem}.txt").exists(),
                      folder=tmp_path / "out", desc="test", progress=False)
        return batch.run(_write_or_fail, workers=workers)

    report = run()
    assert sorted(report.done) == ["fine", "good"] and report.skipped == []
    assert report.failures == tmp_path / "out" / "failures.csv"
    assert _failures(report.failures) == [{"slide": "bad", "error": "ValueError: bad.svs is bad"}]
    items[1] = tmp_path / "mended.svs"  # the bad slide replaced: the rerun is clean
    report = run()
    assert report.done == ["mended"] and sorted(report.skipped) == ["fine", "good"]
    assert not report.failures.exists()


def test_run_chunked_retries_a_failed_chunk_alone_and_saves_periodically(tmp_path: Path) -> None:
    sink = _ListSink()
    chunks: list[list[str]] = []

    def load(item: str) -> str:
        if item == "unreadable":
            raise OSError("cannot read")
        return item

    def process(chunk: list[str]) -> list[int]:
        chunks.append(chunk)
        if "huge" in chunk:
            raise RuntimeError("out of memory")
        return [len(item) for item in chunk]

    items = ["a", "bb", "huge", "unreadable", "ccc", "dddd", "e"]
    report = _batch(items, tmp_path).run_chunked(load, process, sink, chunk_size=3, save_every=2)
    assert chunks == [["a", "bb", "ccc"], ["dddd", "e", "huge"], ["dddd"], ["e"], ["huge"]]
    assert sink.rows == {"a": 1, "bb": 2, "ccc": 3, "dddd": 4, "e": 1}
    assert sink.saves == [["a", "bb", "ccc"], ["a", "bb", "ccc", "dddd", "e"]]  # after >= 2 new, and the rest
    assert report.done == ["a", "bb", "ccc", "dddd", "e"]
    assert dict(report.failed) == {"unreadable": "OSError: cannot read", "huge": "RuntimeError: out of memory"}
    assert [row["slide"] for row in _failures(report.failures)] == ["huge", "unreadable"]


def test_run_chunked_follows_order_and_saves_nothing_when_nothing_is_new(tmp_path: Path) -> None:
    sink = _ListSink()
    chunks: list[list[str]] = []

    def process(chunk: list[str]) -> list[int]:
        chunks.append(chunk)
        return [0] * len(chunk)

    batch = _batch(["aaa", "b", "cc", "dddd"], tmp_path, order=len, is_done={"dddd"}.__contains__)
    batch.run_chunked(str, process, sink, chunk_size=2)
    assert chunks == [["b", "cc"], ["aaa"]] and sink.saves == [["aaa", "b", "cc"]]
    again = _ListSink()
    report = _batch(["a"], tmp_path, is_done=lambda item: True).run_chunked(str, process, again)
    assert report.skipped == ["a"] and again.saves == []
