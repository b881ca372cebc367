"""Writes train.jsonl and eval.jsonl for the `ticket-topic` recipe: customer messages to a shop's
support desk, each labelled with the queue it belongs to: billing, shipping, returns or account.

Deterministic (fixed seed). Held-out messages are written from phrasings and products that never
appear in training, so the adapter must learn the topic, not the sentence.
Run: python adapters/ticket-topic/make_data.py"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20261129
NUM_TRAIN, NUM_EVAL = 320, 60
LABELS = ["billing", "shipping", "returns", "account"]

PRODUCTS = ["kettle", "desk lamp", "yoga mat", "backpack", "coffee grinder", "rain jacket", "phone case",
            "toaster", "water bottle", "office chair", "wool scarf", "bike helmet", "blender", "duvet cover"]
HELD_OUT_PRODUCTS = ["standing fan", "hiking boots", "frying pan", "board game", "electric toothbrush", "tent"]

# per topic: (training phrasings, held-out phrasings); {p} a product, {o} an order number, {a} an amount
TEMPLATES = {
    "billing": ([
        "I was charged twice for my {p}, order {o}. Please refund the extra {a}.",
        "Why does my card statement show {a} for order {o}? The {p} cost less.",
        "The invoice for order {o} has the wrong VAT number, can you send a corrected one?",
        "My payment for the {p} failed but the money ({a}) left my account anyway.",
        "Can I pay for order {o} by bank transfer instead of card?",
        "You billed me {a} for shipping on order {o} although delivery was supposed to be free.",
        "The discount code was not applied to my {p}, I paid {a} too much.",
        "I need a receipt for the {p} I bought, order {o}, for my company's expenses.",
    ], [
        "There is a charge of {a} on my credit card that I do not recognise, reference {o}.",
        "Please explain the extra fee of {a} on my last invoice.",
        "My bank says the payment for order {o} is still pending, was it taken?",
    ]),
    "shipping": ([
        "Where is my {p}? Order {o} was supposed to arrive three days ago.",
        "The tracking for order {o} has not updated since Monday.",
        "Can you deliver my {p} to my office address instead of my home?",
        "The courier left a note but I was at home, when will order {o} be delivered again?",
        "My parcel with the {p} says delivered but it is not here.",
        "How long does shipping to Norway take for order {o}?",
        "Order {o} arrived but the box with the {p} is missing.",
        "Can I still change the delivery date for my {p}?",
    ], [
        "The delivery van never came for order {o}, what happened to my {p}?",
        "Is it possible to pick up my {p} at the depot instead of home delivery?",
        "My package seems stuck at customs, order {o}.",
    ]),
    "returns": ([
        "I want to return the {p} from order {o}, it does not fit.",
        "The {p} arrived broken, can I send it back for a replacement?",
        "How do I get a return label for order {o}?",
        "I sent the {p} back two weeks ago, when will I get my {a} back?",
        "Can I exchange the {p} for a different colour?",
        "The {p} stopped working after a week, I would like to return it under warranty.",
        "Is the return shipping free for order {o}?",
        "You sent me the wrong {p}, I ordered another model. How do I swap it?",
    ], [
        "I changed my mind about the {p}, can I still send it back?",
        "The {p} has a scratch, I want a replacement or my money back.",
        "Where should I drop off the {p} I am returning from order {o}?",
    ]),
    "account": ([
        "I cannot log in to my account, the password reset email never arrives.",
        "Please change the email address on my account to my new one.",
        "How do I delete my account and all my data?",
        "My account was locked after too many login attempts.",
        "I want to unsubscribe from your newsletter but keep my account.",
        "Someone else seems to have used my account to order a {p}, please secure it.",
        "Can I merge my two customer accounts into one?",
        "How do I turn on two-factor authentication for my account?",
    ], [
        "The app keeps logging me out and asks for my password every time.",
        "I would like to update the phone number saved in my profile.",
        "Please send me a copy of all personal data you store about me.",
    ]),
}


GREETINGS = ["", "Hi, ", "Hello, ", "Good morning, ", "Dear support team, ", "Hey there, "]
SIGN_OFFS = ["", " Thanks, {n}.", " Regards, {n}", " Thank you!", " Best, {n}", " Cheers"]
NAMES = ["Ana", "Tom", "Mia", "Leo", "Eva", "Max", "Ida", "Noah", "Zoe", "Ben", "Lena", "Omar", "Sara", "Ivan"]


def fill(template: str, products: list[str], rng: random.Random) -> str:
    body = template.format(p=rng.choice(products), o=f"#{rng.randint(10000, 99999)}",
                           a=f"{rng.randint(5, 300)}.{rng.choice(['00', '50', '99'])} EUR")
    greeting = rng.choice(GREETINGS)
    if greeting:  # "Hi, where is ..." reads better with the body's first letter in lower case
        body = body[0].lower() + body[1:] if not body.startswith("I ") else body
    return greeting + body + rng.choice(SIGN_OFFS).format(n=rng.choice(NAMES))


def make(count: int, held_out: bool, rng: random.Random, seen: set[str]) -> list[dict]:
    records: list[dict] = []
    products = HELD_OUT_PRODUCTS if held_out else PRODUCTS
    for _attempt in range(100 * count):  # a bounded search: too few distinct texts fails loudly below
        if len(records) == count:
            break
        label = LABELS[len(records) % len(LABELS)]  # balanced classes
        template = rng.choice(TEMPLATES[label][1 if held_out else 0])
        text = fill(template, products, rng)
        if text in seen:
            continue
        seen.add(text)
        records.append({"prompt": text, "completion": label})
    if len(records) < count:
        raise SystemExit(f"only {len(records)} distinct {'held-out' if held_out else 'training'} messages")
    rng.shuffle(records)
    return records


def main() -> None:
    rng = random.Random(SEED)
    seen: set[str] = set()
    here = Path(__file__).parent
    for name, count, held_out in (("train.jsonl", NUM_TRAIN, False), ("eval.jsonl", NUM_EVAL, True)):
        records = make(count, held_out, rng, seen)
        (here / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        print(f"wrote {len(records)} examples to {here / name}")


if __name__ == "__main__":
    main()
