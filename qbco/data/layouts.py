"""The layouts feedback is published in, told apart by their columns, each read by a pure function of one row.

A layout turns an input row into candidate rows, each `(label, (prompt, completion, score))` or `(label, Drop)`.
The label is True/False where the data says it (a chosen/rejected pair, votes, a thumbs rating) and None where a
score decides it (`qbco binarize`'s threshold, or its pairing by score). A conversation tree (OpenAssistant) is
read with an index of the whole input built first (`Layout.index`); every other layout reads one row at a time.
The published schemas, as the dataset cards and the front-end's source show them, are in docs/data.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from qbco.common.errors import QbcoError
from qbco.data.rows import (
    DELETED,
    EMPTY_PROMPT,
    EMPTY_RESPONSE,
    MALFORMED,
    MISSING_PARENT,
    NO_RATING,
    NO_VOTES,
    NOT_IN_SNAPSHOT,
    PROMPTS_DIFFER,
    SAME_PAIR,
    TIED_VOTES,
    Drop,
    digest,
    message,
    normalize_prompt,
    parse_score,
    split_conversation,
)

SCORE_COLUMNS = ("helpfulness", "score", "rating")
RESPONSE_COLUMNS = ("response", "completion")
PAIR_SCORE_COLUMNS = (("score_chosen", "score_rejected"), ("rating_chosen", "rating_rejected"))
# openbmb/UltraFeedback: each completion has two summary scores and four aspects rated 1-5 by GPT-4
# (`annotations[aspect]["Rating"]`, a string, "N/A" where it was not rated).
ULTRA_SCORES = ("fine-grained_score", "overall_score")
ULTRA_ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")
# Anthropic's hh-rlhf transcripts: "\n\nHuman: ...\n\nAssistant: ..." (its dataset card).
HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")

Candidate = tuple  # (label: bool | None, (prompt, completion, score) or Drop)
RowSource = Callable[[], Iterable[tuple[int, dict[str, Any]]]]


@dataclass(frozen=True)
class Layout:
    """One published shape of feedback. `modes`: how its rows may become thumbs, the default first ("likert":
    score >= threshold; "pairs-from-scores": best and worst of a prompt; "pairs", "votes", "ratings": the label
    the data gives). `rule` is printed in binarize's summary and in docs/data.md."""

    name: str
    source: str
    modes: tuple[str, ...]
    rule: str
    matches: Callable[[dict], bool]
    setup: Callable[[list[str], Any, str], Any]  # (columns of the first row, Options, origin) -> what read needs
    read: Callable[[dict, Any, str], list]  # (row, what setup returned, where) -> candidates
    index: Callable[[RowSource, Any], Any] | None = None  # a pass over the input before the rows are read


def _need(keys: list[str], name: str, origin: str, flag: str) -> str:
    if name not in keys:
        found = ", ".join(map(str, keys)) or "none"
        raise QbcoError(f"{origin}: no column '{name}' (found: {found}); {flag}")
    return name


def _refuse(options: Any, layout: str, *fields: str) -> None:
    flags = {"score_column": "--score", "prompt_column": "--prompt-column", "response_column": "--response-column"}
    for name in fields:
        if getattr(options, name, None) is not None:
            raise QbcoError(f"{flags[name]} does not apply to the {layout} layout: its columns are fixed by the dataset")


def _pair(chosen: Any, rejected: Any) -> list[Candidate]:
    """A chosen/rejected pair's two candidates, each (prompt, completion, score) or a Drop. A side that is
    defective alone is dropped alone; two sides whose prompts differ, or that are the same text, both go."""
    if not isinstance(chosen, Drop) and not isinstance(rejected, Drop):
        if digest(chosen[0]) != digest(rejected[0]):
            chosen = rejected = Drop(PROMPTS_DIFFER)
        elif chosen[1] == rejected[1]:
            chosen = rejected = Drop(SAME_PAIR)
    return [(True, chosen), (False, rejected)]


def _side(read: Callable[[], tuple]) -> Any:
    try:
        return read()
    except Drop as drop:
        return drop


def _score_or_none(value: Any) -> Any:
    try:
        return parse_score(value)
    except Drop:  # a pair's or a rating's score is informative only; the label comes from elsewhere
        return None


# ---------------------------------------------------------------- qbco's own shapes: scored rows, pairs


@dataclass
class Columns:
    prompt: str | None
    response: str | None = None
    score: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    score_chosen: str | None = None
    score_rejected: str | None = None
    scale: tuple[float, float] | None = None


