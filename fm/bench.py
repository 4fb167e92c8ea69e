"""`fm bench`: per-token speed of the model at a named size on real (or generated) cells, optionally against
scGPT's own `TransformerModel` on the same cells and the same weights.

What is measured (every timing: interleaved repetitions in one process, median reported):

- embed cells/s: `fm.embed` end to end (tokenise, collate, forward, write obsm), batch `--batch-size`;
- training tokens/s: forward + backward + grad-norm clip + AdamW of `ScFMForMaskedExpression` on batches
  pre-collated by the training `CellCollator` (real tokens = attention_mask sum: gene tokens, no padding);
- collator cells/s: the training and the inference `CellCollator` over the tokenised cells;
- peak RSS of the process (ru_maxrss, so it includes model building and every measurement);
- achieved GFLOP/s counting real-token FLOPs only (`real_flops`), against the machine's fp32 matmul peak
  measured here (a large square fp32 matmul), and the bf16 peak when the hardware has native bf16
  (CUDA bf16, or a CPU with avx512_bf16 / amx_bf16; on an AVX2-only CPU bf16 is emulated and slow: skipped).

The model is scGPT's architecture (`SCGPT_ARCHITECTURE`: Post-LN, ReLU, continuous value encoder) at the
chosen size, written once as a scGPT-format checkpoint (args.json, vocab.json, best_model.pt) of random
weights over the data's genes, then loaded by our importer (`fm.load` → `fm.convert.scgpt`) and, with
`--vs-scgpt SRC`, by scGPT's own model class: both compute the same function, which is checked on the first
batch (max |difference| of the L2-normalised <cls> embeddings).

scGPT's code is imported from the user's checkout (`SRC/scgpt/model/model.py` and its two sibling modules)
as a package-less module set: `scgpt/__init__.py`, which imports scanpy, wandb-era trainers and more, never
runs. Its embedding glue (`scgpt/tasks/cell_emb.py: get_batch_cell_embeddings`) imports scgpt's package
root (via `..data_collator` → `scgpt.preprocess` → `from scgpt import logger`), so that glue is reimplemented
here line for line: dense X, per-cell nonzero genes, <cls> first with pad_value, per-cell binning
(`fm.binning.scgpt_binning_reference`, scGPT's algorithm), pad to the batch's longest cell, `model._encode`
under `torch.no_grad`, <cls> row, L2 normalisation. Collation runs in the main process (scGPT uses DataLoader
workers; on a 2-core machine they would compete with the model's threads).

    fm bench --size whole-human --vs-scgpt /path/to/scGPT --cells 64
"""
from __future__ import annotations

import contextlib
import importlib
import json
import resource
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

SIZES = {  # d_model, n_layers, n_heads, d_ff
    "debug": (64, 2, 4, 128),  # recipes/pretrain/debug.yaml
    "small": (64, 2, 4, 128),  # recipes/pretrain/small.yaml
    "base": (512, 12, 8, 2048),  # recipes/pretrain/base.yaml
    "whole-human": (512, 12, 8, 512),  # scGPT's whole-human args.json: embsize 512, nlayers 12, nheads 8, d_hid 512
}
DEFAULT_FILE = "kang2018_muscat_1556c_labeled.h5ad"  # the reference cells (first 64, file order)
SPECIALS = ["<pad>", "<cls>", "<eoc>"]


# ------------------------------------------------------------------------------------------- FLOPs
def real_flops(lengths, d_model: int, n_layers: int, d_ff: int) -> float:
    """Forward FLOPs of the transformer blocks over real tokens only (padding costs time, not credit).

    Per layer, for a cell of n real tokens (its genes + the <cls>/condition prefix), multiply-add = 2 FLOPs:
      q, k, v projection       2·n·d·3d  = 6·n·d²
      attention scores QKᵀ     2·n·n·d   (every head together: H·(n·n·d/H))
      attention · V            2·n·n·d
      output projection        2·n·d·d   = 2·n·d²
      MLP (d → d_ff → d)       2·n·d·d_ff·2 = 4·n·d·d_ff
    = 8·n·d² + 4·n·d·d_ff + 4·n²·d. LayerNorms, activations, softmax, the embedding and the heads are not
    counted (O(n·d), a few % at d 512). A training step counts 3× the forward (backward = 2× forward).
    """
    n = np.asarray(lengths, dtype=np.float64)
    d = float(d_model)
    return float(n_layers * (8 * n * d * d + 4 * n * d * d_ff + 4 * n * n * d).sum())


