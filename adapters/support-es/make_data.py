"""Writes train.jsonl and eval.jsonl for the `support-es` recipe: a Spanish customer message plus the
shop's order data, answered by a short, friendly Spanish reply that states the facts.

Each example's meta.facts lists what the reply must contain verbatim (order number, date,
amount with its currency, number of working days); the `support_reply` metric also checks the
reply is Spanish. Deterministic (fixed seed); held-out examples use order numbers, dates and
amounts not seen in training.
Run: python adapters/support-es/make_data.py"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20261128
NUM_TRAIN, NUM_EVAL = 300, 60
MONTHS = ["enero", "febrero", "marzo", "abril", "mayo", "junio", "julio", "agosto", "septiembre", "octubre",
          "noviembre", "diciembre"]

# intent -> (customer messages, data line, replies, facts). Slots: order, date, amount, days.
INTENTS = {
    "status": (
        ["¿Dónde está mi pedido {order}?", "¿Cuándo llega mi paquete {order}?",
         "Todavía espero el pedido {order}. ¿Pueden revisarlo?", "Hola, ¿el pedido {order} ya está en camino?"],
        "Pedido {order}: enviado, entrega el {date}",
        ["¡Hola! Su pedido {order} está en camino y llegará el {date}. ¡Gracias por su paciencia!",
         "¡Buenos días! Hemos enviado el pedido {order} y se entregará el {date}. Gracias por su compra."],
        ["order", "date"],
    ),
    "refund": (
        ["Devolví el pedido {order}. ¿Cuándo recibo mi dinero?", "¿Cuándo me reembolsan el pedido {order}?",
         "Mi devolución del pedido {order} ya llegó, ¿y ahora qué?"],
        "Pedido {order}: reembolso {amount}, plazo {days} días hábiles",
        ["¡Gracias por su mensaje! Le reembolsaremos {amount} del pedido {order} en {days} días hábiles.",
         "¡Buenos días! Recibirá el reembolso de {amount} por el pedido {order} en un plazo de {days} días hábiles."],
        ["order", "amount", "days_fact"],
    ),
    "cancel": (
        ["Por favor, cancelen mi pedido {order}.", "Quiero cancelar el pedido {order}.",
         "¿Todavía puedo cancelar el pedido {order}?"],
        "Pedido {order}: cancelado, reembolso {amount}",
        ["¡Por supuesto! Su pedido {order} ha sido cancelado. Le devolveremos {amount}.",
         "¡Buenos días! Hemos cancelado el pedido {order} y le reembolsaremos {amount}."],
        ["order", "amount"],
    ),
    "damaged": (
        ["El artículo del pedido {order} llegó roto.", "Mi pedido {order} llegó dañado. ¿Qué hago?",
         "En el pedido {order} había una pieza defectuosa."],
        "Pedido {order}: reemplazo enviado, entrega el {date}",
        ["¡Lo sentimos mucho! Le hemos enviado un reemplazo del pedido {order} que llegará el {date}.",
         "¡Disculpe las molestias! El reemplazo del pedido {order} está en camino y se entregará el {date}."],
        ["order", "date"],
    ),
    "address": (
        ["¿Puedo cambiar la dirección de entrega del pedido {order}?", "Me mudé. ¿Puedo poner una nueva dirección en el pedido {order}?"],
        "Pedido {order}: cambio de dirección posible hasta el {date}",
        ["¡Claro que sí! Puede cambiar la dirección del pedido {order} en su cuenta hasta el {date}.",
         "¡Buenos días! Todavía puede cambiar la dirección de entrega del pedido {order} hasta el {date}."],
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
    return {"order": str(order), "date": f"{day} de {month}", "amount": f"{euros},{cents:02d} €",
            "days": str(days), "days_fact": f"{days} días hábiles"}


def make(rng: random.Random, count: int, held_out: bool) -> list[dict]:
    records = []
    for _ in range(count):
        messages, data, replies, facts = INTENTS[rng.choice(sorted(INTENTS))]
        values = slots(rng, held_out)
        prompt = f"Cliente: {rng.choice(messages).format(**values)}\nDatos: {data.format(**values)}"
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
