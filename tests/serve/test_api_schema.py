"""/schema: typed bodies and responses for every operation, and a small schema-driven fuzz that finds no
server error (bodies drawn from the published schema alone, sent to the real engine)."""

from __future__ import annotations

import random

import pytest

from .api_support import ADMIN, BASE, client, served, store  # noqa: F401

OPERATIONS = {
    ("post", "/v1/completions"), ("post", "/v1/chat/completions"), ("get", "/v1/models"),
    ("get", "/v1/models/{model}"), ("get", "/v1/adapters"), ("get", "/v1/adapters/{ref}"),
    ("post", "/v1/adapters/{ref}/load"), ("post", "/v1/adapters/{ref}/unload"), ("post", "/v1/adapters/{ref}/pin"),
    ("post", "/v1/adapters/{ref}/unpin"), ("post", "/v1/hub/publish"), ("get", "/v1/hub/{name}"),
    ("put", "/v1/hub/{name}/aliases/{alias}"), ("delete", "/v1/hub/{name}/aliases/{alias}"),
    ("get", "/health"), ("get", "/ready"), ("get", "/metrics"), ("post", "/tokenize"), ("post", "/detokenize"),
    ("post", "/classify"), ("post", "/v1/classify"),
}
KEYED = ("/metrics", "/tokenize", "/detokenize", "/classify")


@pytest.fixture(scope="module")
def schema(client) -> dict:
    response = client.get("/schema/openapi.json")
    assert response.status_code == 200
    return response.json()


