"""Subcommands `vlm index build|build-reports|add|remove`, `vlm search` and `vlm eval retrieval`."""

from __future__ import annotations

import argparse
import json
import logging
from typing import TYPE_CHECKING

from vlm.commands.options import add_bootstrap, add_embeddings, add_overwrite, add_seed
from vlm.errors import UsageError
from vlm.settings import INDEX_KINDS

if TYPE_CHECKING:
    from vlm.retrieval import SlideIndex

log = logging.getLogger(__name__)

_INDEX_EPILOG = """examples:
  vlm index build --model runs/align/model --embeddings runs/slides.parquet --out runs/index --metadata meta.csv
  vlm index build-reports --model runs/align/model --pairs reports.csv --out runs/report-index
  vlm index add --index runs/index --embeddings runs/new_slides.parquet
  vlm index remove --index runs/index TCGA-XX-0001 TCGA-XX-0002
"""
_SEARCH_EPILOG = """examples:
  vlm search --index runs/index "poorly differentiated squamous cell carcinoma with keratinization" -k 10
  vlm search --index runs/index --slide-id TCGA-XX-XXXX -k 10 --json
  vlm search --index runs/report-index --slide-id TCGA-XX-XXXX --embeddings runs/slides.parquet   # slide -> report
"""
_KIND_HELP = ("auto (flat up to 100k items, ivf up to 4M, ivfpq above), flat (exact), ivf, hnsw, "
              "ivfpq")


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_index(subparsers)
    _register_search(subparsers)
    _register_eval(subparsers)


def _build_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder from `vlm train` (<run>/model)")
    parser.add_argument("--out", required=True, help="index folder to write: new, empty (e.g. `.`), or an index "
                        "to replace with --overwrite")
    add_overwrite(parser, "replace an existing index at --out (any other non-empty folder is refused)")
    parser.add_argument("--kind", default="auto", choices=INDEX_KINDS, help=_KIND_HELP)
    parser.add_argument("--target-recall", type=float, default=0.95,
                        help="Recall@10 vs exact search to tune approximate kinds to")
    add_seed(parser, "seed of training samples and tuning queries")


