"""Reading feedback as real files and real chat templates have it: labels that pandas wrote as floats,
prompts longer than --max-prompt-length under a Llama 3 / Qwen 2.5 style template, and a --data typo that
fails before any model is touched."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from qbco.cli.main import app
from qbco.common.errors import QbcoError
from qbco.data.encoding import encode, prompt_token_ids
from qbco.data.feedback import Example, load_feedback

runner = CliRunner()

# ---------------------------------------------------------------- labels


def test_labels_that_pandas_wrote_as_floats_are_read(tmp_path):
    """pandas writes a label column as floats once a cell of it was missing (NaN makes the column float);
    such a file, with the NaN rows dropped afterwards, holds "1.0" and "0.0"."""
    frame = pd.DataFrame({"prompt": ["a ?", "b ?", "c ?", "d ?"], "completion": ["x", "y", "z", "w"],
                          "label": [1, 0, None, 1]})
    path = tmp_path / "feedback.csv"
    frame.dropna().to_csv(path, index=False)
    assert "1.0" in path.read_text() and "0.0" in path.read_text()  # what pandas really wrote
    train, held = load_feedback(str(path), 0.0, seed=0)
    assert [(e.prompt, e.label) for e in train] == [("a ?", True), ("b ?", False), ("d ?", True)] and held == []


@pytest.mark.parametrize("bad", ["2.0", "0.5", "1.5", "nan", "-1.0", "1.0.0"])
def test_other_numbers_in_a_label_column_are_still_the_one_line_error(tmp_path, bad):
    path = tmp_path / "feedback.csv"
    path.write_text(f"prompt,completion,label\na ?,x,1.0\nb ?,y,{bad}\n", encoding="utf-8")
    with pytest.raises(QbcoError) as err:
        load_feedback(str(path), 0.0, seed=0)
    assert f"row 2, column label: '{bad}' is not a thumbs-up/down label" in str(err.value)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- truncation under a real chat template

# Llama 3.x Instruct's template (meta-llama/Llama-3.2-3B-Instruct, tokenizer_config.json), reduced to what
# plain chat messages use: BOS, a system block whose head the template writes itself (knowledge cut-off and
# date lines, then the user's system message), then one header + content + <|eot_id|> per message.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}{{- 'Today Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Qwen 2.5 Instruct's template (Qwen/Qwen2.5-3B-Instruct), without tools: no BOS, and a default system
# prompt when the messages bring none.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
QWEN25_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
WORDS = ("system user assistant Cutting Knowledge Date: December 2023 Today 26 Jul 2024 You are Qwen, created by "
         "Alibaba Cloud. a helpful assistant. Be brief.").split()


def chat_tokenizer(template: str, specials: list[str], bos: str | None, eos: str):
    """A word-level tokenizer whose special tokens are split out before the words, as in the real ones."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", *specials, *WORDS] + [f"{c}{i}" for c in "abcx" for i in range(200)]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token=bos,
                                  eos_token=eos, additional_special_tokens=[s for s in specials if s not in (bos, eos)])
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def llama3():
    return chat_tokenizer(LLAMA3_TEMPLATE, LLAMA3_SPECIALS, "<|begin_of_text|>", "<|eot_id|>")


def words(letter: str, n: int, start: int = 0) -> str:
    return " ".join(f"{letter}{i}" for i in range(start, start + n))


# The Llama 3 prompt written out by hand, not by the template: head (BOS, the template's system block with the
# user's system message, the first header), then the turns, then the generation prompt.
def llama3_text(system: str, turns: list[tuple[str, str]]) -> str:
    text = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
            f"Today Date: 26 Jul 2024\n\n{system}<|eot_id|>")
    for role, content in turns:
        text += f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"
    return text + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": words("a", 40)},
                {"role": "assistant", "content": words("b", 60)}, {"role": "user", "content": words("c", 20)}]


