#!/usr/bin/env python
"""Build the gene-vocabulary artifacts in tokenizers/ from the GENCODE gene tables.

    python tokenizers/build_vocab.py [--genes-dir DIR] [--output DIR]

Inputs (rows `ensembl_id, symbol, version, length, biotype`, no header): GENCODE v48 (human)
and M37 (mouse), the tables CELLxGENE uses. Default input: $FM_DATA_DIR/genes, else
../shared/data/genes beside the repository root. Outputs (default: this folder):

- gene_vocab.tsv.gz      token_id, token, symbol, species, biotype — one row per token.
                         Ids 0..15 are special tokens (5 used, 11 `<unusedN>` kept free so gene ids
                         never shift when a special is added); then human genes, then mouse genes,
                         each sorted by Ensembl ID (version-less). `symbol` is "" for unnamed genes
                         (the tables write their Ensembl ID as the symbol: not a symbol).
- gene_symbols.tsv.gz    species, symbol, ensembl_id — one Ensembl ID per named symbol.
- tokenizer_config.json  file names, special-token ids, sources, input hashes, vocab hash.

Duplicate symbols resolve to the protein_coding gene, then to the lowest Ensembl ID. Most
duplicates (v48: 373 of 483 human, M37: 218 of 311 mouse) are recent splits of a transcribed
pseudogene: the old pseudogene ID (e.g. WASH7P = ENSG00000227232, version 6) keeps its name and a
new version-1 lncRNA gene reuses it (ENSG00000310526). The lowest ID is the older gene the symbol
has long named, so a symbol-keyed file and an ID-keyed file from an older annotation land on the
same token; "lncRNA before pseudogene" would split them. Other ties: the PAR genes (since GENCODE
v44 the Y copy of CD99 has its own ID, ENSG00000292348) resolve to the X copy; generic names
(Y_RNA: 758 genes) to an arbitrary but fixed one. Duplicate Ensembl IDs (none in v48/M37; older
tables list PAR_Y copies as `ID_PAR_Y`) are handled deterministically too: PAR_Y rows are dropped
(the version-less ID names the X copy) and exact repeats keep the same-ranked row.

Output is byte-reproducible: fixed row order, "\\n" line ends, gzip with mtime=0 and no file name.
The config stores the SHA-256 of each artifact's *uncompressed* text, so it does not depend on
the zlib build, plus `vocab_sha256` = SHA-256 of the token list joined by "\\n" — the identity a
checkpoint records. This script is standalone (pandas only) so it runs without installing fm.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
VOCAB_FILE = "gene_vocab.tsv.gz"
SYMBOLS_FILE = "gene_symbols.tsv.gz"
CONFIG_FILE = "tokenizer_config.json"
N_SPECIAL = 16
SPECIALS = ["<pad>", "<cls>", "<mask>", "<eoc>", "<unk>"] + [f"<unused{i}>" for i in range(5, N_SPECIAL)]
# species, table file, source release, Ensembl gene-ID prefix every row must carry
SPECIES = [
    ("human", "genes_homo_sapiens.csv.gz", "GENCODE v48", "ENSG"),
    ("mouse", "genes_mus_musculus.csv.gz", "GENCODE M37", "ENSMUSG"),
]
ID_PATTERN = r"^ENS[A-Z]*G\d{11}$"


def biotype_rank(biotype: pd.Series) -> pd.Series:
    """0 for protein_coding, else 1: preferred first when one symbol names several genes."""
    return (biotype != "protein_coding").astype(int)


def default_genes_dir() -> Path:
    env = os.environ.get("FM_DATA_DIR")
    base = Path(env).expanduser() if env else REPO_ROOT / ".." / "shared" / "data"
    return (base / "genes").resolve()


def read_table(path: Path, species: str, prefix: str) -> tuple[pd.DataFrame, dict]:
    """One species' table, version-less unique IDs sorted; returns (table, counts of what was dropped)."""
    df = pd.read_csv(path, header=None, names=["ensembl_id", "symbol", "version", "length", "biotype"],
                     dtype=str, keep_default_na=False, na_filter=False)
    df["ensembl_id"] = df["ensembl_id"].str.strip().str.replace(r"\.\d+(?=(?:_PAR_Y)?$)", "", regex=True)  # version, if present
    par_y = df["ensembl_id"].str.endswith("_PAR_Y")
    df = df[~par_y].copy()
    bad = df[~df["ensembl_id"].str.match(ID_PATTERN) | ~df["ensembl_id"].str.startswith(prefix + "0")]
    if len(bad):
        raise ValueError(f"{path}: {len(bad)} rows whose ID is not a {species} Ensembl gene ID, "
                         f"e.g. {bad['ensembl_id'].head(3).tolist()}")
    for col in ("symbol", "biotype"):
        if df[col].str.contains(r"[\t\n\r]").any() or (df[col] == "").any():
            raise ValueError(f"{path}: empty {col} or {col} with tabs/newlines")
    df["rank"] = biotype_rank(df["biotype"])
    df = df.sort_values(["ensembl_id", "rank", "symbol"], kind="mergesort")
    dup_id = df["ensembl_id"].duplicated()
    df = df[~dup_id].reset_index(drop=True)
    df["species"] = species
    return df, {"par_y_rows_dropped": int(par_y.sum()), "duplicate_id_rows_dropped": int(dup_id.sum())}


