"""Data preparation: ours (phi3mini.data.load_data) vs datasets + transformers' chat template, same data, same run.

Writes seeded synthetic chats shaped like HuggingFaceH4/ultrachat_200k (1-3 turns, questions of 8-40 words, replies
of 100-450 words in sentences and paragraphs, words from the tiny tokenizer's English list; the "prompt",
"prompt_id", "messages" fields of ultrachat) to JSONL, then runs each system in a fresh child process, one process
each (the tokenizers library's Rust threads are on for both):
  ours      load_data(jsonl, tokenizer, max_seq_len, cache=...): batched encoding, label masks, the flat arrays
  anchor    datasets.load_dataset("json") + .map(apply_chat_template(tokenize=True)) per example, as TRL's
            SFTTrainer prepares conversational data (no label mask: less work than ours)
  anchor-b  the same map with batched=True (1000 chats per call): the anchor's fastest form
Each child reports the seconds of the load, the tokens, and the peak resident memory it added (VmHWM minus the
resident memory after imports and tokenizer load), divided by the tokens. A second child per system repeats the
load with the cache the first one wrote (ours: the data cache; datasets: its arrow cache) -> cached reload.
Both systems build their tokenizer from the same tokenizer.json; the first 2000 chats' ids are compared.

    python bench/data_prep.py                          # 20k chats, the three systems
    python bench/data_prep.py --chats 200000 --systems ours
    python bench/data_prep.py --chats 300 --systems ours,anchor --rounds 1    # smoke run
Targets: ours >= 3x faster than the anchor, <= 8 bytes of RSS per token, cached reload < 10% of the first load,
200k chats < 2 minutes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHECK_N = 2000  # chats whose ids both systems must agree on


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return r.ru_utime + r.ru_stime


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:  # VmHWM: this process image's peak (ru_maxrss counts the fork parent's)
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# ----- synthetic chats ----------------------------------------------------------------------------------------

def write_chats(path: Path, n: int, seed: int) -> None:
    import numpy as np

    from phi3lora.phi3mini.tiny import _TINY_WORDS

    words = np.array(sorted(set(_TINY_WORDS.split())), dtype=object)
    rng = np.random.default_rng(seed)

    def text(n_words: int, paragraphs: bool) -> str:
        w = words[rng.integers(0, len(words), n_words)].copy()
        w[0] = w[0].capitalize()
        ends = np.flatnonzero(rng.random(n_words) < 1 / 14)  # sentences of ~14 words
        for e in ends:
            w[e] += "."
            if e + 1 < n_words:
                w[e + 1] = w[e + 1].capitalize() if not paragraphs or rng.random() > 0.2 else \
                    "\n\n" + w[e + 1].capitalize()
        return " ".join(w) + "."

    with open(path, "w") as f:
        for i in range(n):
            messages = []
            for _ in range(int(rng.integers(1, 4))):
                messages.append({"role": "user", "content": text(int(rng.integers(8, 41)), False)})
                messages.append({"role": "assistant", "content": text(int(rng.integers(100, 451)), True)})
            f.write(json.dumps({"prompt": messages[0]["content"], "prompt_id": f"{i:08x}", "messages": messages})
                    + "\n")


# ----- the systems (each in its own child process) ------------------------------------------------------------

def _ids_hash(rows) -> str:
    h = hashlib.sha256()
    for ids in rows:
        h.update(json.dumps([int(t) for t in ids]).encode())
    return h.hexdigest()[:16]


def run_ours(data: str, tok_dir: str, cache: str, max_seq_len: int) -> dict:
    from phi3lora.phi3mini import Tokenizer
    from phi3lora.data.pipeline import load_data

    tok = Tokenizer.from_pretrained(tok_dir)
    base, cpu0 = rss_bytes(), cpu_seconds()
    t0 = time.perf_counter()
    sets = load_data(data, tok, max_seq_len, cache=cache)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    peak = peak_rss_bytes()
    n = sets.train.n_tokens
    check = _ids_hash(sets.train[i].input_ids for i in range(min(CHECK_N, len(sets.train))))
    return {"seconds": seconds, "cpu_seconds": cpu, "tokens": n, "examples": len(sets.train),
            "added_rss": peak - base, "from_cache": sets.from_cache, "check": check}


def run_anchor(data: str, tok_dir: str, cache: str, batched: bool) -> dict:
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    base, cpu0 = rss_bytes(), cpu_seconds()
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=data, split="train", cache_dir=cache)
    if batched:
        def fn(batch):
            return {"input_ids": tok.apply_chat_template(batch["messages"], tokenize=True, return_dict=True)
                    ["input_ids"]}
    else:
        def fn(example):
            return {"input_ids": tok.apply_chat_template(example["messages"], tokenize=True, return_dict=True)
                    ["input_ids"]}
    ds = ds.map(fn, batched=batched, batch_size=1000, remove_columns=ds.column_names)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    peak = peak_rss_bytes()
    lengths = ds.map(lambda b: {"n": [len(x) for x in b["input_ids"]]}, batched=True, batch_size=10000)["n"]
    check = _ids_hash(ds.select(range(min(CHECK_N, len(ds))))["input_ids"])
    return {"seconds": seconds, "cpu_seconds": cpu, "tokens": int(sum(lengths)), "examples": len(ds),
            "added_rss": peak - base, "from_cache": None, "check": check}


def child(args) -> None:
    if args.child == "ours":
        result = run_ours(args.data, args.tok, args.cache, args.max_seq_len)
    else:
        result = run_anchor(args.data, args.tok, args.cache, batched=args.child == "anchor-b")
    print(json.dumps(result))


def run_child(system: str, data: Path, tok_dir: Path, cache: Path, max_seq_len: int) -> dict:
    cmd = [sys.executable, __file__, "--child", system, "--data", str(data), "--tok", str(tok_dir), "--cache",
           str(cache), "--max-seq-len", str(max_seq_len)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "TOKENIZERS_PARALLELISM": "true"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{system} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----- the table ----------------------------------------------------------------------------------------------

def measure(system: str, data: Path, tok_dir: Path, work: Path, max_seq_len: int, rounds: int) -> dict:
    """First load (best of `rounds`, each with an empty cache), then a cached reload in a fresh process."""
    firsts = []
    for _ in range(rounds):
        cache = work / f"cache-{system}"
        shutil.rmtree(cache, ignore_errors=True)
        firsts.append(run_child(system, data, tok_dir, cache, max_seq_len))
    first = min(firsts, key=lambda r: r["seconds"])
    reload = run_child(system, data, tok_dir, cache, max_seq_len)
    shutil.rmtree(cache, ignore_errors=True)
    return {"system": system, "seconds": first["seconds"], "all_seconds": [r["seconds"] for r in firsts],
            "cpu_seconds": first["cpu_seconds"], "reload_cpu_seconds": reload["cpu_seconds"],
            "tokens": first["tokens"], "examples": first["examples"],
            "tokens_per_s": first["tokens"] / first["seconds"],
            "added_rss": first["added_rss"], "rss_per_token": first["added_rss"] / first["tokens"],
            "reload_seconds": reload["seconds"], "reload_fraction": reload["seconds"] / first["seconds"],
            "reload_from_cache": reload["from_cache"], "check": first["check"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chats", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--systems", default="ours,anchor,anchor-b")
    p.add_argument("--rounds", type=int, default=1, help="first loads per system (the fastest is kept)")
    p.add_argument("--max-seq-len", type=int, default=8192, help="ours: long enough that nothing is cut")
    p.add_argument("--workdir", default="", help="where the chats and caches go (default: a temporary folder)")
    p.add_argument("--json-out", default="")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--data", default="", help=argparse.SUPPRESS)
    p.add_argument("--tok", default="", help=argparse.SUPPRESS)
    p.add_argument("--cache", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    from phi3lora.phi3mini import Tokenizer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="data-prep-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"chats-{args.chats}-{args.seed}.jsonl"
    if not data.exists():
        t0 = time.perf_counter()
        write_chats(data.with_suffix(".tmp"), args.chats, args.seed)
        data.with_suffix(".tmp").rename(data)
        print(f"wrote {args.chats} chats ({data.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f} s")
    tok_dir = work / "tokenizer"
    Tokenizer.tiny().save_pretrained(tok_dir)
    rows = [measure(s, data, tok_dir, work, args.max_seq_len, args.rounds) for s in args.systems.split(",")]
    print(f"\n{args.chats} chats, {data.stat().st_size / 1e6:.0f} MB JSONL, tiny tokenizer (32011 ids), "
          f"{os.cpu_count()} CPUs")
    print(f"{'system':10} {'seconds':>8} {'CPU s':>7} {'tokens':>12} {'tokens/s':>10} {'RSS B/token':>11} "
          f"{'reload s':>9} {'reload %':>8}")
    for r in rows:
        print(f"{r['system']:10} {r['seconds']:8.1f} {r['cpu_seconds']:7.1f} {r['tokens']:12,} "
              f"{r['tokens_per_s']:10,.0f} {r['rss_per_token']:11.2f} {r['reload_seconds']:9.2f} "
              f"{100 * r['reload_fraction']:7.1f}%")
    by = {r["system"]: r for r in rows}
    summary = {"chats": args.chats, "bytes": data.stat().st_size}
    if "ours" in by:
        ours = by["ours"]
        for other in ("anchor", "anchor-b"):
            if other in by:
                summary[f"speedup_vs_{other}"] = by[other]["seconds"] / ours["seconds"]
                summary[f"cpu_ratio_vs_{other}"] = by[other]["cpu_seconds"] / ours["cpu_seconds"]
                summary[f"ids_match_{other}"] = by[other]["check"] == ours["check"]
                print(f"ours vs {other}: {summary[f'speedup_vs_{other}']:.2f}x faster (CPU time: "
                      f"{summary[f'cpu_ratio_vs_{other}']:.2f}x less), same ids on the first "
                      f"{CHECK_N} chats: {summary[f'ids_match_{other}']}")
        summary["targets"] = {
            "speedup_3x": summary.get("speedup_vs_anchor", 0) >= 3,
            "rss_8_bytes_per_token": ours["rss_per_token"] <= 8,
            "reload_under_10pct": ours["reload_fraction"] < 0.10,
        }
        if args.chats >= 200000:
            summary["targets"]["200k_under_2_min"] = ours["seconds"] < 120
    result = {"rows": rows, "summary": summary}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
