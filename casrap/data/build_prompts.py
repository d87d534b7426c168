"""Assemble the bundled prompt set (``prompts.csv``) from the project's own templates.

Run ``python -m casrap.data.build_prompts`` to regenerate; the output is committed so
that every install has the same prompts. Six categories: factual, instruction,
reasoning, code, summarise (passages from the bundled prose, up to ~500 tokens) and
creative. Deterministic (fixed seed).
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

COUNTRIES = ["France", "Japan", "Kenya", "Brazil", "Canada", "Egypt", "Norway", "India", "Peru", "Spain",
             "Italy", "Germany", "Mexico", "Chile", "Ghana", "Poland", "Greece", "Turkey", "Vietnam", "Australia",
             "Portugal", "Ireland", "Argentina", "Morocco", "Sweden", "Thailand", "Austria", "Nigeria", "Cuba", "Finland"]
ELEMENTS = ["oxygen", "iron", "gold", "sodium", "carbon", "helium", "silver", "copper", "neon", "calcium",
            "potassium", "zinc", "lead", "mercury", "tin", "sulfur", "nitrogen", "hydrogen", "uranium", "platinum"]
ANIMALS = ["spider", "octopus", "ant", "horse", "bird", "crab", "starfish", "snake", "beetle", "dog"]
FACTS = [
    "How many days are in a leap year?", "What is the largest planet in the solar system?", "Who painted the Mona Lisa?",
    "What is the freezing point of water in Celsius?", "How many continents are there?", "What gas do plants absorb?",
    "What is the longest river in Africa?", "Who proposed the theory of general relativity?", "What is the speed of light?",
    "How many bones are in the adult human body?", "What is the square root of 144?", "Which ocean is the largest?",
    "What language is spoken in Brazil?", "Who wrote Romeo and Juliet?", "What is the tallest mountain on Earth?",
    "What does DNA stand for?", "What is the smallest prime number?", "How many minutes are in a day?",
    "Which planet is known as the red planet?", "What is the main ingredient of guacamole?",
]
INSTRUCTIONS = [
    "Write a short email to {who} asking to {what}.", "List five practical tips for {activity}.",
    "Give me a simple recipe for {dish}.", "Explain to a beginner how to {activity}.",
    "Draft a polite message to {who} to {what}.", "Make a packing checklist for {trip}.",
]
WHO = ["my landlord", "a colleague", "my manager", "a teacher", "a neighbour", "the support team"]
WHAT = ["reschedule a meeting", "fix a leaking tap", "borrow a ladder", "extend a deadline", "share the slides", "confirm an order"]
ACTIVITIES = ["start running", "learn to cook", "keep a tidy desk", "save money each month", "grow tomatoes", "read more books",
              "improve sleep", "learn a new language", "prepare for an interview", "care for a houseplant"]
DISHES = ["pancakes", "lentil soup", "tomato pasta", "fried rice", "banana bread", "vegetable curry", "omelette", "hummus"]
TRIPS = ["a weekend hike", "a beach holiday", "a business trip", "a winter city break", "a camping trip"]
CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "returns the n-th Fibonacci number", "merges two sorted lists",
    "counts the words in a text", "removes duplicates from a list while keeping order", "computes the factorial of n",
    "finds the largest element of an array", "converts Celsius to Fahrenheit", "checks whether a string is a palindrome",
    "flattens a nested list", "sums the digits of an integer", "returns the greatest common divisor of two numbers",
    "parses a CSV line into fields", "implements binary search", "counts vowels in a string", "transposes a matrix",
    "validates an email address with a simple rule", "computes the mean and median of a list", "rotates a list by k places",
    "groups words by their first letter", "implements a stack with push and pop", "returns the k most common items",
    "checks balanced parentheses", "converts a Roman numeral to an integer", "computes a running total",
    "returns the intersection of two lists", "capitalises every word in a sentence", "generates all subsets of a small set",
    "computes the dot product of two vectors",
]
LANGUAGES = ["Python", "JavaScript", "Rust"]
FORMS = ["a haiku", "a four-line poem", "a limerick", "the opening paragraph of a story", "a short dialogue", "a fable in five sentences"]
SUBJECTS = ["the sea at night", "a lost umbrella", "the first day of spring", "a robot learning to paint", "an old lighthouse",
            "a cat that hates Mondays", "a city in the rain", "the last train home", "a forgotten letter", "a mountain village",
            "a bakery at dawn", "a friendship between a fox and a crow", "a library after closing time", "an astronaut's breakfast"]


def factual() -> list[str]:
    items = [f"What is the capital of {c}?" for c in COUNTRIES]
    items += [f"What is the chemical symbol for {e}?" for e in ELEMENTS]
    items += [f"How many legs does a {a} have?" for a in ANIMALS]
    items += [f"Which continent is {c} in?" for c in COUNTRIES[:20]]
    items += FACTS
    return items


def instruction() -> list[str]:
    items = []
    for template in INSTRUCTIONS:
        if "{who}" in template:
            items += [template.format(who=w, what=x) for w in WHO for x in WHAT]
        elif "{activity}" in template:
            items += [template.format(activity=a) for a in ACTIVITIES]
        elif "{dish}" in template:
            items += [template.format(dish=d) for d in DISHES]
        else:
            items += [template.format(trip=t) for t in TRIPS]
    return list(dict.fromkeys(items))


def reasoning(rng: random.Random) -> list[str]:
    items = []
    for _ in range(30):
        price, count, paid = rng.randint(2, 9), rng.randint(3, 12), 100
        items.append(f"Apples cost {price} dollars each. Maria buys {count} apples and pays with a {paid} dollar note. "
                     "How much change does she get? Think step by step.")
    for _ in range(30):
        speed, hours, extra = rng.randint(40, 90), rng.randint(2, 6), rng.randint(10, 50)
        items.append(f"A train travels at {speed} km per hour for {hours} hours, then another {extra} km. "
                     "How far does it travel in total? Explain your reasoning.")
    for _ in range(30):
        a, b, c = rng.randint(3, 20), rng.randint(2, 9), rng.randint(1, 15)
        items.append(f"Tom has {a} marbles. He gives away {b} and then buys {c} packs of 3 marbles. Later he loses half "
                     "of what he has, rounding down. How many marbles does he have now? Show each step.")
    return list(dict.fromkeys(items))


def code() -> list[str]:
    return [f"Write a {lang} function that {task}." for lang in LANGUAGES for task in CODE_TASKS]


def summarise(paragraphs: list[str]) -> list[str]:
    asks = ["Summarise the following passage in two sentences.", "Give a one-sentence summary of this text.",
            "List the three main points of the passage below.", "Summarise this for a ten-year-old."]
    items = []
    for size in (1, 2, 3, 4):
        for start in range(0, len(paragraphs) - size + 1):
            passage = "\n\n".join(paragraphs[start:start + size])
            items.append(f"{asks[(start + size) % len(asks)]}\n\n{passage}")
    return items


def creative() -> list[str]:
    return [f"Write {form} about {subject}." for form in FORMS for subject in SUBJECTS]


TEST_FRACTION = 0.2
SUMMARISE_TEST_PARAGRAPHS = range(16, 21)  # passages wholly inside go to test; windows straddling 15|16 are dropped


def _group_of(category: str, prompt: str) -> str:
    """The near-duplicate family a prompt belongs to; a family never straddles the split.

    Templated prompts that differ only in a slot (country, element, dish, numbers) share
    a group per template; code prompts share a group per task (the same task in three
    languages); creative ones per subject; one-off facts are their own group.
    """
    if category == "factual":
        for prefix in ("What is the capital of", "What is the chemical symbol for", "How many legs does a", "Which continent is"):
            if prompt.startswith(prefix):
                return f"factual:{prefix}"
        return f"factual:{prompt}"
    if category == "instruction":
        for template in INSTRUCTIONS:
            if prompt.startswith(template.split("{")[0]):
                return f"instruction:{template}"
    if category == "reasoning":
        return f"reasoning:{prompt.split()[0]}"
    if category == "code":
        return "code:" + prompt.split(" function that ", 1)[1]
    if category == "creative":
        return "creative:" + prompt.split(" about ", 1)[1]
    return f"{category}:{prompt}"


def _stable_rank(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()


def assign_splits(rows: list[tuple[str, str]], paragraphs: list[str]) -> list[tuple[str, str, str, str]]:
    """(category, prompt, group, split) with a fixed split that no seed changes.

    Per category, whole groups go to test in the order of a hash of their name until
    the category's test share reaches 20%. Summarise prompts are windows of 1-4
    consecutive paragraphs: windows inside the last five paragraphs are test, windows
    wholly before them train, and the few straddling the border are left out
    (``split=none``), so that no passage appears on both sides.
    """
    out: list[tuple[str, str, str, str]] = []
    by_category: dict[str, list[tuple[str, str]]] = {}
    for category, prompt in rows:
        by_category.setdefault(category, []).append((prompt, _group_of(category, prompt)))
    test_groups: set[str] = set()
    for category, items in by_category.items():
        if category == "summarise":
            continue
        sizes: dict[str, int] = {}
        for _, group in items:
            sizes[group] = sizes.get(group, 0) + 1
        taken = 0
        for group in sorted(sizes, key=_stable_rank):
            if taken >= TEST_FRACTION * len(items):
                break
            if taken + sizes[group] > 0.35 * len(items):
                continue  # a template too big to fit keeps the category's test share near 20%
            test_groups.add(group)
            taken += sizes[group]
    for category, prompt in rows:
        if category == "summarise":
            used = [i for i, p in enumerate(paragraphs) if p in prompt]
            inside = [i in SUMMARISE_TEST_PARAGRAPHS for i in used]
            split = "test" if all(inside) else "train" if not any(inside) else "none"
            out.append((category, prompt, f"summarise:paragraphs {used[0]}-{used[-1]}", split))
        else:
            group = _group_of(category, prompt)
            out.append((category, prompt, group, "test" if group in test_groups else "train"))
    return out


def build(seed: int = 0) -> list[tuple[str, str]]:
    from casrap.measure.corpus import offline_corpus

    rng = random.Random(seed)
    rows = [("factual", p) for p in factual()]
    rows += [("instruction", p) for p in instruction()]
    rows += [("reasoning", p) for p in reasoning(rng)]
    rows += [("code", p) for p in code()]
    rows += [("summarise", p) for p in summarise(offline_corpus().paragraphs())]
    rows += [("creative", p) for p in creative()]
    seen: set[str] = set()
    unique = []
    for category, prompt in rows:
        if prompt not in seen:
            seen.add(prompt)
            unique.append((category, prompt))
    return unique


def main() -> None:
    from casrap.measure.corpus import offline_corpus

    rows = assign_splits(build(), offline_corpus().paragraphs())
    path = Path(__file__).with_name("prompts.csv")
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "category", "prompt", "group", "split"])
        for i, (category, prompt, group, split) in enumerate(rows):
            writer.writerow([i, category, prompt, group, split])
    print(f"wrote {len(rows)} prompts to {path}")


if __name__ == "__main__":
    main()
