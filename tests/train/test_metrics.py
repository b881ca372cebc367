"""Held-out metrics: what counts as right, and what does not."""

from __future__ import annotations

import json

from hotswap.train.data import Example
from hotswap.train.langid import detect_language
from hotswap.train.metrics import json_fields, normalize_sql, sql_exact_match, support_reply


def _ex(completion: str, **meta) -> Example:
    return Example(({"role": "user", "content": "q"},), completion, meta)


def test_sql_normalisation():
    ref = "SELECT name FROM customers WHERE city = 'Lyon' ORDER BY name;"
    assert normalize_sql("select  name\nfrom CUSTOMERS where city='Lyon' order by name") == normalize_sql(ref)
    assert normalize_sql("```sql\nSELECT name FROM customers WHERE city = 'Lyon' ORDER BY name\n```") == normalize_sql(ref)
    assert sql_exact_match("SELECT name FROM customers WHERE city = 'lyon' ORDER BY name", _ex(ref), "en") == {
        "sql_exact_match": 0.0}  # literals keep their case
    assert sql_exact_match("SELECT name FROM customers", _ex(ref), "en")["sql_exact_match"] == 0.0
    assert normalize_sql("a != 1") == normalize_sql("a <> 1")
    # no character is dropped: queries that differ in anything but case and spacing stay apart
    assert normalize_sql("SELECT a || b FROM t") != normalize_sql("SELECT a b FROM t")
    assert normalize_sql('SELECT x FROM t WHERE city = "Paris"') != normalize_sql("SELECT x FROM t WHERE city = paris")
    assert normalize_sql("SELECT ä FROM t") != normalize_sql("SELECT ö FROM t")
    assert normalize_sql("SELECT `a` FROM t") != normalize_sql("SELECT a FROM t")


def test_json_fields():
    want = json.dumps({"name": "Ana Ruiz", "party_size": 4, "time": "19:00"})
    right = json_fields('{"time": "19:00", "party_size": 4, "name": "ana ruiz"}', _ex(want), "en")
    assert right == {"json_fields": 1.0, "json_valid": 1.0, "field_accuracy": 1.0}
    wrong_type = json_fields('{"time": "19:00", "party_size": "4", "name": "Ana Ruiz"}', _ex(want), "en")
    assert wrong_type["json_fields"] == 0.0 and abs(wrong_type["field_accuracy"] - 2 / 3) < 1e-9
    extra = json_fields('{"time": "19:00", "party_size": 4, "name": "Ana Ruiz", "x": 1}', _ex(want), "en")
    assert extra["json_fields"] == 0.0 and extra["field_accuracy"] == 1.0
    assert json_fields("Sure! Here is the JSON", _ex(want), "en")["json_valid"] == 0.0


def test_language_identification():
    assert detect_language("Ihre Bestellung 48213 wurde versandt und kommt am 12. März an.") == "de"
    assert detect_language("Su pedido 48213 fue enviado y llegará el 12 de marzo.") == "es"
    assert detect_language("Your order 48213 has been shipped and will arrive on March 12.") == "en"
    assert detect_language("48213") == "und"


def test_support_reply_needs_language_and_every_fact():
    example = _ex("ignored", facts=["48213", "12. März"])
    good = support_reply("Ihre Bestellung 48213 wird am 12. März geliefert. Danke für Ihre Geduld!", example, "de")
    assert good == {"support_reply": 1.0, "right_language": 1.0, "facts_recall": 1.0}
    english = support_reply("Your order 48213 will arrive on 12. März, thank you.", example, "de")
    assert english["support_reply"] == 0.0 and english["facts_recall"] == 1.0
    missing = support_reply("Ihre Bestellung 48213 ist unterwegs. Danke!", example, "de-DE")
    assert missing["support_reply"] == 0.0 and missing["right_language"] == 1.0 and missing["facts_recall"] == 0.5


def test_support_reply_facts_are_whole_not_inside_longer_numbers():
    """Order 58963 is not stated by 589631, 3,50 € not by 103,50 €, 6. Oktober not by 16. Oktober;
    a fact may run on into a longer word (3 Werktag, 3 Werktagen)."""
    example = _ex("ignored", facts=["58963", "3,50 €", "6. Oktober"])
    wrong = support_reply("Ihre Bestellung 589631 wird storniert. Sie erhalten 103,50 € zurück, bis zum 16. Oktober.",
                          example, "de")
    assert wrong["facts_recall"] == 0.0 and wrong["support_reply"] == 0.0
    right = support_reply("Ihre Bestellung 58963 wird storniert. Sie erhalten 3,50 € zurück, bis zum 6. Oktober.",
                          example, "de")
    assert right["support_reply"] == 1.0
    assert support_reply("Die Lieferung dauert 3 Werktagen, danke.", _ex("x", facts=["3 Werktag"]),
                         "de")["facts_recall"] == 1.0


def test_support_reply_references_need_their_facts():
    import pytest

    from hotswap.train.errors import DataError
    from hotswap.train.metrics import check_references

    for facts in (None, "55675", 5, [], ["ok", 3]):
        meta = {} if facts is None else {"facts": facts}
        with pytest.raises(DataError, match="example 1: metric support_reply needs meta.facts"):
            check_references("support_reply", [_ex("reply", **meta)], "eval.jsonl")
    check_references("support_reply", [_ex("reply", facts=["55675"])], "eval.jsonl")
