"""`mlx-mtp models`: the named pairs of models.toml, and what is already downloaded."""

from rich import box
from rich.console import Console
from rich.filesize import decimal
from rich.markup import escape
from rich.table import Table

from ..checkpoints import registry
from . import app, one_line_errors


@app.command()
@one_line_errors
def models():
    """The named pairs of models.toml: sizes, and what is already downloaded."""
    entries = list(registry.load_registry().values())
    default = registry.default_pair()
    table = Table(box=box.SIMPLE_HEAD)
    for name in ["alias", "target / drafter", "size", "downloaded"]:
        table.add_column(name, overflow="fold")
    for entry, (t, d) in zip(entries, registry.presence(entries)):
        alias = entry.alias + (" (default)" if default and entry.alias == default.alias else "")
        target = "built on first use" if entry.kind == registry.EMBEDDED else entry.target
        downloaded = {(True, True): "yes", (True, False): "target", (False, True): "drafter"}.get(
            (t.local, d.local), "no"
        )
        size = " + ".join(decimal(p.size) for p in (t, d) if p.size is not None) or "?"
        table.add_row(alias, f"{target}\n{entry.drafter}", size, downloaded)
        table.add_row("", f"[dim]{escape(entry.note)} (K={entry.draft_tokens})[/]", end_section=True)
    Console(highlight=False).print(table)
