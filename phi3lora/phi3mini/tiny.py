"""The built-in `tiny` model: a small random Phi-3 and a small tokenizer, built in code (no download).

`tiny` is what the README's demo trains on a CPU and what the tests build models from. It keeps Phi-3-mini's
vocabulary size and special-token ids, so the training and chat code paths are the real ones; only the widths and
the number of layers are small. The preset is large enough (256 wide, 4 layers) that LoRA on a frozen random base
can memorize a few short chats to exact greedy replies in about a minute on two CPU cores, which is what the demo
shows. Tests that need speed, not memorization, build a smaller one by keyword overrides (tests/helpers.py).
"""
from __future__ import annotations

import functools
import json
from types import MappingProxyType

from .chat_format import EOS_TOKEN, PHI3_ADDED_TOKENS, PHI3_CHAT_TEMPLATE

# Phi3Config overrides of the `tiny` preset (everything else is Phi-3-mini-4k's: vocabulary 32064, ids, rope theta).
# Read-only: another size is Phi3Config.from_name("tiny", **overrides), never an edit of the preset.
TINY_CONFIG = MappingProxyType(dict(
    hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
    max_position_embeddings=1024, original_max_position_embeddings=1024, sliding_window=1023))


# ----- the built-in tiny tokenizer -------------------------------------------------------------------------------

# Words of the tiny vocabulary: each becomes a piece "▁word" (SentencePiece's word-start mark), its capitalized form
# too, and the lowercase ones also a piece without the mark (for words inside others, after "-" or "(").
_TINY_WORDS = """
the of and to in is it you that he was for on are with as his they be at one have this from or had by not word but
what some we can out other were all there when up use your how said an each she which do their time if will way about
many then them write would like so these her long make thing see him two has look more day could go come did number
sound no most people my over know water than call first who may down side been now find any new work part take get
place made live where after back little only round man year came show every good me give our under name very through
just form sentence great think say help low line differ turn cause much mean before move right boy old too same tell
does set three want air well also play small end put home read hand port large spell add even land here must big high
such follow act why ask men change went light kind off need house picture try us again animal point mother world near
build self earth father head stand own page should country found answer school grow study still learn plant cover food
sun four between state keep eye never last let thought city tree cross farm hard start might story saw far sea draw
left late run don't while press close night real life few north open seem together next white children begin got walk
example ease paper group always music those both mark often letter until mile river car feet care second book carry
took science eat room friend began idea fish mountain stop once base hear horse cut sure watch color face wood main
enough plain girl usual young ready above ever red list though feel talk bird soon body dog family direct pose leave
song measure door product black short numeral class wind question happen complete ship area half rock order fire south
problem piece told knew pass since top whole king space heard best hour better true during hundred five remember step
early hold west ground interest reach fast verb sing listen six table travel less morning ten simple several vowel
toward war lay against pattern slow center love person money serve appear road map rain rule govern pull cold notice
voice unit power town fine certain fly fall lead cry dark machine note wait plan figure star box noun field rest
correct able pound done beauty drive stood contain front teach week final gave green oh quick develop ocean warm free
minute strong special mind behind clear tail produce fact street inch multiply nothing course stay wheel full force
blue object decide surface deep moon island foot system busy test record boat common gold possible plane stead dry
wonder laugh thousand ago ran check game shape equate hot miss brought heat snow tire bring yes distant fill east
paint language among hello thanks please sorry yes okay sure
model train training data token tokens loss rank low adapter adaptation weight weights layer matrix tune tuning
learning rate step steps batch memory gradient chat reply replies message format file files code run script config
python torch kernel kernels checkpoint eval assistant user capital language small fast
LoRA Phi Microsoft PyTorch Python Triton GPU CPU JSON Hugging Face English French France Paris Italy Rome
"""
# Frequent English letter pairs and triples, as pieces inside words (after the word pieces, so they never cut one).
_TINY_SUBWORDS = """
th he in er an re on at en nd ti es or te of ed is it al ar st to nt ng se ha as ou io le ve co me de hi ri ro ic ne
ea ra ce li ch ll be ma si om ur ca el ta la ns di fo ho pe ec pr no ct us ac ot il tr ly nc et ut ss so rs un lo wa ge
ie wh ee wi em ad ol rt po we na ul ni ts mo ow pa im mi ai sh ir su id os iv ia am fi ci vi pl ig tu ev ld ry mp fe bl
ab gh ty op wo sa ay ex ke fr oo av ag if ap gr od bo sp rd do uc bu ei ov by rm ip ht sc ft ph ing ion ent tio for nde
has nce edt tis oft sth men ver ter ere ate all ess str ect con res est pro int com per ble ous ity ive ial ers ant ist
tion ment ness able ible ful less ism ize ise ify ity ous ical ally ed es 's n't 're 've 'll 'm 'd
"""


