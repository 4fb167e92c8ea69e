"""GeneVocab: gene names (symbols, Ensembl IDs with or without version) → token ids.

The artifacts are built once by tokenizers/build_vocab.py from the GENCODE tables (human v48,
mouse M37) and shipped with the package; a checkpoint carries a copy, checked by SHA-256, so a
model is always read with the vocabulary it was trained with.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import re
import shutil
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from fm.paths import vocab_dir

CONFIG_FILE = "scfm_vocab.json"
"""The vocabulary's config (file names, hashes, special tokens) as an export writes it: not `tokenizer_config.json`,
which Hugging Face's AutoTokenizer takes for its own and then fails on with a confusing backend error."""
LEGACY_CONFIG_FILE = "tokenizer_config.json"
"""Its name in the shipped tokenizers/ artifacts and in exports written before the rename; still read."""
SPECIES = ("human", "mouse")
_SPECIES_ALIASES = {"human": "human", "homo_sapiens": "human", "homo sapiens": "human", "hsapiens": "human",
                    "mouse": "mouse", "mus_musculus": "mouse", "mus musculus": "mouse", "mmusculus": "mouse"}
# An Ensembl gene ID as files write it: ENSG / ENSMUSG / ENS<species>G + 11 digits, optional
# ".version", optional "_PAR_Y" (GENCODE <= v43 GTFs). Symbols such as ENSA, ENSAP2 or mouse
# Ensa lack the G + 11 digits, so they never match and stay symbols.
ENSEMBL_ID_RE = re.compile(r"^(ENS[A-Z]*G\d{11})(?:\.\d+)?(_PAR_Y)?$", re.IGNORECASE)


def tokens_sha256(tokens: Iterable[str]) -> str:
    """Identity of a vocabulary: SHA-256 of the token list joined by newlines (same as the build script)."""
    return hashlib.sha256("\n".join(tokens).encode("utf-8")).hexdigest()


def normalize_species(species: str) -> str:
    key = str(species).strip().lower()
    if key not in _SPECIES_ALIASES:
        raise ValueError(f"unknown species {species!r}; expected one of {SPECIES} (or None to auto-detect)")
    return _SPECIES_ALIASES[key]


