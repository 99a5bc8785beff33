"""The scale-wise transformers: VAR / the stage-1 next-scale model, and HMAR.

Sequence layout (length ``L = sum(pn^2)``): position 0 is the start token ``class_emb[label] + pos_start``;
the ``pn_k^2`` positions of scale ``k >= 1`` hold ``word_embed(area(f_hat_{<k}, pn_k))``; every position
gets ``lvl_embed[scale] + pos_1LC[position]``. Output position ``p`` predicts the token at ``p``.

* :class:`ScaleTransformer` -- ``depth`` blocks + one AdaLN head. With ``kind="var"`` attention is
  block-causal (VAR, KV cache at inference); with ``kind="nsp"`` it is block-diagonal (HMAR stage 1).
  Key layout = ``var_d*.pth`` / the official stage-1 checkpoints.
* :class:`HMAR` -- shared trunk (``depth - branch_depth`` blocks), a next-scale branch and a masked
  branch (``branch_depth`` blocks + head each) and a ``[MASK]`` embedding. Key layout = ``hmar-d*.pth``.
"""
from __future__ import annotations

import math
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..presets import ModelConfig
from .blocks import AdaLNBlock, AdaLNHead, Branch, KVCache, modulation_for


def _levels(patch_nums: Sequence[int]) -> torch.Tensor:
    return torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(patch_nums)]).view(1, -1)


def _bias_buffer(patch_nums: Sequence[int], pattern: str) -> torch.Tensor:
    lv = _levels(patch_nums)[0]
    allowed = lv[:, None] == lv[None, :] if pattern == "block_diagonal" else lv[:, None] >= lv[None, :]
    return torch.where(allowed, 0.0, -torch.inf).view(1, 1, len(lv), len(lv))


