"""Writes train.jsonl and eval.jsonl for the `sql` recipe: English questions about a small fixed
shop schema (given in the recipe's system prompt), answered by one SQLite query in a canonical form.

Deterministic (fixed seed). Held-out questions use cities, names, products and numbers that
never appear in training, so the score measures the mapping, not memorised strings.
Run: python adapters/sql/make_data.py"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20261127
NUM_TRAIN, NUM_EVAL = 300, 60

CITIES = ["Lyon", "Porto", "Oslo", "Krakow", "Dublin", "Turin", "Ghent", "Bergen", "Malaga", "Graz",
          "Leeds", "Basel", "Seville", "Tampere", "Brno", "Aarhus", "Cork", "Nantes", "Bilbao", "Utrecht",
          "Riga", "Split", "Lille", "Padua"]
NAMES = ["Ana Ruiz", "Tom Berg", "Mia Novak", "Leo Costa", "Eva Lind", "Max Weber", "Ida Holm", "Noah Fox",
         "Zoe Marin", "Ben Kane", "Lena Vogel", "Omar Haddad", "Sara Blom", "Ivan Petrov", "Julia Rossi",
         "Finn Moller", "Nora Quinn", "Paul Duval", "Rita Sousa", "Hugo Laine", "Alma Stein", "Karl Nagy"]
PRODUCTS = ["lamp", "desk", "chair", "kettle", "blender", "rug", "mirror", "shelf", "toaster", "clock",
            "pillow", "vase", "stool", "heater", "fan", "sofa"]
STATUSES = ["shipped", "pending", "cancelled", "delivered", "returned"]

# (question phrasings, SQL) with {slots}; each template draws its own slot values.
TEMPLATES: list[tuple[list[str], str]] = [
    (["List the names of customers in {city}.", "Which customers live in {city}?",
      "Show the names of all customers from {city}."],
     "SELECT name FROM customers WHERE city = '{city}';"),
    (["How many customers live in {city}?", "Count the customers in {city}.",
      "What is the number of customers from {city}?"],
     "SELECT COUNT(*) FROM customers WHERE city = '{city}';"),
    (["Which customers joined after {year}?", "List customers who joined later than {year}.",
      "Show names of customers with a joined year above {year}."],
     "SELECT name FROM customers WHERE joined_year > {year};"),
    (["How many customers joined in {year}?", "Count customers whose joined year is {year}."],
     "SELECT COUNT(*) FROM customers WHERE joined_year = {year};"),
    (["How many orders are {status}?", "Count the {status} orders.", "What is the number of orders with status {status}?"],
     "SELECT COUNT(*) FROM orders WHERE status = '{status}';"),
    (["What is the total amount of {status} orders?", "Sum the amounts of all {status} orders."],
     "SELECT SUM(amount) FROM orders WHERE status = '{status}';"),
    (["Show the orders over {amount}.", "List order ids and amounts for orders above {amount}.",
      "Which orders have an amount greater than {amount}?"],
     "SELECT id, amount FROM orders WHERE amount > {amount};"),
    (["What is the average amount of {product} orders?", "Give the mean order amount for the product {product}."],
     "SELECT AVG(amount) FROM orders WHERE product = '{product}';"),
    (["How many {product} orders are there?", "Count the orders for {product}."],
     "SELECT COUNT(*) FROM orders WHERE product = '{product}';"),
    (["How many orders did {name} place?", "Count the orders of the customer {name}."],
     "SELECT COUNT(*) FROM orders JOIN customers ON orders.customer_id = customers.id "
     "WHERE customers.name = '{name}';"),
    (["Which products were ordered by customers in {city}?", "List the distinct products bought by customers from {city}."],
     "SELECT DISTINCT orders.product FROM orders JOIN customers ON orders.customer_id = customers.id "
     "WHERE customers.city = '{city}';"),
    (["Who are the top {n} customers by total amount spent?", "List the {n} customers who spent the most."],
     "SELECT customers.name, SUM(orders.amount) AS total FROM customers JOIN orders ON "
     "orders.customer_id = customers.id GROUP BY customers.name ORDER BY total DESC LIMIT {n};"),
]


def split_values(rng: random.Random) -> tuple[dict, dict]:
    """Slot values for training and for the held-out set, disjoint for the string slots."""
    def halves(values: list[str], held: int) -> tuple[list[str], list[str]]:
        shuffled = values[:]
        rng.shuffle(shuffled)
        return shuffled[held:], shuffled[:held]

    cities, names, products = halves(CITIES, 6), halves(NAMES, 6), halves(PRODUCTS, 4)
    train = {"city": cities[0], "name": names[0], "product": products[0], "status": STATUSES,
             "year": list(range(2012, 2020)), "amount": [50, 100, 150, 200, 300, 400], "n": [3, 5, 10]}
    held = {"city": cities[1], "name": names[1], "product": products[1], "status": STATUSES,
            "year": list(range(2020, 2025)), "amount": [75, 120, 250, 500], "n": [2, 4, 7]}
    return train, held


def make(rng: random.Random, values: dict, count: int, seen: set[str]) -> list[dict]:
    records: list[dict] = []
    for _attempt in range(100 * count):
        if len(records) == count:
            break
        phrasings, sql = rng.choice(TEMPLATES)
        slots = {key: rng.choice(options) for key, options in values.items()}
        question = rng.choice(phrasings).format(**slots)
        if question in seen:
            continue
        seen.add(question)
        records.append({"prompt": question, "completion": sql.format(**slots)})
    if len(records) < count:
        raise SystemExit(f"only {len(records)} distinct questions; lower the count or add templates")
    return records


def main() -> None:
    rng = random.Random(SEED)
    train_values, held_values = split_values(rng)
    seen: set[str] = set()
    train = make(rng, train_values, NUM_TRAIN, seen)
    held_out = make(rng, held_values, NUM_EVAL, seen)
    here = Path(__file__).parent
    for name, records in (("train.jsonl", train), ("eval.jsonl", held_out)):
        (here / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    print(f"wrote {len(train)} training and {len(held_out)} held-out examples to {here}")


if __name__ == "__main__":
    main()
