"""What each task kind of `python -m nanodp.eval` hides in its prompt and asks for, drawn from a seeded rng.

  passkey            a 5-digit pass key hidden at `depth` in filler text; the prompt ends "The pass key is"
  single_needle      RULER niah_single: "One of the special magic numbers for {key} is: {7 digits}."
  multi_key          the same needle plus 3 distractor needles for other keys (RULER niah_multikey)
  multi_value        4 numbers for one key, all asked for (niah_multivalue)
  multi_query        4 keys with a number each, all asked at once (niah_multiquery)
  variable_tracking  VAR A = 12345. ... VAR B = A. ... (one chain, 4 hops): which names hold 12345?
  common_words       a numbered list of words; the 10 words repeated most often are asked for (cwe)
  kv_retrieval       a JSON object of many UUID-like key/value pairs; the value of one key (at `depth`) is asked
                     for (RULER's kv retrieval: a copy head must find one exact key among look-alikes)

nanodp/eval/tasks.py wraps these in filler, fits them to a token length and scores the answers.
"""

import random
import string

from .haystack import ADJ, NOUN

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


def needle_spec(kind, rng, depth):
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


def cwe_items(base, k):
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


def kv_pairs(rng, count=4096):
    """`count` (key, value) pairs of UUID-like strings for kv_retrieval; pairs[0] is the one asked for."""

    def uid():
        return "-".join("".join(rng.choice("0123456789abcdef") for _ in range(n)) for n in (8, 4, 4))

    return [(uid(), uid()) for _ in range(count)]
