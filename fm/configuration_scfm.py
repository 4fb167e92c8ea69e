"""ScFMConfig: the hyper-parameters of the scfm backbone and its heads (a Hugging Face config).

A classic keyword `__init__` (not v5 dataclass fields) so the same file works with
transformers 4.x and 5.x; every default is explained in one comment.
"""
from __future__ import annotations

from transformers import PretrainedConfig

from fm.value_encoding import VALUE_ENCODINGS, ValueEncoding, check_n_bins, get_value_encoding

POOLINGS = ("cls", "mean")
ACTIVATIONS = ("gelu", "relu")
SCGPT_ARCHITECTURE = dict(norm_first=False, activation="relu", gene_norm=True, embedding_norm=False, cls_value=True,
                          learned_value_sentinels=False, value_max=512.0, value_encoding="bin_values",
                          expression_decoder="scgpt", embedding_l2=True, pooling="cls")
"""scGPT's TransformerModel (input_emb_style continuous, as released) as ScFMConfig fields: what `fm convert scgpt`
sets and what `model.architecture: scgpt` pretrains (so a model trained here exports to scGPT's files)."""
ARCHITECTURES = {"scfm": {}, "scgpt": SCGPT_ARCHITECTURE}
EXPRESSION_DECODERS = ("gelu", "scgpt")
BACKBONES = ("scfm", "bert")


