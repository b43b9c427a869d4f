"""`vlm.io`: folder outputs survive a kill at any instant of their swap; output locks.

The kill tests run the write in a real subprocess that SIGKILLs itself right after its k-th `os.replace`
(every rename of the commit), then check that the next reader finds the new contents complete, or the old
ones untouched, and never a missing folder (what the two-rename swap left when killed between its renames).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vlm.io import (
    OUTPUT_MARKER,
    atomic_dir,
    atomic_path,
    check_output_folder,
    claim_output_folder,
    folder_lock,
    make_output_folder,
    output_lock,
    recover_dir,
)

ROOT = Path(__file__).resolve().parents[1]

# Writes {a: "new", b: "new"} over a folder holding {a: "old", c: "old"} (from an earlier atomic_dir) and
# kills itself after the KILL_AFTER-th os.replace; 0 kills inside the block, before anything is committed.
_WRITER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import vlm.io as io

    folder, kill_after = Path(sys.argv[1]), int(sys.argv[2])
    calls = 0
    real_replace = os.replace

    def replace(src, dst):
        global calls
        real_replace(src, dst)
        calls += 1
        if calls == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    io.os.replace = replace
    with io.atomic_dir(folder) as tmp:
        (tmp / "a").write_text("new")
        (tmp / "b").write_text("new")
        if kill_after == 0:
            os.kill(os.getpid(), signal.SIGKILL)
    print("finished")
""")


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=environment, cwd=ROOT)


def _contents(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in folder.iterdir() if not p.name.startswith(".vlm")}


@pytest.mark.parametrize("kill_after", [0, 1, 2, 3, 4, 5])
def test_a_kill_anywhere_in_the_swap_leaves_old_or_new_contents(tmp_path: Path, kill_after: int) -> None:
    folder = tmp_path / "model"
    with atomic_dir(folder) as tmp:
        (tmp / "a").write_text("old")
        (tmp / "c").write_text("old")
    (folder / "notes.txt").write_text("the user's")  # never written by vlm: never touched
    result = _run("-c", _WRITER, str(folder), str(kill_after))
    assert result.returncode == -9, result.stderr  # really killed
    assert folder.is_dir()
    recovered = recover_dir(folder)
    expected_new = kill_after >= 1  # the first rename is the commit point
    assert recovered == (expected_new and kill_after < 6)
    expected = {"a": "new", "b": "new"} if expected_new else {"a": "old", "c": "old"}
    assert _contents(folder) == {**expected, "notes.txt": "the user's"}
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".vlm")) == [".vlm-files", ".vlm.lock"]
    assert json.loads((folder / ".vlm-files").read_text()) == sorted(expected)


def test_the_swap_uses_one_commit_rename_and_finishes_unkilled(tmp_path: Path) -> None:
    result = _run("-c", _WRITER, str(tmp_path / "m"), "99")
    assert result.returncode == 0 and "finished" in result.stdout
    assert _contents(tmp_path / "m") == {"a": "new", "b": "new"}
    assert not recover_dir(tmp_path / "m")


def test_a_model_killed_mid_save_loads_after(tmp_path: Path) -> None:
    """The real reader: `SlideTextModel.from_pretrained` finishes the interrupted save of `model/`."""
    script = textwrap.dedent("""
        import os, signal, sys
        import vlm.io as io
        from tests.support.models import build_tiny_model

        model = build_tiny_model(sys.argv[1] + "-tok", slide_embed_dim=16, proj_dim=8)
        model.save_pretrained(sys.argv[1])
        real_replace, calls = os.replace, []

        def replace(src, dst):
            real_replace(src, dst)
            calls.append(dst)
            if len(calls) == 2:  # the commit, then the first file moved into place
                os.kill(os.getpid(), signal.SIGKILL)

        io.os.replace = replace
        model.save_pretrained(sys.argv[1])
    """)
    result = _run("-c", script, str(tmp_path / "model"))
    assert result.returncode == -9, result.stderr
    assert (tmp_path / "model" / ".vlm-commit").is_dir()  # the kill really fell inside the swap
    from vlm.model.clip import SlideTextModel

    model = SlideTextModel.from_pretrained(tmp_path / "model")
    assert model.config.proj_dim == 8 and not (tmp_path / "model" / ".vlm-commit").exists()


def test_a_failed_block_leaves_the_old_contents(tmp_path: Path) -> None:
    with atomic_dir(tmp_path / "x") as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "x") as tmp:
        (tmp / "a").write_text("new")
        raise RuntimeError("boom")
    assert _contents(tmp_path / "x") == {"a": "old"}
    assert [p.name for p in (tmp_path / "x").iterdir() if p.name.startswith(".vlm-staging")] == []


def test_a_failed_first_write_leaves_no_folder(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "new" / "model") as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("boom")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == []


def test_an_output_folder_that_is_a_file_is_named(tmp_path: Path) -> None:
    """`--out results.csv` (a file) gave a bare "[Errno 17] File exists" after the whole run."""
    (tmp_path / "results.csv").write_text("precious")
    with pytest.raises(NotADirectoryError, match=r"results\.csv: exists and is a file, not a folder"):
        with atomic_dir(tmp_path / "results.csv"):
            pass
    with pytest.raises(NotADirectoryError, match=r"results\.csv: exists and is a file"):
        make_output_folder(tmp_path / "results.csv" / "run")  # a file above the folder too
    with pytest.raises(NotADirectoryError, match=r"results\.csv: exists and is a file"):
        with atomic_path(tmp_path / "results.csv" / "slides.parquet"):  # `--out results.csv/slides.parquet`
            pass
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "chapter1.docx").write_text("precious")
    with pytest.raises(IsADirectoryError, match=r"thesis: is a folder, and this output is a file"):
        with atomic_path(tmp_path / "thesis") as tmp:  # `vlm eval retrieval --out thesis/`
            tmp.write_text("{}")
    assert [p.name for p in (tmp_path / "thesis").iterdir()] == ["chapter1.docx"]
    assert (tmp_path / "results.csv").read_text() == "precious"


