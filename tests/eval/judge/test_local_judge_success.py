"""judge=local, success path: a tiny transformers model that really writes a verdict judges the live model.

The judge is wired by hand, not trained: its attention and MLP outputs are zero, so each position's logits
depend only on its own token (a bigram table in `lm_head`), and greedy decoding after the chat template's
"<|assistant|>\\n" spells "Rating: 7" and stops. Everything around it is the product: LocalJudge's
loading, chat rendering (with and without a system prompt, and folding the system prompt into the user
turn for templates that refuse one), batched generation, rating parsing, scoring, caching.
"""

import pytest
import torch
from judge_fakes import CHAT_TEMPLATE, bench_cfg, build_tokenizer
from omegaconf import OmegaConf
from transformers import MistralConfig, MistralForCausalLM

from optimizer.eval import build_evaluator
from optimizer.eval.judge.config import JudgeConfig
from optimizer.eval.judge.evaluator import MtBenchEvaluator
from optimizer.eval.judge.local_judge import LocalJudge
from optimizer.resources import CONF_DIR

VERDICT = "Rating: 7"
NO_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
             + CHAT_TEMPLATE)


def bigram_judge(tokenizer, path, chat_template: str) -> None:
    """Save a model whose greedy continuation of any prompt ending in "\\n" is VERDICT then EOS."""
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192,
                        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = MistralForCausalLM(cfg).eval()
    chain = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.tokenize("\n" + VERDICT)]
    chain.append(tokenizer.eos_token_id)
    assert len(set(chain[:-1])) == len(chain) - 1  # a bigram table needs distinct predecessors
    with torch.no_grad():
        for layer in model.model.layers:  # residual stream = the token's embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb.copy_(torch.nn.functional.normalize(torch.randn_like(emb), dim=-1))
        head = model.lm_head.weight.zero_()
        for prev, nxt in zip(chain, chain[1:], strict=False):
            head[nxt] += 10 * emb[prev]
    model.save_pretrained(path)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def judges(tmp_path_factory):
    root = tmp_path_factory.mktemp("judges")
    bigram_judge(build_tokenizer(), root / "judge", CHAT_TEMPLATE)
    bigram_judge(build_tokenizer(), root / "judge_no_system", NO_SYSTEM)
    return root


def local(path, **kw) -> JudgeConfig:
    return JudgeConfig(**{"kind": "local", "model": str(path), "api_key_env": None, "max_tokens": 16,
                          "batch_size": 4, **kw})


@pytest.mark.parametrize("folder", ["judge", "judge_no_system"])
def test_local_judge_writes_verdicts(judges, folder):
    judge = LocalJudge(local(judges / folder), torch.device("cpu"))
    system = "You are a judge."
    out = judge.complete_batch([(system, "Rate: 2+2=4"), ("", "Rate: 2+2=4")])
    assert [c.text for c in out] == [VERDICT, VERDICT]
    assert all(c.tokens_out == len(VERDICT) + 1 for c in out)  # one byte token per character, then EOS
    assert out[0].tokens_in >= out[1].tokens_in + len(system)  # the instructions reached the judge
    assert judge.stats.requests == 2 and judge.model_id == f"local:{judges / folder}"


def test_local_judge_scores_the_live_model(tiny_lm, judges, tmp_path):
    model, tok = tiny_lm
    ev = MtBenchEvaluator(bench_cfg(tmp_path, limit=3, heldout_share=0.0), local(judges / "judge"),
                          device=torch.device("cpu"), run_dir=tmp_path / "runs" / "s")
    ev.validate()
    first = ev.evaluate(model, tok, "search")
    assert first.tasks == {"mt_bench": pytest.approx(0.7)}  # rating 7 of 10 on every turn
    assert first.info["judge_failures"] == 0 and first.info["judge_new"] == 6  # 3 questions x 2 turns
    assert first.info["judge_model"] == f"local:{judges / 'judge'}"
    lines = [line for line in first.artifacts["judgments.jsonl"].splitlines() if line]
    assert len(lines) == 6 and all('"score": 7.0' in line for line in lines)
    again = ev.evaluate(model, tok, "search")
    assert again.tasks == first.tasks and again.info["judge_cache_hits"] == 6 and again.info["judge_new"] == 0
    ev.close()


def test_judge_local_config_builds_a_working_judge(tiny_lm, judges, tmp_path):
    """The shipped `judge=local` preset with judge.model set, through the evaluator registry."""
    model, tok = tiny_lm
    judge = OmegaConf.load(CONF_DIR / "judge" / "local.yaml")
    judge.model, judge.max_tokens = str(judges / "judge_no_system"), 16
    node = OmegaConf.create({"name": "mt_bench", "bench_dir": "data/mt_bench/en", "max_new_tokens": 4,
                             "limit": 2, "heldout_share": 0.0, "cache": False})
    ev = build_evaluator(node, {"device": torch.device("cpu"), "run_dir": tmp_path / "runs" / "s",
                                "cfg": OmegaConf.create({"judge": judge})})
    ev.validate()
    assert ev.evaluate(model, tok, "search").tasks["mt_bench"] == pytest.approx(0.7)
    ev.close()
