"""Feedback as it is published: each layout read from a fixture in the published schema (field names, nesting
and types as the dataset card or the front-end's source shows them), the written rows checked against rows
written out by hand, and the same rows from the registry through a fake hub.

Sources of the schemas: Anthropic/hh-rlhf's card (one JSON line {"chosen": transcript, "rejected": transcript});
trl-lib/ultrafeedback_binarized, HuggingFaceH4/ultrafeedback_binarized and trl-lib/Capybara-Preferences (chat
message lists); openbmb/UltraFeedback's card (instruction, models, completions with annotations per aspect);
stanfordnlp/SHP's card; OpenAssistant/oasst1 and oasst2 (message rows, emojis and labels as name/count lists);
Open WebUI's backend/open_webui/models/feedbacks.py and ResponseMessage.svelte (a feedback record is
{id, user_id, version, type, data, meta, snapshot: {chat: <the chat row>}, created_at, updated_at}).
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qbco.common.errors import QbcoError
from qbco.data import registry
from qbco.data.binarize import Options, binarize, summary_path
from qbco.data.layouts import split_transcript, votes
from qbco.data.rows import Drop


def msg(role, content):
    return {"role": role, "content": content}


def user(text):
    return msg("user", text)


def bot(text):
    return msg("assistant", text)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def written(path: Path) -> list[tuple]:
    return [(r["prompt"], r["completion"], r["label"], r["score"]) for r in read_jsonl(path)]


def from_registry(rows: list[dict]) -> list[tuple]:
    return [(r["prompt"], r["completion"], r["label"], r["score"]) for r in rows]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset answered from the in-memory DatasetDicts put into the returned dict."""
    hub: dict[str, datasets.DatasetDict] = {}
    monkeypatch.setattr(datasets, "load_dataset", lambda path, *a, **k: hub[path])
    return hub


# ---------------------------------------------------------------- Anthropic/hh-rlhf: transcripts

HH = [
    # 1: one turn
    {"chosen": "\n\nHuman: What is the capital of France?\n\nAssistant: Paris is the capital of France.",
     "rejected": "\n\nHuman: What is the capital of France?\n\nAssistant: I don't know."},
    # 2: multi-turn: the prompt is the three shared turns
    {"chosen": "\n\nHuman: What are some good houseplants?\n\nAssistant: Pothos and snake plants are hard to kill."
               "\n\nHuman: Which one needs less light?\n\nAssistant: The snake plant tolerates low light.",
     "rejected": "\n\nHuman: What are some good houseplants?\n\nAssistant: Pothos and snake plants are hard to kill."
                 "\n\nHuman: Which one needs less light?\n\nAssistant: Pothos needs a sunny window."},
    # 3: the transcripts differ before the last turn: both dropped, never guessed at
    {"chosen": "\n\nHuman: Tell me a joke.\n\nAssistant: Why did the chicken cross the road?\n\nHuman: Why?"
               "\n\nAssistant: To get to the other side.",
     "rejected": "\n\nHuman: Tell me a joke.\n\nAssistant: No.\n\nHuman: Why?\n\nAssistant: I don't do jokes."},
    # 4: the same transcript twice
    {"chosen": "\n\nHuman: Say hi.\n\nAssistant: Hi!", "rejected": "\n\nHuman: Say hi.\n\nAssistant: Hi!"},
    # 5: the rejected transcript ends on an empty assistant turn (it happens in the real file): chosen kept alone
    {"chosen": "\n\nHuman: How do I boil an egg?\n\nAssistant: Simmer it for nine minutes.",
     "rejected": "\n\nHuman: How do I boil an egg?\n\nAssistant:"},
    # 6: two human turns in a row in chosen: malformed; rejected kept alone
    {"chosen": "\n\nHuman: Hi\n\nHuman: Hello?\n\nAssistant: Hi there.",
     "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."},
]
HH_PLANTS = [user("What are some good houseplants?"), bot("Pothos and snake plants are hard to kill."),
             user("Which one needs less light?")]