class ScFMConfig(PretrainedConfig):
    """Config of `ScFMModel` / `ScFMFor*`. Sequence = [<cls>, cond_1..cond_C, gene_1..gene_L]."""

    model_type = "scfm"
    # Standard names that generic tooling reads (e.g. accelerate's DeepSpeed "auto" bucket sizes
    # use `config.hidden_size`) map onto our short names.
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "intermediate_size": "d_ff",
    }

    def __init__(
        self,
        vocab_size: int = 136_000,  # gene vocab incl. special tokens; the tokenizer sets the real size
        # vocab ids that own a gene-embedding row (row r embeds id gene_table[r]; distinct, any order: pretraining
        # writes them ascending, an imported checkpoint keeps its own row order); None: one row per vocab id.
        # Pretraining keeps the specials + its corpus' genes: the other rows would never train.
        gene_table: list[int] | None = None,
        # vocab ids of the pretraining data's genes when gene_table holds more (model.gene_table=full: the other rows
        # never trained); None: gene_table is that set, or it is unknown. The tokenizer refuses input mostly outside it.
        trained_genes: list[int] | None = None,
        n_bins: int = 51,  # value tokens 0..n_bins-1 are expression bins (0 = not expressed), as scGPT
        value_encoding: str = "bins",  # counts -> values: "bins" | "rank" | "continuous" (fm.value_encoding)
        d_model: int = 512,  # hidden size, scGPT's
        n_layers: int = 12,  # transformer blocks, scGPT's
        n_heads: int = 8,  # attention heads (head dim 64 at d_model 512)
        d_ff: int = 2048,  # MLP width, the usual 4 * d_model
        dropout: float = 0.1,  # embedding / residual dropout, BERT/scGPT default
        attention_dropout: float = 0.0,  # off: lets SDPA use its fastest kernels
        max_genes: int = 1200,  # gene tokens per cell, excluding the prefix (scGPT's 1200)
        condition_keys: list[str] | None = None,  # obs columns that become prefix tokens (batch, assay…)
        condition_vocab_sizes: list[int] | None = None,  # table size per key; id 0 = unknown/missing
        pooling: str = "cls",  # cell embedding = hidden state at <cls> ("cls") or mean over genes ("mean")
        generative_mask: bool = False,  # scGPT's mask: masked genes are seen only by themselves
        zero_fraction: float = 0.0,  # share of max_genes given to measured-but-unexpressed genes (bin 0)
        mvc: bool = True,  # add scGPT's masked-value-prediction-from-cell-embedding (MVC) loss
        wced_genes: int = 0,  # whole-cell expression decoding: panel genes decoded from the cell embedding per batch (0 = off)
        wced_weight: float = 1.0,  # weight of the whole-cell decoding loss
        contrastive_weight: float = 0.0,  # InfoNCE between views of one cell (gene subsets); 0 = off
        contrastive_temperature: float = 0.1,  # InfoNCE temperature (SimCLR's range)
        gep_weight: float = 1.0,  # weight of the per-token GEP loss (0 = cell-embedding objectives only)
        layer_norm_eps: float = 1e-5,  # PyTorch's LayerNorm default
        # ---- architecture variants, so imported checkpoints (fm/convert) are configurations of this model
        norm_first: bool = True,  # Pre-LN blocks + a final LayerNorm; False: Post-LN, no final norm (scGPT, BERT)
        activation: str = "gelu",  # MLP activation: "gelu" | "relu" (scGPT)
        gene_norm: bool = False,  # LayerNorm on the gene embedding itself (scGPT's encoder.enc_norm)
        embedding_norm: bool = True,  # LayerNorm on the summed token embedding (scGPT has none)
        cls_value: bool = False,  # <cls> also gets the value embedding of the pad value (scGPT's <cls> carries -2)
        learned_value_sentinels: bool = True,  # continuous values: mask/pad get learned vectors (False: the MLP, scGPT)
        value_norm: bool = False,  # discrete values: LayerNorm on the value embedding (scGPT's category encoder)
        value_combine: str = "sum",  # token = gene + value embedding ("sum") or gene × value number ("scale", scGPT)
        value_max: float | None = None,  # continuous values: clamp at this maximum before the MLP (scGPT: 512)
        embedding_l2: bool = False,  # fm.embed returns L2-normalised cell embeddings (scGPT's embed_data does)
        expression_decoder: str = "gelu",  # GEP head: "gelu" (Linear-GELU-Linear) | "scgpt" (2 LeakyReLU layers)
        # ---- imported BERT backbones (Geneformer; fm/modeling_bert.py, fm/convert/geneformer.py)
        backbone: str = "scfm",  # "scfm" (ScFMModel) | "bert" (ScFMBertModel: transformers' BertModel over gene_table rows)
        bert_config: dict | None = None,  # backbone "bert": the checkpoint's BertConfig kwargs (sets d_model, n_layers, …)
        embedding_layer: int = -1,  # bert: Geneformer's emb_layer, the cell-embedding layer (-1 penultimate, 0 last)
        gene_medians: list[float] | None = None,  # per gene_table row: Geneformer's median (0 = none: never a token)
        add_cls_eos: bool = False,  # bert: wrap each cell as <cls> genes <eos> (Geneformer V2); V1 adds nothing
        eoc_token_id: int = 3,  # vocab id of <eoc>, the row Geneformer V2's <eos> maps to
        initializer_range: float = 0.02,  # std of the normal init, BERT/GPT-2's
        pad_token_id: int = 0,  # gene-vocab ids of the special tokens, fixed by the tokenizer
        cls_token_id: int = 1,
        mask_token_id: int = 2,
        # ---- task heads (fm/heads/<task>.py; written by fm/tasks/<task>.py when a head is fine-tuned, so
        # an exported directory is self-describing). The class names come from transformers' own
        # num_labels / id2label / label2id (annotation, cci).
        label_key: str | None = None,  # annotation, cci: obs column the class names were read from
        classifier_dropout: float | None = None,  # annotation: head dropout; None = `dropout`, as BERT
        classifier: str = "mlp",  # annotation: head shape, "mlp" (ours) | "scgpt" (scGPT's ClsDecoder, imported models)
        classifier_layers: int = 3,  # annotation, classifier="scgpt": scGPT's n_layers_cls (Linear-ReLU-LayerNorm × n-1, out)
        unknown_threshold: float = 0.0,  # annotation: fm.annotate says "unknown" below this top probability
        target_scale: str = "log1p",  # imputation: scale fm.impute writes by default (log1p | normalized)
        target_sum: float = 1e4,  # imputation: counts per cell of the normalisation the head predicts in
        batch_key: str | None = None,  # batch_correction: obs column of the batch; one of condition_keys
        num_batches: int = 0,  # batch_correction: batches the discriminator tells apart
        adversary: str = "confusion",  # batch_correction: "confusion" target or scGPT's gradient "reversal"
        dar_weight: float = 1.0,  # batch_correction: weight of the adversarial terms
        ecs_weight: float = 10.0,  # batch_correction: weight of the elastic cell-similarity loss (scGPT's 10)
        ecs_threshold: float = 0.8,  # batch_correction: ECS similarity threshold (scGPT's 0.8)
        protein_key: str | None = None,  # modality_prediction: obsm key the ADT counts came from
        protein_names: list[str] | None = None,  # modality_prediction: predicted proteins, output column order
        protein_mean: list[float] | None = None,  # modality_prediction: train cells' CLR mean per protein (None: 0)
        protein_std: list[float] | None = None,  # modality_prediction: train cells' CLR std per protein (None: 1)
        isotype_controls: list[str] | None = None,  # modality_prediction: ADTs in the CLR mean, never predicted
        niche_genes: list[str] | None = None,  # cci: genes the niche model predicts, output column order
        spatial_key: str | None = None,  # cci: obsm key of the spatial coordinates
        n_neighbors: int = 8,  # cci: spatial neighbours that form a cell's niche
        **kwargs,
    ):
        self.backbone = str(backbone)
        self.bert_config = None if bert_config is None else dict(bert_config)
        self.embedding_layer = int(embedding_layer)
        self.gene_medians = None if gene_medians is None else [float(m) for m in gene_medians]
        self.add_cls_eos = bool(add_cls_eos)
        self.eoc_token_id = int(eoc_token_id)
        if self.backbone == "bert" and self.bert_config is not None:  # the sizes every head reads come from BERT's
            b = self.bert_config
            d_model, n_layers = b.get("hidden_size", 768), b.get("num_hidden_layers", 12)
            n_heads, d_ff = b.get("num_attention_heads", 12), b.get("intermediate_size", 3072)
            dropout = b.get("hidden_dropout_prob", 0.1)
            layer_norm_eps = b.get("layer_norm_eps", 1e-12)
            # the MLM decoder is the word embedding (transformers ties it when the model's config says so)
            kwargs.setdefault("tie_word_embeddings", b.get("tie_word_embeddings", True))
        self.vocab_size = int(vocab_size)
        self.gene_table = None if gene_table is None else [int(i) for i in gene_table]
        self.trained_genes = None if trained_genes is None else [int(i) for i in trained_genes]
        self.n_bins = int(n_bins)
        self.value_encoding = str(value_encoding)
        self.d_model = int(d_model)
        self.n_layers = int(n_layers)
        self.n_heads = int(n_heads)
        self.d_ff = int(d_ff)
        self.dropout = float(dropout)
        self.attention_dropout = float(attention_dropout)
        self.max_genes = int(max_genes)
        self.condition_keys = [str(k) for k in (condition_keys or [])]
        self.condition_vocab_sizes = [int(n) for n in (condition_vocab_sizes or [])]
        self.pooling = pooling
        self.generative_mask = bool(generative_mask)
        if not 0.0 <= zero_fraction < 1.0:
            raise ValueError(f"zero_fraction must be in [0, 1), got {zero_fraction}")
        self.zero_fraction = float(zero_fraction)
        self.mvc = bool(mvc)
        self.wced_genes = int(wced_genes)
        self.wced_weight = float(wced_weight)
        self.contrastive_weight = float(contrastive_weight)
        self.contrastive_temperature = float(contrastive_temperature)
        self.gep_weight = float(gep_weight)
        self.layer_norm_eps = float(layer_norm_eps)
        self.norm_first = bool(norm_first)
        self.activation = str(activation)
        self.gene_norm = bool(gene_norm)
        self.embedding_norm = bool(embedding_norm)
        self.cls_value = bool(cls_value)
        self.learned_value_sentinels = bool(learned_value_sentinels)
        self.value_max = None if value_max is None else float(value_max)
        self.value_norm = bool(value_norm)
        self.value_combine = str(value_combine)
        self.expression_decoder = str(expression_decoder)
        self.embedding_l2 = bool(embedding_l2)
        self.initializer_range = float(initializer_range)
        self.cls_token_id = int(cls_token_id)
        self.mask_token_id = int(mask_token_id)
        self.label_key = label_key
        self.classifier_dropout = classifier_dropout
        self.classifier = str(classifier)
        self.classifier_layers = int(classifier_layers)
        self.unknown_threshold = float(unknown_threshold)
        self.target_scale = target_scale
        self.target_sum = float(target_sum)
        self.batch_key = batch_key
        self.num_batches = int(num_batches)
        self.adversary = adversary
        self.dar_weight = float(dar_weight)
        self.ecs_weight = float(ecs_weight)
        self.ecs_threshold = float(ecs_threshold)
        self.protein_key = protein_key
        self.protein_names = None if protein_names is None else [str(n) for n in protein_names]
        self.protein_mean = None if protein_mean is None else [float(v) for v in protein_mean]
        self.protein_std = None if protein_std is None else [float(v) for v in protein_std]
        self.isotype_controls = [str(n) for n in (isotype_controls or [])]
        self.niche_genes = None if niche_genes is None else [str(g) for g in niche_genes]
        self.spatial_key = spatial_key
        self.n_neighbors = int(n_neighbors)
        self._validate()
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self._validate_gene_table()

    def _validate_gene_table(self) -> None:
        """A compact table holds distinct vocabulary ids, among them the special tokens the model itself feeds in
        (<pad>, <cls>; <mask> is a value, not a gene token, so it needs no row)."""
        table = self.gene_table
        if table is None:
            return
        if not table or min(table) < 0 or max(table) >= self.vocab_size or len(set(table)) != len(table):
            raise ValueError(f"gene_table must hold distinct vocabulary ids in [0, {self.vocab_size}), "
                             f"got {len(table)} ids from {table[:3]} to {table[-3:]}")
        needed = {self.pad_token_id, self.cls_token_id}
        if self.backbone == "bert":  # BERT sees only the tokens it was trained with: <cls>/<eoc> only when it adds them
            needed = {self.pad_token_id} | ({self.cls_token_id, self.eoc_token_id} if self.add_cls_eos else set())
        missing = sorted(needed - set(table))
        if missing:
            raise ValueError(f"gene_table lacks the special token ids {missing} (the tokens the model feeds in need rows)")
        if self.gene_medians is not None and len(self.gene_medians) != len(table):
            raise ValueError(f"gene_medians has {len(self.gene_medians)} entries for {len(table)} gene_table rows")
        if self.backbone == "bert" and self.bert_config is not None:
            rows = self.bert_config.get("vocab_size")
            if rows != len(table):
                raise ValueError(f"bert_config vocab_size ({rows}) must equal the gene_table rows ({len(table)})")

    def _validate(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.backbone == "bert":
            self._validate_bert()
        elif self.gene_medians is not None or self.add_cls_eos:
            raise ValueError("gene_medians / add_cls_eos describe a Geneformer (backbone 'bert') model")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if len(self.condition_keys) != len(self.condition_vocab_sizes):
            raise ValueError(
                f"condition_keys ({len(self.condition_keys)}: {self.condition_keys}) and condition_vocab_sizes "
                f"({len(self.condition_vocab_sizes)}: {self.condition_vocab_sizes}) must have the same length"
            )
        if len(set(self.condition_keys)) != len(self.condition_keys):
            raise ValueError(f"condition_keys has duplicates: {self.condition_keys}")
        if any(n < 1 for n in self.condition_vocab_sizes):
            raise ValueError(f"every condition vocab size must be >= 1 (id 0 = unknown), got {self.condition_vocab_sizes}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        check_n_bins(self.n_bins)
        if self.value_encoding not in VALUE_ENCODINGS:
            raise ValueError(f"value_encoding must be one of {sorted(VALUE_ENCODINGS)}, "
                             f"got {self.value_encoding!r}")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.expression_decoder not in EXPRESSION_DECODERS:
            raise ValueError(f"expression_decoder must be one of {EXPRESSION_DECODERS}, got {self.expression_decoder!r}")
        if self.value_combine not in ("sum", "scale"):
            raise ValueError(f"value_combine must be 'sum' or 'scale', got {self.value_combine!r}")
        if self.value_combine == "scale" and self.encoding.discrete:
            raise ValueError("value_combine='scale' multiplies gene vectors by value numbers: it needs a continuous "
                             f"value_encoding, not {self.value_encoding!r}")
        if self.classifier not in ("mlp", "scgpt"):
            raise ValueError(f"classifier must be 'mlp' or 'scgpt', got {self.classifier!r}")
        if self.target_scale not in ("log1p", "normalized"):
            raise ValueError(f"target_scale must be 'log1p' or 'normalized', got {self.target_scale!r}")
        if self.adversary not in ("confusion", "reversal"):
            raise ValueError(f"adversary must be 'confusion' or 'reversal', got {self.adversary!r}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_genes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def _validate_bert(self) -> None:
        if self.bert_config is None or self.gene_table is None:
            raise ValueError("backbone 'bert' needs bert_config (the checkpoint's BertConfig) and gene_table "
                             "(our id of each word-embedding row)")
        if self.condition_keys:
            raise ValueError(f"backbone 'bert' takes no condition tokens, got condition_keys {self.condition_keys}")
        if self.zero_fraction:
            raise ValueError("backbone 'bert' reads expressed genes only (Geneformer): zero_fraction must be 0")
        if not -self.n_layers <= self.embedding_layer <= 0:
            raise ValueError(f"embedding_layer must be in [-{self.n_layers}, 0] (Geneformer's emb_layer), "
                             f"got {self.embedding_layer}")
        if self.pooling == "cls" and not self.add_cls_eos:
            raise ValueError("pooling 'cls' needs a <cls> token: a Geneformer V1 model (add_cls_eos False) pools 'mean'")
        positions = self.bert_config.get("max_position_embeddings", 512)
        if self.max_genes + 2 * self.add_cls_eos > positions:
            raise ValueError(f"max_genes {self.max_genes} (+2 for <cls>/<eos>: {self.add_cls_eos}) exceeds the "
                             f"model's {positions} positions")

    @property
    def n_gene_rows(self) -> int:
        """Rows of the gene-embedding table: len(gene_table) (compact) or vocab_size (full)."""
        return self.vocab_size if self.gene_table is None else len(self.gene_table)

    @property
    def encoding(self) -> ValueEncoding:
        """The value encoding the collator must use with this model (built from value_encoding, n_bins)."""
        return get_value_encoding(self.value_encoding, self.n_bins)

    @property
    def mask_value_id(self) -> int | float:
        """Value of a masked gene (the model must predict it); defined by the encoding."""
        return self.encoding.mask_value_id

    @property
    def pad_value_id(self) -> int | float:
        """Value at padding positions; defined by the encoding."""
        return self.encoding.pad_value_id

    @property
    def n_prefix(self) -> int:
        """Tokens the model prepends: <cls> + one per condition."""
        return 1 + len(self.condition_keys)


__all__ = ["ScFMConfig"]
