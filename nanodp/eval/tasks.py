"""Long-context tasks for `python -m nanodp.eval`, generated locally from a seed and sized in tokens.

The kinds (passkey, RULER's needle variants, variable tracking, common words, kv retrieval) and what each hides
and asks for are in nanodp/eval/kinds.py; this file puts them in a haystack, fits the prompt to a token length
and scores the answer (`score` at the end of this file). The answer is decoded token by token after an answer
prefix, as in RULER.

Haystacks: "noise" (The grass is green. The sky is blue. ...), "varied" (seeded generated sentences) or a
path to a plain English text file (real prose, sentences from a seeded offset). "auto" gives passkey and
variable tracking the noise and the other needle tasks the varied sentences. `depth` places the needle:
0 = start, 1 = end of the haystack.
Kinds without one needle get depth None and n * len(depths) samples per length, so every kind has as many.

Sizing: `length` is the prompt length in tokens of the model's tokenizer (template, question and answer prefix
included); the haystack is filled to the largest size that fits (within ~1% or one sentence). Every prompt has its
own random.Random seeded by a string, which is stable across runs, machines and Python versions.
"""

import hashlib
import json
import random
from pathlib import Path

from .haystack import Haystack, read_prose
from .kinds import DEPTH_KINDS, KINDS, MAX_NEW, cwe_items, kv_pairs, needle_spec


def _render(tok, body, prefix, chat):
    if chat:  # the model's own chat template around the task; the answer prefix opens the assistant turn
        return tok.encode(tok.render_chat([{"role": "user", "content": body}]) + prefix, add_special_tokens=False)
    return tok.encode(f"{body} {prefix}")


