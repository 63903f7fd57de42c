"""Filler text for the evaluation's prompts, generated from a seed (no network): the "noise" sentences, seeded
varied English sentences, real prose from a file, and `prose`, a long text for benchmarks and inspection."""

import random
import re
from pathlib import Path

NOISE = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]
ADJ = (
    "quiet bright ancient narrow golden silver hidden wooden frozen gentle rapid hollow crimson distant "
    "patient humble rusty clever lonely muddy sturdy velvet bitter polite sleepy windy curious brave "
    "fragile noisy dusty tidy"
).split()
NOUN = (
    "farmer river lantern harbor teacher garden window sailor meadow bridge painter kettle village "
    "forest baker candle mountain ribbon doctor orchard pebble castle tailor island engine violin "
    "market feather captain cottage mirror valley blanket compass library tractor beacon ladder "
    "pilot basket canyon drummer jacket orchid saddle tunnel miller parrot"
).split()
VERB = (
    "carried painted repaired followed admired noticed borrowed cleaned watched visited measured "
    "described opened counted remembered ignored polished gathered crossed discovered"
).split()
PLACE = (
    "near the old mill",
    "before the first snow",
    "behind the station",
    "at the edge of town",
    "after the long rain",
    "under a pale moon",
    "beside the harbor wall",
    "in the early morning",
    "across the wide field",
    "during the summer fair",
    "on the hill road",
    "inside the quiet hall",
)
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()


def varied_sentence(rng: random.Random) -> str:
    """One generated sentence of ordinary English, e.g. 'The rusty lantern watched the pilot near the old mill.'"""
    a, n, n2, v, p = (rng.choice(ADJ), rng.choice(NOUN), rng.choice(NOUN), rng.choice(VERB), rng.choice(PLACE))
    t = rng.randrange(4)
    if t == 0:
        return f"The {a} {n} {v} the {n2} {p}."
    if t == 1:
        return f"Every {rng.choice(DAYS)} a {n} {v} a {a} {n2}."
    if t == 2:
        return f"Nobody knew why the {n} looked so {a} {p}."
    return f"{p[0].upper() + p[1:]}, the {n2} {v} a {a} {n} and went home."


def read_prose(path) -> list:
    """Sentences of a plain text file (whitespace normalised)."""
    text = " ".join(Path(path).read_text(encoding="utf-8", errors="replace").split())
    sents = [s for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    if len(sents) < 2:
        raise ValueError(f"--haystack {path}: needs plain text with several sentences")
    return sents


class Haystack:
    """The first k filler sentences of one prompt (the same list for every k, so sizing can search k)."""

    def __init__(self, name, rng, prose=None):
        self.name, self.rng, self.prose, self.items = name, random.Random(rng.random()), prose, []
        self.off = rng.randrange(len(prose)) if prose else 0

    def take(self, k):
        while len(self.items) < k:
            i = len(self.items)
            self.items.append(
                NOISE[i % len(NOISE)]
                if self.name == "noise"
                else varied_sentence(self.rng)
                if self.name == "varied"
                else self.prose[(self.off + i) % len(self.prose)]
            )
        return self.items[:k]


def prose(tok, n_tokens, seed):
    """A long, varied English-like text (no network): sentences built from a seeded vocabulary."""
    import torch

    g = torch.Generator().manual_seed(seed)
    subj = [
        "The old sailor",
        "A young doctor",
        "The city council",
        "My neighbour",
        "The river",
        "Our teacher",
        "The small cat",
        "A tired engineer",
        "The garden",
        "The museum guide",
    ]
    verb = ["remembered", "described", "repaired", "painted", "visited", "explained", "counted", "followed"]
    obj = [
        "the broken bridge",
        "a quiet morning",
        "the northern hills",
        "an unusual letter",
        "the market",
        "twelve wooden boats",
        "the history of the town",
        "a song about rain",
        "the last train",
    ]
    tail = [
        "before dinner.",
        "without a word.",
        "with great care.",
        "in the spring.",
        "for the children.",
        "after the storm.",
        "near the harbour.",
        "once again.",
    ]
    words, ids = [], []
    while len(ids) < n_tokens:
        for _ in range(64):
            pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
            words.append(f"{pick(subj)} {pick(verb)} {pick(obj)} {pick(tail)}")
        ids = tok.encode(" ".join(words))
    return ids[:n_tokens]
