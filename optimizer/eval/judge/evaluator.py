"""`evaluator=mt_bench`: MT-Bench-style LLM-as-judge scoring of the live merged model.

Example (the judge here is any OpenAI-compatible server on this machine)::

    python -m optimizer evaluator=mt_bench judge=openai judge.base_url=http://127.0.0.1:8000/v1 n_trials=5
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

import optimizer.eval.judge.audit as audit
from optimizer import UserError
from optimizer.eval import register_evaluator
from optimizer.eval.base import HELDOUT, SEARCH, SPLITS, EvaluationFailed, Scores
from optimizer.eval.judge.bench import Question, load_questions, split_questions
from optimizer.eval.judge.cache import JudgmentCache, judgment_key
from optimizer.eval.judge.chat import check_conv_template
from optimizer.eval.judge.clients import AnthropicJudge, OpenAIJudge
from optimizer.eval.judge.config import (
    GenerationFields,
    JudgeConfig,
    MtBenchConfig,
    check_judge_config,
    check_mtbench_config,
    parse_node,
)
from optimizer.eval.judge.generate import GenSettings, generate_answers
from optimizer.eval.judge.judging import JudgeRequest, JudgeRunner
from optimizer.eval.judge.language import expected_script, language_mismatch
from optimizer.eval.judge.local_judge import LocalJudge, check_local_model
from optimizer.eval.judge.prompts import JudgePrompt, load_judge_prompts, prompt_for, render, select_prompts
from optimizer.eval.judge.scoring import TASK, Judgment, penalised, question_score, summarise
from optimizer.resources import resolve_path

log = logging.getLogger(__name__)
CACHE_FILE = ".judge_cache.sqlite"


def make_judge(cfg: JudgeConfig, device: torch.device) -> Any:
    """The judge client of `cfg.kind` (nothing is contacted or loaded until the first judgment)."""
    if cfg.kind == "local":
        return LocalJudge(cfg, device)
    return {"openai": OpenAIJudge, "anthropic": AnthropicJudge}[cfg.kind](cfg)


class MtBenchEvaluator:
    """Generates answers with the live model and has a judge rate them (see MtBenchConfig, JudgeConfig).

    Args:
        cfg / judge_cfg: validated configs.
        device: the run's device (a local judge is loaded there).
        run_dir: `runs/<study>`; the default judgment cache lives beside it, shared by all studies.
        seed: seeds sampling when a temperature > 0 is asked for.
        judge: a ready judge client (tests); default from judge_cfg.
    """

    name = TASK

    def __init__(self, cfg: MtBenchConfig, judge_cfg: JudgeConfig, *, device: torch.device, run_dir: Path,
                 seed: int = 0, judge: Any = None):
        self.cfg, self.judge_cfg, self.device, self.seed = cfg, judge_cfg, device, seed
        self.run_dir = Path(run_dir)
        self._judge, self._cache = judge, None
        self._questions: list[Question] | None = None
        self._prompts: dict[str, JudgePrompt] = {}

    @property
    def weights(self) -> dict[str, float]:
        """Task weights of the default objective: the one MT-Bench score."""
        return {TASK: 1.0}

    @property
    def chunk_size(self) -> int:
        """Judged questions are scored together; no per-item reports (per-item pruners are refused)."""
        return 0

    def splits(self) -> tuple[str, ...]:
        """The splits this bench can score ("heldout" only when part of it is held out)."""
        held = self.cfg.heldout_ids or self.cfg.heldout_share > 0
        return (SEARCH, HELDOUT) if held else (SEARCH,)

    def cache_path(self) -> Path:
        return Path(self.cfg.cache_path).expanduser() if self.cfg.cache_path else self.run_dir.parent / CACHE_FILE

    def _prompts_path(self, bench: Path) -> Path:
        if self.cfg.judge_prompts:
            return resolve_path(self.cfg.judge_prompts)
        here = bench / "judge_prompts.jsonl"
        return here if here.is_file() else bench.parent / "judge_prompts.jsonl"

    def validate(self) -> None:
        """Check configs, bench files, splits, the judge's SDK / model and key env var; raise UserError."""
        check_mtbench_config(self.cfg)
        check_judge_config(self.judge_cfg)
        check_conv_template(self.cfg.conv_template, "evaluator.conv_template")
        if self.judge_cfg.kind == "local":
            check_conv_template(self.judge_cfg.conv_template, "judge.conv_template")
            check_local_model(self.judge_cfg)
        elif importlib.util.find_spec(self.judge_cfg.kind) is None:
            raise UserError(f"judge={self.judge_cfg.kind} needs the {self.judge_cfg.kind!r} package: "
                            f"pip install {self.judge_cfg.kind}")
        bench = resolve_path(self.cfg.bench_dir)
        questions = load_questions(bench / "question.jsonl")
        self._questions = questions[: self.cfg.limit] if self.cfg.limit else questions
        self._prompts = select_prompts(load_judge_prompts(self._prompts_path(bench)), self.cfg.prompts)
        for split in SPLITS:
            self._split(split)
        for q in self._questions:
            for turn in range(1, len(q.turns) + 1):  # a template with an unknown placeholder fails here
                render(prompt_for(self._prompts, q, turn), q, list(q.turns), turn)

    def _split(self, split: str) -> list[Question]:
        assert self._questions is not None
        return split_questions(self._questions, split, heldout_share=self.cfg.heldout_share,
                               heldout_ids=[str(i) for i in self.cfg.heldout_ids], salt=self.cfg.split_salt)

    def _runner(self) -> JudgeRunner:
        if self._judge is None:
            self._judge = make_judge(self.judge_cfg, self.device)
        if self._cache is None and self.cfg.cache:
            self._cache = JudgmentCache(self.cache_path())
        return JudgeRunner(self._judge, self._cache, self.judge_cfg.parallel, self.judge_cfg.batch_size)

    def _requests(self, questions: list[Question], answers: list[list[str]]) -> tuple[list, list]:
        """All judge requests (question-major order) and, per request, its (question index, turn, index)."""
        requests, slots = [], []
        judge_id = self._judge.model_id
        for qi, (q, ans) in enumerate(zip(questions, answers, strict=True)):
            for turn in range(1, len(q.turns) + 1):
                p = prompt_for(self._prompts, q, turn)
                user = render(p, q, ans, turn)
                for j in range(self.cfg.n_judgments):
                    key = judgment_key(judge=judge_id, temperature=self.judge_cfg.temperature,
                                       max_tokens=self.judge_cfg.max_tokens, prompt=p.name,
                                       system=p.system_prompt, user=user, index=j)
                    requests.append(JudgeRequest(key, p.name, p.system_prompt, user))
                    slots.append((qi, turn, j))
        return requests, slots

    def evaluate(self, model: Any, tokenizer: Any, split: str, *, on_item: Callable | None = None) -> Scores:
        """Answer the split's questions with `model`, judge them, and score (see module docstring).

        Raises:
            EvaluationFailed: more judgments failed than evaluator.max_failed_share allows; the exception
                carries `.artifacts` and `.info` so the failed trial can still be audited.
        """
        if self._questions is None:
            self.validate()
        questions = self._split(split)
        t0 = time.perf_counter()
        shared = {f.name: getattr(self.cfg, f.name) for f in fields(GenerationFields)}
        settings = GenSettings(**shared, seed=self.seed)
        answers = generate_answers(model, tokenizer, questions, settings)
        t1 = time.perf_counter()
        runner = self._runner()
        before = (self._judge.stats.requests, self._judge.stats.retries)  # the judge's counters span trials
        records = self._judge_all(runner, questions, answers, on_item)
        info = self._info(runner, before, t1 - t0, time.perf_counter() - t1, len(questions))
        artifacts = {audit.ANSWERS_FILE: audit.answers_jsonl(questions, answers),
                     audit.JUDGMENTS_FILE: audit.judgments_jsonl(records)}
        try:
            summary = summarise(questions, records, self.cfg.max_failed_share)
        except EvaluationFailed as e:
            e.artifacts, e.info = artifacts, info  # type: ignore[attr-defined]
            raise
        info.update(summary["info"])
        log.info("mt_bench %s: %.3f (%d new judgments, %d cached, %d failed)", split, summary["tasks"][TASK],
                 info["judge_new"], info["judge_cache_hits"], info["judge_failures"])
        return Scores(tasks=summary["tasks"], metrics=summary["metrics"], items=summary["items"], info=info,
                      artifacts=artifacts)

    def _judge_all(self, runner: JudgeRunner, questions: list[Question], answers: list[list[str]],
                   on_item: Callable | None) -> list[Judgment]:
        requests, slots = self._requests(questions, answers)
        left = [0] * len(questions)
        for qi, _, _ in slots:
            left[qi] += 1
        records: list[Judgment] = []
        expected = [expected_script(q.turns[0], self.cfg.language or q.language) for q in questions]
        stream = runner.run(requests)
        try:
            for i, outcome in stream:
                qi, turn, j = slots[i]
                q, answer = questions[qi], answers[qi][turn - 1]
                mismatch = language_mismatch(answer, expected[qi])
                records.append(Judgment(
                    q.question_id, q.category, turn, j, self._judge.model_id, requests[i].prompt_name,
                    penalised(outcome.rating, mismatch, self.cfg.language_penalty), outcome.rating, mismatch,
                    outcome.cached, outcome.error, outcome.text, requests[i].user,
                    outcome.tokens_in, outcome.tokens_out))
                left[qi] -= 1
                if left[qi] == 0 and on_item is not None:
                    score = question_score([r for r in records if r.question_id == q.question_id])
                    if score == score:  # a question whose judgments all failed has no score to report
                        on_item(TASK, qi, score)
        finally:
            stream.close()  # a pruned trial stops judging here
        return records

    def _info(self, runner: JudgeRunner, before: tuple[int, int], gen_s: float, judge_s: float,
              n_questions: int) -> dict[str, Any]:
        c, st, jc = runner.counts, self._judge.stats, self.judge_cfg
        price = (jc.price_input_per_mtok / 1e6, jc.price_output_per_mtok / 1e6)
        return {"judge_model": self._judge.model_id, "judge_requests": st.requests - before[0],
                "judge_retries": st.retries - before[1],
                "judge_new": c["new"], "judge_cache_hits": c["cache_hits"], "judge_failures": c["failures"],
                "judge_tokens_in": c["tokens_in"], "judge_tokens_out": c["tokens_out"],
                "judge_cost_usd": round(c["tokens_in"] * price[0] + c["tokens_out"] * price[1], 6),
                "judge_cost_saved_usd": round(c["saved_tokens_in"] * price[0] + c["saved_tokens_out"] * price[1], 6),
                "answer_seconds": round(gen_s, 3), "judge_seconds": round(judge_s, 3), "n_questions": n_questions}

    def close(self) -> None:
        """Release the cache connection (the evaluator is reusable afterwards)."""
        if self._cache is not None:
            self._cache.close()
            self._cache = None


@register_evaluator(TASK)
def build_mt_bench(cfg: Any, context: dict[str, Any]) -> MtBenchEvaluator:
    """Factory for the registry: `cfg` is the `evaluator` node; the judge is `context["cfg"].judge`."""
    root = context.get("cfg")
    judge_node = root.get("judge") if root is not None and hasattr(root, "get") else None
    return MtBenchEvaluator(parse_node(MtBenchConfig, cfg, "evaluator"), parse_node(JudgeConfig, judge_node, "judge"),
                            device=context.get("device") or torch.device("cpu"),
                            run_dir=Path(context.get("run_dir", "runs/mt_bench")), seed=int(context.get("seed", 0)))
