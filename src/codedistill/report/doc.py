"""A report as a list of blocks, rendered to Markdown and to one self-contained HTML page.

Both renderers read the same blocks, so the Markdown and the HTML always show the same
numbers. The HTML page needs nothing from outside: the CSS is inline, plots are embedded
as base64 PNG data URIs, and there is no script.
"""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Heading:
    text: str
    level: int = 2
    anchor: str | None = None


@dataclass
class Para:
    text: str
    kind: str = ""  # "" | "note" | "ok" | "caution" (amber box) | "warn" (amber, "Warning:" in Markdown)


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""
    name: str = ""  # data-table attribute in the HTML (tests and readers find tables by it)
    nowrap: tuple[int, ...] = ()  # columns whose text cells are kept on one line


@dataclass
class Figure:
    path: Path
    caption: str


Block = Heading | Para | Bullets | Table | Figure


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> Document:
        self.blocks.extend(blocks)
        return self


# ----------------------------------------------------------------------------- Markdown


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def to_markdown(doc: Document, base: Path) -> str:
    """Markdown; figures are linked relative to ``base`` (the folder report.md goes into)."""
    L = [f"# {doc.title}", ""]
    for b in doc.blocks:
        if isinstance(b, Heading):
            L += ["#" * min(6, b.level) + " " + b.text, ""]
        elif isinstance(b, Para):
            prefix = {"warn": "**Warning:** ", "note": "> ", "caution": "> ", "ok": "> "}.get(b.kind, "")
            L += [prefix + b.text, ""]
        elif isinstance(b, Bullets):
            L += [f"- {x}" for x in b.items] + [""]
        elif isinstance(b, Table):
            if b.caption:
                L += [f"*{b.caption}*", ""]
            L.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
            L.append("|" + "---|" * len(b.headers))
            for r in b.rows:
                L.append("| " + " | ".join(_md_cell(c) for c in r) + " |")
            L.append("")
        elif isinstance(b, Figure):
            rel = Path(os.path.relpath(b.path, base)).as_posix()
            L += [f"![{b.caption}]({rel})", "", f"*{b.caption}*", ""]
    return "\n".join(L).rstrip() + "\n"


# ----------------------------------------------------------------------------- HTML

CSS = """
:root { --fg:#1d2430; --muted:#5b6575; --line:#d8dde5; --head:#eef2f7; --accent:#1f5fa8;
        --warn:#8a4b00; --warnbg:#fff4e0; --okbg:#e8f5ec; --ok:#1f6b35; --notebg:#f3f6fa; }
* { box-sizing: border-box; }
body { font: 15px/1.5 -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif;
       color: var(--fg); background: #ffffff; margin: 0; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 26px; margin: 8px 0 16px; border-bottom: 3px solid var(--accent); padding-bottom: 8px; }
h2 { font-size: 21px; margin: 32px 0 10px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 17px; margin: 22px 0 8px; }
h4 { font-size: 15px; margin: 18px 0 6px; color: var(--muted); }
p { margin: 8px 0; }
ul { margin: 6px 0 10px 0; padding-left: 22px; }
code { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 13px; background: #f2f4f7;
       padding: 1px 4px; border-radius: 3px; }
.note { background: var(--notebg); border-left: 4px solid var(--accent); padding: 8px 12px; }
.warn, .caution { background: var(--warnbg); border-left: 4px solid var(--warn); color: var(--warn);
                  padding: 8px 12px; }
.ok { background: var(--okbg); border-left: 4px solid var(--ok); color: var(--ok); padding: 8px 12px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
div.scroll { overflow-x: auto; max-width: 100%; }
p.caption { color: var(--muted); font-size: 13px; margin: 14px 0 2px; }
p.caption + div.scroll table { margin-top: 2px; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: var(--head); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.nowrap { white-space: nowrap; }
tr:nth-child(even) td { background: #fafbfc; }
figure { margin: 12px 0 22px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
nav.toc { background: var(--notebg); padding: 8px 14px; margin-bottom: 18px; font-size: 14px; }
nav.toc a { color: var(--accent); text-decoration: none; margin-right: 14px; }
footer { color: var(--muted); font-size: 12px; margin-top: 40px; border-top: 1px solid var(--line); padding-top: 8px; }
"""

_NUMERIC_START = set("+-0123456789.")


def _is_num(s: str) -> bool:
    """A number, with or without its CI, unit or sign ("0.618 [0.530, 0.702]", "+0.02", "12%",
    "1e-3", "5.2 s"), not text that starts with one ("3 beams per problem")."""
    s = str(s).strip()
    letters = sum(ch.isalpha() for ch in s)
    return bool(s) and (s[0] in _NUMERIC_START or s.endswith("%")) and any(ch.isdigit() for ch in s) and letters <= 3


def _img_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _slug(text: str, used: set[str]) -> str:
    s = "".join(ch.lower() if ch.isalnum() else "-" for ch in text).strip("-")
    s = "-".join(x for x in s.split("-") if x)[:60] or "section"
    base, i = s, 2
    while s in used:
        s, i = f"{base}-{i}", i + 1
    used.add(s)
    return s


def to_html(doc: Document, footer: str = "") -> str:
    """One self-contained page: inline CSS, images as data URIs, no scripts, no links out."""
    e = html.escape
    used: set[str] = set()
    body: list[str] = []
    toc: list[tuple[str, str]] = []
    for b in doc.blocks:
        if isinstance(b, Heading):
            anchor = b.anchor or _slug(b.text, used)
            if b.level == 2:
                toc.append((anchor, b.text))
            lvl = max(2, min(6, b.level))
            body.append(f'<h{lvl} id="{e(anchor)}">{e(b.text)}</h{lvl}>')
        elif isinstance(b, Para):
            cls = f' class="{b.kind}"' if b.kind else ""
            body.append(f"<p{cls}>{e(b.text)}</p>")
        elif isinstance(b, Bullets):
            body.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in b.items) + "</ul>")
        elif isinstance(b, Table):
            name = f' data-table="{e(b.name)}"' if b.name else ""
            parts = [f'<p class="caption">{e(b.caption)}</p>'] if b.caption else []
            parts.append(f'<div class="scroll"><table{name}>')
            parts.append("<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in b.headers) + "</tr></thead><tbody>")
            for r in b.rows:
                cells = []
                for i, c in enumerate(r):
                    cls = "num" if _is_num(c) else ("nowrap" if i in b.nowrap else "")
                    cells.append(f'<td class="{cls}">{e(str(c))}</td>' if cls else f"<td>{e(str(c))}</td>")
                parts.append("<tr>" + "".join(cells) + "</tr>")
            parts.append("</tbody></table></div>")
            body.append("".join(parts))
        elif isinstance(b, Figure):
            body.append(
                f'<figure><img alt="{e(b.caption)}" src="{_img_data_uri(b.path)}">'
                f"<figcaption>{e(b.caption)}</figcaption></figure>"
            )
    nav = ""
    if len(toc) > 1:
        nav = '<nav class="toc">' + "".join(f'<a href="#{e(a)}">{e(t)}</a>' for a, t in toc) + "</nav>"
    foot = f"<footer>{e(footer)}</footer>" if footer else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{e(doc.title)}</title>'
        f"<style>{CSS}</style></head><body><main><h1>{e(doc.title)}</h1>{nav}"
        + "\n".join(body)
        + foot
        + "</main></body></html>\n"
    )
