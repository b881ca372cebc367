"""Writes train.jsonl and eval.jsonl for the `extract` recipe: restaurant booking messages in free
English, answered by a JSON object {"name", "guests", "day", "time"} (guests an integer, time
24-hour HH:MM).

Deterministic (fixed seed). Held-out messages use guest names that never appear in training.
Run: python adapters/extract/make_data.py"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20261127
NUM_TRAIN, NUM_EVAL = 300, 60

FIRST = ["Ana", "Tom", "Mia", "Leo", "Eva", "Max", "Ida", "Noah", "Zoe", "Ben", "Lena", "Omar", "Sara", "Ivan",
         "Julia", "Finn", "Nora", "Paul", "Rita", "Hugo", "Alma", "Karl", "Jade", "Luca", "Maya", "Nils"]
LAST = ["Ruiz", "Berg", "Novak", "Costa", "Lind", "Weber", "Holm", "Fox", "Marin", "Kane", "Vogel", "Haddad",
        "Blom", "Petrov", "Rossi", "Moller", "Quinn", "Duval", "Sousa", "Laine", "Stein", "Nagy"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine",
         10: "ten"}

MESSAGES = [
    "Hi, this is {name}. Could I book a table for {guests} on {day} at {time}?",
    "Table for {guests} please, {day} {time}. Name: {name}.",
    "Hello! I'd like to reserve a table for {guests} people on {day} around {time}. My name is {name}.",
    "{name} here - we are {guests}, can we come on {day} at {time}?",
    "Booking request: {day}, {time}, {guests} guests, under the name {name}.",
    "Good evening, {name} speaking. Do you have room for {guests} at {time} on {day}?",
    "Could you hold a table on {day} at {time}? There will be {guests} of us. Thanks, {name}",
    "Reservation for {name}: {guests} people, {day} at {time}.",
]


def spoken_time(hour: int, minute: int, rng: random.Random) -> str:
    """The time as a guest might write it: 19:30, 7:30 pm or 7pm."""
    twelve = hour - 12 if hour > 12 else hour
    suffix = "pm" if hour >= 12 else "am"
    forms = [f"{hour:02d}:{minute:02d}", f"{twelve}:{minute:02d} {suffix}"]
    if minute == 0:
        forms.append(f"{twelve}{suffix}")
    return rng.choice(forms)


def make(rng: random.Random, names: list[str], count: int, seen: set[str]) -> list[dict]:
    records: list[dict] = []
    for _attempt in range(100 * count):
        if len(records) == count:
            break
        name, day = rng.choice(names), rng.choice(DAYS)
        guests = rng.randint(1, 10)
        hour, minute = rng.randint(11, 22), rng.choice([0, 0, 15, 30, 45])
        spoken_guests = WORDS[guests] if rng.random() < 0.4 else str(guests)
        message = rng.choice(MESSAGES).format(name=name, guests=spoken_guests, day=day,
                                              time=spoken_time(hour, minute, rng))
        if message in seen:
            continue
        seen.add(message)
        answer = {"name": name, "guests": guests, "day": day, "time": f"{hour:02d}:{minute:02d}"}
        records.append({"prompt": message, "completion": json.dumps(answer)})
    if len(records) < count:
        raise SystemExit(f"only {len(records)} distinct messages; lower the count")
    return records


def main() -> None:
    rng = random.Random(SEED)
    names = [f"{first} {last}" for first in FIRST for last in LAST]
    rng.shuffle(names)
    held_names, train_names = names[:60], names[60:]
    seen: set[str] = set()
    train = make(rng, train_names, NUM_TRAIN, seen)
    held_out = make(rng, held_names, NUM_EVAL, seen)
    here = Path(__file__).parent
    for file, records in (("train.jsonl", train), ("eval.jsonl", held_out)):
        (here / file).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    print(f"wrote {len(train)} training and {len(held_out)} held-out examples to {here}")


if __name__ == "__main__":
    main()