def test_a_long_conversation_loses_its_earliest_turn_content_not_the_template_head(llama3):
    full = ids_of(llama3, llama3_text("Be brief.", [("user", words("a", 40)), ("assistant", words("b", 60)),
                                                    ("user", words("c", 20))]))
    assert len(full) == 152  # 17 head + (3 + 40 + 1) + (3 + 60 + 1) + (3 + 20 + 1) + 3: a hand count of the layout
    limit = len(full) - 25

    ids, cut = prompt_token_ids(CONVERSATION, llama3, limit)

    # The first user turn keeps its last 15 words; everything else is as written.
    expected = ids_of(llama3, llama3_text("Be brief.", [("user", words("a", 15, start=25)), ("assistant", words("b", 60)),
                                                        ("user", words("c", 20))]))
    assert cut and ids == expected and len(ids) == limit
    head = ids_of(llama3, "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                          "December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n")
    assert ids[: len(head)] == head
    # What the old left cut kept: the same length from the end, which starts inside the first user turn and has
    # neither BOS nor the system block.
    assert full[-limit:][: len(head)] != head and llama3.bos_token_id not in full[-limit:]


def test_earliest_turns_are_dropped_whole_when_all_their_tokens_are_over(llama3):
    # 40 a-words plus their header and <|eot_id|> (44 tokens) are over, and 10 of the b-words.
    full = len(prompt_token_ids(CONVERSATION, llama3, 10**6)[0])
    ids, cut = prompt_token_ids(CONVERSATION, llama3, full - 44 - 10)
    expected = ids_of(llama3, llama3_text("Be brief.", [("assistant", words("b", 50, start=10)), ("user", words("c", 20))]))
    assert cut and ids == expected


def test_a_template_that_wants_the_user_first_loses_the_orphaned_answer_too():
    """Gemma's and Mistral's templates refuse a conversation that does not alternate user / assistant."""
    strict = LLAMA3_TEMPLATE.replace(
        "{%- for message in messages %}",
        "{%- for message in messages %}{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}")
    tok = chat_tokenizer(strict, LLAMA3_SPECIALS, "<|begin_of_text|>", "<|eot_id|>")
    full = len(prompt_token_ids(CONVERSATION, tok, 10**6)[0])
    ids, cut = prompt_token_ids(CONVERSATION, tok, full - 44 - 10)
    assert cut and ids == ids_of(tok, llama3_text("Be brief.", [("user", words("c", 20))]))


@pytest.mark.parametrize("style", ["llama3", "qwen2.5"])
def test_a_single_long_prompt_is_cut_inside_its_content(style, llama3):
    if style == "llama3":
        tok, head_text = llama3, ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge "
                                  "Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n")
        tail_text = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    else:
        tok = chat_tokenizer(QWEN25_TEMPLATE, QWEN25_SPECIALS, None, "<|im_end|>")
        head_text = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                     "<|im_start|>user\n")
        tail_text = "<|im_end|>\n<|im_start|>assistant\n"
    example = Example(prompt=words("x", 150), completion="a1 a2", label=True, source="f.jsonl:1")
    encoded = encode(example, tok, max_prompt_length=64, max_completion_length=8)
    head, tail = ids_of(tok, head_text), ids_of(tok, tail_text)
    kept = 64 - len(head) - len(tail)
    assert encoded.prompt_cut and len(encoded.prompt_ids) == 64
    assert encoded.prompt_ids == head + ids_of(tok, words("x", kept, start=150 - kept)) + tail


def test_a_limit_below_the_template_itself_is_a_one_line_error(llama3):
    example = Example(prompt=CONVERSATION, completion="a1", label=True, source="f.jsonl:7")
    with pytest.raises(QbcoError) as err:
        encode(example, llama3, max_prompt_length=20, max_completion_length=8)
    # 17 head tokens (BOS, the system header, 10 words of the template's, "Be brief." and <|eot_id|>), then the
    # final user turn's header and <|eot_id|> (3 + 1) and the generation prompt (3): 24
    assert str(err.value) == ("f.jsonl:7: what the chat template adds and the system message take 24 tokens, more "
                              "than --max-prompt-length 20; raise it")


def test_a_prompt_that_fits_is_the_template_as_it_is(llama3):
    ids, cut = prompt_token_ids(CONVERSATION, llama3, 10**6)
    assert not cut and ids == llama3.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True,
                                                         return_dict=False)


# ---------------------------------------------------------------- --data typo


def test_a_data_typo_fails_before_the_model_is_converted_or_loaded(tmp_path, monkeypatch):
    from qbco.model import loading, names

    touched = []
    monkeypatch.setattr(names, "smollm2_folder", lambda *a, **k: touched.append("converted") or tmp_path)
    monkeypatch.setattr(loading, "load_base", lambda *a, **k: touched.append("loaded"))
    result = runner.invoke(app, ["train", "--data", "helpstear2", "--output", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 2, result.output
    assert touched == [] and not (tmp_path / "run").exists()  # the default model was neither converted nor loaded
    assert "--data 'helpstear2' is neither a file nor a registered dataset" in result.output
    assert "did you mean helpsteer2?" in result.output


def test_a_files_split_column_is_its_held_out_part(tmp_path):
    """A file whose every row says split train or eval (validation, test) keeps that split, whatever the seed; a
    file with no split column, or one that names no eval row, is split by qbco (10% of its prompts)."""
    from qbco.data.feedback import load_feedback

    rows = [{"prompt": f"q{i}", "completion": "a", "label": i % 2 == 0, "split": "validation" if i < 3 else "train"}
            for i in range(20)]
    path = tmp_path / "f.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for seed in (0, 1):
        train, held = load_feedback(str(path), None, seed)
        assert sorted(e.prompt for e in held) == ["q0", "q1", "q2"] and len(train) == 17
    train, held = load_feedback(str(path), 0.5, 0)  # --eval-fraction re-splits everything
    assert len(held) == 10
    for r in rows:
        r["split"] = "train"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, held = load_feedback(str(path), None, 0)
    assert len(held) == 2 and len(train) == 18
