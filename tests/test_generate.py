"""qbco generate on a tiny random llama trained a few steps: a run and its merged folder give the same
greedy answers, --compare's base answers are those of the untrained base, sampling is reproducible with a
seed, and the CLI prints base and tuned answers side by side."""

import json

import pytest
import torch
from typer.testing import CliRunner

from qbco.cli.main import app
from qbco.common.errors import QbcoError
from qbco.eval import generate as gen
from qbco.export.merge import merge
from qbco.model.loading import load_base, load_tokenizer

CPU = torch.device("cpu")
PROMPTS = ["question q3 ?", "question q17 ?", [{"role": "user", "content": "question q41 ?"}]]
SHORT = gen.Sampling(max_new_tokens=6)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_run):
    """(run, merged folder): 4 steps of BCO on a 4-bit base, merged in fp32 into the dequantized base."""
    folder = tmp_path_factory.mktemp("generate")
    run = tiny_run
    merged = merge(run, folder / "merged", dtype="fp32", device=CPU, log=lambda message: None).output
    return run, merged


def test_run_and_merged_folder_give_the_same_greedy_answers(folders):
    run, merged = folders
    from_run, kind_run = gen.generate(run, PROMPTS, SHORT, device=CPU)
    from_merged, kind_merged = gen.generate(merged, PROMPTS, SHORT, device=CPU)
    assert kind_run == f"run: {gen.CPU_FLOAT}" and kind_merged == "merged folder"
    assert [a.tuned for a in from_run] == [a.tuned for a in from_merged]
    assert all(a.tuned and a.base is None for a in from_run)


def test_the_cpu_float_twin_is_the_4bit_model_as_trained(folders):
    """On a CPU a 4-bit run answers through fp32 dequantized NF4 weights + the adapter: its logits are the 4-bit
    model's (adapter on and off) to float rounding, far below what the adapter itself moves, and its greedy
    answers (base and tuned) are the 4-bit path's."""
    from qbco.model.logprobs import causal_lm

    run, _ = folders
    twin, exact = gen.RunModels(run, CPU, path="float"), gen.RunModels(run, CPU, path="4bit")
    assert twin.float and not exact.float and exact.kind == "run: 4-bit base + adapter"
    ids = twin.tokenizer("user : question q3 ? assistant : good answer", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        exact_on, twin_on = exact.model(input_ids=ids).logits, twin.model(input_ids=ids).logits
        with exact.base(), twin.base():
            exact_off, twin_off = exact.model(input_ids=ids).logits, twin.model(input_ids=ids).logits
        with twin.tuned():  # merged in place
            merged = causal_lm(twin.model)(input_ids=ids).logits
    adapter_effect = float((exact_on - exact_off).abs().max())
    assert adapter_effect > 1e-2
    for a, b in ((exact_on, twin_on), (exact_off, twin_off), (exact_on, merged)):
        assert float((a - b).abs().max()) < 1e-4 * adapter_effect + 1e-5
    prompts = PROMPTS + [f"question q{k} ?" for k in range(20, 40)]  # more than one batch
    fast, _ = gen.generate(run, prompts, SHORT, compare=True, device=CPU, path="float")
    slow, kind = gen.generate(run, prompts, SHORT, compare=True, device=CPU, path="4bit")
    assert kind.startswith("run: 4-bit base + adapter")
    assert [(a.base, a.tuned) for a in fast] == [(a.base, a.tuned) for a in slow]


def test_batched_answers_are_the_answers_one_at_a_time(folders):
    """Left padding changes nothing: a batch of prompts of unlike length gets the answers each gets alone."""
    run, _ = folders
    models = gen.RunModels(run, CPU)
    prompts = ["question q3 ?", "question q5 ? question q6 ? question q7 ?", [{"role": "user", "content": "q9 ?"}]]
    together = gen.complete_all(models.model, models.tokenizer, prompts, SHORT, CPU)
    alone = [gen.complete_all(models.model, models.tokenizer, [p], SHORT, CPU)[0] for p in prompts]
    assert together == alone and len(set(together)) > 1


def test_compare_shows_the_untrained_base(folders, tiny_model_dir):
    run, merged = folders
    tokenizer = load_tokenizer(str(tiny_model_dir))
    answers, _ = gen.generate(run, PROMPTS, SHORT, compare=True, device=CPU)
    # A run's base is its 4-bit base with the adapters off; a merged folder's is the original float base.
    base4 = load_base(str(tiny_model_dir), True, torch.float32, CPU).eval()
    assert [a.base for a in answers] == [gen.complete(base4, tokenizer, p, SHORT, CPU) for p in PROMPTS]
    assert any(a.base != a.tuned for a in answers)  # training changed what the model says
    merged_answers, _ = gen.generate(merged, PROMPTS, SHORT, compare=True, device=CPU)
    float_base = load_base(str(tiny_model_dir), False, torch.float32, CPU).eval()
    assert [a.base for a in merged_answers] == [gen.complete(float_base, tokenizer, p, SHORT, CPU) for p in PROMPTS]
    assert [a.tuned for a in merged_answers] == [a.tuned for a in answers]


def test_sampling_is_reproducible_with_a_seed(folders):
    run, _ = folders
    hot = dict(max_new_tokens=8, temperature=1.5, top_p=0.95)
    first, _ = gen.generate(run, PROMPTS, gen.Sampling(seed=1, **hot), device=CPU)
    again, _ = gen.generate(run, PROMPTS, gen.Sampling(seed=1, **hot), device=CPU)
    other, _ = gen.generate(run, PROMPTS, gen.Sampling(seed=2, **hot), device=CPU)
    assert [a.tuned for a in first] == [a.tuned for a in again]
    assert [a.tuned for a in first] != [a.tuned for a in other]


def test_read_prompts(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": "a ?", "completion": "x"}, {"prompt": "a ?", "completion": "y"}, {"prompt": "b ?"}, {"prompt": "c ?"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert gen.read_prompts(None, str(path), limit=2) == ["a ?", "b ?"]
    assert gen.read_prompts(["hi"], None, limit=5) == ["hi"]
    assert 0 < len(gen.read_prompts(None, "demo", limit=3)) <= 3
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "a"}) + "\n")
    with pytest.raises(QbcoError, match="prompt column"):
        gen.read_prompts(None, str(tmp_path / "bad.jsonl"), limit=2)
    with pytest.raises(QbcoError, match="--prompt TEXT or --data FILE"):
        gen.read_prompts(None, None, limit=2)
    with pytest.raises(QbcoError, match="--top-p"):
        gen.Sampling(top_p=0).validate()


