"""The tiny preset learns a user's own small data set, not only the demo's six chats: 200 invented facts, trained
with nothing but `--model tiny --data FILE`, then asked back with greedy decoding."""
import json
import random
from collections import Counter
from pathlib import Path

import pytest

from phi3lora import lora
from phi3lora.cli import train
from phi3lora.phi3mini import Phi3, Tokenizer, generate
from phi3lora.phi3mini.tiny import _TINY_WORDS


def invented_facts(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n questions "Who keeps the <word> <word>?" (two words of the tiny vocabulary, a distinct pair each) with the
    reply "<Name> keeps it." (an invented name, distinct for each): nothing the base model could know."""
    tok, rng = Tokenizer.tiny(), random.Random(seed)
    words = [w for w in _TINY_WORDS.split() if w.isalpha() and w.islower() and len(w) >= 3
             and len(tok.encode("the " + w)) == 2]  # one token each
    pairs, names, out = set(), set(), []
    while len(out) < n:
        pair = (rng.choice(words), rng.choice(words))
        name = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(2)).capitalize()
        if pair in pairs or name in names or pair[0] == pair[1]:
            continue
        pairs.add(pair)
        names.add(name)
        out.append((f"Who keeps the {pair[0]} {pair[1]}?", f"{name} keeps it."))
    return out


@pytest.mark.slow
def test_tiny_preset_learns_200_new_facts(tmp_path: Path):
    facts = invented_facts(200)
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n" for q, a in facts))
    # the preset's settings alone; --eval-fraction 0: every fact is trained, so every one asked can be right
    assert train.main(["--model", "tiny", "--data", str(data), "--out", str(tmp_path / "out"), "--eval-fraction", "0",
                       "--data-cache", "off", "--save-every", "0", "--eval-every", "0"]) == 0
    tok, model = Tokenizer.tiny(), Phi3.from_name("tiny")
    lora.load_adapter(model, tmp_path / "out" / "adapter")
    model.eval()
    asked = random.Random(1).sample(facts, 20)
    replies = []
    for q, _ in asked:
        prompt = tok.encode_chat([{"role": "user", "content": q}], add_generation_prompt=True)
        replies.append(tok.decode(generate(model, prompt, max_new_tokens=16), skip_special_tokens=True).strip())
    right = sum(r == a for r, (_, a) in zip(replies, asked))
    same = Counter(replies).most_common(1)[0][1]
    assert right >= 12 and same < 5, (right, Counter(replies).most_common(3), list(zip(replies, asked))[:5])