HH_EXPECTED = [
    ([user("What is the capital of France?")], "Paris is the capital of France.", True, None),
    ([user("What is the capital of France?")], "I don't know.", False, None),
    (HH_PLANTS, "The snake plant tolerates low light.", True, None),
    (HH_PLANTS, "Pothos needs a sunny window.", False, None),
    ([user("How do I boil an egg?")], "Simmer it for nine minutes.", True, None),
    ([user("Hi")], "Go away.", False, None),
]
HH_DROPS = {"prompts differ": 2, "chosen equals rejected": 2, "empty response": 1, "malformed messages": 1}


def test_split_transcript():
    assert split_transcript("\n\nHuman: a\n\nAssistant: b") == [user("a"), bot("b")]
    assert split_transcript("Human: a\n\nAssistant: b c\n\nd") == [user("a"), bot("b c\n\nd")]
    for bad in ("no markers", "\n\nAssistant: b", "\n\nHuman: a", "preamble\n\nHuman: a\n\nAssistant: b"):
        with pytest.raises(Drop, match="malformed messages"):
            split_transcript(bad)
    with pytest.raises(Drop, match="empty response"):
        split_transcript("\n\nHuman: a\n\nAssistant:")


@pytest.mark.parametrize("options", [Options(), Options(mode="pairs"), Options(layout="hh-rlhf")])
def test_hh_rlhf_transcripts(tmp_path, options):
    """As shipped, read with no flag, with --pairs (which used to drop every row as "empty prompt") or --layout."""
    src = write_jsonl(tmp_path / "train.jsonl", HH)
    summary = binarize(src, tmp_path / "out.jsonl", options)
    assert written(tmp_path / "out.jsonl") == HH_EXPECTED
    assert (summary.layout, summary.mode) == ("hh-rlhf", "pairs")
    assert summary.dropped == HH_DROPS
    assert (summary.rows_read, summary.candidates, summary.rows_written) == (6, 12, 6)
    assert (summary.prompts, summary.multi_turn_prompts) == (4, 1)
    assert summary.mostly_dropped is None  # 6 of 12 is not over half


def test_hh_rlhf_from_the_registry(fake_hub):
    fake_hub["Anthropic/hh-rlhf"] = datasets.DatasetDict(train=datasets.Dataset.from_list(HH),
                                                         test=datasets.Dataset.from_list(HH[:1]))
    summaries = []
    train, held = registry.load_registered("hh-rlhf", summaries=summaries)
    assert from_registry(train) == HH_EXPECTED
    assert from_registry(held) == HH_EXPECTED[:2]
    assert summaries[0].dropped == HH_DROPS and summaries[0].layout == "hh-rlhf"
    assert registry.DATASETS["hh-rlhf"].binarize_command() == \
        "qbco binarize hh-rlhf-train.parquet -o hh-rlhf.jsonl --layout hh-rlhf"


# ---------------------------------------------------------------- conversational pairs

