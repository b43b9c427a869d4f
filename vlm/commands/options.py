"""Options that several subcommands share, each defined once, and the flags of a settings dataclass.

`add_device`, `add_precision`, ... give every command the same flag with the same help and choices (the
choices come from `vlm.settings`, so the library and the command line validate against one tuple).
`add_config_options` turns the fields of a dataclass such as `TrainConfig` into flags: the help and group come
from each field's metadata and the default shown is the field's own, so Python and the command line cannot
drift. Nothing here imports torch: `vlm --help` builds every page from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

from vlm.errors import UsageError
from vlm.settings import N_BOOT, POOLS, PRECISIONS, READERS

# Argparse wording of the shared options; a settings field of the same name takes it too (`add_config_options`).
_SHARED: dict[str, dict[str, Any]] = {
    "device": {"help": "'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1' …"},
    "precision": {"choices": PRECISIONS, "help": "autocast on CUDA ('auto' = bf16 where supported); CPU runs fp32"},
    "pool": {
        "choices": POOLS,
        "help": "slide encoder output: mean over tiles, the CLS token (the official code's default output), or "
        "13 layers' means",
    },
    "mpp": {
        "type": float,
        "help": "level-0 µm/px of the feature files' slides, overriding theirs (CLAM files record none; a "
        "value contradicting a TRIDENT file's magnification by > 25% fails that slide)",
    },
    "reader": {
        "choices": READERS,
        "help": "pixel reader: 'auto' reads pyramidal TIFF and SVS tiles with tifffile (same pixels, faster) and "
        "every other format with OpenSlide; 'openslide' or 'tifffile' force one (tifffile refuses a slide it "
        "cannot read)",
    },
    "patches": {
        "metavar": "DIR",
        "help": "CLAM's patches/ folder (create_patches_fp.py), whose <slide>.h5 holds the tile geometry that "
        "CLAM's feature files lack",
    },
}
_ARGPARSE_KEYS = ("help", "choices", "metavar", "type")


def _add(parser: Any, name: str, default: Any, **overrides: Any) -> argparse.Action:
    spec = {**_SHARED[name], **{key: value for key, value in overrides.items() if value is not None}}
    spec["help"] = _escape(spec["help"])
    return parser.add_argument("--" + name.replace("_", "-"), default=default, **spec)


def _escape(text: str) -> str:
    """Plain text as an argparse help string (`%` is its format character)."""
    return text.replace("%", "%%")


class DeprecatedSpelling(argparse.Action):
    """An old spelling of a flag, kept for one release: hidden from --help, it sets the new flag's value and
    prints one warning naming the new flag. `route(value)` picks the new flag's action when the old spelling
    meant two kinds of input (a parquet or a folder)."""

    def __init__(
        self, option_strings: list[str], dest: str, route: Callable[[Any], argparse.Action], **kwargs: Any
    ) -> None:
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)
        self.route = route

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        new = self.route(values)
        flag = max(new.option_strings, key=len)
        shown = values if isinstance(values, str) else " ".join(map(str, values))
        print(f"{parser.prog}: warning: {option_string} {shown} is deprecated and will be removed in the next "
              f"release; use {flag} {shown}", file=sys.stderr)
        setattr(namespace, new.dest, values)


def add_deprecated(container: Any, old: str, new: argparse.Action,
                   route: Callable[[Any], argparse.Action] | None = None) -> argparse.Action:
    """`old` as a deprecated spelling of the action `new` (or of the action `route(value)` returns).

    Add it to the same container (a mutually exclusive group keeps both spellings from being given together).
    """
    return container.add_argument(old, dest="_deprecated_" + old.lstrip("-").replace("-", "_"),
                                  action=DeprecatedSpelling, route=route or (lambda _: new), nargs=new.nargs,
                                  metavar=new.metavar, type=new.type)


def add_embeddings(parser: Any, help: str, required: bool = True, old: str | None = "--slides") -> argparse.Action:
    """`--embeddings PARQUET`: the slide-embeddings parquet of `vlm embed-slides`, under one name in every command.

    `old` is the spelling this command used before (accepted with a deprecation warning for one release).
    """
    group = parser.add_mutually_exclusive_group(required=required)
    action = group.add_argument("--embeddings", metavar="PARQUET", help=_escape(help))
    if old:
        add_deprecated(group, old, action)
    return action


def add_device(parser: Any, default: str = "auto") -> None:
    _add(parser, "device", default)


def add_precision(parser: Any, default: str = "auto") -> None:
    _add(parser, "precision", default)


def add_pool(parser: Any, default: str = "mean") -> None:
    _add(parser, "pool", default)


def add_reader(parser: Any, default: str = "auto") -> None:
    """`--reader`, for every command that reads slide pixels."""
    _add(parser, "reader", default)


def add_feature_file_options(parser: Any) -> None:
    """`--mpp` and `--patches`, for every command that reads a folder of tile-feature files."""
    _add(parser, "mpp", None)
    _add(parser, "patches", None)


def add_seed(parser: Any, help: str, default: int = 0) -> None:
    """`--seed`; `help` says what it seeds in this command."""
    parser.add_argument("--seed", type=int, default=default, help=_escape(help))


def add_bootstrap(parser: Any) -> None:
    """`--n-boot`, for every command that reports confidence intervals."""
    parser.add_argument("--n-boot", type=int, default=N_BOOT, help=_escape("bootstrap replicates for the 95% CIs"))


def add_random_weights(parser: Any, encoder: str) -> None:
    """`--random-weights` and its `--seed`, for commands that load a pretrained `encoder` ("tile", "slide")."""
    parser.add_argument("--random-weights", action="store_true",
                        help=f"an untrained {encoder} encoder seeded by --seed (smoke tests, the demo; never for "
                        "results)")
    add_seed(parser, "seed of --random-weights")


def seed_random_weights(args: argparse.Namespace) -> None:
    """Refuse `--random-weights` with `--checkpoint`; seed torch for the untrained encoder about to be built."""
    if args.random_weights and args.checkpoint:
        raise UsageError("--random-weights and --checkpoint exclude each other: pick one source of weights")
    if args.random_weights:
        import torch

        torch.manual_seed(args.seed)


def add_shard(parser: Any) -> None:
    parser.add_argument(
        "--shard", default=None,
        help="do part i of n of the slides (0-based 'i/n'); under torchrun RANK/WORLD_SIZE are used",
    )


def add_overwrite(parser: Any, help: str) -> None:
    """`--overwrite`; `help` says what this command redoes or replaces."""
    parser.add_argument("--overwrite", action="store_true", help=_escape(help))


def add_progress(parser: Any) -> None:
    """`--no-progress` (read as `args.no_progress`)."""
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_config_options(parser: argparse.ArgumentParser, config: type) -> dict[str, argparse.Action]:
    """One flag per field of the dataclass `config`, in argument groups named by the fields' `group` metadata.

    Every flag's parsed default is None (False for a boolean), so `given_settings` tells what the user typed;
    the help shows the field's default, which the dataclass applies. A field's metadata may add `flags` (its
    spellings), `deprecated` (old spellings, see `add_deprecated`), `choices`, `metavar` and `exclusive` (fields
    sharing that name exclude each other). Returns the actions by field name.
    """
    hints = typing.get_type_hints(config)
    groups: dict[str, Any] = {}
    exclusive: dict[str, Any] = {}
    actions = {}
    for field in dataclasses.fields(config):
        meta = field.metadata
        group_name = meta.get("group", "")
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name) if group_name else parser
        target = groups[group_name]
        if meta.get("exclusive"):
            key = (group_name, meta["exclusive"])
            if key not in exclusive:
                exclusive[key] = target.add_mutually_exclusive_group()
            target = exclusive[key]
        spec = {**_SHARED.get(field.name, {}), **{k: meta[k] for k in _ARGPARSE_KEYS if meta.get(k)}}
        kind = _scalar_type(hints[field.name], field.name)
        help_text = spec.pop("help", "")
        default = field.default
        flags = meta.get("flags", ("--" + field.name.replace("_", "-"),))
        if kind is bool:
            if default is not False:
                raise TypeError(f"{config.__name__}.{field.name}: a boolean flag must default to False")
            actions[field.name] = target.add_argument(*flags, dest=field.name, action="store_true",
                                                      help=_escape(help_text))
            continue
        if default is not dataclasses.MISSING and default is not None and "(default" not in help_text:
            help_text = f"{help_text} (default: {default})".strip()
        spec.setdefault("type", kind)
        actions[field.name] = target.add_argument(*flags, dest=field.name, default=None, help=_escape(help_text),
                                                  **spec)
        for old in meta.get("deprecated", ()):
            add_deprecated(target, old, actions[field.name])
    return actions


def given_settings(args: argparse.Namespace, config: type) -> dict[str, Any]:
    """The fields of `config` that the command line set (flags from `add_config_options`), by name."""
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(config)}
    return {name: value for name, value in values.items() if value is not None and value is not False}


def _scalar_type(hint: Any, name: str) -> type:
    """`int` of `int | None`: the type a flag's value is parsed with."""
    options = [arg for arg in typing.get_args(hint) if arg is not type(None)] if _is_union(hint) else [hint]
    if len(options) != 1 or options[0] not in (bool, int, float, str):
        raise TypeError(f"setting {name}: no command-line flag for type {hint}")
    return options[0]


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)
