"""The reports of the commands whose library call answers with a plain dict.

Every command returns a report: a value with `as_dict()` (what `--json` prints, as the library
gave it) and `summary()` (the text the command prints). Libraries that own a report class
(`EmbedReport`, `VectorsReport`, `FinetuneReport`, ...) keep it; the dicts of index, info, dedup,
curate and the others are wrapped here, because their text needs modules of several layers
(an index description, a fidelity card) and only the CLI formats.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from embedder.names import display_path


class Report(Protocol):
    """What every handler returns."""

    def as_dict(self) -> Any: ...  # the JSON document: a dict (a list for models and predict)

    def summary(self) -> str: ...


@dataclass(frozen=True)
class DocReport:
    """A library's JSON-ready dict, printed as it is by `--json`; subclasses write its text."""

    doc: Any  # a dict (a list for models and predict)

    def as_dict(self) -> Any:
        return self.doc

    def summary(self) -> str:
        raise NotImplementedError


# ------------------------------------------------------------------------------- info


@dataclass(frozen=True)
class CacheInfoReport(DocReport):
    """`embedder info CACHE.h5`: embedder.cache.reader.describe's dict."""

    cache: str = ""  # as the user named it
    listed_errors: bool = False  # --errors: the error list is in the doc

    def summary(self) -> str:
        doc = self.doc
        if doc["complete"]:
            state = "complete"
        elif doc["writer_pid"] is not None:
            state = f"INCOMPLETE (being written right now by embedder pid {doc['writer_pid']}; rows so far shown)"
        else:
            state = "INCOMPLETE (interrupted run; rerun its command to finish)"
        lines = [f"{self.cache}: {doc['rows']} x {doc['dim']} {doc['dtype']}, {state}",
                 f"  fingerprint  {doc['fingerprint'][:16]}"]
        if doc.get("superseded") or doc.get("removed"):
            lines.append(f"  dead rows    {doc['superseded']} superseded (changed files), {doc['removed']} removed "
                         f"(gone files), hidden from every reader; {doc['stored_rows']} rows stored, generation "
                         f"{doc['generation']}")
            lines.append(f"  compact      {doc['compact'] or 'does not pay yet (few dead rows)'}")
        if len(doc["layers"]) > 1:
            labels = doc.get("layer_labels", {})
            lines.append("  layers       " + ", ".join(f"{labels.get(n, n)}: {d}" for n, d in doc["layers"].items())
                         + "  (the first is /features; pick one with --layer in probe, index, search)")
        lines += self._components()
        lines.append(f"  source       {doc['source']} ({doc['layout']})")
        lines += self._contents()
        return "\n".join(lines)

    def _components(self) -> list[str]:
        doc = self.doc
        order = ["model", "weights", "layer", "pooling", "normalization", "preprocessing", "decoder", "precision",
                 "memory_layout", "runtime", "device_type", "feature_dtype"]
        lines = []
        for key, value in sorted(doc["components"].items(),
                                 key=lambda kv: order.index(kv[0]) if kv[0] in order else 99):
            if key == "preprocessing":
                value = ", ".join(f"{k}={v}" for k, v in json.loads(value).items())
            elif key == "layer":
                value = doc.get("layer_labels", {}).get(value, value)
            lines.append(f"  {key:<20} {value}")
        return lines

    def _contents(self) -> list[str]:
        from embedder.data.sources import describe_ignored

        doc, lines = self.doc, []
        if doc.get("fidelity"):
            from embedder.extract.fidelity import card_lines

            lines += [line.replace("  fidelity card   :", "  fidelity card") for line in card_lines(doc["fidelity"])]
        if "shards" in doc:
            lines.append(f"  sharded      view over {doc['shards']} finished shards in {self.cache}.shards/ "
                         "(embedder merge makes one file)")
        if doc["classes"]:
            shown = ", ".join(f"{c} ({n})" for c, n in list(doc["rows_per_class"].items())[:12])
            more = f" ... {len(doc['classes']) - 12} more" if len(doc["classes"]) > 12 else ""
            lines.append(f"  classes      {len(doc['classes'])}: {shown}{more}")
        if doc["unlabelled_rows"]:
            lines.append(f"  unlabelled   {doc['unlabelled_rows']} rows")
        if doc["columns"]:
            lines.append("  columns      " + ", ".join(f"{n} ({k})" for n, k in doc["columns"].items()))
        else:
            lines.append("  columns      none (written before metadata columns existed)")
        hint = "" if self.listed_errors or not doc["errors"] else " (list them with --errors)"
        lines.append(f"  errors       {doc['errors']}{hint}")
        lines += [f"    {display_path(e['path'])}: {e['reason']}" for e in doc.get("error_list", [])]
        if doc["ignored"]:
            lines.append(f"  ignored      {describe_ignored(doc['ignored'])}: files under SOURCE that are not rows")
        return lines