TRL_ULTRA = [  # trl-lib/ultrafeedback_binarized: chosen, rejected, score_chosen, score_rejected
    {"chosen": [user("Name a prime number."), bot("7 is prime.")],
     "rejected": [user("Name a prime number."), bot("9 is prime.")], "score_chosen": 8.0, "score_rejected": 3.5},
    {"chosen": [user("Translate 'cat' to French.")], "rejected": [user("Translate 'cat' to French."), bot("Chat.")],
     "score_chosen": 6.0, "score_rejected": 2.0},  # chosen has no answer: malformed, rejected kept
]
H4_ULTRA = [  # HuggingFaceH4/ultrafeedback_binarized: a prompt column besides the full conversations
    {"prompt": "Name a prime number.", "prompt_id": "8f1c0a", "chosen": [user("Name a prime number."), bot("7 is prime.")],
     "rejected": [user("Name a prime number."), bot("9 is prime.")],
     "messages": [user("Name a prime number."), bot("7 is prime.")], "score_chosen": 8.0, "score_rejected": 3.5},
    {"prompt": "", "prompt_id": "00aa11", "chosen": [user(" "), bot("Yes.")], "rejected": [user(" "), bot("No.")],
     "messages": [user(" "), bot("Yes.")], "score_chosen": 5.0, "score_rejected": 1.0},  # empty prompt
]
CAPYBARA = [  # trl-lib/Capybara-Preferences: multi-turn conversations, chosen and rejected
    {"chosen": [user("Hi"), bot("Hello! How can I help?"), user("What is 2+2?"), bot("2+2 is 4.")],
     "rejected": [user("Hi"), bot("Hello! How can I help?"), user("What is 2+2?"), bot("It is 5.")]},
    {"chosen": [user("Hi"), bot("Hello!"), user("Sum 1 and 1")], "rejected": [user("Hi"), bot("Hey."), bot("2")]},
    {"chosen": [user("Pick a colour"), bot("Red."), user("Another?"), bot("Blue.")],  # earlier turns differ
     "rejected": [user("Pick a colour"), bot("Green."), user("Another?"), bot("Blue.")]},
]
PRIME = [user("Name a prime number.")]
CAPY_PROMPT = [user("Hi"), bot("Hello! How can I help?"), user("What is 2+2?")]


def test_trl_ultrafeedback_pairs(tmp_path):
    src = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(TRL_ULTRA), src)
    summary = binarize(src, tmp_path / "out.jsonl")
    assert summary.layout == "pairs"
    assert written(tmp_path / "out.jsonl") == [(PRIME, "7 is prime.", True, 8), (PRIME, "9 is prime.", False, 3.5),
                                              ([user("Translate 'cat' to French.")], "Chat.", False, 2)]
    assert summary.dropped == {"malformed messages": 1}


def test_h4_ultrafeedback_pairs_with_a_prompt_column(tmp_path):
    src = tmp_path / "train_prefs.parquet"
    pq.write_table(pa.Table.from_pylist(H4_ULTRA), src)
    summary = binarize(src, tmp_path / "out.jsonl")
    assert written(tmp_path / "out.jsonl") == [(PRIME, "7 is prime.", True, 8), (PRIME, "9 is prime.", False, 3.5)]
    assert summary.dropped == {"empty prompt": 2}


def test_capybara_multi_turn_pairs(tmp_path):
    src = write_jsonl(tmp_path / "capybara.jsonl", CAPYBARA)
    summary = binarize(src, tmp_path / "out.jsonl")
    assert written(tmp_path / "out.jsonl") == [(CAPY_PROMPT, "2+2 is 4.", True, None),
                                              (CAPY_PROMPT, "It is 5.", False, None),
                                              ([user("Hi"), bot("Hey.")], "2", False, None)]
    # row 2: chosen ends on a user turn (malformed), rejected is kept; row 3: the earlier turns differ
    assert summary.dropped == {"malformed messages": 1, "prompts differ": 2}
    assert summary.multi_turn_prompts == 2


def test_conversational_pairs_from_the_registry(fake_hub):
    fake_hub["HuggingFaceH4/ultrafeedback_binarized"] = datasets.DatasetDict(
        train_prefs=datasets.Dataset.from_list(H4_ULTRA), test_prefs=datasets.Dataset.from_list(H4_ULTRA[:1]))
    fake_hub["trl-lib/Capybara-Preferences"] = datasets.DatasetDict(train=datasets.Dataset.from_list(CAPYBARA))
    train, held = registry.load_registered("ultrafeedback-h4")
    assert from_registry(train) == from_registry(held) == [(PRIME, "7 is prime.", True, 8), (PRIME, "9 is prime.", False, 3.5)]
    train, held = registry.load_registered("capybara")
    assert held is None and from_registry(train)[0] == (CAPY_PROMPT, "2+2 is 4.", True, None) and len(train) == 3


# ---------------------------------------------------------------- openbmb/UltraFeedback: ratings per completion


