"""The model specification: one flat, serialisable dataclass for all three families, and the
static facts of each routing strategy.

``ModelSpec`` is what every other part reads: the model builder, the FLOP and parameter counter
(:mod:`sectional_moe.models.flops`), the theory module, the benchmark and the checkpoint loader. It
holds only plain Python values (no torch), so it can be saved into a checkpoint, logged to W&B
(whole, as ``spec.*``) and rebuilt by ``evaluate.py`` and the report.

:class:`RoutingRule` says, without torch, what a routing strategy is: which families may use it,
how many experts each item goes to, whether it has a learned router (a d x E matmul and aux
losses), whether item group e always goes to expert e. Validation and FLOP counting read the
rule; :mod:`sectional_moe.models.routers` holds the router module of the same name.

It is assembled from the Hydra config by :func:`spec_from_config`, which merges the ``size``,
``model`` and ``routing`` groups with the top-level ``experts`` key and the tokenizer's vocabulary
size, and validates every combination once, raising :class:`~sectional_moe.errors.ConfigError`
with the key and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from sectional_moe.errors import ConfigError

FAMILIES = ("dense", "moe", "sectional")
SEQ_POOLS = ("mean", "linear")
PRE_EXPERT_RESOLUTIONS = ("short", "full", "cross")
AUX_LOSS_REDUCTIONS = ("sum", "mean")


@dataclass(frozen=True)
class RoutingRule:
    """The static facts of a routing strategy (torch-free; see the module docstring)."""

    name: str
    families: tuple[str, ...]  # families that may use it
    learned: bool = False  # a learned d x E router (FLOPs, parameters, lb/z aux losses); uses routing.top_k
    dedicated: bool = False  # item group e always goes to expert e (sections -> experts, batched GEMM)
    note: str = ""  # one line for error messages and docs

    def experts_per_item(self, spec: "ModelSpec") -> int:
        """K: experts each routed item (token, or token slice) is sent to."""
        return int(spec.top_k) if self.learned else 1


#: every routing strategy, by the name ``routing.name`` uses (conf/routing/<name>.yaml)
ROUTING_RULES: dict[str, RoutingRule] = {}


def register_routing(rule: RoutingRule) -> RoutingRule:
    """Add a routing strategy's rule (its router module goes into :mod:`sectional_moe.models.routers`)."""
    ROUTING_RULES[rule.name] = rule
    return rule


register_routing(RoutingRule("topk", ("moe", "sectional"), learned=True,
                             note="a learned fp32 router sends each item to its top-k experts"))
register_routing(RoutingRule("hash", ("moe", "sectional"),
                             note="a fixed seeded table: token id (and section) -> expert"))
register_routing(RoutingRule("segment_fixed", ("sectional",), dedicated=True,
                             note="section i -> expert i"))


def routings_for(family: str) -> tuple[str | None, ...]:
    """The ``routing`` values a family accepts (dense: only none)."""
    if family == "dense":
        return (None,)
    return tuple(name for name, rule in ROUTING_RULES.items() if family in rule.families)