class _ScaleModel(nn.Module):
    """Embedding bookkeeping shared by both model families (no parameters of its own)."""

    config: ModelConfig
    pattern: str

    def _register_common(self, cfg: ModelConfig, pattern: str, split_word_bias: bool) -> None:
        C, L = cfg.embed_dim, cfg.seq_len
        self.config, self.pattern = cfg, pattern
        self.lengths: Tuple[int, ...] = tuple(pn * pn for pn in cfg.patch_nums)
        self.starts: Tuple[int, ...] = tuple(sum(self.lengths[:i]) for i in range(len(self.lengths) + 1))
        self.num_classes = cfg.num_classes
        std = math.sqrt(1 / C / 3)
        self.pos_start = nn.Parameter(torch.empty(1, 1, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, L, C))
        nn.init.trunc_normal_(self.pos_start, std=std)
        nn.init.trunc_normal_(self.pos_1LC, std=std)
        if split_word_bias:
            self.word_embed_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("lvl_1L", _levels(cfg.patch_nums))
        # the official checkpoints store the attention mask; we keep it for strict loading only
        self.register_buffer("attn_bias_for_masking", _bias_buffer(cfg.patch_nums, pattern))

    def _make_blocks(self, indices: Sequence[int]) -> nn.ModuleList:
        cfg = self.config
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        return nn.ModuleList(AdaLNBlock(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, dpr[i], cfg.attn_l2_norm,
                                        cfg.norm_eps) for i in indices)

    @property
    def patch_nums(self) -> Tuple[int, ...]:
        return self.config.patch_nums

    @property
    def device(self) -> torch.device:
        return self.pos_start.device

    def lvl_pos(self, start: int = 0, end: Optional[int] = None) -> torch.Tensor:
        """``lvl_embed[scale] + pos_1LC`` for positions ``start:end``: ``[1, n, C]``."""
        end = self.config.seq_len if end is None else end
        return self.lvl_embed(self.lvl_1L[:, start:end]) + self.pos_1LC[:, start:end]

    def class_cond(self, labels: torch.Tensor, drop: Optional[float] = None) -> torch.Tensor:
        """Class embedding (also the AdaLN condition); in training ``cond_drop_rate`` of the labels
        become the null class ``num_classes``."""
        drop = (self.config.cond_drop_rate if self.training else 0.0) if drop is None else drop
        if drop > 0:
            labels = torch.where(torch.rand(labels.shape, device=labels.device) < drop, self.num_classes, labels)
        return self.class_emb(labels)

    def _word(self, x: torch.Tensor) -> torch.Tensor:
        x = self.word_embed(x.to(self.word_embed.weight.dtype))
        return x + self.word_embed_bias if hasattr(self, "word_embed_bias") else x

    def embed_first(self, cond: torch.Tensor) -> torch.Tensor:
        """Input of scale 0 (the start token): ``[B, 1, C]``."""
        return cond[:, None] + self.pos_start + self.lvl_pos(0, 1)

    def embed_scale(self, si: int, x_small: torch.Tensor) -> torch.Tensor:
        """Next-scale input of scale ``si >= 1`` from ``area(f_hat, pn)`` (``[B, pn^2, Cz]``)."""
        return self._word(x_small) + self.lvl_pos(self.starts[si], self.starts[si + 1])

    def _embed_sequence(self, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        first = cond[:, None] + self.pos_start
        return torch.cat((first, tokens), 1) + self.lvl_pos(0, 1 + tokens.shape[1])

    # each model family lists its AdaLN blocks and heads, in the order of the packed modulation, as _adaln_modules()

    def _set_modulation_offsets(self) -> None:
        offset = 0
        for m in self._adaln_modules():
            m.mod_offset = offset
            offset += m.chunks

    def precompute_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """The AdaLN modulations of every block and head for the class condition ``cond`` (``[B, C]``), packed as
        ``[B, K, C]``. Every pass method (``next_scale_logits``, ``masked_logits``, ``logits``) takes it in place
        of ``cond`` and gives the same result: it depends on the class only, so a sampler computes it once per
        call instead of once per pass and block (for hmar-d30, 1.3 GB of ``ada_lin`` weights read per pass)."""
        return torch.cat([m.modulation(cond) for m in self._adaln_modules()], 1)

    @staticmethod
    def _norm_head(head: AdaLNHead, x: torch.Tensor, cond: torch.Tensor,
                   branch: Optional[Branch] = None) -> torch.Tensor:
        """``head(x, ...)`` with ``cond`` or its slice of a packed modulation (:func:`modulation_for`)."""
        return head(x, modulation_for(head, cond), branch)

    @staticmethod
    def _run(blocks: nn.ModuleList, x: torch.Tensor, cond: torch.Tensor, lengths: Sequence[int], pattern: str,
             caches: Optional[List[KVCache]] = None, backend: Optional[str] = None, branch: Optional[Branch] = None,
             defer: bool = False):
        """The blocks in turn. ``defer=True`` (the inference passes and teacher-forced features): each block adds
        the residual branch of the one before inside its own kernels, and the result is ``(x, branch)``, the last
        branch not added (:meth:`AdaLNBlock.forward`); ``branch`` is added by the first block. The same ops in the
        same order as without it."""
        for i, b in enumerate(blocks):
            out = b(x, modulation_for(b, cond), lengths, pattern, None if caches is None else caches[i], backend,
                    branch, defer)
            x, branch = out if defer else (out, None)
        return (x, branch) if defer else x

    def _pass(self, groups: Sequence[nn.ModuleList], x: torch.Tensor, cond: torch.Tensor, head_nm: AdaLNHead,
              head: nn.Linear, caches: Optional[List[KVCache]] = None) -> torch.Tensor:
        """One inference pass over one scale's tokens ``x``: the groups of blocks in turn (dense attention), the AdaLN
        head, the output head; fp32 logits (in the model's dtype with :attr:`fused_draw`). With
        :data:`DEFER_RESIDUAL`, each block adds the last residual branch of the block before it inside its own kernels
        (:meth:`AdaLNBlock.forward`'s ``defer``)."""
        n, branch = (x.shape[1],), None
        for blocks in groups:
            if DEFER_RESIDUAL:
                x, branch = self._run(blocks, x, cond, n, "dense", caches, branch=branch, defer=True)
            else:
                x = self._run(blocks, x, cond, n, "dense", caches)
        logits = head(self._norm_head(head_nm, x, cond, branch))
        return logits if self.fused_draw else logits.float()

    fused_draw = False
    """Set by :class:`hmar.accel.GraphedModel`: the sampler draws the tokens of every pass in one Triton kernel
    (:func:`hmar.sampling.draw_tokens`), which reads the head's output as it is, so the inference passes return the
    logits in the model's dtype (bf16) instead of as fp32."""

    def _check_input(self, labels: torch.Tensor, x_in: torch.Tensor) -> None:
        L = self.config.seq_len
        if x_in.shape[1] != L - 1 or x_in.shape[2] != self.config.z_channels:
            raise ValueError(f"expected teacher-forcing input [B, {L - 1}, {self.config.z_channels}], got {tuple(x_in.shape)}")
        if labels.shape[0] != x_in.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for a batch of {x_in.shape[0]}")


DEFER_RESIDUAL = True
"""The inference passes (``next_scale_logits``, ``masked_logits``) hand each block's last residual branch to the next
block, which adds it inside its first LayerNorm's kernel when compiled (:meth:`AdaLNBlock.forward`'s ``defer``). The
same ops in the same order: eager results are the same either way. Off: each block adds its own (a benchmark
switch)."""


def init_weights(model: nn.Module, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-3,
                 init_head: float = 0.02, init_std: float = -1.0) -> None:
    """Initialisation for training from scratch (VAR's recipe): truncated normal ``sqrt(1/3C)``,
    head x ``init_head``, ``proj``/``fc2`` / sqrt(2 depth), AdaLN scale/shift rows x ``init_adaln`` and
    gamma rows x ``init_adaln_gamma``."""
    cfg: ModelConfig = model.config
    C = cfg.embed_dim
    std = math.sqrt(1 / C / 3) if init_std < 0 else init_std
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=std)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.split(".")[-1] == "head" or name in ("head", "ns_head", "mask_head"):
            m.weight.data.mul_(init_head)
            m.bias.data.zero_()
        elif isinstance(m, AdaLNHead):
            m.ada_lin[-1].weight.data.mul_(init_adaln)
            m.ada_lin[-1].bias.data.zero_()
        elif isinstance(m, AdaLNBlock):
            m.attn.proj.weight.data.div_(math.sqrt(2 * cfg.depth))
            m.ffn.fc2.weight.data.div_(math.sqrt(2 * cfg.depth))
            w = m.ada_lin[-1].weight.data
            w[2 * C:].mul_(init_adaln)
            w[:2 * C].mul_(init_adaln_gamma)
            m.ada_lin[-1].bias.data.zero_()


