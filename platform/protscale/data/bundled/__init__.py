"""Bundled demo and test data: real UniProtKB protein sequences (CC BY 4.0; see README.md here).

``MAIN``: 6,000 records (the first 6,000 of ``uniprot-go2014-part-00``, which start with ``sample-2k``);
``OOD``: 400 records from another shard (``uniprot-go2014-part-07``), the demo's OOD test source;
``EXTRA``: the next 3,000 records of ``uniprot-go2014-part-00`` (records 6,001-9,000): with ``MAIN``, the
~3M training tokens the CPU demo's IsoFLOP budgets need without repeating a sequence.
"""

from __future__ import annotations

from pathlib import Path

DIR = Path(__file__).resolve().parent
MAIN = DIR / "uniprot-sample-6k.fasta.gz"
OOD = DIR / "uniprot-ood-400.fasta.gz"
EXTRA = DIR / "uniprot-extra-3k.fasta.gz"
#: The demo dataset's training sources (``protscale data prepare --demo``, ``protscale demo``): weights in
#: proportion to the files' residues (2.1M, 1.08M), so the mix uses all of MAIN and nearly all of EXTRA.
DEMO_SOURCES = ((MAIN, 2.0), (EXTRA, 1.0))


def bundled_path(name: str) -> Path:
    """Path of a bundled file by name (``"uniprot-sample-6k.fasta.gz"``) or alias (``"main"``, ``"ood"``)."""
    aliases = {"main": MAIN, "ood": OOD, "extra": EXTRA}
    p = aliases.get(name, DIR / name)
    if not p.is_file() or p.parent != DIR:
        known = ", ".join(sorted(aliases) + sorted(f.name for f in DIR.glob("*.fasta.gz")))
        raise FileNotFoundError(f"no bundled file {name!r}; known: {known}")
    return p