def _fit(build, target):
    """The largest count k whose prompt build(k) has at most `target` tokens: proportional guesses from the
    fixed part's size and the per-unit size (each step one encode), clamped into the bracket found so far."""
    fixed = len(build(0))
    if fixed > target:
        raise ValueError(f"a prompt length of {target} tokens is too short for this task ({fixed} without filler)")
    lo, hi, best = 0, None, None
    k = max(1, (target - fixed) // 8)
    for _ in range(40):  # a few steps in practice; the bound only stops filler that cannot grow (cwe's words)
        ids = build(k)
        if len(ids) <= target:
            lo, best = k, ids
            if len(ids) >= target - max(3, target // 100):
                return best
        else:
            hi = k
        if hi is not None and hi - lo <= 1:
            return best if best is not None else build(0)
        per = max(1e-3, (len(ids) - fixed) / k)
        guess = int((target - fixed) / per)
        k = min(max(guess, lo + 1), hi - 1 if hi is not None else max(guess, lo + 1))
    return best


def make_task(tok, kind, length, depth, index, seed, haystack="auto", chat=False, prose=None, max_prompt=None):
    hay = haystack if haystack != "auto" else ("noise" if kind in ("passkey", "variable_tracking") else "varied")
    hname = "list" if kind == "common_words" else hay if hay in ("noise", "varied") else "prose-" + Path(hay).stem
    base = f"{seed}|{kind}|{hname}|{length}|{depth}|{index}"
    rng = random.Random(base)
    target = min(length, max_prompt or length)
    if kind == "kv_retrieval":
        pairs = kv_pairs(rng)  # drawn once, so every build(k) shares its first k

        def build(k):
            items = pairs[1 : k + 1]
            items.insert(round(depth * k), pairs[0])
            body = (
                "Extract the value corresponding to the specified key in the JSON object below.\n\n"
                + json.dumps(dict(items), indent=0)
                + f'\n\nKey: "{pairs[0][0]}"\n'
                "The value associated with the specified key is: "
            )
            return _render(tok, body, "Answer:", chat)

        ids = _fit(build, target)
        answers = [pairs[0][1]]
    elif kind == "common_words":

        def build(k):
            items, _ = cwe_items(base, k)
            body = (
                "Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n"
                + "\n".join(f"{i + 1}. {w}" for i, w in enumerate(items))
                + "\nQuestion: What are the 10 most common words in the above list?"
            )
            return _render(tok, body, "Answer: The top 10 words that appear most often in the list are:", chat)

        ids = _fit(build, target)
        answers = cwe_items(base, 0)[1]
    else:
        intro, needles, question, prefix, answers = needle_spec(kind, rng, depth)
        stack = Haystack(hname, rng, prose)

        def build(k):
            parts = list(stack.take(k))
            at = sorted(((round(d * k), i) for i, (d, _) in enumerate(needles)), reverse=True)
            for pos, i in at:  # the deepest first, so earlier insertions do not shift later positions
                parts.insert(pos, needles[i][1])
            return _render(tok, f"{intro}\n\n{' '.join(parts)}\n\n{question}", prefix, chat)

        ids = _fit(build, target)
    dtag = "" if depth is None else f"-d{depth:g}"
    return {
        "id": f"{kind}-{hname}-{length}{dtag}-{index}",
        "kind": kind,
        "haystack": hname,
        "length": length,
        "depth": depth,
        "prompt_ids": ids,
        "answers": answers,
        "max_new": MAX_NEW[kind],
    }


def make_tasks(tok, kinds, lengths, depths, n, seed, haystack=None, chat=False, max_prompt=None) -> list:
    """Every (kind, haystack, length, depth, sample) prompt: list of dict(id, kind, haystack, length, depth,
    prompt_ids, answers, max_new). `haystack`: None/"auto", "noise", "varied", a file path, or a list of them.
    `max_prompt` caps the prompt tokens (room for the answer in the context); `length` stays the label."""
    hays = haystack if isinstance(haystack, (list, tuple)) else [haystack or "auto"]
    prose = {h: read_prose(h) for h in hays if h not in ("auto", "noise", "varied")}
    out = []
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown task kind {kind!r}; known: {', '.join(KINDS)}")
        for hay in hays if kind != "common_words" else hays[:1]:
            for length in lengths:
                grid = (
                    [(d, i) for d in depths for i in range(n)]
                    if kind in DEPTH_KINDS
                    else [(None, i) for i in range(n * len(depths))]
                )
                out += [
                    make_task(tok, kind, length, d, i, seed, hay, chat, prose.get(hay), max_prompt) for d, i in grid
                ]
    return out


def by_length(tasks):
    """[(length, tasks of that length)], shortest first."""
    out = {}
    for t in tasks:
        out.setdefault(t["length"], []).append(t)
    return sorted(out.items())


def fidelity_subset(tasks, k):
    """Per length, k tasks taken from the kinds in turn (the first of each kind, then the second, ...)."""
    out = []
    for _, ts in by_length(tasks):
        seen, keyed = {}, []
        for i, t in enumerate(ts):
            seen[t["kind"]] = seen.get(t["kind"], 0) + 1
            keyed.append((seen[t["kind"]], i))
        out += [ts[i] for _, i in sorted(keyed)[:k]]
    return out


def prompts_sha(tasks) -> str:
    """One hash of every prompt and answer: equal across runs exactly when the prompts are."""
    return hashlib.sha256(json.dumps([(t["id"], t["prompt_ids"], t["answers"]) for t in tasks]).encode()).hexdigest()


def needle_positions(tok, task):
    """Token positions of the needle (the first answer string) in the prompt, or None (kinds without one needle,
    or an answer the tokenizer splits differently in context)."""
    if task["kind"] not in DEPTH_KINDS:
        return None
    ids = task["prompt_ids"]
    for text in (task["answers"][0], " " + task["answers"][0], '"' + task["answers"][0]):
        sub = tok.encode(text, add_special_tokens=False)
        sub = sub[1:] if text[0] in ' "' and len(sub) > 1 else sub  # the leading space / quote may merge
        for i in range(len(ids) - len(sub) + 1):
            if ids[i : i + len(sub)] == sub:
                return list(range(i, i + len(sub)))
    return None


def score(task, text) -> float:
    """RULER's string match: the fraction of the expected strings in the output (case-insensitive); passkey,
    single_needle and multi_key expect one string, so they score 0 or 1."""
    t = text.lower()
    return sum(a.lower() in t for a in task["answers"]) / len(task["answers"])