def bf16_native() -> bool:
    """bf16 matmuls run in hardware: CUDA with bf16, or a CPU advertising avx512_bf16 / amx_bf16."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    with contextlib.suppress(OSError):
        flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def matmul_peak(device: str, dtype: torch.dtype, n: int = 4096, reps: int = 5) -> float:
    """Measured matmul GFLOP/s: best of `reps` (n × n) @ (n × n) products (the peak this machine reaches now)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


# ------------------------------------------------------------------------------------------- data, model
def load_cells(path: str | None, n_cells: int, min_genes: int):
    """(label, AnnData) of the first n_cells cells (file order) with >= min_genes expressed genes."""
    import anndata as ad
    import scipy.sparse as sp

    from fm.paths import data_dir

    if path is None and (data_dir() / "h5ad" / DEFAULT_FILE).is_file():
        path = str(data_dir() / "h5ad" / DEFAULT_FILE)
    if path is None:
        from fm.synthetic import synthetic_anndata

        print(f"note: {DEFAULT_FILE} not in {data_dir() / 'h5ad'}; using fm.synthetic.synthetic_anndata")
        adata, label = synthetic_anndata(n_cells=max(4 * n_cells, 256), n_genes=2000), "synthetic-2000g"
    else:
        adata, label = ad.read_h5ad(path), Path(path).name
    X = adata.X
    nnz = np.diff(X.indptr) if sp.issparse(X) and X.format == "csr" else np.asarray((X != 0).sum(1)).ravel()
    rows = np.flatnonzero(nnz >= min_genes)[:n_cells]
    if len(rows) == 0:
        raise ValueError(f"{label}: no cell has >= {min_genes} expressed genes")
    adata = adata[rows].copy()
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    return label, adata


def write_checkpoint(adata, size: str, out: Path, max_genes: int, dropout: float, seed: int) -> Path:
    """A scGPT-format checkpoint (args.json, vocab.json, best_model.pt) of random weights over adata's genes,
    at the named size; built as our model (importer's config) and exported with `fm convert --to scgpt`."""
    from fm.convert.common import map_gene_names
    from fm.convert.scgpt import export_scgpt, scgpt_config
    from fm.export import save_export
    from fm.modeling_scfm import ScFMForMaskedExpression
    from fm.tokenizer import CellTokenizer

    d_model, n_layers, n_heads, d_ff = SIZES[size]
    args = dict(embsize=d_model, nheads=n_heads, d_hid=d_ff, nlayers=n_layers, n_layers_cls=3, dropout=dropout,
                pad_token="<pad>", pad_value=-2, mask_value=-1, input_emb_style="continuous", n_bins=51,
                max_seq_len=max_genes + 1)
    tokens = list(dict.fromkeys(map(str, adata.var_names))) + SPECIALS
    mapping = map_gene_names(tokens)
    config = scgpt_config(args, mapping, out)
    torch.manual_seed(seed)
    model = ScFMForMaskedExpression(config)
    tokenizer = CellTokenizer(n_bins=config.n_bins, gene_table=config.gene_table, model_genes=mapping.model_genes)
    save_export(model, tokenizer, out / "scfm", source="randomly initialised scGPT-shaped benchmark model (bench)")
    (out / "scfm" / "scgpt_args.json").write_text(json.dumps(args))
    return export_scgpt(out / "scfm", out / "scgpt")


def import_scgpt_model(src: str | Path):
    """scGPT's `scgpt/model/model.py` from a checkout, without `scgpt/__init__.py`: the module object."""
    src = Path(src)
    folder = next((p for p in (src / "scgpt" / "model", src / "model", src) if (p / "model.py").is_file()), None)
    if folder is None:
        raise FileNotFoundError(f"{src}: no scgpt/model/model.py (pass the scGPT source checkout)")
    name = "_fm_bench_scgpt_model"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(folder)]  # a package of just this folder: model.py's relative imports resolve here
        sys.modules[name] = pkg
    return importlib.import_module(f"{name}.model")