def resolve_symbols(df: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """symbol → one Ensembl ID; unnamed genes (symbol == ID) are not symbols and are left out."""
    named = df[df["symbol"] != df["ensembl_id"]]
    counts = named.groupby("symbol").size()
    dup = counts[counts > 1]
    best = named.sort_values(["symbol", "rank", "ensembl_id"], kind="mergesort").drop_duplicates("symbol")
    stats = {"named_genes": len(named), "unnamed_genes": len(df) - len(named), "symbols": len(best),
             "duplicate_symbols": len(dup), "genes_behind_duplicate_symbols": int(dup.sum()),
             "duplicate_symbols_resolved_to_protein_coding":
                 int(best[best["symbol"].isin(dup.index)]["biotype"].eq("protein_coding").sum())}
    return best[["species", "symbol", "ensembl_id"]], stats


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tsv_text(frame: pd.DataFrame) -> str:
    lines = ["\t".join(frame.columns)]
    lines += ["\t".join(map(str, row)) for row in frame.itertuples(index=False, name=None)]
    return "\n".join(lines) + "\n"


def write_gz(path: Path, text: str) -> str:
    """Write gzip with a fixed header (mtime=0, no name); returns the SHA-256 of the plain text."""
    data = text.encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    path.write_bytes(buf.getvalue())
    return hashlib.sha256(data).hexdigest()


def build(genes_dir: Path, output: Path) -> dict:
    output.mkdir(parents=True, exist_ok=True)
    tables, symbol_tables, report = [], [], {}
    for species, fname, _, prefix in SPECIES:
        path = genes_dir / fname
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; pass --genes-dir or set FM_DATA_DIR")
        df, dropped = read_table(path, species, prefix)
        syms, stats = resolve_symbols(df)
        tables.append(df)
        symbol_tables.append(syms)
        report[species] = {"genes": len(df), **dropped, **stats}

    specials = pd.DataFrame({"token": SPECIALS, "symbol": "", "species": "special", "biotype": ""})
    genes = pd.concat(tables, ignore_index=True).rename(columns={"ensembl_id": "token"})
    genes.loc[genes["symbol"] == genes["token"], "symbol"] = ""  # unnamed gene
    vocab = pd.concat([specials, genes[["token", "symbol", "species", "biotype"]]], ignore_index=True)
    vocab.insert(0, "token_id", range(len(vocab)))
    if vocab["token"].duplicated().any():
        raise ValueError("duplicate tokens across species")
    symbols = pd.concat(symbol_tables, ignore_index=True)

    tokens = vocab["token"].tolist()
    config = {
        "vocab_file": VOCAB_FILE,
        "symbols_file": SYMBOLS_FILE,
        "special_tokens": {tok: i for i, tok in enumerate(SPECIALS[:5])},
        "n_special": N_SPECIAL,
        "sources": {species: release for species, _, release, _ in SPECIES},
        "source_sha256": {fname: sha256_file(genes_dir / fname) for _, fname, _, _ in SPECIES},
        "vocab_sha256": hashlib.sha256("\n".join(tokens).encode("utf-8")).hexdigest(),
        "content_sha256": {
            VOCAB_FILE: write_gz(output / VOCAB_FILE, tsv_text(vocab)),
            SYMBOLS_FILE: write_gz(output / SYMBOLS_FILE, tsv_text(symbols)),
        },
        "n_genes": {species: report[species]["genes"] for species, *_ in SPECIES},
        "n_tokens": len(vocab),
    }
    (output / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--genes-dir", type=Path, default=None,
                        help="folder with the GENCODE tables (default: $FM_DATA_DIR/genes or ../shared/data/genes); "
                             "a data dir holding genes/ also works")
    parser.add_argument("--output", type=Path, default=HERE, help="where to write the artifacts (default: tokenizers/)")
    args = parser.parse_args(argv)
    genes_dir = args.genes_dir.expanduser().resolve() if args.genes_dir else default_genes_dir()
    if not (genes_dir / SPECIES[0][1]).is_file() and (genes_dir / "genes" / SPECIES[0][1]).is_file():
        genes_dir = genes_dir / "genes"
    report = build(genes_dir, args.output)
    for species, r in report.items():
        print(f"{species}: {r['genes']} genes ({r['unnamed_genes']} unnamed: symbol = Ensembl ID), "
              f"{r['symbols']} symbols; {r['duplicate_symbols']} duplicate symbols covering "
              f"{r['genes_behind_duplicate_symbols']} genes ({r['duplicate_symbols_resolved_to_protein_coding']} "
              f"resolved to protein_coding); dropped {r['duplicate_id_rows_dropped']} duplicate-ID rows, "
              f"{r['par_y_rows_dropped']} PAR_Y rows")
    for name in (VOCAB_FILE, SYMBOLS_FILE, CONFIG_FILE):
        print(f"wrote {args.output / name} ({(args.output / name).stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
