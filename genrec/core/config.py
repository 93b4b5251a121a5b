"""Typed, frozen configuration, validated once at the edge. Presets (model sizes, recipes) are YAML data files."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


TASK = ("Given an image, summarize the provided image in one word. Given only text, describe the text in one word.")


class EmbedderConfig(Frozen):
    """A transformers backbone from a local directory (DESIGN.md, The embedder)."""

    backbone: str = Field("minilm", description="'minilm' (the packaged all-MiniLM-L6-v2) or a local model directory "
                          "(an encoder, a causal LM such as Qwen2, or a VLM such as Qwen2-VL)")
    pooling: Literal["auto", "mean", "last"] = Field(
        "auto", description="mean over tokens, or the last prompt token; auto: mean for encoders, last for causal "
        "LMs and VLMs")
    prompt: bool | None = Field(None, description="the two-level hierarchical prompt: the task definition (level 1, "
                                "the system turn of chat backbones) and a representation instruction after the input "
                                "(level 2); default: on for causal LMs and VLMs, off for encoders")
    task: str = Field(TASK, description="level 1: the task definition shared by queries and documents")
    query_instruction: str = Field("Represent the given text in one word.", description="level 2 for queries")
    document_instruction: str = Field("Represent the given text in one word.", description="level 2 for documents")
    image_instruction: str = Field("Represent the given image in one word.", description="level 2 for inputs with an "
                                   "image (VLM backbones)")
    max_length: int = Field(64, ge=8, le=8192, description="tokens per input, prompt included; a longer text is an "
                            "error for requests and is truncated for catalogs and training data")
    batch_size: int = Field(128, ge=1, le=4096, description="inputs per forward pass")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights and activations; auto: bfloat16 on CUDA, float32 on CPU")
    max_image_pixels: int = Field(200_704, ge=3136, description="images are resized to at most this many pixels "
                                  "(VLM backbones; 200,704 = 256 visual tokens of Qwen2-VL)")


class SemanticIdConfig(Frozen):
    levels: int = Field(3, ge=1, le=8, description="residual k-means levels (a collision code may follow them)")
    codebook_size: int = Field(256, ge=2, le=4096, description="codes per level")
    kmeans_iters: int = Field(25, ge=1, le=500, description="k-means iterations per level")
    unique_last_level: bool = Field(
        True, description="assign the last level by an optimal one-item-per-code matching inside each prefix, so "
        "items collide only when a prefix holds more items than codes")
    collision_code: Literal["auto", "always"] = Field(
        "auto", description="the code after the residual levels that tells items with identical residual codes "
        "apart: auto appends it only when some items collide (otherwise it would be a level of one code, a wasted "
        "decoder step per beam); always appends it")
    collaborative: float = Field(
        0.0, ge=0.0, le=1.0, description="share of collaborative signal in the vectors the codes are clustered from: "
        "each item's text vector is joined with a co-occurrence vector (PPMI + SVD over the training part of the "
        "sequences), weighted so this is its share of every squared distance; 0: text only, 1: behaviour only (a "
        "catalog without text)")
    collaborative_dim: int = Field(64, ge=2, le=1024, description="dimensions of the co-occurrence vectors")
    collaborative_window: int = Field(3, ge=1, le=100, description="items at most this many positions apart in a "
                                      "sequence count as co-occurring")
    seed: int = Field(0, description="k-means seed")


class IndexConfig(Frozen):
    factory: str = Field("auto", description="FAISS factory string (inner product on normalised vectors), e.g. Flat, "
                         "HNSW32, IVF1024,PQ32; auto: Flat (exact) up to 100,000 items, HNSW32 above")
    ef_search: int = Field(128, ge=1, le=65536, description="HNSW: candidates kept during a search (recall vs speed)")
    nprobe: int = Field(32, ge=1, le=65536, description="IVF: inverted lists visited per search (recall vs speed)")
    refine_factor: float = Field(4.0, ge=1.0, le=1000.0, description="with ',RFlat': re-rank this many times k "
                                 "approximate candidates exactly")


class RecommenderConfig(Frozen):
    d_model: int = Field(128, ge=8, le=4096, description="hidden size")
    n_heads: int = Field(4, ge=1, le=64, description="attention heads (must divide d_model)")
    n_layers: int = Field(2, ge=1, le=48, description="layers of the causal history encoder (one position per item)")
    n_code_layers: int = Field(2, ge=1, le=16, description="layers of the code decoder (one position per SID code)")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="dropout on embeddings, attention outputs and MLPs")
    max_history: int = Field(20, ge=1, le=512, description="most recent items the model sees")
    item_embedding: bool = Field(
        False, description="add a learned per-item embedding to each history position (input side only; outputs "
        "stay semantic IDs)")
    constrained_loss: bool = Field(
        False, description="train each level's softmax over the trie-valid children only (the distribution that "
        "constrained decoding renormalises to)")
    node_embedding: bool = Field(
        False, description="give every trie node and item its own output vector, added to its code embedding "
        "(item-level capacity where a prefix already narrows to a few items); needs constrained_loss")
    tie_item_vectors: bool = Field(
        False, description="with node_embedding and item_embedding: an item's output vector is its input item "
        "embedding (as in SASRec), so a rare item learns from every history it appears in as well as every time it "
        "is the target")

    positions: Literal["newest", "oldest"] = Field("newest", description="history position embeddings counted back "
                                                   "from the most recent item (it always has position 0) or forward "
                                                   "from the oldest (models saved before this option)")
    item_loss: float = Field(
        0.0, ge=0.0, le=100.0, description="weight of an item-level loss beside the semantic-ID loss: the history "
        "state scores the target's item vector against `item_negatives` uniformly drawn items (sampled softmax, "
        "SASRec+SS's loss), so the history encoder learns item-level collaborative signal; needs item_embedding")
    item_negatives: int = Field(256, ge=1, le=65536, description="item_loss: negatives per training sequence")
    rescore: float = Field(
        0.0, ge=0.0, le=100.0, description="decoding: the generator proposes the beam's complete items and each is "
        "ranked by its path log-probability + rescore * (history state . item vector), one dot product per "
        "candidate; 0 ranks by the path alone. Needs item_embedding (and item_loss, which trains that score)")

    @model_validator(mode="after")
    def _node_embedding_needs_constrained_loss(self):
        if self.node_embedding and not self.constrained_loss:
            raise ValueError("recommender.node_embedding needs recommender.constrained_loss: true (a code's node "
                             "term exists only where the code is a valid child)")
        if self.tie_item_vectors and not (self.node_embedding and self.item_embedding):
            raise ValueError("recommender.tie_item_vectors needs node_embedding: true and item_embedding: true "
                             "(it shares the item's input embedding with its output vector)")
        if (self.item_loss or self.rescore) and not self.item_embedding:
            raise ValueError("recommender.item_loss and recommender.rescore need item_embedding: true (they score "
                             "the history state against the item embeddings)")
        return self


class TrainConfig(Frozen):
    batch_size: int = Field(256, ge=1, le=65536, description="training windows per step (global, over all ranks)")
    lr: float = Field(2e-3, gt=0, le=1.0, description="peak AdamW learning rate")
    weight_decay: float = Field(0.05, ge=0, le=1.0, description="AdamW weight decay")
    warmup_steps: int = Field(200, ge=0, description="linear warm-up steps")
    max_epochs: int = Field(200, ge=1, description="stop after this many epochs")
    max_minutes: float = Field(45.0, gt=0, description="stop after this much wall time (a budget, not a goal)")
    eval_every: int = Field(1, ge=1, description="evaluate on the full validation split every N epochs")
    patience: int = Field(6, ge=1, description="early stop after N evaluations without a better validation NDCG@10")
    checkpoint_every: int = Field(500, ge=1, description="write a resumable checkpoint every N steps")
    beam_width: int = Field(20, ge=1, le=1024, description="beam width for validation decoding")
    valid_users: int | None = Field(None, ge=16, description="validation users, a seeded sample (default: the "
                                    "whole split; big catalogs with many users validate faster on a sample)")
    seed: int = Field(0, description="seed for initialisation, data order and dropout")


class EmbedderTrainConfig(TrainConfig):
    """`genrec train embedder`: contrastive fine-tuning on item-to-next-item pairs, with SaHa hard negatives."""

    hard_negatives: bool = Field(True, description="SaHa: pack each anchor with its k hard owner pairs in one batch "
                                 "(false: plain in-batch negatives, random batches)")
    k: int = Field(15, ge=1, le=1024, description="SaHa: hard owner pairs packed with each anchor")
    pool: int = Field(90, ge=2, le=10_000, description="SaHa: candidates retrieved per anchor before the k least "
                      "similar owners are kept (drops likely false negatives)")
    temperature: float = Field(0.02, gt=0.0, le=10.0, description="InfoNCE temperature")
    bucket_rows: int = Field(16, ge=1, le=65_536, description="the batch's texts run through the backbone this many "
                             "at a time, sorted by length, so short texts are not padded to the batch's longest (1.8x "
                             "faster on CPU at batch 64); the loss still spans the whole batch. Raise it on a GPU")

    @model_validator(mode="after")
    def _check(self):
        if self.hard_negatives and self.pool <= self.k:
            raise ValueError(f"embedder_train.pool ({self.pool}) must exceed k ({self.k}): the k owners are picked "
                             f"from the pool")
        if self.hard_negatives and self.batch_size < self.k + 1:
            raise ValueError(f"embedder_train.batch_size ({self.batch_size}) must hold an anchor and its k = {self.k} "
                             f"hard pairs: use at least {self.k + 1}")
        return self


class SASRecConfig(Frozen):
    d_model: int = Field(64, ge=8, le=4096, description="hidden size")
    n_heads: int = Field(2, ge=1, le=64, description="attention heads")
    n_layers: int = Field(2, ge=1, le=48, description="transformer layers")
    dropout: float = Field(0.3, ge=0.0, lt=1.0, description="dropout")
    max_history: int = Field(20, ge=1, le=512, description="most recent items the model sees")
    loss: Literal["full", "sampled"] = Field("full", description="next-item loss: softmax over the whole catalog, or "
                                             "over the target and `negatives` items drawn uniformly per position "
                                             "(sampled softmax, the loss of the strongest published SASRec re-runs)")
    negatives: int = Field(256, ge=1, le=65536, description="sampled softmax: negatives per target position")
    positions: Literal["newest", "oldest"] = Field("newest", description="position embeddings counted back from the "
                                                   "most recent item (it always has position 0, as in RecTools' "
                                                   "SASRec) or forward from the oldest (models saved before this "
                                                   "option)")


class RewardConfig(Frozen):
    """What a recommendation earns (DESIGN.md, Rewards): the value head learns it, VED searches with it, RL optimises
    it. next_item: 1 for the user's next item. horizon: the discounted hit over the user's next `horizon`
    interactions, sum over h of discount^(h-1) * [item == s(t+h)], a goal beyond the next click that the likelihood
    (trained for the next item only) does not optimise."""

    kind: Literal["next_item", "horizon"] = Field("next_item", description="next_item or horizon")
    horizon: int = Field(2, ge=1, le=20, description="H: interactions the horizon reward looks ahead")
    discount: float = Field(0.7, gt=0.0, le=1.0, description="gamma: the h-th interaction weighs gamma^(h-1)")

    @property
    def discounts(self) -> tuple[float, ...]:
        """The weight of each interaction ahead: (1,) for next_item, (1, gamma, ..., gamma^(H-1)) for horizon."""
        steps = self.horizon if self.kind == "horizon" else 1
        return tuple(self.discount ** h for h in range(steps))


class ValueConfig(Frozen):
    """`genrec train value`: fit the value head on the SFT policy's own rollouts (DESIGN.md, Value model)."""

    reward_weights: tuple[float, ...] = Field((0.3, 0.5, 1.0), min_length=1, description="reward of a matching "
                                              "prefix per SID level; later levels (the collision code) earn 0")
    gamma: float = Field(0.99, ge=0.0, le=1.0, description="TD discount")
    rollouts: int = Field(8, ge=1, le=256, description="policy samples per (history, target) pair")
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="sampling temperature of the rollouts")
    batch_size: int = Field(256, ge=1, le=65536, description="(history, target) pairs per step")
    lr: float = Field(1e-3, gt=0, le=1.0, description="AdamW learning rate of the head")
    max_epochs: int = Field(4, ge=1, description="passes over the training pairs")
    max_minutes: float = Field(10.0, gt=0, description="wall-time budget")
    valid_users: int = Field(4096, ge=16, description="validation users scored after every epoch")
    seed: int = Field(0, description="seed of the data order and the rollouts")