@functools.lru_cache(maxsize=1)
def tiny_tokenizer_json() -> str:
    """tokenizer.json text of the tiny tokenizer: Phi-3's layout (Llama 2's normalizer, decoder and byte-fallback
    BPE) and Phi-3's ids for <unk> 0, <s> 1, </s> 2, <0x00>..<0xFF> 3..258 and the added tokens 32000..32010.
    Pieces: "▁" and printable ASCII, then the merges that spell about a thousand common English words (as "▁word",
    "▁Word" and "word") and frequent letter groups; ids up to 31999 are filler pieces that no text encodes to.
    Other characters go through the byte tokens. Vocabulary size 32011, like Phi-3."""
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in ["▁"] + [chr(c) for c in range(0x21, 0x7F)]:
        vocab[ch] = len(vocab)
    merges: list[list[str]] = []

    rank: dict[tuple[str, str], int] = {}

    def spell(piece: str) -> None:
        # Run BPE with the merges so far, then join what is left left to right with new merges: every new merge
        # ranks after all existing ones, so the pieces spelled before still encode the same way.
        parts = list(piece)
        while len(parts) > 1:
            r, i = min((rank.get((a, b), len(rank)), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
            if r == len(rank):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        acc = parts[0]
        for part in parts[1:]:
            if acc + part not in vocab:
                rank[acc, part] = len(rank)
                merges.append([acc, part])
                vocab[acc + part] = len(vocab)
            acc += part

    # Merges that start at a "▁" come first: BPE applies the lowest-ranked merge first, so a listed word grows
    # from its "▁" to its end before any in-word merge can cut into it. Then "▁" + each letter and digit, then the
    # in-word pieces.
    words = _TINY_WORDS.split()
    for word in dict.fromkeys(words + [w[0].upper() + w[1:] for w in words]):
        spell("▁" + word)
    for ch in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789":
        spell("▁" + ch)
    for piece in dict.fromkeys([w for w in words if w.islower()] + _TINY_SUBWORDS.split()):
        spell(piece)
    n_pieces = min(PHI3_ADDED_TOKENS.values())
    while len(vocab) < n_pieces:
        vocab[f"<unused{len(vocab)}>"] = len(vocab)  # multi-character pieces with no merge: never produced
    special = [("<unk>", 0, False), ("<s>", 1, False), ("</s>", 2, True)]  # (content, id, rstrip), as in Phi-3
    added = [dict(id=i, content=c, single_word=False, lstrip=False, rstrip=r, normalized=False, special=c != "</s>")
             for c, i, r in special]
    for content, tid in PHI3_ADDED_TOKENS.items():
        vocab[content] = tid
        added.append(dict(id=tid, content=content, single_word=False, lstrip=False, rstrip=content != EOS_TOKEN,
                          normalized=False, special=True))
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    return json.dumps(spec, ensure_ascii=False)


def tiny_tokenizer_config() -> dict:
    """tokenizer_config.json of the tiny tokenizer (Phi-3's special tokens and chat template)."""
    return {"bos_token": "<s>", "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": "<unk>",
            "add_bos_token": False, "add_eos_token": False, "chat_template": PHI3_CHAT_TEMPLATE,
            "model_max_length": 4096}