def completion(model, response, fine, overall, helpfulness="4", honesty="5"):
    """One completion as the card shows it: four aspects, each a Rating string and its rationale."""
    return {
        "annotations": {
            "helpfulness": {"Rating": helpfulness, "Rationale": "Clear and relevant.", "Rationale For Rating": "Informative.",
                            "Type": ["1", "2"]},
            "honesty": {"Rating": honesty, "Rationale": "Confident and correct."},
            "instruction_following": {"Rating": "4", "Rationale": "Mostly aligned."},
            "truthfulness": {"Rating": "5", "Rationale": "No hallucination.", "Rationale For Rating": "Accurate.",
                             "Type": ["0"]},
        },
        "critique": "Good answer; could be shorter.",
        "custom_system_prompt": "You are a helpful assistant.",
        "fine-grained_score": fine,
        "model": model,
        "overall_score": overall,
        "principle": "helpfulness",
        "response": response,
    }


ULTRA = [
    {"source": "evol_instruct", "instruction": "Why is the sky blue?",
     "models": ["gpt-4", "alpaca-7b", "llama-2-13b-chat", "wizardlm-7b"],
     "completions": [completion("gpt-4", "Rayleigh scattering of sunlight.", 4.75, 8.5),
                     completion("alpaca-7b", "Because of the ocean.", 2.25, 4.0, helpfulness="2"),
                     completion("llama-2-13b-chat", "Air scatters blue light most.", 4.0, 7.0),
                     completion("wizardlm-7b", "Sunlight and air molecules.", 3.5, 6.0, helpfulness="N/A")],
     "correct_answers": ["None"], "incorrect_answers": ["None"]},
    {"source": "flan_v2_niv2", "instruction": "Is 7 odd?", "models": ["gpt-4", "vicuna-33b"],
     "completions": [completion("gpt-4", "Yes.", 3.0, 6.0), completion("vicuna-33b", "Yes, 7 is odd.", 3.0, 6.0)],
     "correct_answers": ["None"], "incorrect_answers": ["None"]},  # tied
    {"source": "sharegpt", "instruction": "Write a haiku.", "models": ["gpt-4", "alpaca-7b", "falcon-40b"],
     "completions": [completion("gpt-4", "", 4.0, 7.0), completion("alpaca-7b", "Leaves fall.", None, 5.0),
                     completion("falcon-40b", "Old pond, a frog.", 4.5, 8.0)],
     "correct_answers": ["None"], "incorrect_answers": ["None"]},  # empty response, missing score
    {"source": "ultrachat", "instruction": "Hello?", "models": [], "completions": [],
     "correct_answers": ["None"], "incorrect_answers": ["None"]},  # no completion
]
SKY = "Why is the sky blue?"
ULTRA_THUMBS = [  # fine-grained_score >= 4
    (SKY, "Rayleigh scattering of sunlight.", True, 4.75), (SKY, "Because of the ocean.", False, 2.25),
    (SKY, "Air scatters blue light most.", True, 4), (SKY, "Sunlight and air molecules.", False, 3.5),
    ("Is 7 odd?", "Yes.", False, 3), ("Is 7 odd?", "Yes, 7 is odd.", False, 3),
    ("Write a haiku.", "Old pond, a frog.", True, 4.5),
]
ULTRA_DEFECTS = {"empty response": 2, "missing score": 1}


def test_ultrafeedback_thumbs_by_threshold(tmp_path):
    src = write_jsonl(tmp_path / "ultrafeedback.jsonl", ULTRA)
    summary = binarize(src, tmp_path / "out.jsonl")
    assert (summary.layout, summary.mode, summary.threshold) == ("ultrafeedback", "likert", 4)
    assert written(tmp_path / "out.jsonl") == ULTRA_THUMBS
    assert summary.dropped == ULTRA_DEFECTS and summary.candidates == 4 + 2 + 3 + 1
    assert summary.scale == [2.25, 4.75] and summary.columns == {"score": "fine-grained_score"}