def test_current_folder_can_be_the_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with atomic_dir(".") as tmp:
        (tmp / "a").write_text("1")
    assert _contents(tmp_path) == {"a": "1"} and Path.cwd() == tmp_path


_HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from vlm.io import folder_lock, output_lock
    lock = folder_lock(sys.argv[1]) if sys.argv[2] == "folder" else output_lock(sys.argv[1])
    with lock:
        print("held", flush=True)
        time.sleep(float(sys.argv[3]))
""")


def _hold(path: Path, kind: str, seconds: float) -> subprocess.Popen[str]:
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), kind, str(seconds)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_output_lock_refuses_a_second_writer_and_folder_lock_waits(tmp_path: Path) -> None:
    holder = _hold(tmp_path / "slides.parquet", "output", 30)
    try:
        with pytest.raises(BlockingIOError, match="another vlm process"), output_lock(tmp_path / "slides.parquet"):
            pass
    finally:
        holder.kill()
        holder.wait()
    with output_lock(tmp_path / "slides.parquet"):  # the OS released the dead holder's lock
        pass

    (tmp_path / "index").mkdir()
    holder = _hold(tmp_path / "index", "folder", 1.5)
    start = time.monotonic()
    with folder_lock(tmp_path / "index"):  # waits for the holder, then gets it
        assert time.monotonic() - start > 1.0
    holder.wait()


# --- run folders (`claim_output_folder`) ------------------------------------------------------------------


def test_claimed_folder_is_marked_reused_by_its_kind_and_refused_by_others(tmp_path: Path) -> None:
    """zeroshot/train/probe/heatmap used to write into any folder, replacing a user's same-named files."""
    out = tmp_path / "run"
    with claim_output_folder(out, "probe"):
        (out / "metrics.json").write_text("{}")
    assert (out / OUTPUT_MARKER).read_text() == "probe\n"
    with claim_output_folder(out, "probe"):  # a re-run reuses its own folder
        pass
    with pytest.raises(FileExistsError, match=r"run: exists and is not a `vlm zeroshot` output folder but one of "
                       r"`vlm probe` \(it holds metrics\.json\); nothing was written"):
        check_output_folder(out, "zeroshot")


def test_folder_of_the_users_files_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "predictions.csv").write_bytes(b"slide_id,label\nA,1\n")
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(
        FileExistsError,
        match=r"mine: exists and is not a `vlm probe` output folder \(it holds "
        r"notes\.txt, predictions\.csv\); nothing was written\. Choose a new or empty folder for --out",
    ):
        with claim_output_folder(mine, "probe"):
            raise AssertionError("the block must not run")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "predictions.csv"]
    assert (mine / "predictions.csv").read_bytes() == b"slide_id,label\nA,1\n"


def test_a_file_or_a_file_on_the_path_is_named(tmp_path: Path) -> None:
    file = tmp_path / "results.csv"
    file.write_text("x")
    for path in (file, file / "sub"):
        with pytest.raises(NotADirectoryError, match=r"results\.csv: exists and is a file, not a folder; choose "
                           "another --heatmaps"):
            check_output_folder(path, "heatmaps", option="--heatmaps")
    assert file.read_text() == "x"


def test_empty_current_folder_works_and_a_failed_run_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError):
        with claim_output_folder(".", "zeroshot"):
            raise RuntimeError("failed before writing")
    assert list(tmp_path.iterdir()) == []  # the pre-existing empty folder is left empty, not marked
    with pytest.raises(RuntimeError):
        with claim_output_folder("new", "zeroshot"):
            raise RuntimeError("failed before writing")
    assert not (tmp_path / "new").exists()  # a folder this run created is removed
    with claim_output_folder(".", "zeroshot"):
        (tmp_path / "run.json").write_text("{}")
    assert (tmp_path / OUTPUT_MARKER).read_text() == "zeroshot\n"


@pytest.mark.parametrize(
    ("kind", "files"),
    [
        ("zeroshot", ["run.json", "prompts_used.json", "predictions.csv"]),
        ("zeroshot", ["slide_embeddings.parquet"]),  # a run that failed after embedding its features folder
        ("train", ["train_config.json", "metrics.jsonl"]),
        ("probe", ["metrics.json", "predictions.csv", "probe.png"]),
        ("heatmaps", ["s1.png", "s1.geojson", "s1.csv", "failures.csv"]),
    ],
)
def test_folders_of_earlier_versions_are_recognised(tmp_path: Path, kind: str, files: list[str]) -> None:
    """Run folders written before the marker existed hold their command's files: reused, then marked."""
    for name in files:
        (tmp_path / name).write_text("x")
    others = [other for other in ("zeroshot", "train", "probe", "heatmaps") if other != kind]
    for other in others:
        with pytest.raises(FileExistsError):
            check_output_folder(tmp_path, other)
    with claim_output_folder(tmp_path, kind):
        pass
    assert (tmp_path / OUTPUT_MARKER).read_text() == f"{kind}\n"


def test_a_users_csv_beside_heatmaps_is_not_mistaken_for_one(tmp_path: Path) -> None:
    for name in ("s1.png", "s1.geojson", "s1.csv", "predictions.csv"):
        (tmp_path / name).write_text("x")
    with pytest.raises(FileExistsError, match="not a `vlm heatmap` output folder"):
        check_output_folder(tmp_path, "heatmaps")
