"""Writes train.jsonl and eval.jsonl for the `support-de` recipe: a German customer message plus the
shop's order data, answered by a short, friendly German reply that states the facts.

Each example's meta.facts lists what the reply must contain verbatim (order number, date,
amount with its currency, number of working days); the `support_reply` metric also checks the reply is German. Deterministic
(fixed seed); held-out examples use order numbers, dates and amounts not seen in training.
Run: python adapters/support-de/make_data.py"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20261127
NUM_TRAIN, NUM_EVAL = 300, 60
MONTHS = ["Januar", "Februar", "März", "April", "Mai", "Juni", "Juli", "August", "September", "Oktober",
          "November", "Dezember"]

# intent -> (customer messages, data line, replies, facts). Slots: order, date, amount, days.
INTENTS = {
    "status": (
        ["Wo ist meine Bestellung {order}?", "Wann kommt mein Paket {order} an?",
         "Ich warte noch auf die Bestellung {order}. Können Sie nachsehen?", "Hallo, ist Bestellung {order} schon unterwegs?"],
        "Bestellung {order}: versandt, Zustellung am {date}",
        ["Guten Tag! Ihre Bestellung {order} ist unterwegs und wird am {date} zugestellt. Vielen Dank für Ihre Geduld!",
         "Hallo! Die Bestellung {order} wurde versandt und kommt am {date} bei Ihnen an. Danke für Ihren Einkauf!"],
        ["order", "date"],
    ),
    "refund": (
        ["Ich habe die Bestellung {order} zurückgeschickt. Wann bekomme ich mein Geld?",
         "Wann wird der Betrag für Bestellung {order} erstattet?", "Meine Rücksendung {order} ist angekommen, was passiert jetzt?"],
        "Bestellung {order}: Rückerstattung {amount}, Dauer {days} Werktage",
        ["Vielen Dank für Ihre Nachricht! Wir erstatten Ihnen {amount} für die Bestellung {order} innerhalb von {days} Werktagen.",
         "Guten Tag! Die Rückerstattung von {amount} für Bestellung {order} erhalten Sie in {days} Werktagen auf Ihrem Konto."],
        ["order", "amount", "days_fact"],
    ),
    "cancel": (
        ["Bitte stornieren Sie meine Bestellung {order}.", "Ich möchte die Bestellung {order} stornieren.",
         "Kann ich Bestellung {order} noch stornieren?"],
        "Bestellung {order}: storniert, Erstattung {amount}",
        ["Gerne! Ihre Bestellung {order} wurde storniert. Sie erhalten {amount} zurück.",
         "Guten Tag! Wir haben die Bestellung {order} storniert und erstatten Ihnen {amount}."],
        ["order", "amount"],
    ),
    "damaged": (
        ["Der Artikel aus Bestellung {order} ist kaputt angekommen.", "Meine Bestellung {order} war beschädigt. Was nun?",
         "In Bestellung {order} war ein defektes Teil."],
        "Bestellung {order}: Ersatz versandt, Zustellung am {date}",
        ["Das tut uns leid! Wir haben Ihnen für die Bestellung {order} einen Ersatz geschickt, der am {date} ankommt.",
         "Entschuldigen Sie bitte! Ein Ersatz für Bestellung {order} ist unterwegs und wird am {date} zugestellt."],
        ["order", "date"],
    ),
    "address": (
        ["Kann ich die Lieferadresse für Bestellung {order} ändern?", "Ich bin umgezogen. Geht eine neue Adresse für Bestellung {order}?"],
        "Bestellung {order}: Adressänderung möglich bis {date}",
        ["Ja, gerne! Sie können die Adresse für die Bestellung {order} bis zum {date} in Ihrem Konto ändern.",
         "Guten Tag! Die Lieferadresse für Bestellung {order} können Sie noch bis zum {date} ändern."],
        ["order", "date"],
    ),
}


def slots(rng: random.Random, held_out: bool) -> dict[str, str]:
    """Held-out values come from ranges training never draws from."""
    order = rng.randint(50000, 59999) if held_out else rng.randint(10000, 49999)
    day = rng.randint(1, 28)
    month = rng.choice(MONTHS[9:] if held_out else MONTHS[:9])
    euros = rng.randint(5, 199)
    cents = rng.choice([0, 50, 90, 95, 99] if held_out else [0, 10, 20, 49, 80])
    days = rng.choice([3, 7, 10] if held_out else [2, 4, 5, 14])
    return {"order": str(order), "date": f"{day}. {month}", "amount": f"{euros},{cents:02d} €",
            "days": str(days), "days_fact": f"{days} Werktag"}


def make(rng: random.Random, count: int, held_out: bool) -> list[dict]:
    records = []
    for _ in range(count):
        messages, data, replies, facts = INTENTS[rng.choice(sorted(INTENTS))]
        values = slots(rng, held_out)
        prompt = f"Kunde: {rng.choice(messages).format(**values)}\nDaten: {data.format(**values)}"
        records.append({"prompt": prompt, "completion": rng.choice(replies).format(**values),
                        "meta": {"facts": [values[f] for f in facts]}})
    return records


def main() -> None:
    rng = random.Random(SEED)
    train, held_out = make(rng, NUM_TRAIN, False), make(rng, NUM_EVAL, True)
    here = Path(__file__).parent
    for file, records in (("train.jsonl", train), ("eval.jsonl", held_out)):
        (here / file).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    print(f"wrote {len(train)} training and {len(held_out)} held-out examples to {here}")


if __name__ == "__main__":
    main()
