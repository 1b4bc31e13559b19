"""Writes ft's shipped datasets (deterministic; run from the repo root):

    python3 scripts/make-datasets.py

datasets/json-answers/: SFT conversations in which the assistant answers every question with a
one-line JSON object {"answer": ...}. SmolLM2-135M-Instruct answers in prose by default, so the
share of held-out replies that are valid JSON with the right "answer" is a behaviour metric that
fine-tuning visibly moves.

datasets/direct-answers/: DPO preference pairs on the same kinds of questions. The chosen reply is
one direct, correct sentence; the rejected one hedges and rambles ("Hmm, I'm not completely
sure...") and half the time gives a wrong answer. Held-out reward accuracy and margin measure
what preference training changed.

datasets/number-answers/: GRPO prompts with verifiable answers: small sums and differences, each
record {"prompt": [user message], "answer": "<number>"}; the reward functions of
recipes/smollm2-grpo.toml check the last number of the reply against "answer" and that the reply
is the number alone. Written by the ft authors, released under CC0-1.0.
"""
import json
import os
import random

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Poland", "Warsaw"),
    ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Ireland", "Dublin"),
    ("China", "Beijing"), ("India", "New Delhi"), ("Russia", "Moscow"), ("Mexico", "Mexico City"),
    ("Argentina", "Buenos Aires"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Turkey", "Ankara"),
    ("Australia", "Canberra"), ("Brazil", "Brasília"), ("Cuba", "Havana"), ("Iran", "Tehran"),
    ("Denmark", "Copenhagen"), ("Belgium", "Brussels"), ("Hungary", "Budapest"), ("Nigeria", "Abuja"),
]
WORDS = ["apple", "river", "mountain", "blue", "keyboard", "ocean", "library", "sun", "garden", "window",
         "rocket", "pencil", "forest", "coffee", "planet", "bridge", "music", "winter", "tiger", "cloud"]
OPPOSITES = [("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("light", "dark"),
             ("open", "closed"), ("early", "late"), ("happy", "sad"), ("full", "empty"), ("old", "new"),
             ("wet", "dry"), ("hard", "soft"), ("loud", "quiet"), ("rich", "poor"), ("first", "last")]


def question(rng):
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randrange(2, 60), rng.randrange(2, 60)
        return rng.choice([f"What is {a} + {b}?", f"Add {a} and {b}.", f"Compute {a} plus {b}."]), a + b
    if kind == 1:
        a, b = rng.randrange(2, 13), rng.randrange(2, 13)
        return rng.choice([f"What is {a} times {b}?", f"Multiply {a} by {b}.", f"What is {a} x {b}?"]), a * b
    if kind == 2:
        country, city = rng.choice(CAPITALS)
        return rng.choice([f"What is the capital of {country}?", f"Name the capital city of {country}.",
                           f"Which city is the capital of {country}?"]), city
    if kind == 3:
        w = rng.choice(WORDS)
        return rng.choice([f"How many letters are in the word \"{w}\"?", f"Count the letters in \"{w}\"."]), len(w)
    if kind == 4:
        w, o = rng.choice(OPPOSITES)
        if rng.random() < 0.5:
            w, o = o, w
        return rng.choice([f"What is the opposite of \"{w}\"?", f"Give the antonym of \"{w}\"."]), o
    a = rng.randrange(10, 100)
    return rng.choice([f"Is {a} even or odd?", f"Tell me whether {a} is even or odd."]), "even" if a % 2 == 0 else "odd"


def conversation(rng):
    q, a = question(rng)
    return {"messages": [{"role": "user", "content": q},
                         {"role": "assistant", "content": json.dumps({"answer": a}, ensure_ascii=False)}]}


def direct(q_answer, rng):
    """(chosen, rejected) replies for a question and its answer."""
    q, a = q_answer
    chosen = f"The answer is {a}."
    if isinstance(a, int):
        wrong = a + rng.choice([-3, -2, -1, 1, 2, 3, 10])
    elif a in ("even", "odd"):
        wrong = "odd" if a == "even" else "even"
    else:
        pool = [c for _, c in CAPITALS] + [o for p in OPPOSITES for o in p]
        wrong = rng.choice([w for w in pool if w != a])
    said = a if rng.random() < 0.5 else wrong
    opener = rng.choice(["Hmm, that's a tricky one.", "Well, let me think about this for a moment.",
                         "Oh, good question! I'm not completely sure, though.", "That depends on how you look at it."])
    middle = rng.choice([f"I believe it might be {said}, but I could be wrong.",
                         f"It's probably {said}, if I remember correctly.",
                         f"My best guess would be {said}, more or less."])
    closer = rng.choice(["You may want to double-check that with another source.",
                         "Please don't rely on me for this one.", "Does that help at all?", ""])
    rejected = " ".join(x for x in (opener, middle, closer) if x)
    return {"prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def write(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main():
    rng = random.Random(20261123)
    seen, train, heldout = set(), [], []
    while len(train) + len(heldout) < 700:
        c = conversation(rng)
        q = c["messages"][0]["content"]
        if q in seen:
            continue
        seen.add(q)
        (heldout if len(heldout) < 100 and rng.random() < 0.15 else train).append(c)
    write("datasets/json-answers/train.jsonl", train[:600])
    write("datasets/json-answers/heldout.jsonl", heldout)
    print(len(train[:600]), len(heldout))

    rng = random.Random(20261124)
    seen, train, heldout = set(), [], []
    while len(train) + len(heldout) < 700:
        q, a = question(rng)
        if q in seen:
            continue
        seen.add(q)
        (heldout if len(heldout) < 100 and rng.random() < 0.15 else train).append(direct((q, a), rng))
    write("datasets/direct-answers/train.jsonl", train[:600])
    write("datasets/direct-answers/heldout.jsonl", heldout)
    print(len(train[:600]), len(heldout))

    rng = random.Random(20261130)
    seen, train, heldout = set(), [], []
    while len(train) + len(heldout) < 460:
        a, b = rng.randrange(1, 20), rng.randrange(1, 20)
        if rng.random() < 0.5:
            q, ans = f"What is {a} + {b}? Reply with the number only.", a + b
        else:
            a, b = max(a, b), min(a, b)
            q, ans = f"What is {a} - {b}? Reply with the number only.", a - b
        if q in seen:
            continue
        seen.add(q)
        row = {"prompt": [{"role": "user", "content": q}], "answer": str(ans)}
        (heldout if len(heldout) < 60 and rng.random() < 0.15 else train).append(row)
    write("datasets/number-answers/train.jsonl", train[:400])
    write("datasets/number-answers/heldout.jsonl", heldout)
    print(len(train[:400]), len(heldout))


if __name__ == "__main__":
    main()
