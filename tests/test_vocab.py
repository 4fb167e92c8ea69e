"""GeneVocab and tokenizers/build_vocab.py: layout, symbol/ID resolution, persistence, reproducibility."""
from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fm.paths import data_dir, h5ad_path, vocab_dir
from fm.vocab import CONFIG_FILE, LEGACY_CONFIG_FILE, GeneVocab, tokens_sha256

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "tokenizers" / "build_vocab.py"
ARTIFACTS = ("gene_vocab.tsv.gz", "gene_symbols.tsv.gz", LEGACY_CONFIG_FILE)  # the shipped names
TABLES = {"human": "genes_homo_sapiens.csv.gz", "mouse": "genes_mus_musculus.csv.gz"}


@pytest.fixture(scope="module")
def vocab() -> GeneVocab:
    return GeneVocab.default()


@pytest.fixture(scope="module")
def genes_dir() -> Path:
    path = data_dir() / "genes"
    if not (path / TABLES["human"]).is_file():
        pytest.skip(f"GENCODE tables not found in {path} (set FM_DATA_DIR to the shared data directory)")
    return path


@pytest.fixture(scope="module")
def gencode(genes_dir) -> dict[str, pd.DataFrame]:
    return {sp: pd.read_csv(genes_dir / f, header=None, names=["ensembl_id", "symbol", "version", "length", "biotype"],
                            dtype=str, keep_default_na=False) for sp, f in TABLES.items()}


def one(vocab: GeneVocab, name: str, species: str | None = None) -> int:
    return int(vocab.lookup([name], species=species)[0])


def token_of(vocab: GeneVocab, ensembl_id: str) -> int:
    hits = np.flatnonzero(vocab.tokens == ensembl_id)
    assert hits.size == 1, ensembl_id
    return int(hits[0])


# ---------------------------------------------------------------------------------- layout
def test_special_tokens_and_order(vocab):
    assert (vocab.pad_id, vocab.cls_id, vocab.mask_id, vocab.unk_id, vocab.n_special) == (0, 1, 2, 4, 16)
    assert list(vocab.tokens[:5]) == ["<pad>", "<cls>", "<mask>", "<eoc>", "<unk>"]
    assert list(vocab.tokens[5:16]) == [f"<unused{i}>" for i in range(5, 16)]
    assert (vocab.species[:16] == "special").all() and (vocab.symbols[:16] == "").all()
    n = vocab.config["n_genes"]
    assert len(vocab) == 16 + n["human"] + n["mouse"] == len(vocab.tokens) == len(vocab.symbols)
    human, mouse = vocab.tokens[16:16 + n["human"]], vocab.tokens[16 + n["human"]:]
    assert (vocab.species[16:16 + n["human"]] == "human").all() and (vocab.species[16 + n["human"]:] == "mouse").all()
    assert all(t.startswith("ENSG") for t in human) and all(t.startswith("ENSMUSG") for t in mouse)
    assert list(human) == sorted(human) and list(mouse) == sorted(mouse)  # deterministic: sorted by ID
    assert len(set(vocab.tokens)) == len(vocab)
    unnamed = token_of(vocab, "ENSG00000310577")  # GENCODE writes the ID as its "symbol": not a symbol
    assert vocab.symbols[unnamed] == "" and vocab.biotypes[unnamed] == "lncRNA"
    assert one(vocab, "ENSG00000310577.1") == unnamed
    assert vocab.sha256 == tokens_sha256(vocab.tokens) == vocab.config["vocab_sha256"]
    with pytest.raises(ValueError):
        vocab.tokens[0] = "x"  # shared via the cache: read-only


def test_artifacts_small_and_no_package():
    for name in ARTIFACTS:
        assert (REPO / "tokenizers" / name).stat().st_size < 5e6, name
    assert not (REPO / "tokenizers" / "__init__.py").exists(), "tokenizers/ must never be a package"


def test_hf_tokenizers_not_shadowed():
    """From the repo root, `import tokenizers` must still be Hugging Face's package."""
    code = "import tokenizers, transformers; print(tokenizers.__file__); assert hasattr(tokenizers, 'Tokenizer')"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert not out.stdout.strip().startswith(str(REPO / "tokenizers"))


