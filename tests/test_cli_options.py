"""The command line is built from the library's settings: shared flags read the same in every command, and
`vlm train`'s flags are `TrainConfig`'s fields with their defaults."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from vlm.cli import build_parser, main
from vlm.commands.options import given_settings
from vlm.settings import INDEX_KINDS, POOLS, PRECISIONS, READERS
from vlm.training.config import CONFIG_FILE, TrainConfig


def _parsers(parser: argparse.ArgumentParser, name: str = "vlm") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def _train_parser() -> argparse.ArgumentParser:
    return dict(_parsers(build_parser()))["vlm train"]


def _config(argv: list[str]) -> TrainConfig:
    return TrainConfig(**given_settings(build_parser().parse_args(["train", *argv]), TrainConfig))


def test_shared_options_read_the_same_in_every_command() -> None:
    """--device, --precision, --pool, --shard, --no-progress, --n-boot, --reader: one help and choices everywhere."""
    seen: dict[str, dict[tuple[str, tuple[str, ...] | None], list[str]]] = {}
    for name, parser in _parsers(build_parser()):
        for action in parser._actions:
            flag = next((f for f in action.option_strings if f.startswith("--")), None)
            if flag in ("--device", "--precision", "--pool", "--shard", "--no-progress", "--kind", "--n-boot",
                        "--reader"):
                text = re.sub(r" \(default: [^)]*\)$", "", " ".join((action.help or "").split()))  # train's own
                key = (text, tuple(action.choices) if action.choices else None)
                seen.setdefault(flag, {}).setdefault(key, []).append(name)
    assert {flag: len(variants) for flag, variants in seen.items()} == dict.fromkeys(seen, 1), seen
    assert len(seen["--device"][next(iter(seen["--device"]))]) >= 5  # train, embed-*, zeroshot, heatmap
    choices = {flag: next(iter(variants))[1] for flag, variants in seen.items()}
    assert choices["--precision"] == PRECISIONS
    assert choices["--pool"] == POOLS
    assert choices["--kind"] == INDEX_KINDS
    assert choices["--reader"] == READERS
    assert len(seen["--reader"][next(iter(seen["--reader"]))]) == 3  # info, tile, embed-tiles


def test_train_flags_are_the_config_fields_with_their_defaults() -> None:
    parser = _train_parser()
    by_dest = {action.dest: action for action in parser._actions}
    for field in dataclasses.fields(TrainConfig):
        assert field.name in by_dest, f"TrainConfig.{field.name} has no flag"
        action = by_dest[field.name]
        assert action.help, f"{action.option_strings[0]} has no help"
        if field.default not in (None, False, dataclasses.MISSING):
            entry = "".join(parser._get_formatter()._format_action(action).split())  # its lines on the page
            assert f"(default:{field.default})" in entry, field.name  # (long values wrap at a hyphen)
    # what is not typed comes from the dataclass, so Python and the command line train the same run
    minimal = ["--pairs", "p.csv", "--out", "o", "--embeddings", "s.parquet"]
    assert _config(minimal) == TrainConfig(pairs="p.csv", out="o", embeddings="s.parquet")
    typed = _config([*minimal, "--contrastive-batch", "8", "--freeze-text", "--lr", "0.001", "--val-fraction", "0"])
    assert (typed.batch_size, typed.freeze_text, typed.lr, typed.val_fraction) == (8, True, 0.001, 0.0)


def test_a_value_typed_equal_to_the_default_still_counts() -> None:
    """`--resume RUN --epochs 10` extends a 4-epoch run to 10 although 10 is the default of `epochs`."""
    args = build_parser().parse_args(["train", "--resume", "run", "--epochs", "10"])
    assert given_settings(args, TrainConfig) == {"epochs": 10}


def test_resume_refuses_settings_it_cannot_change(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """They used to be ignored with a log line: a run 'resumed with --lr 0.5' kept its old learning rate."""
    run = tmp_path / "run"
    run.mkdir()
    TrainConfig(pairs="p.csv", out=str(run), embeddings="s.parquet").save(run / CONFIG_FILE)
    before = sorted(p.name for p in run.iterdir())
    with caplog.at_level(logging.ERROR):
        assert main(["train", "--resume", str(run), "--lr", "0.5", "--freeze-text", "--epochs", "3"]) == 2
    assert "--lr, --freeze-text cannot change (only --epochs can)" in caplog.text
    assert sorted(p.name for p in run.iterdir()) == before


def test_train_refuses_a_resume_with_other_settings(tmp_path: Path) -> None:
    """`train(config, resume=True)` from Python keeps the same rule: a changed learning rate is not applied."""
    from vlm.training.checkpoint import CHECKPOINT
    from vlm.training.loop import train

    run = tmp_path / "run"
    saved = TrainConfig(pairs="p.csv", out=str(run), embeddings="s.parquet", epochs=2)
    run.mkdir()
    saved.save(run / CONFIG_FILE)
    (run / CHECKPOINT).parent.mkdir()
    (run / CHECKPOINT).write_bytes(b"")  # never read: the settings are checked first
    with pytest.raises(ValueError, match=r"train_config\.json: .*--lr cannot change"):
        train(dataclasses.replace(saved, lr=0.5, epochs=4), resume=True)
    moved = saved.resumed(tmp_path / "moved", {"epochs": 4}, run / CONFIG_FILE)
    assert (moved.out, moved.epochs, moved.lr) == (str(tmp_path / "moved"), 4, saved.lr)


@pytest.mark.parametrize("setting", ["pool", "loss", "precision"])
def test_config_checks_the_named_choices_as_the_command_line_does(setting: str) -> None:
    with pytest.raises(ValueError, match=f"unknown {setting} 'bogus'; choose one of"):
        TrainConfig(pairs="p.csv", out="o", embeddings="s.parquet", **{setting: "bogus"})
