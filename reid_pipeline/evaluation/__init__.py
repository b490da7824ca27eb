"""Evaluation library: distances, Market-1501 metrics, k-reciprocal re-ranking and plots.

Plain PyTorch/numpy (no Dagster)::

    from reid_pipeline.evaluation import evaluate_rank, pairwise_distance, re_ranking
"""

from .distance import normalize, pairwise_distance
from .metrics import NoValidQueryError, ReIDEvaluator, evaluate_rank
from .plots import plot_cmc, plot_rank_list
from .rerank import re_ranking

__all__ = [
    "NoValidQueryError",
    "ReIDEvaluator",
    "evaluate_rank",
    "normalize",
    "pairwise_distance",
    "plot_cmc",
    "plot_rank_list",
    "re_ranking",
]
