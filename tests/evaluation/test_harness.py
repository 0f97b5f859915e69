"""The lm-eval model type `bitune`: equal to lm-eval's own `hf` + PEFT at theta 0, one prefill per prompt,
generation, rolling log-likelihood, and end-to-end runs of lm-eval's CLI and `bitune eval`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from bitune import BituneConfig, get_bitune_model
from bitune.evaluation import ContinuationRequest, score_continuations
from bitune.evaluation.harness import BituneLM
from bitune.references import load_model

from conftest import bitune_pair, char_tokenizer, randomize_adapters, tiny_model, zero_thetas

REPO = Path(__file__).resolve().parents[2]
CONTEXTS = ["Question: which is heavy?\n\nAnswer:", "Question: pick one\n\nChoices:\nred\nblue\n\nAnswer:"]
CONTINUATIONS = [" rock", " feather", " red", " blue", " (0)"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny base model directory and a Bitune run directory trained-like (random adapters, thetas 0)."""
    root = tmp_path_factory.mktemp("harness")
    tiny_model("llama").save_pretrained(root / "base")
    char_tokenizer().save_pretrained(root / "base")
    base, _ = load_model(str(root / "base"))  # records where its base comes from in what it saves
    model = get_bitune_model(base, BituneConfig())
    randomize_adapters(model, std=0.2)
    zero_thetas(model)
    model.save_pretrained(root / "run")
    return root


def loglikelihood_requests():
    pairs = [(c, k) for c in CONTEXTS for k in CONTINUATIONS]
    return [Instance("loglikelihood", {}, pair, idx) for idx, pair in enumerate(pairs)]


def test_zero_theta_loglikelihoods_equal_lm_evals_hf_model_with_the_causal_adapter(run):
    ours = BituneLM(pretrained=str(run / "base"), bitune=str(run / "run"), batch_size=4)
    theirs = HFLM(pretrained=str(run / "base"), peft=str(run / "run" / "causal"), device="cpu", batch_size=4)
    a, b = ours.loglikelihood(loglikelihood_requests()), theirs.loglikelihood(loglikelihood_requests())
    assert len(a) == len(b) == len(CONTEXTS) * len(CONTINUATIONS)
    for (ll_a, greedy_a), (ll_b, greedy_b) in zip(a, b, strict=True):
        assert ll_a == pytest.approx(ll_b, abs=1e-4)
        assert greedy_a == greedy_b


def test_a_fully_fine_tuned_lora_run_scores_as_lm_evals_hf_model_of_its_weights(run, tmp_path):
    base, _ = load_model(str(run / "base"))
    model = get_bitune_model(base, BituneConfig(variant="lora", finetune="full"))
    with torch.no_grad():  # "trained": every weight moved
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(tmp_path / "full")
    model.full_model.save_pretrained(tmp_path / "plain")
    char_tokenizer().save_pretrained(tmp_path / "plain")
    ours = BituneLM(pretrained=str(run / "base"), bitune=str(tmp_path / "full"), batch_size=4)
    theirs = HFLM(pretrained=str(tmp_path / "plain"), device="cpu", batch_size=4)
    a, b = ours.loglikelihood(loglikelihood_requests()), theirs.loglikelihood(loglikelihood_requests())
    for (ll_a, greedy_a), (ll_b, greedy_b) in zip(a, b, strict=True):
        assert ll_a == pytest.approx(ll_b, abs=1e-4)
        assert greedy_a == greedy_b
    untrained = HFLM(pretrained=str(run / "base"), device="cpu", batch_size=4).loglikelihood(
        loglikelihood_requests()
    )
    assert any(abs(x[0] - y[0]) > 1e-3 for x, y in zip(a, untrained, strict=True))  # the weights were loaded