def test_ultrafeedback_pairs_by_score_and_an_aspect(tmp_path):
    src = write_jsonl(tmp_path / "ultrafeedback.jsonl", ULTRA)
    summary = binarize(src, tmp_path / "pairs.jsonl", Options(mode="pairs-from-scores"))
    assert written(tmp_path / "pairs.jsonl") == [(SKY, "Rayleigh scattering of sunlight.", True, 4.75),
                                                (SKY, "Because of the ocean.", False, 2.25)]
    assert summary.dropped == {**ULTRA_DEFECTS, "not in pair": 2, "tied scores": 2, "prompt without a pair": 1}
    # one aspect's rating instead ("N/A" is a missing score)
    summary = binarize(src, tmp_path / "help.jsonl", Options(score_column="helpfulness"))
    assert [(c, label, s) for _, c, label, s in written(tmp_path / "help.jsonl")][:4] == [
        ("Rayleigh scattering of sunlight.", True, 4), ("Because of the ocean.", False, 2),
        ("Air scatters blue light most.", True, 4)] + [("Yes.", True, 4)]
    assert summary.dropped == {"empty response": 2, "missing score": 1}
    with pytest.raises(QbcoError, match="an UltraFeedback completion is scored by"):
        binarize(src, tmp_path / "x.jsonl", Options(score_column="stars"))


def test_ultrafeedback_from_the_registry(fake_hub):
    fake_hub["openbmb/UltraFeedback"] = datasets.DatasetDict(train=datasets.Dataset.from_list(ULTRA))
    train, held = registry.load_registered("ultrafeedback-ratings")
    assert held is None and from_registry(train) == ULTRA_THUMBS


# ---------------------------------------------------------------- stanfordnlp/SHP


def shp(post, history, a, b, score_a, score_b, text_a, text_b, domain="askscience_train"):
    return {"post_id": post, "domain": domain, "upvote_ratio": 0.97, "history": history, "c_root_id_A": a,
            "c_root_id_B": b, "created_at_utc_A": 1593535113, "created_at_utc_B": 1593535824, "score_A": score_a,
            "score_B": score_b, "human_ref_A": text_a, "human_ref_B": text_b, "labels": int(score_a > score_b),
            "seconds_difference": 711.0, "score_ratio": max(score_a, score_b) / max(1, min(score_a, score_b))}


WHY = "Why do onions make you cry?"
BEST, MID, WORST = "They release a sulfur gas that irritates the eyes.", "Chemistry.", "Cut them underwater lol"
SHP = [
    shp("p1", WHY, "c1", "c2", 52, 10, BEST, MID),
    shp("p1", WHY, "c1", "c3", 52, 3, BEST, WORST),
    shp("p1", WHY, "c2", "c3", 10, 3, MID, WORST),
    shp("p2", "Is glass a liquid?", "d1", "d2", 7, 7, "No, an amorphous solid.", "Sort of."),  # tie
    shp("p3", "How do magnets work?", "e1", "e2", 12, 4, "Aligned electron spins.", ""),  # empty comment
]


def test_shp_pairs_by_score(tmp_path):
    """The default: per post, the best comment up and the worst down; a comment met again is a duplicate."""
    src = write_jsonl(tmp_path / "shp.jsonl", SHP)
    summary = binarize(src, tmp_path / "out.jsonl")
    assert (summary.layout, summary.mode) == ("shp", "pairs-from-scores")
    assert written(tmp_path / "out.jsonl") == [(WHY, BEST, True, 52), (WHY, WORST, False, 3)]
    assert summary.dropped == {"duplicate": 3, "not in pair": 1, "tied scores": 2, "prompt without a pair": 1,
                               "empty response": 1}
    assert summary.mostly_dropped.startswith("8 of 10 candidate rows (80%) were dropped, read as layout shp")


def test_shp_thumbs_by_threshold(tmp_path):
    src = write_jsonl(tmp_path / "shp.jsonl", SHP)
    summary = binarize(src, tmp_path / "out.jsonl", Options(threshold=10))
    assert written(tmp_path / "out.jsonl") == [
        (WHY, BEST, True, 52), (WHY, MID, True, 10), (WHY, WORST, False, 3),
        ("Is glass a liquid?", "No, an amorphous solid.", False, 7), ("Is glass a liquid?", "Sort of.", False, 7),
        ("How do magnets work?", "Aligned electron spins.", True, 12)]
    assert summary.mode == "likert" and summary.dropped == {"duplicate": 3, "empty response": 1}