def likert_columns(keys: list[str], options: Any, origin: str) -> Columns:
    """prompt, response (then completion) and the first of helpfulness, score, rating; flags override each."""
    prompt = _need(keys, options.prompt_column or "prompt", origin, "pass --prompt-column")
    if options.response_column:
        response = _need(keys, options.response_column, origin, "pass --response-column")
    else:
        response = next((c for c in RESPONSE_COLUMNS if c in keys), None)
        if response is None:
            raise QbcoError(f"{origin}: no response column ({' or '.join(RESPONSE_COLUMNS)}; found: "
                            f"{', '.join(map(str, keys)) or 'none'}); pass --response-column")
    if options.score_column:
        score = _need(keys, options.score_column, origin, "pass --score")
    else:
        score = next((c for c in SCORE_COLUMNS if c in keys), None)
        if score is None:
            hint = " (for chosen/rejected rows use --pairs)" if "chosen" in keys else ""
            raise QbcoError(f"{origin}: no score column ({', '.join(SCORE_COLUMNS)}; found: "
                            f"{', '.join(map(str, keys)) or 'none'}); pass --score{hint}")
    return Columns(prompt=prompt, response=response, score=score, scale=options.scale)


def read_likert(row: dict, cols: Columns, where: str) -> list[Candidate]:
    """A scored response: (prompt, response, score), the label left to the threshold or to the pairing by score.
    A score outside a given --scale is an error (QbcoError), not a drop."""
    try:
        prompt, completion = split_conversation(row.get(cols.response), row.get(cols.prompt))
        score = parse_score(row.get(cols.score))
    except Drop as drop:
        return [(None, drop)]
    if cols.scale is not None and not cols.scale[0] <= score <= cols.scale[1]:
        lo, hi = cols.scale
        raise QbcoError(f"{where}: {cols.score} = {score} is outside the scale {lo:g}-{hi:g}; "
                        "fix the row or pass the right --scale")
    return [(None, (prompt, completion, score))]


def pair_columns(keys: list[str], options: Any, origin: str) -> Columns:
    """chosen and rejected; prompt when there is one (TRL's implicit-prompt rows have none); their scores."""
    _refuse(options, "pairs", "response_column", "score_column")
    prompt = options.prompt_column or "prompt"
    if options.prompt_column:
        _need(keys, prompt, origin, "pass --prompt-column")
    scores = next(((c, r) for c, r in PAIR_SCORE_COLUMNS if c in keys and r in keys), (None, None))
    return Columns(prompt=prompt if prompt in keys else None,
                   chosen=_need(keys, "chosen", origin, "rows with prompt, chosen, rejected"),
                   rejected=_need(keys, "rejected", origin, "rows with prompt, chosen, rejected"),
                   score_chosen=scores[0], score_rejected=scores[1])


def read_pair(row: dict, cols: Columns, where: str) -> list[Candidate]:
    """chosen -> thumbs-up, rejected -> thumbs-down. Each side is text or a message list (TRL's conversational
    format, HuggingFaceH4's and trl-lib's ultrafeedback_binarized, Capybara): the prompt is the separate prompt
    column, or the messages before the last assistant turn; the two sides must share it (else "prompts differ")."""
    prompt = row.get(cols.prompt) if cols.prompt else None

    def side(column: str, score_column: str | None):
        p, c = split_conversation(row.get(column), prompt)
        return p, c, _score_or_none(row.get(score_column)) if score_column else None

    return _pair(_side(lambda: side(cols.chosen, cols.score_chosen)),
                 _side(lambda: side(cols.rejected, cols.score_rejected)))


# ---------------------------------------------------------------- Anthropic/hh-rlhf