class VedConfig(Frozen):
    """Value-guided efficient decoding (DESIGN.md, VED): defaults for `--decoding ved`."""

    lam: float = Field(0.1, ge=0.0, le=100.0, description="weight of the entropy in the priority G = V + lam * H")
    beta: float = Field(1.0, ge=0.0, le=100.0, description="UCB exploration weight")
    gate: bool = Field(True, description="expand a node only if its G is at least the mean G at its depth")
    widen_power: float = Field(2.0, ge=0.0, le=8.0, description="progressive widening: a node with c children "
                               "takes another once visited (c + 1)^widen_power times (lower widens sooner)")
    init_depth: int = Field(1, ge=0, le=16, description="levels decoded by the initial width-B beam before the "
                            "value-guided search spends the rest of the budget")
    score: Literal["logp", "value", "mix"] = Field("logp", description="final score of a complete item: its "
                                                   "log-probability, its value, or log-probability + value_weight "
                                                   "* value")
    value_weight: float = Field(1.0, ge=0.0, le=100.0, description="weight of the value in the 'mix' score")
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="temperature of the policy from which a new child "
                               "is sampled (0 = the most probable unexpanded code)")
    seed: int = Field(0, description="seed of the sampled expansions (VED is deterministic under it)")


class RlConfig(Frozen):
    """`genrec train rl`: Sibling-GRPO from the SFT policy (DESIGN.md, Sibling-GRPO)."""

    rollout: Literal["ved", "beam", "sample"] = Field("ved", description="how the G candidates of a context are "
                                                      "drawn: VED, constrained beam search, or constrained sampling")
    group_size: int = Field(16, ge=2, le=256, description="candidates per user context (G)")
    budget: int | None = Field(None, ge=1, description="VED forwards per context (default: width-G beam search's)")
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="temperature of sampled rollouts")
    rewards: dict[Literal["exact", "ndcg_rule", "ranking", "cosine"], float] = Field(
        {"exact": 1.0, "ndcg_rule": 1.0}, description="reward weights: 'exact' (the rule reward: 1 for the target), "
        "'ndcg_rule' (MiniOneRec's / V-STAR's rank-discounted penalty of every other candidate in a group that holds "
        "the target; with 'exact', their published reward, the default), 'ranking' (our variant: 1 for the target "
        "and a penalty for the wrong candidates above it only), 'cosine' (item-vector similarity to the target)")
    grpo_weight: float = Field(1.0, ge=0.0, description="weight of the group GRPO loss")
    sibling_weight: float = Field(1.0, ge=0.0, description="weight of the Sibling-GRPO loss")
    value_weight: float = Field(1.0, ge=0.0, description="weight of the value head's TD loss")
    kl_beta: float = Field(1e-3, ge=0.0, description="weight of the k3 KL to the frozen SFT reference")
    clip: float | None = Field(0.2, gt=0.0, lt=1.0, description="PPO ratio clipping (null: no clipping)")
    inner_epochs: int = Field(1, ge=1, le=16, description="optimisation passes over each batch of rollouts")
    batch_size: int = Field(64, ge=1, le=65536, description="user contexts per step (global, over all ranks)")
    micro_batch: int | None = Field(None, ge=1, le=65536, description="contexts per forward/backward on each rank "
                                    "(gradient accumulation; default: the whole batch at once)")
    lr: float = Field(1e-4, gt=0, le=1.0, description="AdamW learning rate of the policy")
    value_lr: float = Field(1e-3, gt=0, le=1.0, description="AdamW learning rate of the value head")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (default: no limit)")
    max_minutes: float = Field(60.0, gt=0, description="wall-time budget (validation excluded)")
    eval_every: int = Field(100, ge=1, description="validate every N steps")
    valid_users: int | None = Field(None, ge=16, description="validation users (default: the full split)")
    beam_width: int = Field(20, ge=1, le=1024, description="beam width of validation decoding")
    patience: int = Field(5, ge=1, description="early stop after N validations without a better NDCG@10")
    checkpoint_every: int = Field(50, ge=1, description="write a resumable checkpoint every N steps")
    seed: int = Field(0, description="seed of the context order, the rollouts and the reward noise")

    @model_validator(mode="after")
    def _check(self):
        if not any(self.rewards.values()):
            raise ValueError("rl.rewards needs at least one non-zero weight, e.g. {exact: 1.0, ndcg_rule: 1.0}")
        return self