def test_shp_from_the_registry(fake_hub):
    fake_hub["stanfordnlp/SHP"] = datasets.DatasetDict(train=datasets.Dataset.from_list(SHP),
                                                       validation=datasets.Dataset.from_list(SHP[:1]))
    train, held = registry.load_registered("shp")
    assert from_registry(train) == [(WHY, BEST, True, 52), (WHY, WORST, False, 3)]
    assert from_registry(held) == [(WHY, BEST, True, 52), (WHY, MID, False, 10)]


# ---------------------------------------------------------------- OpenAssistant/oasst1, oasst2: votes


def oasst(mid, parent, role, text, emojis=None, deleted=False, rank=None, tree="t1"):
    """A message row as on the hub (parquet): emojis and labels as name/count(/value) lists, or null."""
    return {"message_id": mid, "parent_id": parent, "user_id": "u-" + mid, "created_date": "2023-02-05T13:28:43.906453+00:00",
            "text": text, "role": role, "lang": "en", "review_count": 3, "review_result": True, "deleted": deleted,
            "rank": rank, "synthetic": False, "model_name": None,
            "detoxify": {"toxicity": 0.0004, "severe_toxicity": 0.00003, "obscene": 0.0002, "identity_attack": 0.0001,
                         "insult": 0.0002, "threat": 0.00004, "sexual_explicit": 0.00003},
            "message_tree_id": tree, "tree_state": "ready_for_export",
            "emojis": None if emojis is None else {"name": list(emojis), "count": list(emojis.values())},
            "labels": {"name": ["spam", "lang_mismatch", "quality"], "value": [0.0, 0.0, 0.75], "count": [3, 3, 3]}}


OASST = [
    oasst("a5", "p2", "assistant", "Rex is a classic.", {"+1": 2, "_skip_labeling": 1}),  # child before its parents
    oasst("p1", None, "prompter", "What is a good name for a cat?", {"+1": 4, "_skip_reply": 1}),
    oasst("a1", "p1", "assistant", "Whiskers.", {"+1": 3, "-1": 1, "_skip_ranking": 2}, rank=0),
    oasst("a2", "p1", "assistant", "Dog.", {"-1": 2, "red_flag": 1}, rank=3),
    oasst("a3", "p1", "assistant", "Mittens.", None, rank=1),  # nobody voted
    oasst("a4", "p1", "assistant", "Luna.", {"+1": 1, "-1": 1}, rank=2),  # tied
    oasst("p2", "a1", "prompter", "And for a dog?"),
    oasst("a6", "p1", "assistant", "Garfield.", {"+1": 5}, deleted=True),
    oasst("a7", "p9", "assistant", "An orphan answer.", {"+1": 1}, tree="t2"),  # its prompt is not in the file
]
CAT = [user("What is a good name for a cat?")]
OASST_EXPECTED = [
    (CAT + [bot("Whiskers."), user("And for a dog?")], "Rex is a classic.", True, 2),
    (CAT, "Whiskers.", True, 2),
    (CAT, "Dog.", False, -2),
]
OASST_DROPS = {"no votes": 1, "tied votes": 1, "deleted message": 1, "missing parent message": 1}


def test_votes_in_both_published_forms():
    assert votes({"name": ["+1", "-1", "_skip_reply"], "count": [3, 1, 2]}) == (3, 1)
    assert votes({"+1": 2, "red_flag": 1}) == (2, 0)  # the project's own JSONL export
    assert votes(None) == (0, 0)


