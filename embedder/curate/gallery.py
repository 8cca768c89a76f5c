"""gallery.html: the top suspects of each question, one self-contained page.

Thumbnails (at most THUMB pixels a side, JPEG) are embedded as base64 data URLs, so the page
opens offline, from anywhere, with no files beside it. An image that cannot be read any more
shows its path in place of the picture.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from embedder.errors import BadImageError

THUMB = 96


def _thumbnail(path: Path) -> str | None:
    from PIL import Image

    from embedder.data.decode import load_rgb

    try:
        img = Image.fromarray(load_rgb(path).permute(1, 2, 0).numpy())
    except (BadImageError, OSError):
        return None
    img.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _card(row: int, cols: dict, files: list[Path], caption: str) -> str:
    src = _thumbnail(files[row])
    picture = f'<img src="{src}" alt="">' if src else '<div class="missing">unreadable</div>'
    return (f'<figure title="{html.escape(cols["path"][row])}">{picture}'
            f'<figcaption>{html.escape(caption)}<br><small>{html.escape(cols["path"][row])}</small>'
            "</figcaption></figure>")


def _section(title: str, note: str, cards: list[str]) -> str:
    body = "".join(cards) if cards else "<p>None found.</p>"
    return f"<section><h2>{html.escape(title)}</h2><p>{html.escape(note)}</p><div class='grid'>{body}</div></section>"


def write_gallery(out: Path, cols: dict, files: list[Path], summary: dict, top: int) -> Path:
    """Write the page: label issues, outliers, least unique rows, leaks, duplicate groups, representatives."""
    issues = np.flatnonzero(cols["label_issue"])
    issues = issues[np.argsort(cols["mistake_rank"][issues])][:top]
    sections = [_section("Likely label mistakes", "confident learning on out-of-fold probe probabilities; lowest "
                         "label_quality first", [_card(r, cols, files, f"{cols['given_label'][r]} → "
                                                  f"{cols['suggested_label'][r]} ({cols['label_quality'][r]:.2f})")
                                            for r in issues])]
    outliers = np.argsort(-cols["outlier_score"], kind="stable")[:top]
    sections.append(_section("Outliers", f"cosine distance to the {summary['outliers']['k']}-th neighbour",
                             [_card(r, cols, files, f"{cols['outlier_score'][r]:.3f}") for r in outliers]))
    common = np.argsort(cols["uniqueness"], kind="stable")[:top]
    sections.append(_section("Least unique", "uniqueness near 0: near copies nearby",
                             [_card(r, cols, files, f"{cols['uniqueness'][r]:.3f}") for r in common]))
    sections.append(_leak_section(cols, files, top))
    sections.append(_duplicate_section(cols, files, top))
    reps = np.flatnonzero(cols["representative"] == 1)[:top]
    sections.append(_section("Representatives", "per class, the row nearest the largest k-means centre",
                             [_card(r, cols, files, cols["given_label"][r]) for r in reps]))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>embedder curate</title><style>"
            "body{font-family:sans-serif;margin:1em}.grid{display:flex;flex-wrap:wrap;gap:8px}"
            "figure{margin:0;width:150px;font-size:11px;word-break:break-all}img{max-width:96px;max-height:96px}"
            ".pair{display:flex;gap:4px;border:1px solid #ccc;padding:4px}.missing{color:#a00}</style></head>"
            f"<body><h1>{html.escape(summary['cache'])}: {summary['rows']} rows</h1>{''.join(sections)}</body></html>")
    out.write_text(page, encoding="utf-8")
    return out


def _leak_section(cols: dict, files: list[Path], top: int) -> str:
    sim = np.nan_to_num(cols["leak_similarity"], nan=-2.0)
    leaked = [r for r in np.argsort(-sim, kind="stable") if cols["leak_row"][r] >= 0][:top]
    cards = []
    for r in leaked:
        caption = f"{cols['split'][r]} {sim[r]:.3f}"
        pair = _card(r, cols, files, caption) + _card(int(cols["leak_row"][r]), cols, files, "train")
        cards.append(f"<div class='pair'>{pair}</div>")
    return _section("Leaks between splits", "val/test rows and the train row they duplicate", cards)


def _duplicate_section(cols: dict, files: list[Path], top: int) -> str:
    group = cols["duplicate_group"]
    cards = []
    for g in range(min(top, int(group.max()) + 1 if len(group) else 0)):
        members = np.flatnonzero(group == g)
        cards.append("<div class='pair'>" + "".join(
            _card(r, cols, files, "keep" if cols["duplicate_keep"][r] else "drop") for r in members[:6]) + "</div>")
    return _section("Duplicate groups", "largest groups first; keep/drop as --keep suggests", cards)