def test_cli_compare_prints_base_and_tuned_side_by_side(folders, tmp_path, tiny_model_dir):
    run, merged = folders
    runner = CliRunner()
    answers, _ = gen.generate(run, ["question q3 ?"], SHORT, compare=True, device=CPU)
    result = runner.invoke(app, ["generate", str(run), "--prompt", "question q3 ?", "--compare", "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if "prompt" in line)
    assert "base" in header and "tuned" in header
    flat = " ".join(result.output.split())
    assert answers[0].tuned.split()[0] in flat and "greedy" in flat

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question q{k} ?"}) + "\n" for k in range(5)))
    result = runner.invoke(app, ["generate", str(merged), "--data", str(data), "--limit", "2", "--max-new-tokens", "4",
                                 "--temperature", "0.8", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "question q1 ?" in result.output and "question q2 ?" not in result.output and "answer" in result.output

    for args, message in (
        ([str(run)], "--prompt TEXT or --data FILE"),
        ([str(tiny_model_dir), "--prompt", "hi", "--compare"], "its base is unknown"),
        ([str(tmp_path), "--prompt", "hi"], "neither a qbco run"),
    ):
        result = runner.invoke(app, ["generate", *args])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


def test_base_answers_are_cached_for_the_next_run(folders, tmp_path, monkeypatch):
    """The base answers the same prompts the same way whatever the adapter: a second --compare (or another run
    on the same base) reads them from QBCO_CACHE/answers/; other sampling settings ask the base again."""
    run, _ = folders
    monkeypatch.setenv("QBCO_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    real = gen.complete_all
    calls = []

    def counting(model, tokenizer, prompts, sampling, device, batch_size=None, **progress):
        calls.append(sampling.max_new_tokens)
        return real(model, tokenizer, prompts, sampling, device, batch_size, **progress)

    monkeypatch.setattr(gen, "complete_all", counting)
    first, _ = gen.generate(run, PROMPTS, SHORT, compare=True, device=CPU)
    assert len(calls) == 2 and len(list((tmp_path / "cache" / "answers").glob("*.json"))) == 1
    again, _ = gen.generate(run, PROMPTS, SHORT, compare=True, device=CPU)
    assert len(calls) == 3  # the tuned answers only
    assert [(a.base, a.tuned) for a in again] == [(a.base, a.tuned) for a in first]
    gen.generate(run, PROMPTS, gen.Sampling(max_new_tokens=4), compare=True, device=CPU)
    assert len(calls) == 5 and len(list((tmp_path / "cache" / "answers").glob("*.json"))) == 2


def test_answers_stop_at_every_eos_id_of_the_generation_config(tiny_model_dir):
    """Qwen 2.5 lists two EOS ids in generation_config.json (<|im_end|> and <|endoftext|>); the tokenizer knows
    one. An answer stops at the first of any, as the model's own `generate` with that config does."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_base(str(tiny_model_dir), False, torch.float32, CPU).eval()
    sampled = gen.Sampling(max_new_tokens=12, temperature=1.0, seed=5)  # a random tiny llama says one word greedily
    prompt_ids = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": "question q3 ?"}], tokenize=False,
                                                         add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(sampled.seed)  # as gen.complete does, so both draw the same tokens
    free = model.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)[0, len(prompt_ids):].tolist()
    # A second stop id: the first token of the free answer, from position 2 on, that did not come before.
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i] and free[i] != tokenizer.eos_token_id)
    assert tokenizer.eos_token_id not in free[:k]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, free[k]]

    answer = gen.complete(model, tokenizer, "question q3 ?", sampled, CPU)

    assert answer == tokenizer.decode(free[:k], skip_special_tokens=True).strip()
    assert len(answer.split()) == k < len(free)  # shorter than the answer that ignored the second id