def resolve(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


def test_every_operation_is_typed(schema):
    found = {(m, p) for p, ops in schema["paths"].items() for m in ops}
    assert found == OPERATIONS
    assert schema["components"]["securitySchemes"]["BearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "An API key."}
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            ok = [c for c in op["responses"] if c.startswith("2")]
            assert len(ok) == 1, (method, path)
            content = op["responses"][ok[0]]["content"]
            media = "text/plain; version=0.0.4; charset=utf-8" if path == "/metrics" else "application/json"
            assert set(content) == {media}, (path, content)
            if media == "application/json":
                assert resolve(schema, content[media]["schema"]).get("properties"), (method, path)
            for code, response in op["responses"].items():
                if code.startswith("4") or (code == "503" and path not in ("/ready", "/health")):
                    assert response["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/ErrorResponse"}, (method, path, code)
            assert op.get("security") == ([{"BearerAuth": []}] if path.startswith("/v1/") or path in KEYED
                                          else None), (method, path)
    for path, media, model, required in [
        ("/v1/completions", "application/json", "CompletionRequest", {"model", "prompt"}),
        ("/v1/chat/completions", "application/json", "ChatCompletionRequest", {"model", "messages"}),
        ("/v1/classify", "application/json", "ClassifyRequest", {"model", "input"}),
        ("/v1/hub/publish", "multipart/form-data", "PublishForm", {"name", "files"}),
        ("/v1/hub/{name}/aliases/{alias}", "application/json", "AliasMove", {"version"}),
    ]:
        op = next(iter(o for o in schema["paths"][path].values() if "requestBody" in o))
        body = op["requestBody"]["content"][media]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
        assert set(resolve(schema, body)["required"]) == required


def test_pinned_out_is_documented_where_it_can_answer(schema):
    """A request or a load for an adapter that fits only in manually pinned rows answers 409 `pinned_out`."""
    for method, path in [("post", "/v1/completions"), ("post", "/v1/chat/completions"), ("post", "/v1/classify"),
                         ("post", "/classify"), ("post", "/v1/adapters/{ref}/load"), ("post", "/v1/adapters/{ref}/pin")]:
        response = schema["paths"][path][method]["responses"]["409"]
        assert "pinned_out" in response["description"], (method, path)


def test_request_constraints_are_in_the_schema(schema):
    props = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert props["temperature"]["minimum"] == 0 and props["temperature"]["maximum"] == 2
    assert props["top_p"]["exclusiveMinimum"] == 0 and props["n"]["maximum"] == 128
    assert props["suffix"]["type"] == "null"  # unsupported: only null is valid
    assert (props["logprobs"]["minimum"], props["logprobs"]["maximum"]) == (0, 20)
    assert (props["presence_penalty"]["minimum"], props["presence_penalty"]["maximum"]) == (-2, 2)
    text, texts, ids, id_lists = props["prompt"]["oneOf"]
    assert text == {"minLength": 1, "type": "string"} and ids["items"]["minimum"] == 0 and ids["minItems"] == 1


class Draw:
    """Schema-valid values from a JSON schema (the subset OpenAPI uses here), small numbers favoured."""

    def __init__(self, schema: dict, seed: int) -> None:
        self.schema, self.rng = schema, random.Random(seed)

    def value(self, node: dict):
        node = resolve(self.schema, node)
        rng = self.rng
        if "oneOf" in node:
            merged = {k: v for k, v in node.items() if k != "oneOf"}
            return self.value({**merged, **rng.choice(node["oneOf"])})
        if "enum" in node:
            return rng.choice(node["enum"])
        kind = node.get("type")
        if isinstance(kind, list):
            kind = rng.choice(kind)
        if kind == "null":
            return None
        if kind == "boolean":
            return rng.random() < 0.5
        if kind in ("integer", "number"):
            exclusive = "exclusiveMinimum" in node
            low = node.get("minimum", node.get("exclusiveMinimum", -3))
            high = min(node.get("maximum", low + 12), low + 12)
            if kind == "integer":
                return rng.randint(int(low) + exclusive, int(high))
            number = rng.uniform(low, high)
            return (low + high) / 2 if exclusive and number <= low else number
        if kind == "string":
            size = rng.randint(node.get("minLength", 0), min(node.get("maxLength", 12), 12))
            return "".join(rng.choice("ab cdéz\n{}\"") for _ in range(size))
        if kind == "array":
            size = rng.randint(node.get("minItems", 0), min(node.get("maxItems", 3), 3))
            return [self.value(node.get("items", {})) for _ in range(size)]
        if kind == "object" or "properties" in node:
            required = set(node.get("required", []))
            return {k: self.value(v) for k, v in node.get("properties", {}).items()
                    if k in required or rng.random() < 0.4}
        return None


# /tokenize takes exactly one of prompt and messages, which its schema cannot say: fewer drawn bodies are served
@pytest.mark.parametrize("path, model, at_least", [("/v1/completions", "CompletionRequest", 10),
                                                   ("/v1/chat/completions", "ChatCompletionRequest", 10),
                                                   ("/tokenize", "TokenizeRequest", 5),
                                                   ("/detokenize", "DetokenizeRequest", 10),
                                                   # no classification adapter in this store: each is refused
                                                   ("/v1/classify", "ClassifyRequest", 0)])
def test_schema_valid_bodies_never_cause_a_server_error(client, schema, path, model, at_least):
    draw = Draw(schema, seed=len(path))
    statuses = []
    for _ in range(40):
        body = draw.value({"$ref": f"#/components/schemas/{model}"})
        body["model"] = draw.rng.choice([BASE, BASE, "acme-sql", "acme-sql@prod", body["model"]])
        response = client.post(path, json=body, headers=ADMIN)
        statuses.append(response.status_code)
        assert response.status_code < 500, (body, response.text)
        if response.status_code != 200:
            error = response.json()["error"]
            assert error["message"] and error["type"], body
    assert statuses.count(200) >= at_least, statuses  # drawn bodies are served, not merely refused


def test_without_keys_the_schema_asks_for_none(store):
    from litestar.testing import TestClient

    from .api_support import make_app

    app, _ = make_app(store.home, keys=[])
    schema = TestClient(app).get("/schema/openapi.json").json()  # no lifespan needed for the schema
    assert "securitySchemes" not in schema.get("components", {})
    assert all("security" not in op for ops in schema["paths"].values() for op in ops.values())