class GeneVocab:
    """Token table (specials, then human genes, then mouse genes) plus per-species symbol maps.

    Read-only: the arrays are frozen because `GeneVocab.default()` is shared process-wide.
    """

    pad_id = 0
    cls_id = 1
    mask_id = 2
    eoc_id = 3
    unk_id = 4
    n_special = 16

    def __init__(self, table: pd.DataFrame, symbols: pd.DataFrame, config: dict, directory: Path):
        self.config = config
        self.directory = Path(directory)
        self.tokens = _frozen(table["token"].to_numpy(dtype=object))
        self.symbols = _frozen(table["symbol"].to_numpy(dtype=object))  # "" for specials and unnamed genes
        self.species = _frozen(table["species"].to_numpy(dtype=object))
        self.biotypes = _frozen(table["biotype"].to_numpy(dtype=object))
        self.sha256 = config["vocab_sha256"]
        self._symbol_table = symbols

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, directory: str | Path) -> "GeneVocab":
        """Read the artifacts from a directory (tokenizers/, fm/_vocab or a checkpoint), verifying hashes."""
        directory = Path(directory)
        config_path = directory / CONFIG_FILE
        if not config_path.is_file():
            config_path = directory / LEGACY_CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"{directory}: no {CONFIG_FILE} (or {LEGACY_CONFIG_FILE}); not a gene-vocabulary directory "
                                    "(build one with `python tokenizers/build_vocab.py`)")
        try:
            config = json.loads(config_path.read_text())
            table = _read_tsv_gz(directory, config, config["vocab_file"])
            symbols = _read_tsv_gz(directory, config, config["symbols_file"])
        except (KeyError, json.JSONDecodeError) as err:
            raise ValueError(f"{config_path}: malformed vocabulary config ({err!r})") from err
        if list(table.columns) != ["token_id", "token", "symbol", "species", "biotype"]:
            raise ValueError(f"{directory}: unexpected vocabulary columns {list(table.columns)}")
        if not np.array_equal(table["token_id"].astype(np.int64).to_numpy(), np.arange(len(table))):
            raise ValueError(f"{directory}: token ids are not 0..{len(table) - 1} in order")
        if tokens_sha256(table["token"]) != config["vocab_sha256"]:
            raise ValueError(f"{directory}: token list does not match vocab_sha256 in {CONFIG_FILE}; "
                             "the vocabulary files are mismatched or modified")
        for token, i in config["special_tokens"].items():
            if getattr(cls, token.strip("<>") + "_id", i) != i or table["token"].iat[i] != token:
                raise ValueError(f"{directory}: special token {token} is not at id {i}")
        return cls(table, symbols, config, directory)

    @classmethod
    def default(cls) -> "GeneVocab":
        """The shipped vocabulary, loaded once per process."""
        return _load_cached(str(vocab_dir().resolve()))

    def save(self, directory: str | Path) -> None:
        """Copy the artifact files (unchanged, so hashes still match) into e.g. a checkpoint directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = CONFIG_FILE if (self.directory / CONFIG_FILE).is_file() else LEGACY_CONFIG_FILE
        for name, out in ((self.config["vocab_file"],) * 2, (self.config["symbols_file"],) * 2, (config, CONFIG_FILE)):
            src, dst = self.directory / name, directory / out
            if not (dst.exists() and src.resolve() == dst.resolve()):
                shutil.copyfile(src, dst)
        legacy = directory / LEGACY_CONFIG_FILE  # an old export re-saved in place: leave no file AutoTokenizer trips on
        if legacy.is_file() and directory.resolve() != vocab_dir().resolve() and _is_vocab_config(legacy):
            legacy.unlink()

    # ------------------------------------------------------------------ lookup
    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        n = self.config.get("n_genes", {})
        return f"GeneVocab({len(self)} tokens: {n}, sha256={self.sha256[:12]}, from {self.directory})"

    def lookup(self, names, species: str | None = None) -> np.ndarray:
        """Token id per name (int64, -1 where unknown).

        Ensembl IDs (version suffix stripped) resolve in any species; everything else is a symbol
        of `species` (auto-detected when None): exact match first, then a case-insensitive match
        when unique within that species. `_PAR_Y` IDs give -1: since GENCODE v44 the Y copy has its
        own ID, and mapping it onto the X gene would put two columns on one token.
        """
        ids, sym_pos, sym, exact, counts = self._parse(names)
        species = self._choose(counts) if species is None else normalize_species(species)
        hit = exact[species]
        ids[sym_pos] = hit
        missing = hit < 0
        if missing.any():
            upper = sym[missing].str.upper()
            fallback = self._resolve(self._upper_index[species], upper)
            # a case-insensitive hit never takes a gene that another name matched exactly
            # (files holding both 'C1orf220' and 'C1ORF220' keep the exact one)
            exact_ids = ids[ids >= 0]
            fallback[np.isin(fallback, exact_ids)] = -1
            ids[sym_pos[missing]] = fallback
        return ids

    def detect_species(self, names) -> str:
        """The species with more exact symbol/ID matches among `names` (ties → human)."""
        return self._choose(self._parse(names)[4])

    def species_of(self, ids: np.ndarray) -> np.ndarray:
        """Species per token id ("" where -1)."""
        ids = np.asarray(ids)
        return np.where(ids >= 0, self.species[np.maximum(ids, 0)], "")

    # ------------------------------------------------------------------ internals
    def _parse(self, names):
        """Split names into IDs and symbols; exact hits per species and per-species match counts."""
        if isinstance(names, str):
            names = [names]
        s = pd.Series(np.asarray(names, dtype=object).ravel(), dtype=object)
        s = s.where(s.notna(), "").astype(str).str.strip()
        ids = np.full(len(s), -1, dtype=np.int64)
        # Boolean/str ops only: per-name match objects or tuples (.str.extract) trigger costly GC passes.
        is_id = s.str.match(ENSEMBL_ID_RE).to_numpy(dtype=bool)
        upper = s[is_id].str.upper()
        plain = ~upper.str.endswith("_PAR_Y")  # _PAR_Y stays -1 (see lookup)
        ids[np.flatnonzero(is_id)[plain.to_numpy()]] = self._resolve(
            self._id_index, upper[plain].str.replace(r"\.\d+$", "", regex=True))
        sym_pos = np.flatnonzero(~is_id)
        sym = s.iloc[sym_pos].reset_index(drop=True)
        exact = {sp: self._resolve(m, sym) for sp, m in self._symbol_index.items()}
        id_species = self.species[ids[ids >= 0]]
        counts = {sp: int((id_species == sp).sum() + (exact[sp] >= 0).sum()) for sp in SPECIES}
        return ids, sym_pos, sym, exact, counts

    @staticmethod
    def _choose(counts: dict) -> str:
        return "mouse" if counts["mouse"] > counts["human"] else "human"

    @staticmethod
    def _resolve(mapping: tuple[pd.Index, np.ndarray], keys: pd.Series) -> np.ndarray:
        index, values = mapping
        pos = index.get_indexer(keys)
        return np.where(pos >= 0, values[pos], -1).astype(np.int64)

    @functools.cached_property
    def _id_index(self) -> tuple[pd.Index, np.ndarray]:
        return pd.Index(self.tokens[self.n_special:]), np.arange(self.n_special, len(self), dtype=np.int64)


    @functools.cached_property
    def _symbol_index(self) -> dict[str, tuple[pd.Index, np.ndarray]]:
        out = {}
        for sp in SPECIES:
            rows = self._symbol_table[self._symbol_table["species"] == sp]
            token_ids = self._resolve(self._id_index, rows["ensembl_id"])
            if (token_ids < 0).any() or rows["symbol"].duplicated().any():
                raise ValueError(f"{self.directory}: symbol table is inconsistent with the vocabulary ({sp})")
            out[sp] = (pd.Index(rows["symbol"].to_numpy()), token_ids)
        return out


    @functools.cached_property
    def _upper_index(self) -> dict[str, tuple[pd.Index, np.ndarray]]:
        """Case-insensitive symbol maps, keeping only upper-cased keys that are unique in the species."""
        out = {}
        for sp, (index, token_ids) in self._symbol_index.items():
            upper = index.str.upper()
            unique = ~upper.duplicated(keep=False)
            out[sp] = (upper[unique], token_ids[unique])
        return out



def _is_vocab_config(path: Path) -> bool:
    """True for our vocabulary config saved as tokenizer_config.json by old exports (not Hugging Face's file)."""
    try:
        return "vocab_sha256" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _read_tsv_gz(directory: Path, config: dict, name: str) -> pd.DataFrame:
    """Read one gzipped TSV artifact, checking its uncompressed content against the config's hash."""
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: vocabulary file missing (named in {CONFIG_FILE})")
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: corrupt gzip file ({err}); rebuild or re-copy the vocabulary") from err
    expected = config.get("content_sha256", {}).get(name)
    if expected is None or hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(f"{path}: content does not match its SHA-256 in {CONFIG_FILE}; "
                         "the file is corrupt or from a different vocabulary build")
    # A plain split is ~6x faster than pd.read_csv here (all columns are strings; no quoting).
    lines = data.decode("utf-8").rstrip("\n").split("\n")
    header = lines[0].split("\t")
    flat = "\t".join(lines[1:]).split("\t") if len(lines) > 1 else []
    if len(flat) != (len(lines) - 1) * len(header):
        raise ValueError(f"{path}: malformed TSV (rows do not all have {len(header)} fields)")
    return pd.DataFrame(np.array(flat, dtype=object).reshape(-1, len(header)), columns=header)


@functools.lru_cache(maxsize=4)
def _load_cached(directory: str) -> GeneVocab:
    return GeneVocab.load(directory)