def test_oasst_votes(tmp_path):
    src = tmp_path / "oasst2-train.parquet"
    pq.write_table(pa.Table.from_pylist(OASST), src)
    summary = binarize(src, tmp_path / "out.jsonl")
    assert (summary.layout, summary.mode, summary.passes) == ("oasst", "votes", 3)
    assert written(tmp_path / "out.jsonl") == OASST_EXPECTED
    assert summary.dropped == OASST_DROPS
    assert (summary.rows_read, summary.candidates) == (9, 7)  # prompter messages are context, not candidates
    assert "tied or no votes dropped" in summary.rule
    with pytest.raises(QbcoError, match="--pairs-from-scores does not apply to the oasst layout"):
        binarize(src, tmp_path / "x.jsonl", Options(mode="pairs-from-scores"))
    with pytest.raises(QbcoError, match="--threshold is for scored rows"):
        binarize(src, tmp_path / "x.jsonl", Options(layout="oasst", threshold=1))


def test_oasst_from_the_registry(fake_hub):
    fake_hub["OpenAssistant/oasst2"] = datasets.DatasetDict(train=datasets.Dataset.from_list(OASST),
                                                            validation=datasets.Dataset.from_list(OASST[1:4]))
    train, held = registry.load_registered("oasst2")
    assert from_registry(train) == OASST_EXPECTED
    assert from_registry(held) == OASST_EXPECTED[1:]


# ---------------------------------------------------------------- Open WebUI's feedback export


def webui_message(mid, parent, children, role, content, model=None):
    m = {"id": mid, "parentId": parent, "childrenIds": children, "role": role, "content": content, "timestamp": 1733000000}
    if role == "assistant":
        m.update(model=model or "llama3.2:latest", modelName="llama3.2:latest", done=True, userContext=None)
    else:
        m.update(models=[model or "llama3.2:latest"])
    return m


def webui_record(fid, rating, message_id, messages, current, details=None):
    """A record of the Admin > Evaluations export: the chat row fetched when the thumb was clicked is the
    snapshot; its `chat` holds history.messages (the tree) and messages (the path shown)."""
    history = {m["id"]: m for m in messages}
    shown, at = [], current
    while at is not None:
        shown.append(history[at])
        at = history[at]["parentId"]
    data = {"rating": rating, "model_id": "llama3.2:latest", "sibling_model_ids": None, "reason": "", "comment": "",
            "tags": ["general"]}
    if details is not None:
        data["details"] = {"rating": details}
    return {
        "id": fid, "user_id": "3f2e-user", "version": 0, "type": "rating", "data": data,
        "meta": {"arena": False, "model_id": "llama3.2:latest", "message_id": message_id, "message_index": 2,
                 "chat_id": "chat-" + fid, "base_models": {"llama3.2:latest": None}},
        "snapshot": {"chat": {
            "id": "chat-" + fid, "user_id": "3f2e-user", "title": "New Chat",
            "chat": {"id": "", "title": "New Chat", "models": ["llama3.2:latest"], "params": {},
                     "history": {"messages": history, "currentId": current}, "messages": shown[::-1],
                     "tags": [], "timestamp": 1733000000000, "files": []},
            "updated_at": 1733000100, "created_at": 1733000000, "share_id": None, "archived": False, "pinned": False,
            "meta": {}, "folder_id": None}},
        "created_at": 1733000100, "updated_at": 1733000100,
    }


ARITH = [webui_message("m1", None, ["m2"], "user", "What is 2+2?"), webui_message("m2", "m1", [], "assistant", "4.")]
TRIP = [webui_message("n1", None, ["n2"], "user", "Plan a day in Lisbon."),
        webui_message("n2", "n1", ["n3"], "assistant", "Morning: Belem. Afternoon: Alfama."),
        webui_message("n3", "n2", ["n4", "n5"], "user", "Make it cheaper."),
        webui_message("n4", "n3", [], "assistant", "Skip Belem; walk Alfama for free."),
        webui_message("n5", "n3", [], "assistant", "Take a taxi everywhere.")]  # a regenerated sibling, shown last