@dataclass(frozen=True)
class IndexInfoReport(DocReport):
    """`embedder info INDEX_DIR`: embedder.search.removal.describe_index's dict."""

    index: str = ""

    def summary(self) -> str:
        doc = self.doc
        knob = {k: v for k, v in doc["params"].items() if k in ("nprobe", "efSearch")}
        recall = "-" if doc["recall_at_10"] is None else f"{doc['recall_at_10']:.4f}"
        lines = [f"{self.index}: {doc['kind']} index of {doc['rows']} x {doc['dim']} ({doc['metric']})"
                 + (", lists on disk" if doc["on_disk"] else ""),
                 f"  searchable   {doc['searchable']} rows",
                 f"  removed      {doc['removed']}" + (" (removed in place)" if doc["removed_in_place"] else
                                                       f" ({doc['hidden']} hidden from every search)" if doc["hidden"]
                                                       else ""),
                 f"  columns      {', '.join(doc['columns'])}  (for search --where)",
                 f"  recall@10    {recall}" + (f" with {knob}" if knob else ""),
                 f"  cache        {doc['cache']}" + (f" (layer {doc['layer']})" if doc["layer"] else "")]
        if doc["rebuild"]:
            lines.append(f"  rebuild      pays: {doc['rebuild']}")
        if doc.get("out_of_step"):
            lines.append(f"  OUT OF STEP  {doc['out_of_step']}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------ index


@dataclass(frozen=True)
class IndexReport(DocReport):
    """`embedder index CACHE --out DIR`: the built index's metadata (embedder.search.build)."""

    out: str = ""

    def summary(self) -> str:
        meta = self.doc
        knob = {k: v for k, v in meta["params"].items() if k in ("nprobe", "efSearch")}
        reached = "reached" if meta["target_reached"] else "NOT reached (the best setting is kept)"
        return "\n".join([
            (f"wrote {self.out}: {meta['kind']} index of {meta['ntotal']} x {meta['dim']} ({meta['metric']}) "
            f"in {meta['build_s']:.1f} s, layer {meta.get('layer_label') or meta['layer']}"),
            f"  why            {meta['why']}",
            f"  parameters     {meta['params']}",
            f"  recall@10      {meta['recall_at_10']:.4f} against exact search on {meta['eval_queries']} held-out "
            f"queries; target {meta['target_recall']} {reached}" + (f" with {knob}" if knob else "")])


@dataclass(frozen=True)
class IndexUpdateReport(DocReport):
    """`embedder index --update`: embedder.search.update.update_index's dict."""

    cache: str = ""
    out: str = ""

    def summary(self) -> str:
        report = self.doc
        meta, knob = report["meta"], report["knob"]
        if report["status"] == "up_to_date":
            lines = [(f"{self.out} is up to date: {self.cache} has no rows beyond its {report['ntotal']}; "
                     "nothing written.")]
        else:
            setting = (f"{knob} {report['knob_before']} -> {report['knob_after']}" if report["retuned"]
                       else f"{knob} {report['knob_after']} kept") if knob else "exact search"
            reached = "reached" if meta["target_reached"] else "NOT reached (the best setting is kept)"
            dropped = (f", took out {report['rows_removed']} rows a sync superseded or removed"
                       if report.get("rows_removed") else "")
            lines = [(f"updated {self.out}: added {report['rows_added']} rows{dropped} to the {meta['kind']} index, "
                     f"now {report['ntotal']} x {meta['dim']} ({meta['metric']}), in "
                     f"{meta['updates'][-1]['update_s']:.1f} s; {setting}; recall@10 {report['recall_at_10']:.4f} "
                     f"against exact search on {meta['eval_queries']} "
                     f"{'held-out new' if meta['eval_queries_held_out'] else 'indexed'} queries, target "
                     f"{meta['target_recall']} {reached}.")]
        lines += [f"  a rebuild would be better: {advice}. Rebuild without --update: "
                  f"`embedder index {self.cache} --out {self.out}`." for advice in report["advice"]]
        return "\n".join(lines)


@dataclass(frozen=True)
class RemovalReport(DocReport):
    """`embedder index INDEX_DIR --remove ...`: embedder.search.removal.remove_rows's dict."""

    index: str = ""

    def summary(self) -> str:
        report = self.doc
        how = "removed in place" if report["removed_in_place"] else "hidden from every search"
        lines = [(f"{self.index}: {report['newly_removed']} row(s) removed ({how}), "
                 f"{report['already_removed']} already removed; {report['removed_rows']} of {report['rows']} rows "
                 "removed in all")]
        lines += [f"  {display_path(p)}" for p in report["paths"]]
        if report["newly_removed"] > len(report["paths"]):
            lines.append(f"  ... {report['newly_removed'] - len(report['paths'])} more")
        if report["urls_not_checked"]:
            lines.append(f"  {report['urls_not_checked']} URL row(s) not checked (--prune-missing checks files; "
                         "remove dead URLs with --remove-from)")
        return "\n".join(lines)


# ------------------------------------------------------------------------------ dedup


@dataclass(frozen=True)
class DedupReport(DocReport):
    """`embedder dedup`: the near-duplicate groups, each row with its path and keep/drop."""

    cache: str = ""

    def summary(self) -> str:
        doc, against = self.doc, self.doc["against"]
        groups = doc["groups"]
        drop = sum(not e["keep"] for g in groups for e in g)
        lines = [f"{len(groups)} near-duplicate groups ({doc['metric']} "
                 f"{'>=' if doc['metric'] == 'cosine' else '<='} {doc['threshold']}, {doc['kind']} index), "
                 f"{sum(len(g) for g in groups)} images, {drop} to drop"
                 + (f" from {self.cache} (duplicates of {against})" if against else "")]
        for k, g in enumerate(groups, start=1):
            lines.append(f"group {k} ({len(g)}):")
            for e in g:
                where = f"[{e['cache']}] " if against else ""
                lines.append(f"  {'keep' if e['keep'] else 'drop'}  {where}{display_path(e['path'])}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- curate


@dataclass(frozen=True)
class CurateReport(DocReport):
    """`embedder curate`: embedder.curate.run.run_curate's summary dict."""

    def summary(self) -> str:
        doc = self.doc
        lines = [(f"{doc['cache']}: {doc['rows']} rows, {doc['labelled']} labelled, {doc['classes']} classes; "
                 f"splits: {doc['split_how']}")]
        lm = doc["label_mistakes"]
        if "skipped" in lm:
            lines.append(f"  label mistakes  skipped: {lm['skipped']}")
        else:
            lines.append(f"  label mistakes  {lm['issues']} likely (confident learning, {lm['folds']}-fold probe, "
                         f"C {lm['C']:.3g}, out-of-fold accuracy {100 * lm['out_of_fold_accuracy']:.1f}%)")
            lines += [f"      {t['label_quality']:.3f}  {t['given_label']} -> {t['suggested_label']}  "
                      f"{display_path(t['path'])}" for t in lm["top"][:5]]
        lines.append(f"  outliers        most outlying (cosine distance to neighbour number "
                     f"{doc['outliers']['k']}):")
        lines += [f"      {t['outlier_score']:.3f}  {display_path(t['path'])}" for t in doc["outliers"]["top"][:5]]
        leaks = doc["leaks"]
        if "skipped" in leaks:
            lines.append(f"  leaks           skipped: {leaks['skipped']}")
        else:
            lines.append(f"  leaks           {leaks['count']} val/test rows with a train row at similarity >= "
                         f"{leaks['threshold']} ({leaks['by_split']['val']} val, {leaks['by_split']['test']} test)")
            lines += [f"      {t['similarity']:.3f}  {display_path(t['path'])}  ~  {display_path(t['train_path'])}"
                      for t in leaks["pairs"][:5]]
        dup = doc["duplicates"]
        lines.append(f"  duplicates      {dup['groups']} groups (similarity >= {dup['threshold']}), "
                     f"{dup['rows_in_groups']} rows, {dup['to_drop']} to drop (--keep {dup['keep']})")
        lines.append(f"wrote {', '.join(doc['files'])} in {doc['out']} ({doc['wall_s']:.1f} s)")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelsReport(DocReport):
    """`embedder models`: the registry's rows (a list, printed as one by --json)."""

    def summary(self) -> str:
        rows = self.doc
        lines = [f"{'model':<20}{'dim':>6}  {'offline':<8}{'input':<18}{'other layers':<26}weights file"]
        for r in rows:
            other = ", ".join(f"{a} ({d})" for a, d in r["other_layers"].items()) or "-"
            lines.append(f"{r['name']:<20}{r['feature_dim']:>6}  {'yes' if r['weights_offline'] else 'no':<8}"
                         f"{r['input']:<18}{other:<26}{r['weights_file']}")
        missing = [r for r in rows if not r["weights_offline"]]
        if missing:
            lines.append(f"\n{len(missing)} models have no pretrained weights on this machine. They download on "
                         "first use when there is a network; offline, copy the file to the path shown, pass "
                         "--weights PATH, or use --weights none (random init).")
        return "\n".join(lines)


@dataclass(frozen=True)
class BuildableModelsReport(DocReport):
    """`embedder models --all [PATTERN]`: every buildable name, by source."""

    pattern: str | None = None

    def summary(self) -> str:
        groups, pattern = self.doc, self.pattern
        shown = groups["timm"] if pattern else groups["timm"][:20]
        more = ", ... (filter with `embedder models --all 'timm:vit_*'`)" if len(shown) < len(groups["timm"]) else ""
        lines = [f"curated aliases ({len(groups['curated'])}): {', '.join(groups['curated']) or '-'}",
                 (f"torchvision classification models ({len(groups['torchvision'])}): "
                 f"{', '.join(groups['torchvision']) or '-'}"),
                 f"timm models ({len(groups['timm'])}): {', '.join(shown) or '-'}{more}"]
        if pattern:
            lines.append(f"timm pretrained tags ({len(groups['timm_pretrained'])}): "
                         f"{', '.join(groups['timm_pretrained']) or '-'}")
        lines.append("A timm name takes a pretrained tag (timm:convnext_small.fb_in22k); a torchvision name a weights "
                     "name (torchvision:resnet50.IMAGENET1K_V1). `embedder models NAME` shows one entry.")
        return "\n".join(lines)


@dataclass(frozen=True)
class ModelEntryReport(DocReport):
    """`embedder models NAME`: one registry entry."""

    name: str = ""

    def summary(self) -> str:
        entry, name = self.doc, self.name
        pre = entry["preprocessing"]
        lines = [(f"{name}: {entry['feature_dim']}-d default feature at {entry['default_layer']} "
                 f"(head {entry['head']})"),
                 (f"  input: resize {pre['resize_size']} ({pre['interpolation']}), crop {pre['crop_size']}, "
                 f"mean {pre['mean']}, std {pre['std']}"),
                 "  layers: " + ", ".join(f"{n} ({d})" for n, d in entry["layers"].items())
                 + "; aliases: " + (", ".join(f"{a}={n}" for a, n in entry["aliases"].items()) or "-"),
                 f"  poolings (--pool): {', '.join(entry['poolings'])}"]
        if entry["blocks"]:
            lines.append(f"  transformer blocks ({len(entry['blocks'])}, pool with --pool "
                         f"{'|'.join(entry['poolings'])}): {entry['blocks'][0]} ... {entry['blocks'][-1]}")
        offline = "present offline" if entry["weights_offline"] else "NOT present offline"
        lines.append(f"  weights: {entry['weights']} ({offline}: {entry['weights_file']})")
        if entry["weights_hint"]:
            lines.append(f"  to use them offline: {entry['weights_hint']}; or pass --weights PATH (a state dict), "
                         "or --weights none (random init)")
        lines.append(f"  all layers: embedder inspect {name}")
        if entry.get("card") is not None:
            from embedder.extract.fidelity import card_lines

            lines += card_lines(entry["card"])
        return "\n".join(lines)


@dataclass(frozen=True)
class InspectReport:
    """`embedder inspect`: a model's layers (embedder.models.inspection.Inspection)."""

    inspection: Any
    depth: int | None = None

    def as_dict(self) -> dict:
        return self.inspection.as_dict()

    def summary(self) -> str:
        from embedder.models.inspection import format_inspection

        return format_inspection(self.inspection, self.depth)


# ------------------------------------------------------------------------------ cache


@dataclass(frozen=True)
class MergeReport(DocReport):
    """`embedder merge`: {"cache", "out", "rows"}."""

    def summary(self) -> str:
        return (f"wrote {self.doc['out']}: {self.doc['rows']} rows, one self-contained file (same fingerprint as "
                f"{self.doc['cache']})")


@dataclass(frozen=True)
class CompactReport(DocReport):
    """`embedder compact`: embedder.cache.compact.compact_cache's dict."""

    cache: str = ""

    def summary(self) -> str:
        report = self.doc
        if report["status"] == "compact":
            return f"{self.cache} has no superseded or removed rows ({report['rows']} rows). Nothing to do."
        return (f"wrote {self.cache}: {report['rows']} live rows, sorted by path; {report['dropped']} dead rows "
                "dropped. Rebuild its index: `embedder index CACHE.h5 --out INDEX_DIR`.")


@dataclass(frozen=True)
class SamplesReport:
    """`embedder make-samples`: embedder.data.samples.Samples ({name: folder}, what was written)."""

    samples: Any

    def as_dict(self) -> dict:
        return {"folders": {name: str(path) for name, path in self.samples.items()},
                "written": dict(self.samples.written), "existing": dict(self.samples.existing)}

    def summary(self) -> str:
        return self.samples.summary()


# ------------------------------------------------------------------------------ learn


@dataclass(frozen=True)
class ProbeReport(DocReport):
    """`embedder probe`: embedder.learn.train.run_probe's dict (a table, or a sweep's)."""

    def summary(self) -> str:
        if self.doc.get("sweep"):
            from embedder.learn.sweep import format_sweep

            return format_sweep(self.doc)
        from embedder.learn.metrics import format_table

        return format_table(self.doc)


@dataclass(frozen=True)
class EvaluateReport(DocReport):
    """`embedder evaluate`: embedder.learn.train.evaluate_probe's dict."""

    cache: str = ""

    def summary(self) -> str:
        acc = self.doc["accuracy"]
        return f"{self.cache}: {self.doc['rows']} rows, accuracy {'-' if acc is None else f'{100 * acc:.2f}%'}"


@dataclass(frozen=True)
class ExportReport(DocReport):
    """`embedder export`: {"out": the .pt, "onnx": the standalone .onnx or None, "onnx_json"}."""

    def summary(self) -> str:
        path, standalone = self.doc["out"], self.doc["onnx"]
        return (f"wrote {path}: backbone + linear head, ready for `embedder predict {path} IMAGE...`"
                + (f"; {standalone} and {self.doc['onnx_json']}: the same for onnxruntime, without embedder"
                   if standalone else ""))


@dataclass(frozen=True)
class PredictReport(DocReport):
    """`embedder predict`: one dict per image (a list, printed as one by --json)."""

    def summary(self) -> str:
        lines = []
        for r in self.doc:
            if "error" in r:
                lines.append(f"{display_path(r['path'])}\tERROR\t{r['error']}")
                continue
            extra = "  ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top"][1:])
            lines.append(f"{display_path(r['path'])}\t{r['label']}\t{r['probability']:.3f}"
                         + (f"\t({extra})" if extra else ""))
        return "\n".join(lines)


# ----------------------------------------------------------------------------- search


@dataclass(frozen=True)
class PlotReport(DocReport):
    """`embedder plot`: {"out", "cache", "method", "seed"}."""

    def summary(self) -> str:
        return f"wrote {self.doc['out']}"


@dataclass(frozen=True)
class MapReport(DocReport):
    """`embedder map`: embedder.search.maps.compute_map's dict."""

    index: str = ""

    def summary(self) -> str:
        report = self.doc
        placed = report["mapped"] - report["fitted_on"]
        return (f"wrote {report['map']}: {report['method']} map of {report['mapped']} rows in "
                f"{report['seconds']:.1f} s"
                + (f" (fitted on {report['fitted_on']}, {placed} placed by the fitted model)" if placed else "")
                + (f", with the curate scores {', '.join(report['scores'])}" if report["scores"] else "")
                + f"; `embedder serve {self.index}` shows it at /map")
