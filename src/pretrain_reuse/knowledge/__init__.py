"""Knowledge analysis by game-theoretic interactions (Jiang, Cheng & Li, arXiv 2410.08455).

Model-independent core: transforms of games (2^n values in bitmask layout) into AND/OR
interactions, their sparsification, the :class:`Interactions` value object, and the knowledge
metrics (preserved, discarded, new, exclusive knowledge; convergence over checkpoints).
"""

from .contiguity import Contiguity, contiguity, contiguous_coalitions, player_adjacency
from .interactions import (
    MAX_PLAYERS,
    harsanyi_and,
    harsanyi_or,
    mask_of,
    orders,
    players_of,
    reconstruct_and,
    reconstruct_or,
)
from .metrics import (
    MATCHES,
    MEASURES,
    SET_EFFECTS,
    AccuracyCorrelation,
    Convergence,
    Discrimination,
    KnowledgeReport,
    RatioStats,
    SampleKnowledge,
    SetAblation,
    SetDiscrimination,
    accuracy_correlation,
    cover_ratio,
    discrimination_power,
    knowledge_convergence,
    knowledge_report,
    knowledge_set,
    sample_knowledge,
    set_ablation,
    set_discrimination,
    transferability,
    weighted_overlap,
)
from .recovery import Recovery, ground_truth_recovery, rule_game
from .sparsify import (
    MAX_LP_PLAYERS,
    and_interactions,
    and_or_interactions,
    and_or_interactions_lp,
    and_or_interactions_sgd,
    joint_and_or_interactions,
)
from .synthetic import planted_game
from .values import Interactions

__all__ = [
    "MATCHES",
    "MAX_LP_PLAYERS",
    "MAX_PLAYERS",
    "MEASURES",
    "SET_EFFECTS",
    "AccuracyCorrelation",
    "Contiguity",
    "Convergence",
    "Discrimination",
    "Interactions",
    "KnowledgeReport",
    "RatioStats",
    "Recovery",
    "SampleKnowledge",
    "SetAblation",
    "SetDiscrimination",
    "accuracy_correlation",
    "and_interactions",
    "and_or_interactions",
    "and_or_interactions_lp",
    "and_or_interactions_sgd",
    "contiguity",
    "contiguous_coalitions",
    "cover_ratio",
    "discrimination_power",
    "ground_truth_recovery",
    "harsanyi_and",
    "harsanyi_or",
    "joint_and_or_interactions",
    "knowledge_convergence",
    "knowledge_report",
    "knowledge_set",
    "mask_of",
    "orders",
    "planted_game",
    "player_adjacency",
    "players_of",
    "reconstruct_and",
    "reconstruct_or",
    "rule_game",
    "sample_knowledge",
    "set_ablation",
    "set_discrimination",
    "transferability",
    "weighted_overlap",
]