def test_one_prefill_per_prompt_scores_like_a_fresh_prefill_per_choice_and_like_forward():
    model, _ = bitune_pair("gemma3_text")  # sliding windows shorter than the prompts
    generator = torch.Generator().manual_seed(0)
    prompts = [tuple(torch.randint(3, 90, (n,), generator=generator).tolist()) for n in (9, 6)]
    requests = [
        ContinuationRequest(p, tuple(torch.randint(3, 90, (k,), generator=generator).tolist()))
        for p in prompts
        for k in (1, 3, 5)
    ]
    shared = score_continuations(model, requests, batch_size=2)
    fresh = [score_continuations(model, [r])[0] for r in requests]
    for (a, _), (b, _) in zip(shared, fresh, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    for r, (ll, _) in zip(requests, shared, strict=True):
        ids = torch.tensor([r.prompt + r.continuation])
        with torch.no_grad():
            out = model(ids, prompt_lengths=torch.tensor([len(r.prompt)]))
        logprobs = torch.log_softmax(out.logits[0, : len(r.continuation)], dim=-1)
        expected = logprobs.gather(1, torch.tensor(r.continuation)[:, None]).sum()
        assert ll == pytest.approx(float(expected), abs=1e-5)


def test_generate_until_decodes_through_bitune_generate(run):
    lm = BituneLM(pretrained=str(run / "run"), batch_size=2)
    context = "Question: spell abc\n\nAnswer:"
    [text] = lm.generate_until(
        [Instance("generate_until", {}, (context, {"until": ["zz"], "max_gen_toks": 8}), 0)]
    )
    ids = torch.tensor([lm.tok_encode(context)])
    expected = lm.bitune_model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[
        0, ids.shape[1] :
    ]
    assert text == lm.tok_decode(expected.tolist()).split("zz")[0]


def test_rolling_loglikelihood_uses_the_causal_adapter_only(run):
    ours = BituneLM(pretrained=str(run / "run"), batch_size=2, max_length=16)
    theirs = HFLM(pretrained=str(run / "base"), peft=str(run / "run" / "causal"), device="cpu", max_length=16)
    request = [Instance("loglikelihood_rolling", {}, ("a long document that needs several windows.",), 0)]
    assert ours.loglikelihood_rolling(request)[0] == pytest.approx(
        theirs.loglikelihood_rolling(request)[0], abs=1e-4
    )


def test_a_bitune_run_directory_is_refused_by_plain_peft(run):
    with pytest.raises((ValueError, OSError)):
        HFLM(pretrained=str(run / "base"), peft=str(run / "run"), device="cpu")


def test_lm_eval_cli_and_bitune_eval_end_to_end(run, tmp_path):
    out = tmp_path / "lm_eval_out"
    command = [sys.executable, "-c", "from bitune.evaluation.harness import lm_eval_main; lm_eval_main()"]
    command += [
        "--model",
        "bitune",
        "--model_args",
        f"pretrained={run / 'run'}",
        "--tasks",
        "bitune_siqa_packaged",
    ]
    command += ["--limit", "4", "--batch_size", "2", "--output_path", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    [results_file] = list(out.rglob("results_*.json"))
    results = json.loads(results_file.read_text())["results"]["bitune_siqa_packaged"]
    assert 0 <= results["acc,none"] <= 1

    report = tmp_path / "report"
    command = [sys.executable, "-m", "bitune", "eval", str(run / "run"), "--tasks", "siqa", "gsm8k"]
    command += ["--limit", "3", "--max-gen-toks", "16", "--output", str(report)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    table = (report / "results.md").read_text().splitlines()
    assert table[0] == "| method | seeds | siqa | gsm8k | avg |" and table[2].startswith(
        f"| {run / 'run'} | 1 | "
    )
    scores = json.loads((report / "results.json").read_text())["scores"]
    assert scores["siqa"]["n"] == 3 and set(scores) == {"siqa", "gsm8k"}
    assert scores["gsm8k"]["metric"] == "exact_match (answer)"  # generative: decoded through bitune


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("She pays 3 * 4 = 12 dollars.\n#### 12", "12"),
        ("#### $1,000.\nQuestion: next", "1000"),  # first "####" wins, units and separators dropped
        ("2 + 3 = 5, so 5 - 7 = -2 apples.", "-2"),  # no "####": the last number
        ("It costs 2.50 and then 7.", "7"),
        ("Half of it is 0.5", "0.5"),
        ("no number here", ""),
    ],
)
def test_gsm8k_answer_takes_the_marked_number_else_the_last_number(text, answer):
    from bitune.evaluation.lm_eval_tasks.utils import gsm8k_answer, gsm8k_answers

    assert gsm8k_answer(text) == answer
    assert gsm8k_answers([[text, "1"]], [{}]) == [[answer, "1"]]