class Preset(Frozen):
    """One named bundle recipe: how to embed, quantize, index, and train."""

    embedder: EmbedderConfig = EmbedderConfig()
    semantic_ids: SemanticIdConfig = SemanticIdConfig()
    index: IndexConfig = IndexConfig()
    recommender: RecommenderConfig = RecommenderConfig()
    sft: TrainConfig = TrainConfig()
    sasrec: SASRecConfig = SASRecConfig()
    sasrec_train: TrainConfig = TrainConfig(lr=1e-3, max_minutes=10.0, patience=4)
    reward: RewardConfig = RewardConfig()
    value: ValueConfig = ValueConfig()
    ved: VedConfig = VedConfig()
    rl: RlConfig = RlConfig()
    embedder_train: EmbedderTrainConfig = EmbedderTrainConfig(
        batch_size=128, lr=2e-5, weight_decay=0.01, warmup_steps=50, max_epochs=3, max_minutes=20.0, patience=2,
        checkpoint_every=100)


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("genrec.core.presets").iterdir()
                  if p.name.endswith(".yaml"))


SMALL_CATALOG = 5_000  # items: below this `genrec build` picks the small preset, from it on the medium one


def preset_for_catalog(n_items: int) -> str:
    """The shipped preset named for a catalog of this size (what `genrec build --preset auto` uses)."""
    return "small" if n_items < SMALL_CATALOG else "medium"


def load_preset(name_or_path: str) -> Preset:
    """A shipped preset by name (see preset_names()) or a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        text = path.read_text()
    elif name_or_path in preset_names():
        text = resources.files("genrec.core.presets").joinpath(f"{name_or_path}.yaml").read_text()
    else:
        raise ValueError(f"unknown preset {name_or_path!r}: use one of {preset_names()} or a path to a YAML file")
    try:
        return Preset.model_validate(yaml.safe_load(text) or {})
    except ValidationError as e:
        raise ValueError(f"invalid preset {name_or_path!r}:\n{e}") from None
