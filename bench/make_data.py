"""The benchmark's data, seeded and written to bench/out/ (never committed):

  w1.jsonl                 512 feedback rows for workload W1: prompts and completions of 100-160 tokens each
                           under the SmolLM2 tokenizer (the prompt counted as the model sees it, chat template
                           included; the completion with its EOS)
  scale-smollm2-L.jsonl    rows whose prompt and completion are L/2 tokens each, L in 256 512 1024 2048
  tiny-qwen-vocab/         a 2-layer decoder with Qwen2.5's 151,936-token vocabulary, random weights, built from a
                           config, with a word-level tokenizer (token k is the word "wk")
  scale-qwenvocab-L.jsonl  rows for it, prompt and completion L/2 tokens each

Plain text from a word list: the benchmark measures speed and memory, not what is learnt.
Run with the qbco venv:  .venv/bin/python bench/make_data.py
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
QWEN_VOCAB = 151_936
LENGTHS = (256, 512, 1024, 2048)

WORDS = ["the", "a", "of", "to", "and", "in", "is", "it", "that", "for", "on", "with", "as", "was", "at", "by", "this", "be", "are", "from", "or", "an", "have", "not", "they", "which", "one", "you", "were", "all", "we", "when", "there", "can", "but", "use", "each", "she", "how", "their", "if", "will", "up", "other", "about", "out", "many", "then", "them", "these", "so", "some", "her", "would", "make", "like", "him", "into", "time", "has", "look", "two", "more", "write", "go", "see", "number", "no", "way", "could", "people", "my", "than", "first", "water", "been", "call", "who", "oil", "its", "now", "find", "long", "down", "day", "did", "get", "come", "made", "may", "part", "over", "new", "sound", "take", "only", "little", "work", "know", "place", "year", "live", "me", "back", "give", "most", "very", "after", "thing", "our", "just", "name", "good", "sentence", "man", "think", "say", "great", "where", "help", "through", "much", "before", "line", "right", "too", "mean", "old", "any", "same", "tell", "boy", "follow", "came", "want", "show", "also", "around", "form", "three", "small", "set", "put", "end", "does", "another", "well", "large", "must", "big", "even", "such", "because", "turn", "here", "why", "ask", "went", "men", "read", "need", "land", "different", "home", "us", "move", "try", "kind", "hand", "picture", "again", "change", "off", "play", "spell", "air", "away", "animal", "house", "point", "page", "letter", "mother", "answer", "found", "study", "still", "learn", "should", "world", "high", "every", "near", "add", "food", "between", "own", "below", "country", "plant", "last", "school", "father", "keep", "tree", "never", "start", "city", "earth", "eye", "light", "thought", "head", "under", "story", "saw", "left", "few", "while", "along", "might", "close", "something", "seem", "next", "hard", "open", "example", "begin", "life", "always", "those", "both", "paper", "together", "got", "group", "often", "run", "important", "until", "children", "side", "feet", "car", "mile", "night", "walk", "white", "sea", "began", "grow", "took", "river", "four", "carry", "state", "once", "book", "hear", "stop", "without", "second", "later", "miss", "idea", "enough", "eat", "face", "watch", "far", "real", "almost", "let", "above", "girl", "sometimes", "mountain", "cut", "young", "talk", "soon", "list", "song", "being", "leave", "family"]


def sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 16))]
    return " ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!"])


def text_of(n_tokens: int, count, rng: random.Random) -> str:
    """Sentences added and the last one cut word by word until `count(text)` is exactly `n_tokens`
    (or the nearest below it when a word boundary makes exactness impossible)."""
    text = ""
    while count(text) < n_tokens:
        text = (text + " " + sentence(rng)).strip()
    words = text.split(" ")
    while count(" ".join(words)) > n_tokens:
        words.pop()
    return " ".join(words)


def smollm2_counters(tokenizer):
    """Token counts as qbco (qbco.data.feedback.encode) and TRL see them: templated prompt, completion + EOS."""
    overhead = len(tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False,
                                                           add_generation_prompt=True), add_special_tokens=False)["input_ids"])

    def prompt_tokens(content: str) -> int:
        return overhead + len(tokenizer(content, add_special_tokens=False)["input_ids"])

    def completion_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1

    return prompt_tokens, completion_tokens


def rows(n: int, prompt_len, completion_len, counters, rng: random.Random) -> list[dict]:
    prompt_tokens, completion_tokens = counters
    out = []
    for _ in range(n):
        out.append({
            "prompt": text_of(prompt_len(), prompt_tokens, rng),
            "completion": text_of(completion_len(), completion_tokens, rng),
            "label": rng.random() < 0.5,
        })
    return out


def write_jsonl(path: Path, data: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")


def word_tokenizer(size: int = QWEN_VOCAB):
    """A word-level tokenizer of `size` tokens: <pad> 0, <unk> 1, <eos> 2, then token k is the word "wk"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2}
    vocab.update({f"w{k}": k for k in range(3, size)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def tiny_qwen_vocab(folder: Path, seed: int) -> None:
    """Qwen2.5's vocabulary size on a 2-layer decoder (hidden 256): the LM head dominates, as it does for Qwen at long lengths."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    word_tokenizer().save_pretrained(folder)
    torch.manual_seed(seed)
    # A llama config, not a qwen2 one: transformers 5 would load a qwen2 folder's tokenizer as Qwen's BPE
    # class and lose the word-level vocabulary. The architecture is the same decoder either way.
    config = LlamaConfig(vocab_size=QWEN_VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=2, bos_token_id=None)
    LlamaForCausalLM(config).float().save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--scale-rows", type=int, default=8, help="rows per scaling file (batch x steps)")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    from qbco.model.loading import load_tokenizer
    from qbco.model.names import smollm2_folder

    tokenizer = load_tokenizer(str(smollm2_folder()))
    counters = smollm2_counters(tokenizer)
    rng = random.Random(args.seed)
    w1 = rows(args.rows, lambda: rng.randint(100, 160), lambda: rng.randint(100, 160), counters, rng)
    write_jsonl(OUT / "w1.jsonl", w1)
    for length in LENGTHS:
        rng = random.Random(args.seed * 1000 + length)
        write_jsonl(OUT / f"scale-smollm2-{length}.jsonl",
                    rows(args.scale_rows, lambda n=length: n // 2, lambda n=length: n // 2, counters, rng))

    tiny_qwen_vocab(OUT / "tiny-qwen-vocab", args.seed)
    for length in LENGTHS:
        rng = random.Random(args.seed * 1000 + length + 1)
        # Without a chat template qbco's prompt is "content\n\n" (the newlines vanish under whitespace
        # splitting) and the completion gets the EOS: L/2 - 1 words make L/2 tokens.
        data = [{"prompt": " ".join(f"w{rng.randrange(3, QWEN_VOCAB)}" for _ in range(length // 2)),
                 "completion": " ".join(f"w{rng.randrange(3, QWEN_VOCAB)}" for _ in range(length // 2 - 1)),
                 "label": rng.random() < 0.5} for _ in range(args.scale_rows)]
        write_jsonl(OUT / f"scale-qwenvocab-{length}.jsonl", data)
    n_p = [counters[0](r["prompt"]) for r in w1]
    n_c = [counters[1](r["completion"]) for r in w1]
    print(f"w1.jsonl: {len(w1)} rows, prompt tokens {min(n_p)}-{max(n_p)}, completion tokens {min(n_c)}-{max(n_c)}, "
          f"{sum(r['label'] for r in w1)} thumbs-up; scaling files for L = {', '.join(map(str, LENGTHS))} in {OUT}")


if __name__ == "__main__":
    main()