def _register_index(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("index", help="build and edit FAISS indexes of slides or reports",
                              epilog=_INDEX_EPILOG)
    actions = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    build = actions.add_parser(
        "build", help="index slide embeddings (slide search by text or by slide)",
        description="Projects each slide embedding with the model's slide head and writes a FAISS index folder "
        "(index, ids, metadata, manifest) for `vlm search`.",
    )
    add_embeddings(build, "slide embeddings parquet from `vlm embed-slides`")
    build.add_argument("--metadata", help="CSV / Parquet / JSONL with slide_id and columns to show in results")
    _build_options(build)
    build.set_defaults(func=_index_build)

    reports = actions.add_parser("build-reports", help="index report texts (slide -> report search)")
    reports.add_argument("--pairs", required=True, help="CSV / Parquet / JSONL with slide_id, report")
    _build_options(reports)
    reports.set_defaults(func=_index_build_reports)

    add = actions.add_parser("add", help="add slides to an index without rebuilding it")
    add.add_argument("--index", required=True, help="index folder")
    add_embeddings(add, "slide embeddings parquet of the new slides (all must be new)")
    add.add_argument("--metadata", help="metadata table of the new slides")
    add.add_argument("--model", help="model folder (default: the one recorded in the index)")
    add.set_defaults(func=_index_add)

    remove = actions.add_parser("remove", help="remove slides (or reports) from an index by id")
    remove.add_argument("--index", required=True, help="index folder")
    remove.add_argument("ids", nargs="*", metavar="ID", help="slide ids (report ids for a report index)")
    remove.add_argument("--ids-file", help="text file with one id a line, for many ids")
    remove.set_defaults(func=_index_remove)


def _register_search(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("search", help="search an index by report text or by slide id",
                              epilog=_SEARCH_EPILOG)
    p.add_argument("--index", required=True, help="index folder from `vlm index build` / `build-reports`")
    p.add_argument("text", nargs="?", help="query text, e.g. a report phrase (needs the model)")
    p.add_argument("--slide-id", help="query by a slide (in a slide index: no model needed)")
    add_embeddings(p, "slide embeddings parquet holding the --slide-id slide: needed on a report index, and on a "
                   "slide index for a slide that is not in it", required=False)
    p.add_argument("-k", type=int, default=10, help="results to return")
    p.add_argument("--model", help="model folder (default: the one recorded in the index manifest)")
    p.add_argument("--json", action="store_true", help="print a JSON list of {rank, slide_id, score, …}")
    p.add_argument("--gpu", action="store_true", help="search on GPU (needs faiss-gpu: pip install 'vlm[gpu]')")
    p.set_defaults(func=_search)


def _register_eval(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model (retrieval)")
    tasks = p.add_subparsers(dest="eval_command", required=True, metavar="TASK")
    r = tasks.add_parser(
        "retrieval", help="report <-> slide Recall@K, slide -> slide Acc@K by label, with CIs",
        description="Recall@K counts a hit at the level of the case: pairs rows sharing a patient_id, a report "
        "text or a slide_id are one case, so report -> slide finds any slide of the report's case and slide -> "
        "report the case's report. The definitions are written into the output JSON.",
    )
    r.add_argument("--model", required=True, help="model folder from `vlm train`")
    r.add_argument("--pairs", required=True, help="CSV / Parquet / JSONL with slide_id, report [, patient_id, split]; "
                   "rows of one patient_id (or report text) are one case")
    add_embeddings(r, "slide embeddings parquet from `vlm embed-slides`")
    r.add_argument("--labels", help="CSV / Parquet / JSONL with slide_id, label for slide -> slide metrics")
    r.add_argument("--split", default="auto", choices=("auto", "train", "val", "test", "all"),
                   help="pairs to evaluate; auto = test when the pairs have a split column, else all")
    r.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10], help="cut-offs K")
    add_bootstrap(r)
    add_seed(r, "bootstrap seed")
    r.add_argument("--out", help="also write the metrics as JSON to this file")
    r.set_defaults(func=_eval_retrieval)


def _index_build(args: argparse.Namespace) -> int:
    from vlm.retrieval import build_slide_index

    index = build_slide_index(args.model, args.embeddings, args.out, metadata=args.metadata, overwrite=args.overwrite,
                              kind=args.kind, target_recall=args.target_recall, seed=args.seed)
    print(_summary(index, args.out))
    return 0


def _index_build_reports(args: argparse.Namespace) -> int:
    from vlm.retrieval import build_report_index

    index = build_report_index(args.model, args.pairs, args.out, overwrite=args.overwrite, kind=args.kind,
                               target_recall=args.target_recall, seed=args.seed)
    print(_summary(index, args.out))
    return 0


def _index_add(args: argparse.Namespace) -> int:
    from vlm.io import folder_lock
    from vlm.retrieval import SlideIndex, add_slides

    with folder_lock(args.index):  # load-add-save as one step: a concurrent add waits, then adds to this result
        index = SlideIndex.load(args.index, model=args.model)
        added = add_slides(index, args.embeddings, args.metadata)
        index.save(args.index)
    print(f"added {len(added)} slides -> {_summary(index, args.index)}")
    return 0


def _index_remove(args: argparse.Namespace) -> int:
    from vlm.formats.tables import read_list
    from vlm.io import folder_lock
    from vlm.retrieval import load_index

    ids = list(args.ids)
    if args.ids_file:
        ids += read_list(args.ids_file, what="ids")
    with folder_lock(args.index):
        index = load_index(args.index)
        index.remove(ids)
        index.save(args.index)
    print(f"removed {len(set(ids))} -> {_summary(index, args.index)}")
    return 0


def _search(args: argparse.Namespace) -> int:
    from vlm.formats.embeddings import load_slide_embeddings
    from vlm.retrieval import ReportIndex, load_index
    from vlm.retrieval.index import result_records

    if (args.text is None) == (args.slide_id is None):
        raise UsageError("give either a query text or --slide-id (not both)")
    index = load_index(args.index, model=args.model, gpu=args.gpu)
    if args.text is not None:
        results = index.search_text(args.text, k=args.k)
    elif isinstance(index, ReportIndex):
        if args.embeddings is None:
            raise UsageError("a report index is searched by slide through its embedding: add --embeddings "
                             "slides.parquet")
        results = index.search_slide(args.slide_id, load_slide_embeddings(args.embeddings), k=args.k)
    elif args.embeddings is not None:  # a slide outside this slide index, by its embedding in --embeddings
        table = load_slide_embeddings(args.embeddings)
        if args.slide_id not in table.row:
            raise UsageError(f"{args.embeddings}: no slide {args.slide_id!r} (it has {len(table.ids)} slides)")
        results = index.search_embeddings(table.lookup([args.slide_id]), k=args.k)
    else:
        results = index.search_slide(args.slide_id, k=args.k)
    if args.json:
        print(json.dumps(result_records(results), indent=2))
    else:
        results = results.drop(columns=["query"])
        if "report" in results.columns:
            results["report"] = results["report"].map(lambda text: text if len(text) <= 80 else text[:77] + "...")
        print(results.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    return 0


def _eval_retrieval(args: argparse.Namespace) -> int:
    from vlm.io import atomic_path, check_output_file
    from vlm.retrieval.evaluate import evaluate_retrieval

    if args.out:
        check_output_file(args.out)  # before the evaluation, not after
    metrics = evaluate_retrieval(args.model, args.pairs, args.embeddings, args.labels, split=args.split, ks=args.ks,
                                 n_boot=args.n_boot, seed=args.seed)
    print(f"split {metrics['split']}: {metrics['n_pairs']} pairs, {metrics['n_slides']} slides, "
          f"{metrics['n_cases']} cases (a hit is any slide / report of the query's case)")
    for group in ("report_to_slide", "slide_to_report", "slide_to_slide"):
        for name, value in metrics.get(group, {}).items():
            if isinstance(value, dict) and "value" in value:
                print(f"{group:16s} {name:9s} {_interval(value)}")
    print(f"{'mean_recall':26s} {_interval(metrics['mean_recall'])}")
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


def _summary(index: SlideIndex, out: str) -> str:
    manifest = index.manifest
    recall = manifest["recall"]
    quality = "exact" if recall.get("exact") else f"Recall@{recall['k']} {recall['measured']:.3f} vs exact"
    params = ", ".join(f"{name}={value}" for name, value in manifest["params"].items())
    kind = f"{manifest['kind']} ({params})" if params else manifest["kind"]
    return f"{manifest['count']} {manifest['content']}, {kind}, {quality} -> {out}"


def _interval(value: dict[str, float]) -> str:
    return f"{value['value']:.3f} [{value['ci_low']:.3f}, {value['ci_high']:.3f}]"