def build_scgpt(module, ckpt: Path):
    """scGPT's TransformerModel (PyTorch attention, as on CPU) with the checkpoint's weights, and its vocab."""
    args = json.loads((ckpt / "args.json").read_text())
    vocab = json.loads((ckpt / "vocab.json").read_text())
    model = module.TransformerModel(
        len(vocab), args["embsize"], args["nheads"], args["d_hid"], args["nlayers"], nlayers_cls=3, n_cls=1,
        vocab=vocab, dropout=args["dropout"], pad_token="<pad>", pad_value=args["pad_value"], do_mvc=True,
        input_emb_style="continuous", n_input_bins=args["n_bins"], cell_emb_style="cls",
        use_fast_transformer=False)
    state = torch.load(ckpt / "best_model.pt", weights_only=True)
    state = {k.replace("self_attn.Wqkv.", "self_attn.in_proj_"): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("cls_decoder.") for k in missing):
        raise ValueError(f"scGPT model: missing {missing}, unexpected {unexpected}")
    return model.eval(), vocab, args


def to_scgpt(batch: dict, gene_index: torch.Tensor, cls_row: int, pad_value: float) -> dict:
    """One of our collated batches as scGPT's inputs: <cls> first (value = pad_value), our vocab ids → its rows,
    key padding mask True = pad."""
    B = batch["gene_ids"].shape[0]
    src = torch.cat([torch.full((B, 1), cls_row, dtype=torch.long), gene_index[batch["gene_ids"]]], 1)
    values = torch.cat([torch.full((B, 1), float(pad_value)), batch["values"].float()], 1)
    pad = torch.cat([torch.zeros(B, 1, dtype=torch.bool), ~batch["attention_mask"].bool()], 1)
    return {"src": src, "values": values, "src_key_padding_mask": pad}


def scgpt_embed(adata, model, gene_rows: np.ndarray, vocab: dict, args: dict, batch_size: int,
                max_length: int = 1200, rng=None) -> np.ndarray:
    """scGPT's get_batch_cell_embeddings (cell_embedding_mode "cls"), its glue reimplemented (see module doc)."""
    from fm.binning import scgpt_binning_reference

    rng = rng if rng is not None else np.random.default_rng(0)
    X = adata.X if isinstance(adata.X, np.ndarray) else adata.X.toarray()
    cls_id, pad_id, pad_value = vocab["<cls>"], vocab[args["pad_token"]], args["pad_value"]
    out = np.zeros((len(X), args["embsize"]), dtype=np.float32)
    with torch.no_grad():
        for lo in range(0, len(X), batch_size):
            cells = []
            for row in X[lo:lo + batch_size]:
                nz = np.nonzero(row)[0]
                genes = np.insert(gene_rows[nz], 0, cls_id)
                values = np.insert(row[nz], 0, pad_value).astype(np.float32)
                values[1:] = scgpt_binning_reference(values[1:], args["n_bins"], rng)
                cells.append((genes, values))
            L = min(max_length, max(len(g) for g, _ in cells))
            src = np.full((len(cells), L), pad_id, dtype=np.int64)
            val = np.full((len(cells), L), pad_value, dtype=np.float32)
            for i, (g, v) in enumerate(cells):
                if len(g) > L:  # scGPT: keep <cls>, a random subset of the rest
                    keep = np.concatenate([[0], 1 + rng.permutation(len(g) - 1)[:L - 1]])
                    g, v = g[keep], v[keep]
                src[i, :len(g)], val[i, :len(v)] = g, v
            src_t = torch.from_numpy(src)
            emb = model._encode(src_t, torch.from_numpy(val), src_key_padding_mask=src_t.eq(pad_id))[:, 0]
            out[lo:lo + len(cells)] = emb.cpu().numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------- timing
def interleaved(fns: dict, reps: int) -> dict:
    """{name: median seconds} of each fn over `reps` rounds, the fns run in turn inside every round."""
    times = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