class ScaleTransformer(_ScaleModel):
    """VAR (``kind="var"``, block-causal) or the HMAR stage-1 next-scale model (``kind="nsp"``,
    block-diagonal): ``depth`` AdaLN blocks and one head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.kind not in ("var", "nsp"):
            raise ValueError(f"ScaleTransformer builds 'var' or 'nsp' models, not {config.kind!r}; use HMAR")
        cfg = config
        self._register_common(cfg, "block_causal" if cfg.kind == "var" else "block_diagonal", split_word_bias=False)
        C = cfg.embed_dim
        self.word_embed = nn.Linear(cfg.z_channels, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        self.lvl_embed = nn.Embedding(len(cfg.patch_nums), C)
        self.blocks = self._make_blocks(range(cfg.depth))
        self.head_nm = AdaLNHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)
        std = math.sqrt(1 / C / 3)
        for emb in (self.class_emb, self.lvl_embed):
            nn.init.trunc_normal_(emb.weight, std=std)
        self._set_modulation_offsets()

    def _adaln_modules(self) -> List[nn.Module]:
        """Every AdaLN block and head, in the order of the packed modulation (:meth:`precompute_condition`)."""
        return [*self.blocks, self.head_nm]

    @property
    def kv_cache(self) -> bool:
        """VAR samples with a KV cache; the Markov next-scale model needs none."""
        return self.config.kind == "var"

    def forward(self, labels: torch.Tensor, x_in: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        """Teacher-forced logits ``[B, L, V]`` from labels ``[B]`` and next-scale inputs ``[B, L-1, Cz]``."""
        return self.head(self.features(labels, x_in, backend)).float()

    def features(self, labels: torch.Tensor, x_in: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        """Teacher-forced input of the output head, ``[B, L, C]``: ``forward = head(features).float()`` (the
        trainer's chunked head + cross-entropy starts from here)."""
        self._check_input(labels, x_in)
        cond = self.class_cond(labels)
        x = self._embed_sequence(cond, self._word(x_in))
        x, branch = self._run(self.blocks, x, cond, self.lengths, self.pattern, backend=backend, defer=True)
        return self._norm_head(self.head_nm, x, cond, branch)

    def output_head(self, masked: bool = False) -> nn.Linear:
        """The final ``Linear`` applied to :meth:`features`."""
        if masked:
            raise ValueError(f"a {self.config.kind} model has no masked branch")
        return self.head

    def next_scale_logits(self, x: torch.Tensor, cond: torch.Tensor,
                          caches: Optional[List[KVCache]] = None) -> torch.Tensor:
        """Inference pass over one scale's tokens ``[B, pn^2, C]`` (with the KV ``caches`` for VAR)."""
        return self._pass([self.blocks], x, cond, self.head_nm, self.head, caches)

    def new_caches(self) -> Optional[List[KVCache]]:
        return [KVCache(self.config.seq_len) for _ in self.blocks] if self.kv_cache else None


class HMAR(_ScaleModel):
    """HMAR: shared trunk + next-scale branch + masked branch, block-diagonal attention.

    A next-scale pass runs trunk -> ``ns_blocks`` -> ``ns_head``; a masked pass runs
    trunk -> ``mask_blocks`` -> ``mask_head``. The masked branch's input at a position of scale ``k`` is
    ``W area(f_hat_{<k}) + (mask_embed if masked else W x_cur) + b`` (``x_cur``: that scale's own
    current tokens, see :meth:`hmar.tokenizer.MultiScaleQuantizer.masked_inputs`).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.kind != "hmar":
            raise ValueError(f"HMAR builds 'hmar' models, not {config.kind!r}; use ScaleTransformer")
        cfg = config
        self._register_common(cfg, "block_diagonal", split_word_bias=True)
        C, d, b = cfg.embed_dim, cfg.depth, cfg.branch_depth
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        self.lvl_embed = nn.Embedding(len(cfg.patch_nums), C)
        self.base_blocks = self._make_blocks(range(d - b))
        self.ns_blocks = self._make_blocks(range(d - b, d))
        self.mask_blocks = self._make_blocks(range(d - b, d))
        self.ns_head_nm = AdaLNHead(C, cfg.norm_eps)
        self.ns_head = nn.Linear(C, cfg.vocab_size)
        self.mask_head_nm = AdaLNHead(C, cfg.norm_eps)
        self.mask_head = nn.Linear(C, cfg.vocab_size)
        self.word_embed = nn.Linear(cfg.z_channels, C, bias=False)
        self.mask_embed = nn.Embedding(1, C)
        std = math.sqrt(1 / C / 3)
        for emb in (self.class_emb, self.lvl_embed, self.mask_embed):
            nn.init.trunc_normal_(emb.weight, std=std)
        self._set_modulation_offsets()

    def _adaln_modules(self) -> List[nn.Module]:
        """Every AdaLN block and head, in the order of the packed modulation (:meth:`precompute_condition`)."""
        return [*self.base_blocks, *self.ns_blocks, self.ns_head_nm, *self.mask_blocks, self.mask_head_nm]

    kv_cache = False

    # ------------------------------------------------------------------ training
    def forward(self, labels: torch.Tensor, x_in: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        """Next-scale branch, teacher-forced: logits ``[B, L, V]`` (block-diagonal over all scales)."""
        return self.ns_head(self.features(labels, x_in, backend)).float()

    def features(self, labels: torch.Tensor, x_in: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        """Next-scale branch up to its head: ``forward = ns_head(features).float()``, ``[B, L, C]``."""
        self._check_input(labels, x_in)
        cond = self.class_cond(labels)
        x = self._embed_sequence(cond, self._word(x_in))
        x, branch = self._run(self.base_blocks, x, cond, self.lengths, self.pattern, backend=backend, defer=True)
        x, branch = self._run(self.ns_blocks, x, cond, self.lengths, self.pattern, backend=backend, branch=branch,
                              defer=True)
        return self._norm_head(self.ns_head_nm, x, cond, branch)

    def forward_masked(self, labels: torch.Tensor, x_ns: torch.Tensor, x_cur: torch.Tensor, mask: torch.Tensor,
                       backend: Optional[str] = None) -> torch.Tensor:
        """Masked branch, teacher-forced: ``x_ns``/``x_cur`` ``[B, L-1, Cz]``, ``mask`` ``[B, L]`` bool
        (True = replaced by ``[MASK]``; position 0 is ignored). Returns logits ``[B, L, V]``."""
        return self.mask_head(self.features_masked(labels, x_ns, x_cur, mask, backend)).float()

    def features_masked(self, labels: torch.Tensor, x_ns: torch.Tensor, x_cur: torch.Tensor, mask: torch.Tensor,
                        backend: Optional[str] = None) -> torch.Tensor:
        """Masked branch up to its head: ``forward_masked = mask_head(features_masked).float()``."""
        self._check_input(labels, x_ns)
        cond = self.class_cond(labels)
        tok = self._masked_tokens(x_ns, x_cur, mask[:, 1:])
        x = self._embed_sequence(cond, tok)
        x, branch = self._run(self.base_blocks, x, cond, self.lengths, self.pattern, backend=backend, defer=True)
        x, branch = self._run(self.mask_blocks, x, cond, self.lengths, self.pattern, backend=backend, branch=branch,
                              defer=True)
        return self._norm_head(self.mask_head_nm, x, cond, branch)

    def output_head(self, masked: bool = False) -> nn.Linear:
        """The final ``Linear`` of the next-scale (or the masked) branch."""
        return self.mask_head if masked else self.ns_head

    def _masked_tokens(self, x_ctx: torch.Tensor, x_cur: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = self.word_embed.weight.dtype
        cur = torch.where(mask[..., None], self.mask_embed.weight.to(w), self.word_embed(x_cur.to(w)))
        return self.word_embed(x_ctx.to(w)) + cur + self.word_embed_bias

    # ------------------------------------------------------------------ inference (one scale at a time)
    def embed_masked(self, si: int, x_ctx: torch.Tensor, x_cur: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked-branch input of scale ``si``: ``[B, pn^2, C]`` (``mask`` ``[B, pn^2]``)."""
        return self._masked_tokens(x_ctx, x_cur, mask) + self.lvl_pos(self.starts[si], self.starts[si + 1])

    def next_scale_logits(self, x: torch.Tensor, cond: torch.Tensor, caches=None) -> torch.Tensor:
        return self._pass([self.base_blocks, self.ns_blocks], x, cond, self.ns_head_nm, self.ns_head)

    def masked_logits(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self._pass([self.base_blocks, self.mask_blocks], x, cond, self.mask_head_nm, self.mask_head)

    def new_caches(self) -> None:
        return None

    # ------------------------------------------------------------------ stage 2
    def masked_branch_parameters(self) -> Iterator[nn.Parameter]:
        """What stage 2 trains: the masked branch's blocks and head and the mask embedding."""
        for m in (self.mask_blocks, self.mask_head_nm, self.mask_head, self.mask_embed):
            yield from m.parameters()

    @classmethod
    def from_next_scale(cls, nsp: ScaleTransformer, branch_depth: Optional[int] = None) -> "HMAR":
        """Assemble an HMAR from a stage-1 model: trunk = its first ``depth - b`` blocks, both branches
        start as copies of its last ``b`` blocks and head, ``mask_embed`` freshly initialised."""
        b = min(nsp.config.branch_depth, nsp.config.depth) if branch_depth is None else branch_depth
        cfg = ModelConfig.from_dict({**nsp.config.to_dict(), "kind": "hmar", "branch_depth": b})
        model = cls(cfg).to(nsp.device)
        from .keymaps import nsp_to_hmar
        sd = nsp_to_hmar(nsp.state_dict(), cfg.depth, cfg.branch_depth)
        sd["mask_embed.weight"] = model.mask_embed.weight.detach().clone()
        sd["attn_bias_for_masking"] = model.attn_bias_for_masking
        model.load_state_dict(sd, strict=True)
        return model


def build_model(config: ModelConfig) -> nn.Module:
    """The module class that serves ``config.kind``."""
    return HMAR(config) if config.kind == "hmar" else ScaleTransformer(config)