def test_load_fast_and_cached():
    t = time.perf_counter()
    fresh = GeneVocab.load(vocab_dir())
    elapsed = time.perf_counter() - t
    assert elapsed < 1.0, f"loading took {elapsed:.2f}s (target < 0.5 s)"
    assert GeneVocab.default() is GeneVocab.default()
    assert fresh.sha256 == GeneVocab.default().sha256


# ---------------------------------------------------------------------------------- lookup
def test_duplicate_symbols_prefer_protein_coding(vocab, gencode):
    # Real duplicates where the protein-coding gene has the *higher* ID (so lowest-ID alone would be wrong).
    for species, symbol in [("human", "CAST"), ("human", "SIGLEC5"), ("mouse", "Cdhr17"), ("mouse", "Lrrc7")]:
        rows = gencode[species][gencode[species]["symbol"] == symbol]
        assert len(rows) > 1 and set(rows["biotype"]) - {"protein_coding"}, symbol
        tid = one(vocab, symbol, species)
        assert vocab.biotypes[tid] == "protein_coding" and vocab.symbols[tid] == symbol
    # Every duplicated symbol with a protein-coding candidate resolves to one.
    for species, table in gencode.items():
        named = table[table["symbol"] != table["ensembl_id"]]
        dup = named[named["symbol"].duplicated(keep=False)]
        with_pc = dup.groupby("symbol")["biotype"].apply(lambda b: (b == "protein_coding").any())
        syms = with_pc[with_pc].index.tolist()
        assert len(syms) > 10
        assert (vocab.biotypes[vocab.lookup(syms, species=species)] == "protein_coding").all()


def test_duplicate_symbol_ties(vocab):
    # PAR genes: the Y copy (own ID since GENCODE v44) shares the symbol; the lowest (X) ID wins.
    assert vocab.tokens[one(vocab, "CD99", "human")] == "ENSG00000002586"
    assert one(vocab, "ENSG00000292348") >= 16  # the Y copy stays reachable by ID
    # Split transcribed pseudogenes: the old pseudogene ID keeps the symbol, not the new lncRNA, so
    # symbol-keyed and ID-keyed files from older annotations agree.
    for symbol, old_id, species in [("WASH7P", "ENSG00000227232", "human"), ("A2MP1", "ENSG00000256069", "human"),
                                    ("1600029O15Rik", "ENSMUSG00000057818", "mouse")]:
        assert vocab.lookup([symbol, old_id], species=species).tolist() == [token_of(vocab, old_id)] * 2
        assert "pseudogene" in vocab.biotypes[token_of(vocab, old_id)]


def test_version_suffix_stripped(vocab):
    tp53 = token_of(vocab, "ENSG00000141510")
    assert vocab.symbols[tp53] == "TP53"
    names = ["ENSG00000141510.17", "ENSG00000141510", "TP53", "ensg00000141510.3"]
    assert vocab.lookup(names).tolist() == [tp53] * 4
    trp53 = token_of(vocab, "ENSMUSG00000059552")
    assert vocab.lookup(["ENSMUSG00000059552.14", "Trp53"], species="mouse").tolist() == [trp53, trp53]


def test_ens_prefixed_symbols_are_symbols(vocab):
    ids = vocab.lookup(["ENSA", "ENSAP2", "ENSAP1"], species="human")
    assert vocab.tokens[ids].tolist() == ["ENSG00000143420", "ENSG00000259032", "ENSG00000224274"]
    assert vocab.tokens[one(vocab, "Ensa", "mouse")] == "ENSMUSG00000038619"
    assert vocab.detect_species(["Ensa", "Xkr4"]) == "mouse"
    assert one(vocab, "ENSG0000014151") == -1  # 10 digits: neither an ID nor a symbol


