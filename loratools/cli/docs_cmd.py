"""``loratools docs [SECTION]``: the reference documents the code and its messages cite."""

from __future__ import annotations

import click

from .errors import user_errors
from .render_inspect import echo_json


@click.command("docs")
@click.argument("number", required=False, metavar="[SECTION]")
@click.option("--doc", default="FORMATS", show_default=True, help="Which document (FORMATS, CHECK, FLUX, …).")
@click.option("--list", "as_list", is_flag=True, help="List the documents and the numbered sections of --doc.")
@click.option("--json", "as_json", is_flag=True, help="Print {doc, number, title, text} (or the list) as JSON.")
def docs_command(number: str | None, doc: str, as_list: bool, as_json: bool) -> None:
    """Print a reference document, or one section of it, as cited (`docs/FORMATS.md §5.6`).

    The documents state each fact the code relies on (key layouts, scale rules, each tool's
    quirks) with where it was checked; they are installed with the package.

    \b
    Examples:
      loratools docs 1.3                 kohya's scale rule (docs/FORMATS.md §1.3)
      loratools docs --list              every document and FORMATS' sections
      loratools docs --doc CHECK         what each UI loads
    """
    with user_errors():
        from ..report.docs import doc_names, doc_text, section, sections

        text = doc_text(doc)
        name = doc.upper().removesuffix(".MD")
        if as_list:
            listed = [(s.number, s.title) for s in sections(text)]
            if as_json:
                echo_json(
                    {"docs": doc_names(), "doc": name, "sections": [{"number": n, "title": t} for n, t in listed]}
                )
                return
            click.echo(f"documents: {', '.join(doc_names())}")
            for n, t in listed:
                click.echo(f"  §{n:<5} {t}")
            return
        if number is None:
            if as_json:
                echo_json({"doc": name, "number": None, "title": None, "text": text})
            else:
                click.echo(text, nl=False)
            return
        found = section(text, number, name)
        if as_json:
            echo_json({"doc": name, "number": found.number, "title": found.title, "text": found.text})
        else:
            click.echo(found.text, nl=False)