def split_transcript(text: Any) -> list[dict[str, str]]:
    """hh-rlhf's "\\n\\nHuman: ...\\n\\nAssistant: ..." as chat messages, the text of each turn stripped. The turns
    must alternate from a human turn to a final assistant turn; an empty final turn is an empty response."""
    if not isinstance(text, str):
        raise Drop(EMPTY_RESPONSE if text is None else MALFORMED)
    parts = HH_TURN.split(text)
    head, rest = parts[0], parts[1:]
    if head.strip() or not rest:
        raise Drop(MALFORMED)
    messages = [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
                for who, said in zip(rest[::2], rest[1::2])]
    roles = [m["role"] for m in messages]
    if roles != ["user", "assistant"] * (len(roles) // 2) or not roles:
        raise Drop(MALFORMED)
    if not messages[-1]["content"]:
        raise Drop(EMPTY_RESPONSE)
    if not all(m["content"] for m in messages[:-1]):
        raise Drop(MALFORMED)
    return messages


def hh_columns(keys: list[str], options: Any, origin: str) -> None:
    _refuse(options, "hh-rlhf", "prompt_column", "response_column", "score_column")
    _need(keys, "chosen", origin, "hh-rlhf rows hold chosen and rejected transcripts")
    _need(keys, "rejected", origin, "hh-rlhf rows hold chosen and rejected transcripts")


def read_hh(row: dict, _: Any, where: str) -> list[Candidate]:
    """Two full transcripts: the prompt is their shared conversation before the last assistant turn (as chat
    messages), the completions are the two last assistant turns, chosen up and rejected down. Transcripts
    that differ before the last turn are dropped ("prompts differ"), never guessed at."""

    def side(column: str):
        messages = split_transcript(row.get(column))
        return messages[:-1], messages[-1]["content"], None

    return _pair(_side(lambda: side("chosen")), _side(lambda: side("rejected")))


# ---------------------------------------------------------------- openbmb/UltraFeedback, stanfordnlp/SHP


def ultra_columns(keys: list[str], options: Any, origin: str) -> str:
    _refuse(options, "ultrafeedback", "prompt_column", "response_column")
    _need(keys, "instruction", origin, "UltraFeedback rows hold an instruction and its completions")
    _need(keys, "completions", origin, "UltraFeedback rows hold an instruction and its completions")
    score = options.score_column or "fine-grained_score"
    if score not in ULTRA_SCORES + ULTRA_ASPECTS:
        raise QbcoError(f"--score {score!r}: an UltraFeedback completion is scored by {', '.join(ULTRA_SCORES)} "
                        f"or an aspect's rating ({', '.join(ULTRA_ASPECTS)})")
    return score


def read_ultra(row: dict, score_key: str, where: str) -> list[Candidate]:
    """An instruction and its completions (four models' answers), each with its score: by default
    fine-grained_score, the mean of the four aspect ratings (1-5); overall_score (1-10), or one aspect's
    Rating ("N/A" is a missing score) with --score. One candidate per completion; the label is left to the
    threshold or the pairing by score. The prompt is the instruction alone (the generation's system prompt is
    not part of it)."""
    completions = row.get("completions")
    if not isinstance(completions, (list, tuple)) or not completions:
        return [(None, Drop(EMPTY_RESPONSE))]
    out = []
    for c in completions:
        try:
            if not isinstance(c, dict):
                raise Drop(MALFORMED)
            prompt, completion = split_conversation(c.get("response"), row.get("instruction"))
            if score_key in ULTRA_SCORES:
                score = parse_score(c.get(score_key))
            else:
                rating = ((c.get("annotations") or {}).get(score_key) or {}).get("Rating")
                score = parse_score(None if rating == "N/A" else rating)
            out.append((None, (prompt, completion, score)))
        except Drop as drop:
            out.append((None, drop))
    return out


def shp_columns(keys: list[str], options: Any, origin: str) -> None:
    _refuse(options, "shp", "prompt_column", "response_column", "score_column")
    for name in ("history", "human_ref_A", "human_ref_B", "score_A", "score_B"):
        _need(keys, name, origin, "SHP rows hold history, human_ref_A/B and score_A/B")


def read_shp(row: dict, _: Any, where: str) -> list[Candidate]:
    """A Reddit post (history) and two top-level comments with their net upvotes (score_A, score_B): two
    scored candidates. By default the post's best and worst comment over all its rows become up and down
    (pairs by score; a comment met again in a later row is a duplicate); with --threshold, thumbs by score."""
    out = []
    for side in "AB":
        try:
            prompt, completion = split_conversation(row.get(f"human_ref_{side}"), row.get("history"))
            out.append((None, (prompt, completion, parse_score(row.get(f"score_{side}")))))
        except Drop as drop:
            out.append((None, drop))
    return out


# ---------------------------------------------------------------- OpenAssistant/oasst1, oasst2


def votes(emojis: Any) -> tuple[int, int]:
    """(+1 count, -1 count) from oasst's emojis: {"name": [...], "count": [...]} on the hub, {"+1": n, ...} in
    the project's own JSONL export; None when nobody reacted."""
    if not isinstance(emojis, dict):
        return 0, 0
    if isinstance(emojis.get("name"), (list, tuple)):
        counts = dict(zip(emojis["name"], emojis.get("count") or []))
    else:
        counts = emojis
    number = lambda v: int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0  # noqa: E731
    return number(counts.get("+1")), number(counts.get("-1"))


def oasst_columns(keys: list[str], options: Any, origin: str) -> None:
    _refuse(options, "oasst", "prompt_column", "response_column", "score_column")
    for name in ("message_id", "parent_id", "role", "text"):
        _need(keys, name, origin, "OpenAssistant rows are messages with message_id, parent_id, role, text")


def index_oasst(open_rows: RowSource, _: Any) -> dict[str, tuple]:
    """message_id -> (parent_id, role, text) of every message that another message answers: the prompts.
    Two passes (which ids are parents, then their text), so the text of leaf messages is never held."""
    parents = {row.get("parent_id") for _, row in open_rows() if row.get("parent_id")}
    return {row["message_id"]: (row.get("parent_id"), row.get("role"), row.get("text"))
            for _, row in open_rows() if row.get("message_id") in parents}


def read_oasst(row: dict, index: dict[str, tuple], where: str) -> list[Candidate]:
    """Each assistant message (prompter messages are only context): the prompt is its conversation from the
    tree's root (prompter -> user, assistant -> assistant, alternating, ending with a user turn); the label is
    the votes': more "+1" than "-1" reactions is thumbs-up, fewer is thumbs-down; equal counts are dropped
    ("tied votes"), and so is a message nobody voted on ("no votes"), and a deleted one. The score is
    +1 minus -1."""
    if row.get("role") != "assistant":
        return []
    if row.get("deleted") is True:
        return [(None, Drop(DELETED))]
    try:
        chain, parent = [], row.get("parent_id")
        while parent is not None:
            if parent not in index or len(chain) > len(index):
                raise Drop(MISSING_PARENT if parent not in index else MALFORMED)
            parent, role, text = index[parent]
            chain.append({"role": {"prompter": "user"}.get(role, role), "content": text})
        chain.reverse()
        if [m["role"] for m in chain] != ["user", "assistant"] * (len(chain) // 2) + ["user"]:
            raise Drop(MALFORMED if chain else EMPTY_PROMPT)
        prompt = normalize_prompt([message(m) for m in chain])
        completion = row.get("text")
        if not isinstance(completion, str) or not completion.strip():
            raise Drop(EMPTY_RESPONSE)
        up, down = votes(row.get("emojis"))
        if up == down:
            raise Drop(TIED_VOTES if up else NO_VOTES)
    except Drop as drop:
        return [(None, drop)]
    return [(up > down, (prompt, completion, up - down))]


# ---------------------------------------------------------------- Open WebUI's feedback export


def webui_columns(keys: list[str], options: Any, origin: str) -> None:
    _refuse(options, "open-webui", "prompt_column", "response_column", "score_column")
    for name in ("data", "meta", "snapshot"):
        _need(keys, name, origin, "Open WebUI feedback records hold data, meta and snapshot")


def _rated_path(chat: dict, message_id: Any) -> list[dict]:
    """The messages from the chat's first to the rated one: along parentId in chat.history.messages (the tree
    Open WebUI keeps, where regenerated answers are siblings), else the flat chat.messages list."""
    history = (chat.get("history") or {}).get("messages") or {}
    if isinstance(history, dict) and message_id in history:
        path, current = [], message_id
        while current is not None:
            if current not in history or len(path) > len(history):
                raise Drop(NOT_IN_SNAPSHOT)
            path.append(history[current])
            current = history[current].get("parentId")
        return path[::-1]
    flat = chat.get("messages") or []
    for i, m in enumerate(flat):
        if isinstance(m, dict) and m.get("id") == message_id:
            return flat[: i + 1]
    raise Drop(NOT_IN_SNAPSHOT)


def read_webui(row: dict, _: Any, where: str) -> list[Candidate]:
    """One rated answer: data.rating 1 is thumbs-up, -1 thumbs-down (any other value, or none: dropped, "no
    thumbs rating"); meta.message_id names the answer in snapshot.chat.chat; the prompt is the conversation up
    to it. The score is the optional 1-10 detail rating (data.details.rating)."""
    data = row.get("data") if isinstance(row.get("data"), dict) else {}
    meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
    try:
        rating = data.get("rating")
        rating = int(rating.strip()) if isinstance(rating, str) and rating.strip().lstrip("-").isdigit() else rating
        if isinstance(rating, bool) or rating not in (1, -1):
            raise Drop(NO_RATING)
        chat = ((row.get("snapshot") or {}).get("chat") or {}).get("chat") or {}
        path = _rated_path(chat, meta.get("message_id"))
        messages = [message({"role": m.get("role"), "content": m.get("content")}) if isinstance(m, dict)
                    else message(m) for m in path]
        if messages[-1]["role"] != "assistant":
            raise Drop(MALFORMED)
        if not messages[-1]["content"].strip():
            raise Drop(EMPTY_RESPONSE)
        if len(messages) == 1:
            raise Drop(EMPTY_PROMPT)
        prompt = normalize_prompt(messages[:-1])
        score = _score_or_none((data.get("details") or {}).get("rating"))
    except Drop as drop:
        return [(None, drop)]
    return [(rating == 1, (prompt, messages[-1]["content"], score))]


# ---------------------------------------------------------------- the registry of layouts, in detection order


def _is_transcript(value: Any) -> bool:
    return isinstance(value, str) and HH_TURN.search(value) is not None and "Assistant:" in value


LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (
    Layout("open-webui", "Open WebUI's feedback export (Admin > Evaluations > Export): a JSON array of records",
           ("ratings",), "rating 1 -> thumbs-up, -1 -> thumbs-down on the rated answer; the chat up to it is "
           "the prompt; other ratings dropped",
           lambda row: {"data", "meta", "snapshot"} <= row.keys(), webui_columns, read_webui),
    Layout("oasst", "OpenAssistant/oasst1, oasst2: one row per message of a conversation tree",
           ("votes",), "assistant message: +1 votes > -1 votes -> thumbs-up, fewer -> thumbs-down; tied or "
           "no votes dropped; the conversation before it is the prompt",
           lambda row: {"message_id", "parent_id", "role", "text"} <= row.keys(), oasst_columns, read_oasst,
           index_oasst),
    Layout("ultrafeedback", "openbmb/UltraFeedback: an instruction and its rated completions",
           ("likert", "pairs-from-scores"), "each completion by its fine-grained_score (--score to change)",
           lambda row: {"instruction", "completions"} <= row.keys(), ultra_columns, read_ultra),
    Layout("shp", "stanfordnlp/SHP: a post and two comments with their upvote scores",
           ("pairs-from-scores", "likert"), "a post's highest-scored comment -> thumbs-up, lowest -> "
           "thumbs-down (--threshold N: score >= N)",
           lambda row: {"history", "human_ref_A", "human_ref_B"} <= row.keys(), shp_columns, read_shp),
    Layout("hh-rlhf", "Anthropic/hh-rlhf: chosen and rejected full transcripts",
           ("pairs",), "last assistant turn of chosen -> thumbs-up, of rejected -> thumbs-down; the shared "
           "conversation before it is the prompt; transcripts differing before it dropped",
           lambda row: "prompt" not in row and _is_transcript(row.get("chosen")), hh_columns, read_hh),
    Layout("pairs", "prompt/chosen/rejected rows, text or chat messages (TRL; ultrafeedback_binarized, Capybara)",
           ("pairs",), "chosen -> thumbs-up, rejected -> thumbs-down; the prompt is the prompt column or the "
           "messages both share",
           lambda row: {"chosen", "rejected"} <= row.keys(), pair_columns, read_pair),
    Layout("likert", "prompt/response rows with a score (HelpSteer2 and qbco's own files)",
           ("likert", "pairs-from-scores"), "score >= threshold -> thumbs-up",
           lambda row: True, likert_columns, read_likert),
)}


def choose(row: dict, name: str | None, mode: str | None, threshold_given: bool, origin: str) -> tuple[Layout, str]:
    """The layout of a file from its first row (or `name`, from --layout) and the mode to read it in: `mode`
    when given, else --threshold's "likert" where the layout takes it, else the layout's default."""
    if name is not None:
        if name not in LAYOUTS:
            raise QbcoError(f"--layout {name!r} is not one of {', '.join(LAYOUTS)}")
        layout = LAYOUTS[name]
    else:
        layout = next(lay for lay in LAYOUTS.values() if lay.matches(row))
        if mode == "pairs" and mode not in layout.modes:  # --pairs on other columns: the pairs layout names what is missing
            layout = LAYOUTS["pairs"]
    if mode is None:
        mode = "likert" if threshold_given and "likert" in layout.modes else layout.modes[0]
    if mode not in layout.modes:
        flag = {"pairs": "--pairs", "pairs-from-scores": "--pairs-from-scores", "likert": "--threshold"}.get(mode, mode)
        raise QbcoError(f"{origin}: {flag} does not apply to the {layout.name} layout ({layout.rule})")
    return layout, mode


def detect(row: dict) -> str | None:
    """The name of the published layout a row is in, or None for qbco's own shapes (likert, pairs)."""
    name = next(lay.name for lay in LAYOUTS.values() if lay.matches(row))
    return None if name in ("likert", "pairs") else name