def test_mouse_genes(vocab):
    ids = vocab.lookup(["Xkr4", "Trp53", "Gnai3", "mt-Co1", "ENSMUSG00000051951"])
    assert (ids >= 0).all() and (vocab.species[ids] == "mouse").all()
    assert ids[0] == ids[4] == token_of(vocab, "ENSMUSG00000051951")
    assert vocab.symbols[ids[:4]].tolist() == ["Xkr4", "Trp53", "Gnai3", "mt-Co1"]


def test_mixed_symbols_and_ids(vocab):
    names = ["TP53", "ENSG00000141510.17", "CD3E", "ENSMUSG00000051951.6", "MALAT1", "not-a-gene"]
    ids = vocab.lookup(names)
    assert vocab.detect_species(names) == "human"
    assert ids[0] == ids[1] and (ids[:5] >= 0).all() and ids[5] == -1
    assert vocab.species[ids[3]] == "mouse"  # IDs resolve whatever the detected species
    assert vocab.lookup(names, species="mouse")[[1, 3]].tolist() == ids[[1, 3]].tolist()


def test_unknown_names(vocab):
    names = ["", None, float("nan"), "NOT_A_GENE", "ENSG99999999999", "<pad>", "<cls>", "ENSG00000002586.20_PAR_Y"]
    ids = vocab.lookup(names)
    assert ids.dtype == np.int64 and ids.tolist() == [-1] * len(names)
    assert vocab.lookup([]).shape == (0,)


def test_case_insensitive_fallback_within_species(vocab):
    assert one(vocab, "tp53") == one(vocab, "TP53")
    assert one(vocab, "TRP53", "mouse") == one(vocab, "Trp53", "mouse")
    assert vocab.species[one(vocab, "CD99", "mouse")] == "mouse"  # Cd99, the mouse gene
    assert one(vocab, "TP53", "mouse") == -1  # no mouse "Tp53"; never falls back to human
    assert one(vocab, "Xkr4", "human") == vocab.lookup(["XKR4"])[0]  # human XKR4 via case-insensitivity


def test_species_argument(vocab):
    assert vocab.lookup(["TP53"], species="homo_sapiens")[0] == vocab.lookup(["TP53"], species="human")[0]
    with pytest.raises(ValueError, match="unknown species"):
        vocab.lookup(["TP53"], species="zebrafish")


def test_detect_species(vocab):
    assert vocab.detect_species(["Xkr4", "Trp53", "TP53"]) == "mouse"
    assert vocab.detect_species(["ENSMUSG00000051951", "ENSMUSG00000059552"]) == "mouse"
    assert vocab.detect_species(["TP53", "Xkr4"]) == "human"  # tie → human
    assert vocab.detect_species(["nothing", "here"]) == "human"


@pytest.mark.parametrize("name,species,min_fraction", [
    ("pbmc3k_seurat_hvg2000_labeled.h5ad", "human", 0.85),        # 0.896: old RP11-/C1orf names unmatched
    ("spatial_starmap_cortex_930c_labeled.h5ad", "mouse", 0.98),  # 0.996
    ("cellbench_3cl_celseq2_dropseq.h5ad", "human", 0.98),        # Ensembl IDs, 0.992
])
def test_real_var_names(vocab, name, species, min_fraction):
    anndata = pytest.importorskip("anndata")
    path = h5ad_path(name)
    if not path.is_file():
        pytest.skip(f"{path} not found (set FM_DATA_DIR to the shared data directory)")
    adata = anndata.read_h5ad(path, backed="r")
    names = adata.var_names.to_numpy()
    adata.file.close()
    assert vocab.detect_species(names) == species
    t = time.perf_counter()
    ids = vocab.lookup(names)
    elapsed = time.perf_counter() - t
    fraction = float((ids >= 0).mean())
    print(f"{name}: {species}, matched {fraction:.3f} of {len(names)} in {elapsed * 1e3:.0f} ms")
    assert fraction >= min_fraction
    assert (vocab.species[ids[ids >= 0]] == species).all()


def test_lookup_fast(vocab):
    names = np.concatenate([vocab.symbols[16:20016], vocab.tokens[40000:56000]]).astype(object)
    vocab.lookup(names[:10])
    t = time.perf_counter()
    ids = vocab.lookup(names, species="human")
    assert time.perf_counter() - t < 0.5
    assert (ids[20000:] == np.arange(40000, 56000)).all()


