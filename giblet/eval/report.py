"""`giblet report RUN`: one self-contained folder (``index.html`` + ``assets/``) that opens offline in a browser.

Generated from the run's own files, nothing recomputed: the settings and training curves (``config.yaml``,
``metrics.jsonl``), the per-voxel r map beside the noise ceiling and each baseline (``eval/``, from ``giblet
evaluate``), and the map of what each parcel carries with the media of the top parcels (``lesion/atlas-*``, from
``giblet lesion --atlas``). A part whose files are missing is said, with the command that makes it, never faked.
Every path in the page is relative; the brain maps are drawn by ``giblet.eval.brainmaps`` (nilearn).
"""

from __future__ import annotations

import datetime
import html
import json
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import numpy as np

from giblet.data.store import Store, open_store, run_store_path
from giblet.data.volume import load_values
from giblet.eval import brainmaps
from giblet.eval.metrics import format_lead
from giblet.eval.lesion import write_report_folder
from giblet.errors import DataError
from giblet.progress import bar

PathLike = Union[str, Path]
MARKER, KIND = "report.json", "giblet report"
TOP_ROWS = 10  # parcels per modality in the table of those that carry most

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; } .missing { background: #fff4e5; border-left: 4px solid #f0a030; padding: .5em 1em; }
.grid { display: flex; flex-wrap: wrap; gap: 1em; } .grid figure { margin: 0; flex: 1 1 520px; }
figcaption { font-size: .9em; color: #555; } code, pre { background: #f6f6f6; padding: .1em .3em; }
pre { padding: .8em; overflow-x: auto; } iframe { width: 100%; height: 420px; border: 1px solid #ddd; }
#load-status { font-size: .9em; color: #555; }
"""

# Counts what loaded once the page has: an image with pixels, a media element whose metadata was read. The line it
# writes (and body's data-loaded) tells a reader, or a headless browser, whether the page is whole.
CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var bad = [];
  Array.prototype.forEach.call(document.images, function (img) {
    if (!(img.complete && img.naturalWidth > 0)) bad.push(img.getAttribute('src'));
  });
  var media = Array.prototype.slice.call(document.querySelectorAll('audio, video'));
  Promise.all(media.map(function (m) {
    return new Promise(function (done) {
      if (m.readyState >= 1) return done(true);
      m.addEventListener('loadedmetadata', function () { done(true); });
      m.addEventListener('error', function () { done(false); });
      setTimeout(function () { done(m.readyState >= 1); }, 8000);
    });
  })).then(function (ok) {
    ok.forEach(function (loaded, i) { if (!loaded) bad.push(media[i].getAttribute('src')); });
    var total = document.images.length + media.length;
    document.body.setAttribute('data-loaded', bad.length ? 'failed' : 'ok');
    document.getElementById('load-status').textContent = bad.length
      ? 'not loaded: ' + bad.join(', ') : 'all ' + total + ' images and media loaded';
  });
});
"""


def _e(value) -> str:
    return html.escape(str(value))


def _missing(text: str, command: str) -> str:
    return f'<p class="missing">{_e(text)} Run <code>{_e(command)}</code>.</p>'


def _table(header: List[str], rows: List[List[object]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _number(value, spec: str = ".3f") -> str:
    return "-" if value is None or (isinstance(value, float) and not np.isfinite(value)) else format(value, spec)


def _figure(src: str, caption: str) -> str:
    return f'<figure><img src="{_e(src)}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>'


class _Assets:
    """Files of the report under ``assets/``, each named once, referred to by relative paths."""

    def __init__(self, root: Path) -> None:
        self.root, self.folder = root, root / "assets"
        self.folder.mkdir()

    def path(self, name: str) -> Path:
        return self.folder / name

    def src(self, name: str) -> str:
        return f"assets/{name}"

    def copy(self, source: Path, name: str) -> str:
        shutil.copyfile(source, self.path(name))
        return self.src(name)


def _run_section(run: Path, store: Optional[Store], store_problem: Optional[str], checkpoint: Optional[Dict]) -> str:
    rows = [["run folder", str(run.resolve())]]
    if checkpoint is not None:
        rows += [["checkpoint", checkpoint["file"]], ["epoch", checkpoint.get("epoch", "-")],
                 ["store key", checkpoint.get("store_key", "-")]]
    if store is not None:
        sources = store.manifest.get("sources", {})
        data = sources.get("movie", {}).get("path")
        rows += [["store", str(store.path)], ["data", str(Path(data).parent) if data else "-"],
                 ["voxels", f"{store.n_voxels:,}"], ["TRs", f"{store.n_trs} of {store.tr_s} s"],
                 ["splits (TRs)", ", ".join(f"{k} {a}-{b - 1}" for k, (a, b) in store.splits.items())],
                 ["subjects", len(store.subjects)], ["space", store.space]]
    parts = [f"<h2>Run</h2>{_table(['', ''], rows)}"]
    if store_problem:
        parts.append(_missing(f"The run's store could not be opened ({store_problem}); the maps need it.",
                              f"giblet report {run} --store STORE"))
    config = run / "config.yaml"
    if config.is_file():
        parts.append(f"<details><summary>settings ({_e(config.name)})</summary><pre>{_e(config.read_text())}</pre></details>")
    else:
        parts.append(_missing("No config.yaml in the run folder.", f"giblet train --data DATA --out {run}"))
    return "\n".join(parts)


def _training_section(run: Path, assets: _Assets) -> str:
    log = run / "metrics.jsonl"
    if not log.is_file():
        return "<h2>Training</h2>" + _missing("No metrics.jsonl: the run has logged no step.", f"giblet train --data DATA --out {run}")
    steps, validation = [], []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash mid-write
        (validation if "val_r" in record else steps).append(record)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    if steps:
        x = [r["step"] for r in steps]
        axes[0].plot(x, [r.get("loss", np.nan) for r in steps], label="total loss")
        axes[0].plot(x, [r.get("fmri_loss", np.nan) for r in steps], label="fMRI loss")
        axes[0].set_xlabel("step"), axes[0].set_yscale("log"), axes[0].legend()
    if validation:
        axes[1].plot([r["epoch"] for r in validation], [r["val_r"] for r in validation], marker="o", label="validation mean r")
        axes[1].set_xlabel("epoch"), axes[1].set_ylabel("r"), axes[1].legend()
    figure.tight_layout()
    figure.savefig(assets.path("training.png"), dpi=90)
    plt.close(figure)
    best = max((r.get("best_val_r", r["val_r"]) for r in validation), default=None)
    text = f"{len(steps)} logged steps, {len(validation)} validations; best validation mean r {_number(best)}."
    return f"<h2>Training</h2><p>{_e(text)}</p>" + _figure(assets.src("training.png"), "training curves (metrics.jsonl)")


def _map(values: np.ndarray, store: Store, assets: _Assets, name: str, title: str, vmax: Optional[float] = None,
         threshold: Optional[float] = None) -> str:
    brainmaps.stat_map(values, store, assets.path(f"{name}.png"), title, vmax=vmax, threshold=threshold)
    return _figure(assets.src(f"{name}.png"), title)


def _prediction_section(run: Path, store: Optional[Store], assets: _Assets) -> str:
    eval_dir = run / "eval"
    metrics_file = eval_dir / "metrics.json"
    if not metrics_file.is_file():
        return "<h2>Brain prediction</h2>" + _missing("No eval/metrics.json: the run has not been evaluated.",
                                                       f"giblet evaluate {run}")
    metrics = json.loads(metrics_file.read_text())
    truth = metrics.get("truth") or {}
    header = (["model", "mean r", "median r", "giblet's lead in mean r (95% interval)"]
              + (["fraction of the noise-free ceiling"] if truth else []))
    rows = [["giblet (layer 7)", _number(metrics["mean_r"]), _number(metrics["median_r"]), ""]
            + ([_number(truth.get("model", {}).get("fraction_of_ceiling"))] if truth else [])]
    for name, values in metrics.get("baselines", {}).items():
        rows.append([name, _number(values["mean_r"]), _number(values["median_r"]), format_lead(values.get("model_minus_this"))]
                    + ([_number(truth.get(name, {}).get("fraction_of_ceiling"))] if truth else []))
    parts = [f"<h2>Brain prediction ({_e(metrics['split'])} TRs {metrics['test_trs'][0]}-{metrics['test_trs'][1] - 1})</h2>",
             f"<p>Per-voxel Pearson r against the group-mean response; noise ceiling (mean) "
             f"{_number(metrics.get('noise_ceiling_mean'))}, noise-normalised r {_number(metrics.get('noise_normalized_r'))}. "
             "giblet's lead over a baseline has a 95% interval from a block bootstrap of these TRs: where it holds 0, "
             "this block cannot tell the two apart.</p>",
             _table(header, rows)]
    if truth.get("by_kind"):
        kinds = truth["by_kind"]
        names = ["model"] + [n for n in metrics.get("baselines", {}) if n in next(iter(kinds.values()))]
        parts.append("<p>Fraction of the noise-free ceiling by kind of region (synthetic ground truth):</p>")
        parts.append(_table(["kind", "voxels"] + names, [[kind, entry["voxels"]] + [_number(entry.get(n, {}).get("fraction_of_ceiling")) for n in names]
                                                          for kind, entry in kinds.items()]))
    if store is None:
        return "\n".join(parts)
    background = brainmaps.background(store)[1]
    figures = []
    maps = [("r_map.nii.gz", "r_model", "giblet: test r per voxel"), ("noise_ceiling.nii.gz", "noise_ceiling", "noise ceiling")]
    maps += [(f"r_map_{name}.nii.gz", f"r_{name}", f"{name}: test r per voxel") for name in metrics.get("baselines", {})]
    model_r = None
    for file, name, title in maps:
        if not (eval_dir / file).is_file():
            figures.append(_missing(f"No eval/{file}.", f"giblet evaluate {run}"))
            continue
        values = load_values(eval_dir / file, store.mask())
        model_r = values if name == "r_model" else model_r
        figures.append(_map(values, store, assets, name, title, vmax=1.0))
    parts.append(f"<p>Maps on {_e(background)}.</p><div class=\"grid\">{''.join(figures)}</div>")
    if model_r is not None:
        if brainmaps.glass_brain(model_r, store, assets.path("r_model_glass.png"), "giblet: test r", vmax=1.0):
            parts.append(_figure(assets.src("r_model_glass.png"), "giblet: test r, glass brain"))
        brainmaps.interactive_map(model_r, store, assets.path("r_model_view.html"), "giblet: test r", vmax=1.0)
        parts.append(f'<p>Interactive (click to move the cut):</p><iframe src="{assets.src("r_model_view.html")}" '
                     f'title="interactive r map"></iframe>')
    return "\n".join(parts)


def _atlas_folders(run: Path) -> List[Path]:
    return sorted((p.parent for p in (run / "lesion").glob("atlas-*/atlas.json")), key=lambda p: p.stat().st_mtime)


def _top_media(folder: Path, assets: _Assets, prefix: str) -> str:
    """The ``--roi`` report of a top parcel: frames, audio players, the first nearest texts."""
    lesion_json = folder / "lesion.json"
    if not lesion_json.is_file():
        return _missing(f"No lesion report in {folder.name}.", "giblet lesion RUN --atlas LABELS")
    files = json.loads(lesion_json.read_text()).get("files", {})
    parts = []
    video = files.get("video")
    if video and (folder / video["file"]).is_file():
        src = assets.copy(folder / video["file"], f"{prefix}_frames.mp4")
        parts.append(f'<figure><video controls preload="metadata" src="{src}"></video>'
                     f"<figcaption>frames: {_e(', '.join(video.get('panels', [])))}</figcaption></figure>")
    audio = files.get("audio")
    if audio and audio.get("files"):
        players = []
        for name, file in audio["files"].items():
            if (folder / file).is_file():
                src = assets.copy(folder / file, f"{prefix}_{file}")
                players.append(f'<p>{_e(name)}: <audio controls preload="metadata" src="{src}"></audio></p>')
        parts.append("".join(players) + f"<p><small>{_e(audio.get('method', ''))}</small></p>")
    elif audio and audio.get("skipped"):
        parts.append(f"<p>audio: {_e(audio['skipped'])}</p>")
    text = files.get("text")
    if text and (folder / text["files"]["json"]).is_file():
        windows = json.loads((folder / text["files"]["json"]).read_text())["windows"]
        rows = [[f"TR {w['tr']}", s["text"], s["intact"]["text"], s["lesioned"]["text"]] for w in windows for s in w["slots"]][:8]
        hits = f"nearest is the true annotation: intact {_number(text.get('nearest_is_true_intact'), '.0%')}, " \
               f"lesioned {_number(text.get('nearest_is_true_lesioned'), '.0%')}"
        parts.append(f"<p>{_e(hits)}</p>" + _table(["window", "annotation", "nearest, intact", "nearest, lesioned"], rows))
    return "\n".join(parts) or "<p>no media in this report</p>"


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3%}"


def _share(value: Optional[float]) -> str:
    """A parcel's share of the whole brain's loss increase; '-' where the whole brain raises it by nothing (older
    atlas.json files have no share)."""
    return "-" if value is None else f"{value:+.1%}"


def _atlas_section(run: Path, store: Optional[Store], assets: _Assets) -> str:
    folders = _atlas_folders(run)
    if not folders:
        return "<h2>What each region carries</h2>" + _missing(
            "No lesion atlas in RUN/lesion/.", f"giblet data atlas cubes STORE --size 5 --out cubes.nii.gz && giblet lesion {run} --atlas cubes.nii.gz")
    folder = folders[-1]
    report = json.loads((folder / "atlas.json").read_text())
    parcels = {p["label"]: p for p in report["parcels"]}
    null = report.get("null", {})
    parts = [f"<h2>What each region carries ({_e(folder.name)})</h2>",
             f"<p>{len(report['parcels'])} parcels of {_e(Path(report['atlas']).name)} silenced in turn on "
             f"{report['windows']} {_e(report['split'])} windows; p from {null.get('permutations', '-')} random contiguous "
             f"parcels of matched size per size class, q by Benjamini-Hochberg over parcels x modalities. "
             f"Relative change: how much the reconstruction loss rises when the parcel is silenced.</p>"]
    whole = report.get("whole_brain")
    if whole:
        values = [f"{_e(n)} {whole[n]['relative_change']:+.2%} (loss {whole[n]['loss_intact']:.3f} -> {whole[n]['loss_silenced']:.3f})"
                  for n in report["top"] if n in whole]
        sums = [f"{_e(n)} {_number(whole[n].get('parcels_sum_of_shares'), '.2f')}" for n in report["top"] if n in whole]
        parts.append("<p>Every layer-7 unit silenced at once: " + ", ".join(values) + ". That is all the decoder reads from the "
                     "brain on these windows, the scale of every parcel's change (a parcel's <i>share of the brain</i> is its "
                     "loss increase over this one). The parcels silenced one at a time add up to " + ", ".join(sums) + " of it: "
                     "near 1, each parcel holds its own part; far below 1, the parcels hold it redundantly and silencing any "
                     "one removes little, so single parcels are mostly noise.</p>")
    reliability = report.get("reliability")
    if reliability:
        values = [f"{_e(n)} {_number(reliability[n]['split_half_r'], '.2f')} (whole map {_number(reliability[n]['spearman_brown'], '.2f')})"
                  for n in report["top"] if n in reliability]
        parts.append("<p>How reproducible the map is: r over parcels between the relative changes on the first and the second "
                     f"half of the windows ({' + '.join(map(str, reliability['windows']))}): {', '.join(values)}. A map whose halves "
                     "disagree is mostly the held-out block's own noise: score more windows before reading single parcels.</p>")
    if len(folders) > 1:
        parts.append(f"<p>Other atlas lesions in this run: {_e(', '.join(f.name for f in folders[:-1]))}.</p>")
    for name, ranked in report["top"].items():
        parts.append(f"<h3>{_e(name)}</h3>")
        carries = folder / report.get("files", {}).get(name, {}).get("carries", f"carries_{name}.nii.gz")
        if store is not None and carries.is_file():
            values = load_values(carries, store.mask())
            figures = [_map(values, store, assets, f"carries_{name}", f"{name}: relative change when each parcel is silenced")]
            if brainmaps.glass_brain(values, store, assets.path(f"carries_{name}_glass.png"), f"what carries {name}"):
                figures.append(_figure(assets.src(f"carries_{name}_glass.png"), f"{name}, glass brain"))
            parts.append(f"<div class=\"grid\">{''.join(figures)}</div>")
        rows = [[label, parcels[label]["voxels"], f"{parcels[label]['modalities'][name]['relative_change']:+.3%}",
                 _share(parcels[label]["modalities"][name].get("share_of_brain")),
                 _number(parcels[label]["modalities"][name]["p_value"]), _number(parcels[label]["modalities"][name]["q_value"]),
                 _percent(parcels[label]["modalities"][name].get("relative_shift"))]
                for label in ranked[:TOP_ROWS]]
        parts.append(f"<p>Parcels that carry most {_e(name)}:</p>"
                     + _table(["parcel", "voxels", "relative change", "share of the brain", "p", "q", "relative shift"], rows))
        by_shift = report.get("top_by_shift", {}).get(name)
        if by_shift:
            parts.append(f"<p>Parcels whose silencing moves the {_e(name)} reconstruction most (relative shift, the steadier "
                         "measure: never negative, free of the windows' own error): "
                         + ", ".join(f"{label} ({_percent(parcels[label]['modalities'][name]['relative_shift'])}, "
                                     f"q {_number(parcels[label]['modalities'][name].get('shift_q_value'), '.2f')})"
                                     for label in by_shift[:5]) + ".</p>")
        top = report.get("files", {}).get(name, {}).get("top_report")
        if top:
            parts.append(f"<p>Top parcel {ranked[0]}, silenced: original, intact and lesioned reconstructions.</p>")
            parts.append(_top_media(folder / top, assets, f"top_{name}"))
    names = list(report["top"])
    rows = [[p["label"], p["voxels"]] + [f"{p['modalities'][n]['relative_change']:+.3%} (q {_number(p['modalities'][n]['q_value'], '.2f')})"
                                          for n in names] for p in report["parcels"]]
    parts.append(f"<details><summary>every parcel ({len(rows)})</summary>" + _table(["parcel", "voxels"] + names, rows) + "</details>")
    return "\n".join(parts)


def write_report(run: PathLike, out: Optional[PathLike] = None, store_path: Optional[PathLike] = None,
                 progress: Optional[bool] = None) -> Path:
    """Write the report of ``run`` to ``out`` (default ``RUN/report``) and return the path of its ``index.html``.

    Refuses a ``run`` that is not a run folder; replaces ``out`` only when it is a report (or empty)."""
    run = Path(run)
    if not run.is_dir() or not any((run / name).exists() for name in ("config.yaml", "checkpoints", "metrics.jsonl")):
        raise DataError(run, "is not a run folder (no config.yaml, checkpoints/ or metrics.jsonl)",
                        expected="a folder written by giblet train", fix="give the --out folder of a giblet train run")
    out = Path(out) if out is not None else run / "report"
    store: Optional[Store] = None
    store_problem = None
    try:
        store = open_store(store_path or run_store_path(run))
    except (DataError, OSError, ValueError) as error:
        store_problem = str(error)
    checkpoint = _checkpoint_facts(run)

    def fill(tmp: Path) -> Dict[str, object]:
        assets = _Assets(tmp)
        sections: List[Callable[[], str]] = [
            lambda: _run_section(run, store, store_problem, checkpoint),
            lambda: _training_section(run, assets),
            lambda: _prediction_section(run, store, assets),
            lambda: _atlas_section(run, store, assets),
        ]
        body = []
        with bar("report", total=len(sections), show=progress) as progress_bar:
            for section in sections:
                body.append(section())
                progress_bar.advance(1)
        when = datetime.datetime.now().isoformat(timespec="seconds")
        page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>giblet report: {_e(run.name)}</title>"
                f"<style>{STYLE}</style></head><body><h1>giblet report: {_e(run.name)}</h1>"
                f"<p>Generated {_e(when)} from the files of <code>{_e(run)}</code>.</p>{''.join(body)}"
                f"<hr><p id=\"load-status\">checking that every image and media file loads...</p>"
                f"<script>{CHECK_SCRIPT}</script></body></html>")
        (tmp / "index.html").write_text(page, encoding="utf-8")
        return {"index": "index.html", "assets": sorted(p.name for p in assets.folder.iterdir())}

    write_report_folder(out, MARKER, KIND, fill, {"run": str(run), "store": str(store.path) if store else None})
    return out / "index.html"


def _checkpoint_facts(run: Path) -> Optional[Dict[str, object]]:
    from giblet.models.checkpoint import find_checkpoint, read_checkpoint

    try:
        path = find_checkpoint(run)
        payload = read_checkpoint(path)
    except (DataError, FileNotFoundError, OSError, RuntimeError, ValueError):
        return None
    return {"file": str(path), "epoch": payload.get("epoch", "-"), "store_key": payload.get("store_key", "-")}