@dataclass
class ModelSpec:
    """Architecture of a LLaMA-style decoder LM of one family (dense, token MoE or sectional MoE)."""

    # --- family and size -------------------------------------------------------------------
    family: str = "sectional"  # dense | moe | sectional
    size: str = "custom"  # name of the size preset it came from (for dashboards only)
    vocab_size: int = 8192  # set from the tokenizer
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4  # grouped-query attention: n_heads % n_kv_heads == 0
    d_ff: int = 384  # SwiGLU hidden width of a dense FFN
    seq_len: int = 128  # training context length
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    # --- mixture of experts (moe and sectional) ---------------------------------------------
    experts: int | None = 4  # E: token-MoE experts, or sections of d_model in the sectional family
    routing: str | None = "segment_fixed"  # segment_fixed | topk | hash
    top_k: int = 2  # experts per token (moe) or per slice (sectional topk)
    expert_d_ff: int | None = None  # expert FFN width; None: d_ff (moe) or d_ff // E (sectional)
    capacity_factor: float | None = None  # None: dropless; else tokens over capacity are dropped
    shared_expert: bool = False  # moe topk: one always-on expert of width expert_d_ff
    lb_loss_coef: float = 0.01  # load-balancing loss weight per routed layer (logged unscaled, 1.0 = balanced)
    z_loss_coef: float = 0.001  # router z-loss weight per routed layer
    # sum: each routed layer's aux losses weigh the coefficient (the same per layer in every family);
    # mean: the coefficient is shared by all routed layers (as before 2026-12-07)
    aux_loss_reduction: str = "sum"
    hash_seed: int = 0  # seed of the dedicated generator that draws the hash tables

    # --- sectional family (Sane 2025; defaults from shared/paper-notes.md) -----------------
    pre_expert: bool = True  # full-width transformer layer before the experts
    # where it runs: short (on the T/r shortened positions), full (at full length on the residual
    # stream, shortened after it), cross (T/r short queries over the full-length keys); all [I]
    pre_expert_resolution: str = "short"
    seq_reduction: int = 4  # r: the pre-expert layer shortens the sequence r-fold (1 = off)
    seq_pool: str = "mean"  # how r tokens are merged: mean | linear
    expert_attention: bool = True  # experts hold attention + FFN (False: FFN only)
    merge_proj: bool = False  # d x d projection after concatenating the sections
    # every k-th layer is sectional, the others dense. 1 is the paper read literally (and the
    # decisions table); conf/model/sectional.yaml, what train.py builds, defaults to 2 because with
    # r = E every layer sectional trails dense badly (docs/results/README.md)
    sectional_every: int = 1

    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes, never read by the model

    # ------------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_experts(self) -> int:
        """E, or 1 for the dense family."""
        return 1 if self.family == "dense" else int(self.experts or 1)

    @property
    def section_dim(self) -> int:
        """Width d/E of one section (sectional family)."""
        return self.d_model // self.n_experts

    @property
    def section_heads(self) -> int:
        """Query heads per section: n_heads / E, at least one."""
        return max(1, self.n_heads // self.n_experts)

    @property
    def section_kv_heads(self) -> int:
        return max(1, self.n_kv_heads // self.n_experts)

    @property
    def section_head_dim(self) -> int:
        return self.section_dim // self.section_heads

    @property
    def resolved_expert_d_ff(self) -> int:
        if self.expert_d_ff:
            return int(self.expert_d_ff)
        if self.family == "sectional":
            return self.d_ff // self.n_experts
        return self.d_ff

    @property
    def routing_rule(self) -> RoutingRule | None:
        """The :class:`RoutingRule` of ``routing`` (None for dense)."""
        return None if self.family == "dense" else ROUTING_RULES.get(str(self.routing))

    @property
    def experts_per_item(self) -> int:
        """K: experts per routed item (top_k for a learned router, else 1); 1 for dense."""
        rule = self.routing_rule
        return rule.experts_per_item(self) if rule is not None else 1

    def is_routed_layer(self, layer: int) -> bool:
        """Layer ``layer`` sends items to experts (every moe layer; the sectional layers)."""
        return self.family == "moe" or self.is_sectional_layer(layer)

    def is_sectional_layer(self, layer: int) -> bool:
        """Layer ``layer`` (0-based) is a sectional block: the last of every ``sectional_every``."""
        return self.family == "sectional" and (layer + 1) % self.sectional_every == 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError("model", f"unknown model keys {unknown}; known keys: {sorted(names)}")
        return cls(**dict(d))

    # ------------------------------------------------------------------------------------------
    def validate(self) -> "ModelSpec":
        """Check every invariant; raise ConfigError naming the key and the fix. Returns self."""
        if self.family not in FAMILIES:
            raise ConfigError("model", f"unknown family {self.family!r}; use model=dense, model=moe or model=sectional")
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "seq_len"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"size.{key}", f"{key}={v!r} must be a positive integer")
        if self.d_model % self.n_heads:
            raise ConfigError("size.n_heads", f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; pick n_heads dividing d_model")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError("size.n_kv_heads", f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; pick n_kv_heads dividing n_heads")
        if self.head_dim % 2:
            raise ConfigError("size.n_heads", f"head_dim=d_model/n_heads={self.head_dim} must be even for RoPE; change d_model or n_heads")
        if self.init_std <= 0:
            raise ConfigError("model.init_std", f"init_std={self.init_std} must be > 0")
        if self.family == "dense":
            return self
        self._validate_moe()
        if self.family == "sectional":
            self._validate_sectional()
        return self

    def _validate_moe(self) -> None:
        E = self.experts
        if not isinstance(E, int) or isinstance(E, bool) or E <= 0:
            raise ConfigError("experts", f"experts={E!r} must be a positive integer, e.g. experts=8")
        allowed = routings_for(self.family)
        if self.routing not in allowed:
            if self.family == "moe" and self.routing == "segment_fixed":
                raise ConfigError("routing", "routing=segment_fixed needs model=sectional (token MoE has no sections); use routing=topk or routing=hash")
            raise ConfigError("routing", f"routing={self.routing!r} is not valid for model={self.family}; use one of {', '.join(map(str, allowed))}")
        rule = ROUTING_RULES[str(self.routing)]
        if rule.learned:
            if not isinstance(self.top_k, int) or self.top_k <= 0:
                raise ConfigError("routing.top_k", f"top_k={self.top_k!r} must be a positive integer")
            if self.top_k > E:
                raise ConfigError("routing.top_k", f"top_k={self.top_k} > experts={E}; use routing.top_k<={E} or more experts")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError("routing.capacity_factor", f"capacity_factor={self.capacity_factor} must be > 0, or null for dropless routing")
        if self.expert_d_ff is not None and self.expert_d_ff <= 0:
            raise ConfigError("model.expert_d_ff", f"expert_d_ff={self.expert_d_ff} must be > 0, or null for the family default")
        for key in ("lb_loss_coef", "z_loss_coef"):
            if getattr(self, key) < 0:
                raise ConfigError(f"routing.{key}", f"{key}={getattr(self, key)} must be >= 0")
        if self.aux_loss_reduction not in AUX_LOSS_REDUCTIONS:
            raise ConfigError("routing.aux_loss_reduction", f"aux_loss_reduction={self.aux_loss_reduction!r}; use sum "
                              "(each routed layer weighs the coefficient) or mean (the layers share it)")
        if self.shared_expert and not (self.family == "moe" and rule.learned):
            raise ConfigError("routing.shared_expert", "shared_expert=true is only defined for model=moe with a learned router (routing=topk)")

    def _validate_sectional(self) -> None:
        E, d = self.n_experts, self.d_model
        if d % E:
            raise ConfigError("experts", f"d_model={d} is not divisible by experts={E}; pick experts dividing d_model")
        if E <= self.n_heads and self.n_heads % E:
            raise ConfigError("experts", f"n_heads={self.n_heads} is not divisible by experts={E}: each section needs n_heads/E whole heads; pick experts dividing n_heads")
        if E <= self.n_kv_heads and self.n_kv_heads % E:
            raise ConfigError("experts", f"n_kv_heads={self.n_kv_heads} is not divisible by experts={E}; pick experts dividing n_kv_heads or a size with more kv heads")
        if self.section_dim % self.section_heads or self.section_head_dim % 2:
            raise ConfigError("experts", f"section width d_model/experts={self.section_dim} cannot hold {self.section_heads} heads of even width; use fewer experts")
        if self.expert_d_ff is None and self.d_ff % E:
            raise ConfigError("experts", f"d_ff={self.d_ff} is not divisible by experts={E}; set model.expert_d_ff or pick experts dividing d_ff")
        r = self.seq_reduction
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ConfigError("model.seq_reduction", f"seq_reduction={r!r} must be a positive integer or 'experts'")
        if self.seq_len % r:
            raise ConfigError("model.seq_reduction", f"seq_len={self.seq_len} is not divisible by seq_reduction={r}; pick r dividing seq_len (r=1 disables shortening)")
        if self.seq_pool not in SEQ_POOLS:
            raise ConfigError("model.seq_pool", f"seq_pool={self.seq_pool!r}; use one of {SEQ_POOLS}")
        if self.pre_expert_resolution not in PRE_EXPERT_RESOLUTIONS:
            raise ConfigError("model.pre_expert_resolution", f"pre_expert_resolution={self.pre_expert_resolution!r}; use one of "
                              f"{', '.join(PRE_EXPERT_RESOLUTIONS)} (where the pre-expert layer runs)")
        k = self.sectional_every
        if not isinstance(k, int) or k <= 0 or k > self.n_layers:
            raise ConfigError("model.sectional_every", f"sectional_every={k!r} must be an integer in [1, n_layers={self.n_layers}]")


def spec_from_config(cfg: Mapping[str, Any], vocab_size: int | None = None) -> ModelSpec:
    """Build and validate the :class:`ModelSpec` of a composed Hydra config.

    Reads ``cfg.size`` (shape), ``cfg.model`` (family and switches), ``cfg.routing`` (routing and
    its parameters) and ``cfg.experts``. ``vocab_size`` comes from the tokenizer; if None, the
    config's ``data.vocab_size`` is used.
    """
    size = dict(cfg["size"])
    model = dict(cfg["model"])
    routing = dict(cfg.get("routing") or {})
    family = model.pop("family", None)
    values: dict[str, Any] = {"family": family, "size": size.pop("name", "custom")}
    values.update(size)
    values.update(model)
    name = routing.pop("name", None)
    values["vocab_size"] = int(vocab_size if vocab_size is not None else cfg["data"]["vocab_size"])
    if family == "dense":
        # dense ignores experts/routing; they are recorded as null so dashboards never mix it with MoE runs
        values.update(experts=None, routing=None)
    else:
        values.update(routing)
        values.update(experts=cfg.get("experts"), routing=name)
        r = values.get("seq_reduction", 1)
        if r == "experts":
            values["seq_reduction"] = values["experts"]
    if family != "sectional":
        for key in ("pre_expert", "pre_expert_resolution", "seq_reduction", "seq_pool", "expert_attention", "merge_proj",
                    "sectional_every"):
            values.pop(key, None)
    return ModelSpec.from_dict(values).validate()