WEBUI = [
    webui_record("f1", 1, "m2", ARITH, "m2", details=9),
    webui_record("f2", -1, "n5", TRIP, "n5"),
    webui_record("f3", 1, "n4", TRIP, "n5"),  # the sibling not shown in the flat list: found in the tree
    webui_record("f4", None, "m2", ARITH, "m2", details=6),  # only a detailed rating, no thumb
    webui_record("f5", -1, "gone", ARITH, "m2"),  # the rated message is not in the snapshot
    webui_record("f6", 1, "m1", ARITH, "m2"),  # a user message rated: malformed
]
LISBON = [user("Plan a day in Lisbon."), bot("Morning: Belem. Afternoon: Alfama."), user("Make it cheaper.")]
WEBUI_EXPECTED = [
    ([user("What is 2+2?")], "4.", True, 9),
    (LISBON, "Take a taxi everywhere.", False, None),
    (LISBON, "Skip Belem; walk Alfama for free.", True, None),
]


def test_open_webui_feedback_export(tmp_path):
    src = tmp_path / "feedback-export.json"
    src.write_text(json.dumps(WEBUI, indent=2), encoding="utf-8")
    summary = binarize(src, tmp_path / "out.jsonl")
    assert (summary.layout, summary.mode) == ("open-webui", "ratings")
    assert written(tmp_path / "out.jsonl") == WEBUI_EXPECTED
    assert summary.dropped == {"no thumbs rating": 1, "rated message not in snapshot": 1, "malformed messages": 1}


# ---------------------------------------------------------------- nothing written, mostly dropped, the CLI


def test_nothing_written_is_an_error_and_leaves_no_file(tmp_path):
    src = write_jsonl(tmp_path / "hh.jsonl", [HH[2], HH[3]])
    out = tmp_path / "out.jsonl"
    with pytest.raises(QbcoError) as err:
        binarize(src, out)
    assert str(err.value) == ("hh.jsonl: no row written, read as layout hh-rlhf (2 rows read, 4 candidates; dropped: "
                              "chosen equals rejected 2, prompts differ 2); nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hh.jsonl"]
    assert not summary_path(out).exists()


def test_a_training_load_with_no_row_names_the_drops(fake_hub):
    from qbco.data.feedback import load_feedback

    fake_hub["Anthropic/hh-rlhf"] = datasets.DatasetDict(train=datasets.Dataset.from_list([HH[2]]))
    with pytest.raises(QbcoError, match=r"Anthropic/hh-rlhf:train: no row written.*dropped: prompts differ 2"):
        load_feedback("hh-rlhf", None, 0)


def test_a_published_file_given_to_train_points_to_binarize(tmp_path):
    from qbco.data.feedback import load_feedback

    src = write_jsonl(tmp_path / "hh.jsonl", HH)
    with pytest.raises(QbcoError, match="in the hh-rlhf layout: qbco binarize .*hh.jsonl -o thumbs.jsonl"):
        load_feedback(str(src), None, 0)


def test_cli(tmp_path):
    from typer.testing import CliRunner

    from qbco.cli.main import app

    runner = CliRunner()
    hh = write_jsonl(tmp_path / "hh.jsonl", HH)
    result = runner.invoke(app, ["binarize", str(hh), "--pairs", "-o", str(tmp_path / "hh-out.jsonl")],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "hh-rlhf: last assistant turn of chosen" in result.output and "prompts differ" in result.output
    assert len(read_jsonl(tmp_path / "hh-out.jsonl")) == 6

    none = write_jsonl(tmp_path / "none.jsonl", [HH[3]])
    result = runner.invoke(app, ["binarize", str(none), "-o", str(tmp_path / "none-out.jsonl")])
    assert result.exit_code == 2 and "no row written" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "none-out.jsonl").exists()

    shp_file = write_jsonl(tmp_path / "shp.jsonl", SHP)
    result = runner.invoke(app, ["binarize", str(shp_file), "-o", str(tmp_path / "shp-out.jsonl")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith("warning: 8 of 10 candidate rows (80%) were dropped")

    result = runner.invoke(app, ["binarize", str(shp_file), "-o", str(tmp_path / "x.jsonl"), "--layout", "nope"])
    assert result.exit_code == 2 and "--layout 'nope' is not one of open-webui, oasst" in result.output
