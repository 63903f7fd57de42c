"""Long-context tasks for `python -m nanodp.eval`, generated locally from a seed and sized in tokens.

Kinds (scored by `score` at the end of this file):
  passkey            a 5-digit pass key hidden at `depth` in filler text; the prompt ends "The pass key is"
  single_needle      RULER niah_single: "One of the special magic numbers for {key} is: {7 digits}."
  multi_key          the same needle plus 3 distractor needles for other keys (RULER niah_multikey)
  multi_value        4 numbers for one key, all asked for (niah_multivalue)
  multi_query        4 keys with a number each, all asked at once (niah_multiquery)
  variable_tracking  VAR A = 12345. ... VAR B = A. ... (one chain, 4 hops): which names hold 12345?
  common_words       a numbered list of words; the 10 words repeated most often are asked for (cwe)
  kv_retrieval       a JSON object of many UUID-like key/value pairs; the value of one key (at `depth`) is asked
                     for (RULER's kv retrieval: a copy head must find one exact key among look-alikes)
The answer is decoded token by token after an answer prefix, as in RULER.

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
import string
from pathlib import Path

from .haystack import ADJ, NOUN, Haystack, read_prose

KINDS = (
    "passkey",
    "single_needle",
    "multi_key",
    "multi_value",
    "multi_query",
    "variable_tracking",
    "common_words",
    "kv_retrieval",
)
DEPTH_KINDS = ("passkey", "single_needle", "multi_key", "kv_retrieval")
MAX_NEW = {
    "passkey": 8,
    "single_needle": 12,
    "multi_key": 12,
    "multi_value": 40,
    "multi_query": 40,
    "variable_tracking": 30,
    "common_words": 64,
    "kv_retrieval": 24,
}  # tokens to generate per kind
INTRO_NIAH = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards."
)


def _key(rng, taken):
    while True:  # RULER-style keys: two words joined by a hyphen, distinct within a prompt
        k = f"{rng.choice(ADJ)}-{rng.choice(NOUN)}"
        if k not in taken:
            taken.add(k)
            return k


def _numbers(rng, count, digits):
    out = []
    while len(out) < count:
        x = str(rng.randrange(10 ** (digits - 1), 10**digits))
        if x not in out:
            out.append(x)
    return out


def _needle_spec(kind, rng, depth):
    """(intro, [(depth, sentence)], question, answer prefix, answers) of one needle-in-a-haystack prompt."""
    magic = "One of the special magic numbers for {} is: {}."
    if kind == "passkey":
        k = _numbers(rng, 1, 5)[0]
        return (
            "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there.",
            [(depth, f"The pass key is {k}. Remember it. {k} is the pass key.")],
            "What is the pass key?",
            "The pass key is",
            [k],
        )
    if kind == "variable_tracking":
        names, value = [], _numbers(rng, 1, 5)[0]
        while len(names) < 5:
            nm = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
            names += [nm] if nm not in names else []
        lines = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = {a}." for a, b in zip(names, names[1:])]
        return (
            "Memorize and track the chain(s) of variable assignment hidden in the following text.",
            list(zip(sorted(rng.random() for _ in lines), lines)),
            f"Question: Find all variables that are assigned the value {value} in the text above.",
            "Answer: According to the chain(s) of variable assignment in the text above, 5 variables are "
            f"assigned the value {value}, they are:",
            names,
        )
    taken = set()
    if kind in ("single_needle", "multi_key"):
        keys = [_key(rng, taken) for _ in range(4 if kind == "multi_key" else 1)]
        vals = _numbers(rng, len(keys), 7)
        needles = [(depth, magic.format(keys[0], vals[0]))] + [
            (rng.random(), magic.format(k, v)) for k, v in zip(keys[1:], vals[1:])
        ]  # distractors
        q = f"the special magic number for {keys[0]} mentioned in the provided text"
        return INTRO_NIAH, needles, f"What is {q}?", f"The {q[4:]} is", vals[:1]
    if kind == "multi_value":
        key, vals = _key(rng, taken), _numbers(rng, 4, 7)
        needles, keys = [(rng.random(), magic.format(key, v)) for v in vals], key
    elif kind == "multi_query":
        ks, vals = [_key(rng, taken) for _ in range(4)], _numbers(rng, 4, 7)
        needles, keys = (
            [(rng.random(), magic.format(k, v)) for k, v in zip(ks, vals)],
            ", ".join(ks[:-1]) + f", and {ks[-1]}",
        )
    else:
        raise ValueError(f"unknown task kind {kind!r}; known: {', '.join(KINDS)}")
    q = f"the special magic numbers for {keys} mentioned in the provided text"
    return INTRO_NIAH, needles, f"What are all {q}?", f"The {q[4:]} are", vals


def _cwe_items(base, k):
    """k numbered-list entries: 10 common words repeated f times, the others f // 10 times (at least 1)."""
    words = [f"{a}-{n}" for a in ADJ for n in NOUN]
    random.Random(base).shuffle(words)  # the same words for every k
    rng = random.Random(f"{base}|{k}")
    fc = min(30, max(2, k // 40))
    fu = max(1, fc // 10)
    common, rare = words[:10], words[10 : 10 + max(0, (k - 10 * fc) // fu)]
    items = common * fc + rare * fu
    rng.shuffle(items)
    return items, common


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

        def uid():
            return "-".join("".join(rng.choice("0123456789abcdef") for _ in range(n)) for n in (8, 4, 4))

        pairs = [(uid(), uid()) for _ in range(4096)]  # drawn once, so every build(k) shares its first k

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
            items, _ = _cwe_items(base, k)
            body = (
                "Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n"
                + "\n".join(f"{i + 1}. {w}" for i, w in enumerate(items))
                + "\nQuestion: What are the 10 most common words in the above list?"
            )
            return _render(tok, body, "Answer: The top 10 words that appear most often in the list are:", chat)

        ids = _fit(build, target)
        answers = _cwe_items(base, 0)[1]
    else:
        intro, needles, question, prefix, answers = _needle_spec(kind, rng, depth)
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