# ---------------------------------------------------------------------------------- persistence
def test_save_load_roundtrip(vocab, tmp_path):
    vocab.save(tmp_path)
    for name in ARTIFACTS:  # copied unchanged; the config under the export's name
        saved = CONFIG_FILE if name == LEGACY_CONFIG_FILE else name
        assert (tmp_path / saved).read_bytes() == (vocab.directory / name).read_bytes()
    loaded = GeneVocab.load(tmp_path)
    assert loaded.sha256 == vocab.sha256 and (loaded.tokens == vocab.tokens).all()
    names = ["TP53", "Xkr4", "ENSG00000141510.2", "nope"]
    assert (loaded.lookup(names) == vocab.lookup(names)).all()
    loaded.save(tmp_path)  # saving onto itself is a no-op
    GeneVocab.load(tmp_path)


def _copy(vocab, tmp_path) -> Path:
    vocab.save(tmp_path)
    return tmp_path


def test_corrupt_gzip_is_a_clear_error(vocab, tmp_path):
    path = _copy(vocab, tmp_path) / "gene_vocab.tsv.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt"):
        GeneVocab.load(tmp_path)


def test_modified_content_is_a_clear_error(vocab, tmp_path):
    directory = _copy(vocab, tmp_path)
    path = directory / "gene_symbols.tsv.gz"
    text = gzip.decompress(path.read_bytes()).decode().replace("\tTP53\t", "\tTP53X\t")
    path.write_bytes(gzip.compress(text.encode()))
    with pytest.raises(ValueError, match="SHA-256"):
        GeneVocab.load(directory)


def test_mismatched_vocab_hash_is_a_clear_error(vocab, tmp_path):
    config_path = _copy(vocab, tmp_path) / CONFIG_FILE
    config = json.loads(config_path.read_text())
    config["vocab_sha256"] = "0" * 64
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="vocab_sha256"):
        GeneVocab.load(tmp_path)


def test_missing_files_are_clear_errors(vocab, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        GeneVocab.load(tmp_path)
    (_copy(vocab, tmp_path) / "gene_symbols.tsv.gz").unlink()
    with pytest.raises(FileNotFoundError, match="gene_symbols"):
        GeneVocab.load(tmp_path)


# ---------------------------------------------------------------------------------- build script
def test_build_is_reproducible(genes_dir, tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    procs = [subprocess.Popen([sys.executable, str(BUILD), "--genes-dir", str(genes_dir), "--output", str(o)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for o in outs]
    results = [p.communicate() + (p.returncode,) for p in procs]
    for stdout, stderr, rc in results:
        assert rc == 0, stderr
        assert "duplicate symbols" in stdout
    committed = REPO / "tokenizers"
    for name in ARTIFACTS:
        a, b = (outs[0] / name).read_bytes(), (outs[1] / name).read_bytes()
        assert a == b, f"{name} differs between two builds"
        ref = (committed / name).read_bytes()
        if name.endswith(".gz"):  # compressed bytes may differ across zlib builds; content must not
            a, ref = gzip.decompress(a), gzip.decompress(ref)
        assert a == ref, f"{name}: rebuilt artifact differs from the committed one; rerun build_vocab.py"
    config = json.loads((outs[0] / LEGACY_CONFIG_FILE).read_text())
    assert config["sources"] == {"human": "GENCODE v48", "mouse": "GENCODE M37"}
    assert set(config["source_sha256"]) == set(TABLES.values())
    shutil.rmtree(tmp_path)


def test_case_fallback_never_steals_an_exact_match():
    from fm.vocab import GeneVocab

    vocab = GeneVocab.default()
    ids = vocab.lookup(["TP53", "tp53", "Gapdh"], species="human")
    assert ids[0] >= 0 and ids[1] == -1, "the exact symbol keeps the gene"
    assert ids[2] == vocab.lookup(["GAPDH"], species="human")[0], "a lone case variant still matches"