@contextlib.contextmanager
def mha_fastpath(enabled: bool):
    """PyTorch's TransformerEncoder(Layer) inference fast path (fused kernels + nested tensors) on or off."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def fm_train_step(model, opt):
    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def scgpt_train_step(model, opt, mask_value: float):
    """scGPT's pretraining step (its trainer's GEP + MVC losses: MSE on masked positions), AdamW, clip 1.0."""
    def step(sb):
        out = model(sb["src"], sb["masked"], sb["src_key_padding_mask"], MVC=True)
        m = sb["masked"].eq(mask_value)
        loss = (nn.functional.mse_loss(out["mlm_output"][m], sb["values"][m])
                + nn.functional.mse_loss(out["mvc_output"][m], sb["values"][m]))
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


# ------------------------------------------------------------------------------------------- main
def run_bench(size: str = "whole-human", data: str | None = None, n_cells: int = 64, batch_size: int = 32,
              train_batch: int = 8, train_batches: int = 2, reps: int = 3, min_genes: int = 0,
              vs_scgpt: str | None = None, max_genes: int = 1200, seed: int = 0, profile: int = 0,
              compile_blocks: bool = False) -> dict:
    """Run the benchmark, print the markdown tables; returns the numbers."""
    import fm
    from fm.data.collator import CellCollator, collator_settings
    from fm.inference import backbone

    device = "cpu"
    d_model, n_layers, n_heads, d_ff = SIZES[size]
    label, adata = load_cells(data, n_cells, min_genes)
    tmp = tempfile.TemporaryDirectory(prefix="fm_bench_")
    ckpt = write_checkpoint(adata, size, Path(tmp.name), max_genes, dropout=0.2, seed=seed)
    model = fm.load(ckpt)
    if compile_blocks:
        for layer in backbone(model).layers:
            layer.compile()
    # genes of the exported vocabulary only, so both models see exactly the same genes
    vocab = json.loads((ckpt / "vocab.json").read_text())
    adata = adata[:, [g in vocab for g in map(str, adata.var_names)]].copy()
    print(f"size {size}: d_model {d_model}, {n_layers} layers, {n_heads} heads, d_ff {d_ff}; data {label}: "
          f"{adata.n_obs} cells x {adata.n_vars} genes; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, CPU capability {torch.backends.cpu.get_cpu_capability()}", flush=True)

    # tokenised cells, collated batches
    tok = model.cell_tokenizer.for_config(model.config)
    cells = tok.encode(adata)
    rows = [cells[i] for i in range(len(cells))]
    infer_col = CellCollator(**collator_settings(model.config), train=False)
    train_col = CellCollator(**collator_settings(model.config), train=True)
    lengths = np.minimum(np.diff(cells.indptr), max_genes) + model.config.n_prefix  # real tokens incl. <cls>

    def collate_all(col, b):
        for lo in range(0, len(rows), b):
            col(rows[lo:lo + b])
    t_col = interleaved({"train": lambda: collate_all(train_col, train_batch),
                         "infer": lambda: collate_all(infer_col, batch_size)}, max(reps, 3))

    # peaks
    peak32 = matmul_peak(device, torch.float32)
    peak16 = matmul_peak(device, torch.bfloat16) if bf16_native() else None

    # embed
    sub = adata.copy()
    embed_fns = {"fm.embed": lambda: fm.embed(sub, model, batch_size=batch_size)}
    sc = None
    if vs_scgpt:
        module = import_scgpt_model(vs_scgpt)
        sc, sc_vocab, sc_args = build_scgpt(module, ckpt)
        gene_rows = np.array([sc_vocab[g] for g in map(str, adata.var_names)])

        def scgpt_fn(on):
            def run():
                with mha_fastpath(on):
                    scgpt_embed(adata, sc, gene_rows, sc_vocab, sc_args, batch_size, max_genes)
            return run
        embed_fns["scGPT fast path on"] = scgpt_fn(True)
        embed_fns["scGPT fast path off"] = scgpt_fn(False)
    for fn in embed_fns.values():  # warm-up (first-call allocations, compile)
        fn()
    t_embed = interleaved(embed_fns, reps)

    # same-function check on the first batch (identical inputs: our inference collation)
    check = {}
    if sc is not None:
        enc = backbone(model)
        gi = enc.embeddings.gene_index
        b0 = infer_col(rows[:batch_size])
        sb = to_scgpt(b0, gi, sc_vocab["<cls>"], sc_args["pad_value"])
        with torch.no_grad():
            ours = nn.functional.normalize(enc(b0["gene_ids"], b0["values"], b0["attention_mask"]).cell_embedding, dim=-1)
            for on in (True, False):
                with mha_fastpath(on):
                    theirs = nn.functional.normalize(sc._encode(sb["src"], sb["values"], sb["src_key_padding_mask"])[:, 0], dim=-1)
                check[on] = float((ours - theirs).abs().max())

    # training
    n_train = min(train_batches, max(1, len(rows) // train_batch))
    batches = [train_col(rows[k * train_batch:(k + 1) * train_batch]) for k in range(n_train)]
    train_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    train_lengths = np.concatenate([b["attention_mask"].sum(1).numpy() + model.config.n_prefix for b in batches])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as fm.train builds it (train.fused_optimizer)
    ours_step = fm_train_step(model, opt)
    train_fns = {"fm": lambda: [ours_step(b) for b in batches]}
    if sc is not None:
        sc.train()
        sc_opt = torch.optim.AdamW(sc.parameters(), lr=1e-4)
        sc_step = scgpt_train_step(sc, sc_opt, sc_args["mask_value"])
        gi = backbone(model).embeddings.gene_index
        sbs = []
        for b in batches:
            x = to_scgpt(b, gi, sc_vocab["<cls>"], sc_args["pad_value"])
            x["masked"] = x["values"]  # our collator's masked values (-1 at masked genes)
            x["values"] = torch.cat([torch.full((len(b["labels"]), 1), float(sc_args["pad_value"])), b["labels"]], 1)
            sbs.append(x)
        train_fns["scGPT"] = lambda: [sc_step(x) for x in sbs]
    for fn in train_fns.values():
        fn()
    t_train = interleaved(train_fns, reps)
    model.eval()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # tables
    fwd = real_flops(lengths, d_model, n_layers, d_ff)
    trn = 3 * real_flops(train_lengths, d_model, n_layers, d_ff)
    gf_embed = fwd / t_embed["fm.embed"] / 1e9
    gf_train = trn / t_train["fm"] / 1e9
    res = {"embed_cells_s": len(rows) / t_embed["fm.embed"], "train_tokens_s": train_tokens / t_train["fm"],
           "collate_train_cells_s": len(rows) / t_col["train"], "collate_infer_cells_s": len(rows) / t_col["infer"],
           "peak_rss_mib": rss, "peak_fp32_gflops": peak32, "peak_bf16_gflops": peak16,
           "embed_gflops": gf_embed, "train_gflops": gf_train, "check": check}
    print(f"\n{adata.n_obs} cells, {lengths.mean() - model.config.n_prefix:.0f} real gene tokens per cell on average "
          f"(max {lengths.max() - model.config.n_prefix}); embed batch {batch_size}; training {n_train} batches of "
          f"{train_batch} cells, {train_tokens} real tokens; {reps} interleaved rounds, medians\n")
    print("| measure | value |\n|---|---:|")
    print(f"| fm.embed cells/s | {res['embed_cells_s']:.2f} |")
    print(f"| training real tokens/s (fwd+bwd+clip+AdamW) | {res['train_tokens_s']:.0f} |")
    print(f"| training collator cells/s | {res['collate_train_cells_s']:.0f} |")
    print(f"| inference collator cells/s | {res['collate_infer_cells_s']:.0f} |")
    print(f"| peak RSS MiB (process) | {rss:.0f} |")
    print(f"| fp32 matmul peak GFLOP/s (4096², measured) | {peak32:.0f} |")
    print(f"| bf16 matmul peak GFLOP/s | {f'{peak16:.0f}' if peak16 else 'n/a (no native bf16)'} |")
    print(f"| embed GFLOP/s, real tokens (% of fp32 peak) | {gf_embed:.1f} ({100 * gf_embed / peak32:.0f}%) |")
    print(f"| training GFLOP/s, real tokens (% of fp32 peak) | {gf_train:.1f} ({100 * gf_train / peak32:.0f}%) |")
    if sc is not None:
        on, off = t_embed["scGPT fast path on"], t_embed["scGPT fast path off"]
        res.update(scgpt_embed_on_s=on, scgpt_embed_off_s=off, fm_embed_s=t_embed["fm.embed"],
                   fm_train_s=t_train["fm"], scgpt_train_s=t_train["scGPT"])
        print("\n| vs scGPT (same cells, same weights, fp32, eval) | fm | scGPT fast path on | scGPT fast path off |"
              "\n|---|---:|---:|---:|")
        print(f"| embed seconds ({adata.n_obs} cells) | {t_embed['fm.embed']:.2f} | {on:.2f} | {off:.2f} |")
        print(f"| fm speed-up | 1 | {on / t_embed['fm.embed']:.2f}x | {off / t_embed['fm.embed']:.2f}x |")
        print(f"| max abs diff of L2 <cls> embeddings vs fm (batch 1) | 0 | {check[True]:.1e} | {check[False]:.1e} |")
        print(f"| training seconds ({n_train} steps, {train_tokens} real tokens) | {t_train['fm']:.2f} | "
              f"{t_train['scGPT']:.2f} (train mode: no fast path) | |")
        print(f"| training tokens/s, fm ÷ scGPT | {t_train['scGPT'] / t_train['fm']:.2f}x | | |")
    if profile:
        profile_model(model, infer_col(rows[:batch_size]), batches[0], opt, profile)
    tmp.cleanup()
    return res


def profile_model(model, infer_batch: dict, train_batch: dict, opt, top: int) -> None:
    """torch.profiler of one forward (eval, inference_mode) and one training step: top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    from fm.inference import backbone

    enc = backbone(model)
    with torch.inference_mode():
        enc(infer_batch["gene_ids"], infer_batch["values"], infer_batch["attention_mask"])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            enc(infer_batch["gene_ids"], infer_batch["values"], infer_batch["attention_mask"])
    print(f"\nprofile: one forward, batch {tuple(infer_batch['gene_ids'].shape)}\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    model.train()
    step = fm_train_step(model, opt)
    step(train_batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(train_batch)
    model.eval()
    print(f"\nprofile: one training step, batch {tuple(train_batch['gene_ids'].shape)}\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="per-token speed at a model size (embed, training, collator, FLOP/s), "
                                     "optionally against scGPT's own model")
    p.add_argument("--size", choices=list(SIZES), default="whole-human",
                   help="model size (gene table and transformer shape) to time; default whole-human")
    p.add_argument("--data", default=None, help=f"an .h5ad of counts (default: {DEFAULT_FILE} in the data "
                                                "directory when present, else generated cells)")
    p.add_argument("--cells", type=int, default=64, help="first N cells in file order (default 64)")
    p.add_argument("--min-genes", type=int, default=0, help="only cells with at least this many expressed genes "
                                                            "(1200: dense cells)")
    p.add_argument("--batch-size", type=int, default=32, help="embedding batch (default 32)")
    p.add_argument("--train-batch", type=int, default=8, help="cells per training step (default 8)")
    p.add_argument("--train-batches", type=int, default=2, help="training steps per round (default 2)")
    p.add_argument("--reps", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    p.add_argument("--max-genes", type=int, default=1200, help="gene tokens per cell (default 1200, scGPT's)")
    p.add_argument("--vs-scgpt", default=None, metavar="SCGPT_SOURCE",
                   help="a scGPT source checkout: also time its TransformerModel on the same cells and weights")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also print torch.profiler's top N ops of one forward and one training step")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (opt-in)")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    run_bench(size=args.size, data=args.data, n_cells=args.cells, batch_size=args.batch_size,
              train_batch=args.train_batch, train_batches=args.train_batches, reps=args.reps,
              min_genes=args.min_genes, vs_scgpt=args.vs_scgpt, max_genes=args.max_genes, profile=args.profile,
              compile_blocks=args.compile)
    return 0


__all__ = ["SIZES", "add_bench_parser", "import_scgpt_model", "real_flops", "run_bench"]
