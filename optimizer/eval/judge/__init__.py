"""LLM-as-judge evaluation (MT-Bench style): bench files, answer generation, judge clients, cache, scoring.

Importing this package registers the `mt_bench` evaluator.
"""

from optimizer.eval.judge.config import JudgeConfig, MtBenchConfig
from optimizer.eval.judge.evaluator import MtBenchEvaluator, build_mt_bench

__all__ = ["JudgeConfig", "MtBenchConfig", "MtBenchEvaluator", "build_mt_bench"]
